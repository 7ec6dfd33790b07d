"""`python -m genrefocus_core render`: classical refocus of an image file with a depth or disparity file.

    python -m genrefocus_core render --image photo.png --depth depth.npy --focus-x 320 --focus-y 200 \
        --K 25 --aperture hexagon --out refocused.png

--depth is by default metric depth in metres (see --depth-kind/--depth-scale/--depth-unit); --disparity
is a relative disparity map (bigger = nearer), placed in a 1..20 m scene as Depth From Image does.
Depth files: .npy, .npz, .pfm, .exr, 16-bit PNG/TIFF (see depth.sources.load_depth_file).
"""
from __future__ import annotations

import argparse
import logging
import time

from ..basics import apertures
from ..basics.images import load_image, save_image
from ..classical.renderer import HIGHLIGHT_BOOST_DEFAULT, HIGHLIGHT_THRESHOLD_DEFAULT, QUALITY_PRESETS, render_bokeh
from .focus_options import add_depth_file_options, add_focus_and_blur_options, defocus_from_args, disparity_from_args
from .options import check_finite_options, check_outputs


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m genrefocus_core render", description=__doc__.split("\n")[0])
    ap.add_argument("--image", required=True, help="input photo (PNG/JPEG/...)")
    ap.add_argument("--out", required=True, help="output image path (.png)")
    add_depth_file_options(ap, depth_required=True)
    add_focus_and_blur_options(ap)
    shape = ap.add_argument_group("aperture")
    shape.add_argument("--aperture", default="circle",
                       help=f"{' | '.join(apertures.SHAPES)} | hexagon | pentagon (or --aperture-image)")
    shape.add_argument("--blades", type=int, default=6, help="blades of a polygon aperture")
    shape.add_argument("--rotation", type=float, default=0.0,
                       help="aperture rotation in degrees (clockwise); the cut's direction for cat_eye")
    shape.add_argument("--curvature", type=float, default=0.0, help="blade curvature 0..1 (polygon)")
    shape.add_argument("--star-points", type=int, default=5, help="points of a star aperture")
    shape.add_argument("--star-inner-ratio", type=float, default=0.5, help="inner / outer radius of a star")
    shape.add_argument("--cat-eye-strength", type=float, default=0.5, help="cat_eye: how much of the disc is cut")
    shape.add_argument("--hole-ratio", type=float, default=0.45,
                       help="annular (mirror lens): central obstruction / outer radius")
    shape.add_argument("--aperture-image", help="use this image's bright part as the aperture shape, as drawn")
    shape.add_argument("--cat-eye-across-frame", type=float, default=0.0,
                       help="cat's-eye bokeh growing towards the frame's corners, up to this much (0..0.95)")
    look = ap.add_argument_group("look")
    look.add_argument("--highlight-boost", type=float, default=HIGHLIGHT_BOOST_DEFAULT,
                      help=f"light given back to clipped highlights (0 = off, 1 = discs as bright as the light; "
                      f"default {HIGHLIGHT_BOOST_DEFAULT})")
    look.add_argument("--highlight-threshold", type=float, default=HIGHLIGHT_THRESHOLD_DEFAULT,
                      help="linear brightness above which a pixel is a clipped highlight")
    look.add_argument("--grain", type=float, default=0.0, help="grain matched to the sharp region (0 = off, 1 = matched)")
    look.add_argument("--grain-seed", type=int, default=0, help="seed of the grain")
    look.add_argument("--quality", default="balanced", choices=list(QUALITY_PRESETS))
    look.add_argument("--colorspace", default="srgb", choices=["srgb", "linear"])
    return ap


def aperture_from_args(a) -> apertures.Aperture:
    mask = load_image(a.aperture_image)[0].mean(-1) if a.aperture_image else None
    return apertures.make_aperture("custom" if mask is not None else a.aperture, blades=a.blades,
                                   rotation_deg=a.rotation, curvature=a.curvature, points=a.star_points,
                                   inner_ratio=a.star_inner_ratio, strength=a.cat_eye_strength,
                                   direction_deg=a.rotation, hole_ratio=a.hole_ratio, mask=mask)


def main(argv) -> int:
    a = build_parser().parse_args(list(argv[1:]))
    check_finite_options(a)
    check_outputs(a, images=["out"], inputs=["image", "depth", "disparity", "focus_mask", "aperture_image"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    t0 = time.perf_counter()
    image = load_image(a.image)
    h, w = image.shape[1:3]
    aperture = aperture_from_args(a)
    disp, metric = disparity_from_args(a, (h, w))
    d = defocus_from_args(a, disp, metric)
    out = render_bokeh(image, defocus_px=d.signed_coc, aperture=aperture, highlight_boost=a.highlight_boost,
                       highlight_threshold=a.highlight_threshold, quality=a.quality, colorspace=a.colorspace,
                       vignetting=a.cat_eye_across_frame, grain=a.grain, grain_seed=a.grain_seed)
    save_image(out, a.out)
    print(f"wrote {a.out} ({w}x{h}, K={float(d.K[0]):.4g} px per 1/m, focus disparity "
          f"{float(d.focus_disparity[0]):.4g}) in {time.perf_counter() - t0:.2f} s")
    return 0
