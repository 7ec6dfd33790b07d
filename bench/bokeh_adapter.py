"""Adapter for ../shared/tools/bokeh/measure.py: `render(image, disparity, focus_disparity, K, aperture)`.

    python ../shared/tools/bokeh/measure.py --renderer bench/bokeh_adapter.py:render --sizes 512 1024 --aperture poly6

measure.py's scenes are linear-light data (make_scenes.py), so the renderer runs with colorspace="linear"
and no highlight boost. measure.py's expected point-spread function is the aperture at |r| for both signs
of r, so the in-front 180-degree turn of the shape is off here (flip_front=False). Its apertures map onto
ours: circle -> circle(); {'poly_sides': n, 'init_angle': a} -> polygon(n) with the same vertex
direction (a vertex at atan2(dy, dx) = -a, image coordinates); any other shape -> from_image(.mask)
with the mask's circumradius (n - 1) / 2 px.
"""
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genrefocus_core.basics import apertures  # noqa: E402
from genrefocus_core.classical.renderer import render_bokeh  # noqa: E402

torch.set_num_threads(int(os.environ.get("BOKEH_THREADS", "2")))


def to_project_aperture(aperture):
    if aperture is None:
        return apertures.circle()
    params = getattr(aperture, "params", {}) or {}
    if params.get("shape") == "circle":
        return apertures.circle()
    if "poly_sides" in params:
        n = int(params["poly_sides"])
        init = float(params.get("init_angle", math.pi / 2))
        # ours: vertex at -90 deg + rotation; measure's: vertex where theta + init_angle = 0
        return apertures.polygon(n, rotation_deg=math.degrees(math.pi / 2 - init))
    mask = np.asarray(aperture.mask, np.float32)
    return apertures.from_image(mask / mask.max(), circumradius_px=(mask.shape[0] - 1) / 2.0)


_cache = {}


def render(image, disparity, focus_disparity, K, aperture, quality="balanced"):
    """measure.py's interface; `quality` can be set with measure.py --kwargs '{"quality": "fast"}'."""
    # keyed by the shape, not id(): ids of freed objects are reused
    key = None if aperture is None else (aperture.name, repr(sorted(aperture.params.items())),
                                         np.asarray(aperture.mask).tobytes())
    if key not in _cache:
        _cache[key] = to_project_aperture(aperture)
    out = render_bokeh(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None],
                       torch.from_numpy(np.ascontiguousarray(disparity, np.float32))[None],
                       float(focus_disparity), float(K), _cache[key], colorspace="linear", flip_front=False,
                       quality=quality)
    return out[0].numpy()
