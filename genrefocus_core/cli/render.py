"""`python -m genrefocus_core render`: classical refocus of an image file with a depth or disparity file.

    python -m genrefocus_core render --image photo.png --depth depth.npy --focus-x 320 --focus-y 200 \
        --K 25 --aperture hexagon --out refocused.png

--depth is metric depth in metres (disparity = 1/depth); --disparity is any disparity map (bigger =
nearer), rescaled to 0..1 so K is "px of blur radius across the whole disparity range". Depth files:
.npy, .npz, .pfm, .exr, 16-bit PNG/TIFF (see depth_sources.load_depth_file).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from ..basics import apertures
from ..classical.renderer import QUALITY_PRESETS, render_bokeh
from ..basics.defocus import blur_level_from_lens, disparity_from_depth, focus_disparity
from ..depth.sources import load_depth_file
from ..basics.errors import InputError
from ..basics.images import load_image, resize_map, save_image, to_map_batch


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m genrefocus_core render", description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True, help="input photo (PNG/JPEG/...)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--depth", help="metric depth file in metres")
    src.add_argument("--disparity", help="disparity file (bigger = nearer), rescaled to 0..1")
    ap.add_argument("--out", required=True, help="output image path (.png)")
    focus = ap.add_argument_group("focus (default: the centre pixel)")
    focus.add_argument("--focus-x", type=float, help="focus point column (px)")
    focus.add_argument("--focus-y", type=float, help="focus point row (px)")
    focus.add_argument("--focus-depth", type=float, help="focus distance in metres (with --depth)")
    focus.add_argument("--focus-disparity", type=float, help="focus disparity value")
    focus.add_argument("--focus-mask", help="image whose white part is in focus (median disparity inside)")
    blur = ap.add_argument_group("blur (K, or a lens with --depth)")
    blur.add_argument("--K", type=float, help="px of CoC radius per unit of disparity (default 20)")
    blur.add_argument("--f-number", type=float, help="lens f-number, e.g. 1.8 (needs --focal-length)")
    blur.add_argument("--focal-length", type=float, help="focal length in mm")
    blur.add_argument("--sensor-width", type=float, default=36.0, help="sensor width in mm (default 36)")
    shape = ap.add_argument_group("aperture")
    shape.add_argument("--aperture", default="circle",
                       help="circle | polygon | hexagon | pentagon | triangle | star | heart | cat_eye")
    shape.add_argument("--blades", type=int, default=6, help="blades of a polygon aperture")
    shape.add_argument("--rotation", type=float, default=0.0, help="aperture rotation in degrees (clockwise)")
    shape.add_argument("--curvature", type=float, default=0.0, help="blade curvature 0..1 (polygon)")
    shape.add_argument("--aperture-image", help="use this image's bright part as the aperture shape")
    ap.add_argument("--highlight-boost", type=float, default=1.0, help="bloom of clipped highlights (0 = off)")
    ap.add_argument("--quality", default="balanced", choices=list(QUALITY_PRESETS))
    ap.add_argument("--colorspace", default="srgb", choices=["srgb", "linear"])
    return ap


def _aperture(a) -> apertures.Aperture:
    if a.aperture_image:
        return apertures.from_image(load_image(a.aperture_image)[0].mean(-1))
    name = a.aperture.lower().replace("-", "_")
    if name == "polygon":
        return apertures.polygon(a.blades, a.rotation, a.curvature)
    if name in ("hexagon", "pentagon"):
        return apertures.polygon(6 if name == "hexagon" else 5, a.rotation, a.curvature)
    if name in ("triangle", "star", "heart"):
        return apertures.make_aperture(name, rotation_deg=a.rotation)
    if name == "cat_eye":
        return apertures.cat_eye(0.5, a.rotation)
    return apertures.make_aperture(name)


def main(argv) -> int:
    a = build_parser().parse_args(list(argv[1:]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    t0 = time.perf_counter()
    image = load_image(a.image)
    h, w = image.shape[1:3]
    raw = to_map_batch(load_depth_file(a.depth or a.disparity), "depth file")
    if tuple(raw.shape[-2:]) != (h, w):
        print(f"note: depth map {raw.shape[-1]}x{raw.shape[-2]} resized to the image size {w}x{h}")
        raw = resize_map(raw, (h, w))
    if a.depth:
        disp = disparity_from_depth(raw)
    else:
        finite = raw[torch.isfinite(raw)]
        if finite.numel() == 0:
            raise InputError(f"Disparity file {a.disparity} has no finite values.")
        lo, hi = float(finite.min()), float(finite.max())
        disp = (raw - lo) / (hi - lo) if hi > lo else torch.zeros_like(raw)
        disp = torch.nan_to_num(disp, nan=0.5, posinf=1.0, neginf=0.0)

    chosen = [v is not None for v in (a.focus_x, a.focus_depth, a.focus_disparity, a.focus_mask)]
    if sum(chosen) > 1:
        raise InputError("Give one focus: --focus-x/--focus-y, --focus-depth, --focus-disparity or --focus-mask.")
    if (a.focus_x is None) != (a.focus_y is None):
        raise InputError("--focus-x and --focus-y go together.")
    if a.focus_x is not None:
        f = focus_disparity(disp, point=(round(a.focus_x), round(a.focus_y)))
    elif a.focus_depth is not None:
        if not a.depth:
            raise InputError("--focus-depth needs a metric --depth file.")
        if not a.focus_depth > 0:
            raise InputError(f"--focus-depth must be positive, got {a.focus_depth}.")
        f = focus_disparity(disp, value=1.0 / a.focus_depth)
    elif a.focus_disparity is not None:
        f = focus_disparity(disp, value=a.focus_disparity)
    elif a.focus_mask:
        f = focus_disparity(disp, mask=load_image(a.focus_mask)[0].mean(-1))
    else:
        f = focus_disparity(disp)

    if a.f_number is not None or a.focal_length is not None:
        if a.K is not None:
            raise InputError("Give either --K or the lens (--f-number, --focal-length), not both.")
        if not a.depth or a.f_number is None or a.focal_length is None:
            raise InputError("Lens blur needs --depth (metres), --f-number and --focal-length.")
        if not float(f[0]) > 0:
            raise InputError("The focus point is at infinity; a lens cannot be focused there by this formula.")
        K = blur_level_from_lens(a.f_number, a.focal_length, a.sensor_width, 1.0 / float(f[0]), max(h, w))
        print(f"lens: K = {K:.2f} px per 1/m")
    else:
        K = 20.0 if a.K is None else a.K

    out = render_bokeh(image, disp, f, K, _aperture(a), highlight_boost=a.highlight_boost, quality=a.quality,
                       colorspace=a.colorspace)
    save_image(out, a.out)
    print(f"wrote {a.out} ({w}x{h}, K={K:g}, focus disparity {float(f[0]):.4g}) in {time.perf_counter() - t0:.2f} s")
    return 0
