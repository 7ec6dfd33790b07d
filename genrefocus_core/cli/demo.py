"""`python -m genrefocus_core demo --out DIR`: refocus the built-in scene with the classical renderer.

Needs no model weights and no GPU. Writes the all-in-focus scene, its depth, renders at several focus
points, blur levels and aperture shapes, and a labelled contact sheet (contact_sheet.png).
"""
from __future__ import annotations

import argparse
import time

import torch

from ..basics import apertures
from ..classical.renderer import HIGHLIGHT_BOOST_DEFAULT, render_bokeh
from ..basics.defocus import blur_level_from_lens, check_blur_level, disparity_from_depth, resolve_focus
from ..basics.errors import InputError
from ..basics.files import check_output_folder, save_array, save_pil_image
from ..basics.images import save_image, to_uint8
from ..basics.scene import check_scene_request, make_scene, scene_landmarks
from .options import check_finite_options


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size must look like 512x384, got {text!r}.") from None
    if w < 8 or h < 8:
        raise InputError(f"--size must be at least 8x8, got {text!r}.")
    return w, h


def demo_jobs(depth: torch.Tensor, disp: torch.Tensor, K: float) -> list[dict]:
    """The renders of the demo: label, focus point name, K, aperture, highlight boost."""
    h, w = disp.shape[-2:]
    marks = scene_landmarks(h, w)
    z_pillar = float(depth[0, marks["pillar"][1], marks["pillar"][0]])
    k_lens = blur_level_from_lens(1.4, 50.0, 36.0, z_pillar, max(h, w))
    boost = HIGHLIGHT_BOOST_DEFAULT
    return [
        dict(label=f"focus near card, K={K:g}, circle", point="near card", K=K, ap=apertures.circle(), boost=boost),
        dict(label=f"focus lights, K={K:g}, circle", point="lights", K=K, ap=apertures.circle(), boost=boost),
        dict(label=f"focus far wall, K={K:g}, circle", point="far wall", K=K, ap=apertures.circle(), boost=boost),
        dict(label="near card, mirror lens (annular 0.5)", point="near card", K=K, ap=apertures.annular(0.5),
             boost=boost),
        dict(label="near card, 6 blades, curved 0.15", point="near card", K=K,
             ap=apertures.polygon(6, curvature=0.15), boost=boost),
        dict(label="near card, star", point="near card", K=K, ap=apertures.star(5, 0.45), boost=boost),
        dict(label="near card, heart", point="near card", K=K, ap=apertures.heart(), boost=boost),
        dict(label="near card, cat-eye vignetting 0.7", point="near card", K=K, ap=apertures.circle(), boost=boost,
             vignetting=0.7),
        dict(label=f"50mm f/1.4 @ {z_pillar:.1f} m (K={k_lens:.1f})", point="pillar", K=k_lens,
             ap=apertures.polygon(9, curvature=0.3), boost=boost),
    ]


def _depth_preview(depth: torch.Tensor) -> torch.Tensor:
    disp = disparity_from_depth(depth)[0]
    v = (disp - disp.min()) / (disp.max() - disp.min()).clamp_min(1e-12)
    return v[None, :, :, None].expand(1, *v.shape, 3)


def contact_sheet(tiles: list[tuple[str, torch.Tensor]], columns: int = 3, thumb_width: int = 384):
    """Grid of labelled thumbnails -> PIL image."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default()
    thumbs = []
    for label, img in tiles:
        im = Image.fromarray(to_uint8(img[0]))
        th = max(1, round(im.height * thumb_width / im.width))
        thumbs.append((label, im.resize((thumb_width, th), Image.LANCZOS)))
    th = max(t.height for _, t in thumbs)
    pad, text_h = 6, 16
    rows = (len(thumbs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (thumb_width + pad) + pad, rows * (th + text_h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (label, t) in enumerate(thumbs):
        r, c = divmod(i, columns)
        x, y = pad + c * (thumb_width + pad), pad + r * (th + text_h + pad)
        sheet.paste(t, (x, y))
        draw.text((x + 2, y + th + 2), label, fill=(235, 235, 235), font=font)
    return sheet


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m genrefocus_core demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="output folder (created)")
    ap.add_argument("--size", default="512x384", help="scene size WxH (default 512x384)")
    ap.add_argument("--seed", type=int, default=0, help="scene seed")
    ap.add_argument("--K", type=float, default=40.0, help="blur level for the main renders (default 40)")
    a = ap.parse_args(list(argv[1:]))
    check_finite_options(a)
    w, h = _parse_size(a.size)
    check_scene_request(h, w, a.seed)
    check_blur_level(a.K)
    out = check_output_folder(a.out, "--out")  # an existing file of that name is refused, never replaced

    t0 = time.perf_counter()
    image, depth = make_scene(h, w, a.seed)
    disp = disparity_from_depth(depth)
    save_image(image, out / "scene_all_in_focus.png")
    save_image(_depth_preview(depth), out / "scene_disparity.png")
    save_array(depth[0].numpy(), out / "scene_depth_m.npy")
    tiles = [("all in focus (input)", image), ("disparity (bright = near)", _depth_preview(depth))]
    marks = scene_landmarks(h, w)
    print(f"scene {w}x{h} seed {a.seed}: {time.perf_counter() - t0:.2f} s")
    for i, job in enumerate(demo_jobs(depth, disp, a.K), 1):
        t = time.perf_counter()
        f = resolve_focus(disp, point=marks[job["point"]])
        out_img = render_bokeh(image, disp, f, job["K"], job["ap"], highlight_boost=job["boost"],
                               vignetting=job.get("vignetting", 0.0))
        name = f"render_{i:02d}.png"
        save_image(out_img, out / name)
        tiles.append((job["label"], out_img))
        print(f"{name}: {job['label']}: {time.perf_counter() - t:.2f} s")
    ap_tiles = [("aperture: " + a_.name, a_.condition_image(h, w)) for a_ in
                (apertures.polygon(6, curvature=0.15), apertures.star(5, 0.45), apertures.heart())]
    tiles.extend(ap_tiles)
    sheet = contact_sheet(tiles)
    save_pil_image(sheet, out / "contact_sheet.png")
    print(f"wrote {len(tiles) - len(ap_tiles)} images and contact_sheet.png to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
