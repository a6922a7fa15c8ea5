#!/usr/bin/env bash
# Screenshots of a results folder's pages as a reader sees them, with headless Chromium:
# index.html and the reports, full length, for a look with an image viewer.
#
#   scripts/screenshot.sh RESULTS_DIR [OUT_DIR] [REPORT ...]
#
#   RESULTS_DIR  a profile's results folder, e.g. results/demo (holds index.html, reports/)
#   OUT_DIR      where the PNGs go (default: RESULTS_DIR/screenshots)
#   REPORT       report names to shoot besides the index (default: 01_tuning_methods);
#                "all" shoots every report
#
# Needs Chromium (Debian/Ubuntu: apt-get install chromium; or set CHROMIUM=/path/to/chrome).
# Pages are opened as files with the network off, as a reader offline would see them.
# Env: WIDTH (default 1280) and HEIGHT (default 2400) set the window, i.e. the capture.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
[ $# -ge 1 ] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0 ;; esac
results="$(cd "$1" 2>/dev/null && pwd)" || { echo "screenshot.sh: no folder '$1'" >&2; exit 2; }
[ -f "$results/index.html" ] || {
    echo "screenshot.sh: '$1' has no index.html; give a profile's results folder, e.g. results/demo" >&2
    exit 2
}
out="${2:-$results/screenshots}"
shift $(( $# >= 2 ? 2 : 1 ))
reports=("$@")
[ ${#reports[@]} -gt 0 ] || reports=(01_tuning_methods)
if [ "${reports[0]}" = all ]; then
    reports=()
    for page in "$results"/reports/*.html; do reports+=("$(basename "$page" .html)"); done
fi

browser="${CHROMIUM:-}"
for candidate in chromium chromium-browser google-chrome; do
    [ -n "$browser" ] && break
    browser="$(command -v "$candidate" || true)"
done
[ -n "$browser" ] || {
    echo "screenshot.sh: no Chromium found; install it (apt-get install chromium) or set CHROMIUM" >&2
    exit 2
}

mkdir -p "$out"
profile_dir="$(mktemp -d)"
trap 'rm -rf "$profile_dir"' EXIT

shoot() {  # shoot PAGE.html NAME.png
    [ -f "$1" ] || { echo "screenshot.sh: no page $1" >&2; return 1; }
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
        --user-data-dir="$profile_dir" --proxy-server="127.0.0.1:9" \
        --window-size="${WIDTH:-1280},${HEIGHT:-2400}" --screenshot="$out/$2" \
        "file://$1" >/dev/null 2>&1
    echo "$out/$2"
}

shoot "$results/index.html" index.png
for name in "${reports[@]}"; do
    shoot "$results/reports/$name.html" "$name.png"
done
