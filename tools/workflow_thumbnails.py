"""Thumbnails `<name>.jpg` beside each shipped workflow (ComfyUI's template browser asks for them).

    GENREFOCUS_SCREENSHOTS=/tmp/shots python -m pytest -m browser tests/comfyui -k inside_the_view
    python tools/workflow_thumbnails.py /tmp/shots/stored_view

Each thumbnail is the workflow's screenshot in the real front end at its stored view (the canvas only),
with the title of its note as a caption. The classical workflow needs no weights, so its thumbnail is its
own output: the nodes of the file are run here with the file's widget values.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "comfyui"))

SIZE = (640, 400)
CAPTION_H = 56
# the canvas of a 1600x1000 screenshot of front end 1.27 (side bar and top bars cut off)
CANVAS_BOX = (64, 78, 1600, 1000)
RENDERED = {"Bokeh Lens Blur (classical, no weights).json"}


def note_title(ui: dict) -> str:
    """The first markdown heading of the workflow's note, without the 'GenRefocus:' prefix."""
    for n in ui["nodes"]:
        if n["type"] in ("MarkdownNote", "Note") and n.get("widgets_values"):
            m = re.search(r"^#+\s*(.+)$", str(n["widgets_values"][0]), re.M)
            if m:
                return re.sub(r"^GenRefocus:\s*", "", m.group(1)).strip()
    return ui.get("name", "GenRefocus")


def render_classical(ui: dict) -> Image.Image:
    """Run Test Scene -> Aperture Shape -> Defocus Map -> classical renderer with the file's widget values."""
    import numpy as np
    from nodes import collect_nodes
    from ui_to_api import widget_inputs
    classes, _, _ = collect_nodes()
    values = {}
    for n in ui["nodes"]:
        cls = classes.get(n["type"])
        if cls is None:
            continue
        spec = widget_inputs({"input": cls.INPUT_TYPES()})
        vals, i = {}, 0
        for name, _, extra in spec:
            if i >= len(n["widgets_values"]):
                break  # widgets added after the file was saved: the node's defaults
            vals[name] = n["widgets_values"][i]
            i += 1 + extra
        values[n["type"]] = vals
    image, depth, _ = classes["GenRefocusScene"]().make(**values["GenRefocusScene"])
    aperture, _ = classes["GenRefocusApertureShape"]().make(**values["GenRefocusApertureShape"])
    defocus = classes["GenRefocusDefocusMap"]().build(depth, **values["GenRefocusDefocusMap"], image=image)["result"][0]
    (out,) = classes["GenRefocusClassicalBokeh"]().render(image, defocus, aperture=aperture,
                                                          **values["GenRefocusClassicalBokeh"])
    return Image.fromarray((out[0].numpy() * 255 + 0.5).astype(np.uint8))


def cover(img: Image.Image, size, top: bool) -> Image.Image:
    """Scale to fill `size`, cropping the excess (centred; from the top edge down when `top`)."""
    s = max(size[0] / img.width, size[1] / img.height)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    x, y = (img.width - size[0]) // 2, 0 if top else (img.height - size[1]) // 2
    return img.crop((x, y, x + size[0], y + size[1]))


def thumbnail(picture: Image.Image, title: str, top: bool) -> Image.Image:
    out = Image.new("RGB", SIZE, (24, 24, 24))
    out.paste(cover(picture.convert("RGB"), (SIZE[0], SIZE[1] - CAPTION_H), top), (0, 0))
    draw = ImageDraw.Draw(out)
    font_file = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
    size = 26
    while True:
        font = ImageFont.truetype(str(font_file), size) if font_file.exists() else ImageFont.load_default(size)
        if draw.textlength(title, font=font) <= SIZE[0] - 24 or size <= 12:
            break
        size -= 1
    draw.text((12, SIZE[1] - CAPTION_H / 2), title, font=font, fill=(240, 240, 240), anchor="lm")
    return out


def write_jpg(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, optimize=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    shots = Path(argv[0])
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        ui = json.loads(wf.read_text())
        if wf.name in RENDERED:
            picture = render_classical(ui)
        else:
            shot = shots / wf.with_suffix(".png").name
            if not shot.exists():
                print(f"no screenshot {shot}: make them first (see --help)")
                return 1
            picture = Image.open(shot).crop(CANVAS_BOX)
        write_jpg(thumbnail(picture, note_title(ui), top=wf.name not in RENDERED), wf.with_suffix(".jpg"))
        print(wf.with_suffix(".jpg").name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
