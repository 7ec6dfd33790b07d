"""Lay out the shipped workflows so that, opened in a 1600x1000 browser window, the note and every node
lie inside the visible canvas at the workflow's stored view (`extra.ds`), without overlaps.

    python tools/workflow_layout.py            # rewrite workflows/*.json (positions, note size, extra.ds)

Nodes go in columns (left to right as the data flows), stacked with a gap; the stored view is the largest
scale up to MAX_SCALE that fits the whole graph into the canvas of the default front-end layout. Node sizes
are taken from the files: re-serialize the workflows through the front end first when nodes gained inputs
(tests/comfyui/browser_check.js serialize), then run this. The browser test checks the result on screen.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from workflow_models import write_json  # noqa: E402

# The graph canvas of ComfyUI's front end (1.27) in a 1600x1000 window: the 64 px side bar on the left and
# the 78 px tab + menu bars on top leave 1536 x 922 px. The minimap and the zoom buttons cover the bottom
# right corner (about 330 x 270 px): the last column is kept short (SHORT_LAST_COLUMN) to leave it free.
CANVAS = (1536, 922)
CORNER = (330, 270)
MARGIN = 16           # px around the graph
MAX_SCALE = 0.8
TITLE = 30            # LiteGraph title bar height (graph units), drawn above a node's pos
GAP = (40, 30)        # between columns / between stacked nodes, graph units (besides the title bar)
NOTE_TYPES = {"MarkdownNote", "Note"}

# Columns of node ids per workflow, in the order the data flows; the note first (top left).
COLUMNS = {
    "Bokeh Lens Blur (classical, no weights).json": [[1, 2, 3], [4], [5, 7], [6]],
    "Refocus a Photo (DeblurNet, BokehNet).json": [[1, 2, 3], [4, 5, 13, 14], [6, 7, 8, 12], [9], [10, 11]],
    "Refocus a Photo in Tiles (DeblurNet, BokehNet).json": [[1, 2, 3], [4, 5, 12, 13], [6, 7, 8], [9], [10, 11]],
    "Sharpen a Blurry Photo (DeblurNet).json": [[1, 2, 3], [4, 7, 8], [5], [6]],
    "Rack Focus from a Still (classical, no weights).json": [[1, 2, 3], [4], [5], [6]],
    "Focus Pull over a Clip (classical, no weights).json": [[1, 2], [3], [4], [5]],
    "Text to Image, then Refocus (BokehNet).json":
        [[1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [11, 12, 13, 17], [14], [15, 16]],
}
NOTE_HEIGHT = 330
# Sizes of display nodes (image previews) so that the columns stay within the canvas.
DISPLAY_SIZE = {"SaveImage": (400, 380), "PreviewImage": (300, 280)}


def layout(ui: dict, columns: list[list[int]]) -> dict:
    nodes = {n["id"]: n for n in ui["nodes"]}
    placed = [i for col in columns for i in col]
    if sorted(placed) != sorted(nodes):
        raise SystemExit(f"layout columns {sorted(placed)} do not match the nodes {sorted(nodes)}")
    x = 0
    bottoms = []
    for col in columns:
        for i in col:
            n = nodes[i]
            if n["type"] in DISPLAY_SIZE:
                n["size"] = list(DISPLAY_SIZE[n["type"]])
        width = max(nodes[i]["size"][0] for i in col if nodes[i]["type"] not in NOTE_TYPES)
        y = 0
        for i in col:
            n = nodes[i]
            if n["type"] in NOTE_TYPES:
                n["size"] = [width, NOTE_HEIGHT]
            n["pos"] = [x, y]
            y += n["size"][1] + TITLE + GAP[1]
        bottoms.append((x, width, y - GAP[1] - TITLE))
        x += width + GAP[0]
    right = x - GAP[0]
    bottom = max(b for _, _, b in bottoms)
    width, height = right, bottom + TITLE
    scale = min(MAX_SCALE, (CANVAS[0] - 2 * MARGIN) / width, (CANVAS[1] - 2 * MARGIN) / height)
    scale = math.floor(scale * 100) / 100
    # the last column must end above the minimap corner
    last_x, _, last_bottom = bottoms[-1]
    corner_top = (CANVAS[1] - CORNER[1]) / scale - MARGIN / scale - TITLE
    if last_bottom > corner_top:
        raise SystemExit(f"last column reaches {last_bottom:.0f}, the minimap corner starts at {corner_top:.0f}")
    ui.setdefault("extra", {})["ds"] = {"scale": scale, "offset": [MARGIN / scale, MARGIN / scale + TITLE]}
    return ui


def main() -> int:
    for name, columns in COLUMNS.items():
        path = ROOT.parent / "workflows" / name
        ui = layout(json.loads(path.read_text()), columns)
        write_json(path, ui)
        print(f"{name}: scale {ui['extra']['ds']['scale']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
