#!/bin/sh
# Screenshot a run's report.html with headless Chromium (Debian: apt-get install chromium-headless-shell).
#   benchmarks/report/screenshot_report.sh [REPORT_HTML] [OUT_PNG] [WIDTH] [HEIGHT]
set -eu
report=$(realpath "${1:-results/run-default/report.html}")
out=${2:-/tmp/report.png}
width=${3:-1280}
height=${4:-4000}
browser=$(command -v chromium-headless-shell || command -v chromium || command -v chromium-browser) || {
    echo "no headless Chromium found: apt-get install -y chromium-headless-shell" >&2
    exit 2
}
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --allow-file-access-from-files \
    --screenshot="$out" --window-size="$width,$height" "file://$report" 2>/dev/null
echo "wrote $out ($width x $height) of $report"
