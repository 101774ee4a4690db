#!/usr/bin/env bash
# Renders the shootout's HTML report the way a reader sees it, in headless
# Chromium, into docs/: the top of the report (summary, legend, the first
# scenario) and the gc-pause plot (the one whose labels used to pile up).
# Needs chromium (Debian: apt-get install chromium). Runs the quick
# shootout first, so the pictures show this checkout's code.
set -euo pipefail
cd "$(dirname "$0")/../.."
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "no chromium found: apt-get install chromium" >&2
  exit 1
fi
cargo run --release --quiet --example shootout -- --quick >/dev/null
mkdir -p docs
shot() { # url width height output
  "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size="$2,$3" --screenshot="$4" "$1" 2>/dev/null
}
shot "file://$PWD/target/shootout/report.html" 960 1800 docs/shootout-report.png
shot "file://$PWD/target/shootout/gc-pause.svg" 900 420 docs/shootout-gc-pause.png
echo "wrote docs/shootout-report.png and docs/shootout-gc-pause.png"
