#!/usr/bin/env bash
# Measure the classical renderer with ../shared/tools/bokeh (metrics + timing), circle and hexagon,
# 512 and 1024 px scenes. Prints measure.py's figures; JSON results go to $OUT (default /tmp).
#   bench/run_bokeh_measure.sh                 # all
#   APERTURES=circle SIZES=512 bench/run_bokeh_measure.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${BOKEH_TOOLS:-../shared/tools/bokeh}"
SCENES="${BOKEH_SCENES:-$HOME/.cache/genrefocus-bokeh-scenes}"
SIZES="${SIZES:-512 1024}"
APERTURES="${APERTURES:-circle poly6}"
OUT="${OUT:-/tmp}"
KWARGS="${KWARGS:-}"   # e.g. KWARGS='{"quality": "fast"}'
[ -n "$KWARGS" ] || KWARGS='{}'
export BOKEH_THREADS="${BOKEH_THREADS:-2}" BOKEH_SCENES="$SCENES"
for s in $SIZES; do
  [ -f "$SCENES/flat_$s.npz" ] || python "$TOOLS/make_scenes.py" --sizes "$s" --out "$SCENES"
done
echo "machine: $(nproc) cores, torch threads $BOKEH_THREADS, $(uptime | sed 's/.*load/load/')"
for ap in $APERTURES; do
  echo "== aperture $ap"
  python "$TOOLS/measure.py" --renderer bench/bokeh_adapter.py:render --sizes $SIZES --timing-sizes $SIZES \
    --aperture "$ap" --kwargs "$KWARGS" --json "$OUT/bokeh_measure_$ap.json" | grep -v "^     {"
done
echo "after: $(uptime | sed 's/.*load/load/')"
