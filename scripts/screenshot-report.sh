#!/usr/bin/env bash
# Screenshots an HTML report with headless Chromium (Debian package `chromium`), e.g. to check
# how a report looks without a browser. Usage: scripts/screenshot-report.sh REPORT.html OUT.png
# Optional: WINDOW=1400,4000 (width,height in pixels).
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 REPORT.html OUT.png" >&2
    exit 2
fi
report=$(realpath "$1")
out=$(realpath -m "$2")
[ -f "$report" ] || { echo "no such report: $1" >&2; exit 1; }

chromium_bin=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$chromium_bin" ]; then
    echo "chromium not found; install it with: apt-get install -y chromium" >&2
    exit 1
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# No network of any kind: the report is self-contained and the screenshot must prove it.
"$chromium_bin" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out" --window-size="${WINDOW:-1400,4000}" \
    "file://$report" 2> >(grep -v -e 'dbus' -e 'Fontconfig' >&2 || true)
[ -s "$out" ] || { echo "no screenshot written" >&2; exit 1; }
echo "$out"
