"""What an exact renderer scores on measure.py's scenes: the floor under two of its lines.

    python bench/bokeh_floors.py [--sizes 512 1024] [--apertures circle poly5 poly6 poly8]

1. CoC radius "error" of the exact aperture itself: measure.py counts the pixel centres at or above half
   maximum and converts the count to a radius through the shape's area; for the exact shape that count
   is the number of lattice points inside it (its `inside` at r_expected), which is not the area.
2. Spill ratio of the exact layered answer for a shaped aperture: make_scenes.py builds the edge_bg
   ground truth with a disc for every aperture, so a polygon of the same circumradius (less area) spills
   less than that ground truth by construction.

Needs the scenes of ../shared/tools/bokeh/make_scenes.py (same --scenes default as measure.py).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

TOOLS = os.environ.get("BOKEH_TOOLS", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "tools", "bokeh"))
sys.path.insert(0, os.path.abspath(TOOLS))

import make_scenes  # noqa: E402
import measure  # noqa: E402


def aperture(name):
    return measure.circle() if name == "circle" else measure.polygon(int(name[4:]))


def coc_floor(scenes, size, ap):
    """mean / max |r_meas - r| over the dots with r >= 2 when the rendered support is the exact shape."""
    _, meta = measure.load_scene(scenes, f"points_{size}")
    errs = []
    for dot in meta["dots"]:
        r = dot["r_expected"]
        if r < 2:
            continue
        x0, y0, t = dot["tile"]
        yy, xx = np.mgrid[0:t, 0:t]
        count = ap.inside(xx - (dot["x"] - x0), yy - (dot["y"] - y0), r).sum()
        errs.append(math.sqrt(count / ap.area_unit) - r)
    return float(np.mean(np.abs(errs))), float(np.max(np.abs(errs)))


def exact_spill(scenes, size, ap, supersample=8):
    """measure.py's spill ratio of the exact layered answer (M FG) (*) A + (1 - M (*) A) BG, A = the
    aperture at r_blur (anti-aliased), against the disc ground truth of the scene."""
    arrays, meta = measure.load_scene(scenes, f"edge_bg_{size}")
    r = meta["r_blur"]
    image, sd = arrays["image"].astype(np.float64), arrays["signed_dist"]
    bg, gt = arrays["bg_full"].astype(np.float64), arrays["gt"].astype(np.float64)
    fg_mask = (sd < 0).astype(np.float64)
    half = int(math.ceil(r)) + 1
    offsets = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(offsets, offsets, indexing="ij")
    cover = np.zeros(yy.shape)
    for sy in (np.arange(supersample) + 0.5) / supersample - 0.5:
        for sx in (np.arange(supersample) + 0.5) / supersample - 0.5:
            cover += ap.inside(xx + sx, yy + sy, r)
    kernel = cover / cover.sum()
    blurred_mask = make_scenes.convolve_fft(fg_mask, kernel)
    exact = np.stack([make_scenes.convolve_fft(fg_mask * image[..., c], kernel) for c in range(3)], -1)
    exact += (1.0 - blurred_mask)[..., None] * bg
    band = (sd > 0) & (sd <= r) & measure._valid(size, r)
    return float(np.abs(exact - bg).mean(axis=2)[band].mean() / np.abs(gt - bg).mean(axis=2)[band].mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", default=measure.DEFAULT_SCENES)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--apertures", nargs="+", default=["circle", "poly5", "poly6", "poly8"])
    args = ap.parse_args()
    for size in args.sizes:
        for name in args.apertures:
            shape = aperture(name)
            mean, worst = coc_floor(args.scenes, size, shape)
            print(json.dumps({"size": size, "aperture": name, "exact_coc_mean_abs_err": round(mean, 4),
                              "exact_coc_max_abs_err": round(worst, 4),
                              "exact_spill_ratio": round(exact_spill(args.scenes, size, shape), 4)}))


if __name__ == "__main__":
    main()
