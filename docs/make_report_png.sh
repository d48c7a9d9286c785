#!/usr/bin/env bash
# docs/make_report_png.sh RUN [OUT.png]: the README's picture, remade from a study run folder (one seed of
# `nfed demo`, RUN/{local,federated,...}): `nfed report --run RUN` into a temporary folder, then headless
# Chromium's screenshot of report.html (the top 1590 px at 1280 px wide), reduced to 128 colours so the PNG stays
# small. Run it from the repository root after every change to the report, and say in the README which run it shows.
# NFED (default: nfed on PATH) and NFED_CHROMIUM (default: chromium, chromium-browser or google-chrome) override.
set -euo pipefail
run=${1:?usage: docs/make_report_png.sh RUN [OUT.png]}
out=${2:-docs/report.png}
nfed=${NFED:-nfed}
chromium=${NFED_CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -n "$chromium" ] || { echo "Error: no Chromium found (apt-get install chromium, or set NFED_CHROMIUM)" >&2; exit 1; }
python=$(dirname "$(command -v "$nfed")")/python
[ -x "$python" ] || python=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$nfed" report --run "$run" --out "$work/report" >/dev/null
"$chromium" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/profile" \
    --window-size=1280,1590 --screenshot="$work/shot.png" "file://$work/report/report.html" 2>/dev/null
"$python" - "$work/shot.png" "$out" <<'PY'
import sys
from PIL import Image
Image.open(sys.argv[1]).convert("RGB").quantize(128).save(sys.argv[2], optimize=True)
PY
echo "wrote $out from $run"
