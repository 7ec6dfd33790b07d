"""Command-line options shared by `render` and `refocus`: the depth file, the focus and the blur.
The rules behind them live in the core (`depth.sources`, `basics.defocus`); this only reads them."""
from __future__ import annotations

import argparse
import math

import torch

from ..basics.defocus import Defocus, FocusTilt, Lens, build_defocus, check_blur_level, resolve_focus
from ..basics.errors import InputError


def add_depth_file_options(p: argparse.ArgumentParser, depth_required: bool) -> None:
    g = p.add_argument_group("depth file (.npy, .npz, .pfm, .exr, 16-bit PNG, TIFF)")
    src = g.add_mutually_exclusive_group(required=depth_required)
    src.add_argument("--depth", help="depth or disparity file (by default metric depth in metres)")
    src.add_argument("--disparity", help="relative disparity file (bigger = nearer; Depth Anything, MiDaS): "
                     "short for --depth FILE --depth-kind disparity --depth-scale relative")
    g.add_argument("--depth-kind", choices=("depth", "disparity"), default="depth")
    g.add_argument("--depth-scale", choices=("metric", "relative"), default="metric")
    g.add_argument("--depth-near", choices=("auto", "bright", "dark"), default="auto",
                   help="relative maps: which end is near")
    g.add_argument("--depth-unit", type=float, default=1.0, help="metric maps: metres per stored unit")


def disparity_from_args(args, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """(disparity [1,H,W] in the core's convention, metric?) from the depth file options."""
    from ..depth.sources import disparity_from_external, load_depth_file

    path = args.depth or args.disparity
    kind, scale = ("disparity", "relative") if args.disparity else (args.depth_kind, args.depth_scale)
    disp = disparity_from_external(load_depth_file(path), kind=kind, near=args.depth_near, scale=scale,
                                   unit=args.depth_unit, size=size, batch=1, name=f"depth file {path}")
    return disp, scale == "metric"


def _pair(text: str, what: str):
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} must be two comma-separated numbers 'x,y', got {text!r}.") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise InputError(f"{what} must be two finite numbers 'x,y', got {text!r}.")
    return a, b


def add_focus_and_blur_options(p: argparse.ArgumentParser) -> None:
    f = p.add_argument_group("focus: one of these (default: the centre pixel)")
    f.add_argument("--focus", help="focus point 'x,y' in pixels")
    f.add_argument("--focus-x", type=float, help="focus point column in pixels (with --focus-y)")
    f.add_argument("--focus-y", type=float, help="focus point row in pixels (with --focus-x)")
    f.add_argument("--focus-norm", help="focus point 'x,y' as fractions of width and height")
    f.add_argument("--focus-distance", "--focus-depth", dest="focus_distance", type=float,
                   help="distance the lens is focused at, in metres ('inf' = infinity; metric depth): zero blur there")
    f.add_argument("--focus-slider", type=float, help="0-1 slider through the scene's depth: 0 = nearest, 1 = farthest")
    f.add_argument("--focus-disparity", type=float, help="focal plane as a disparity (1/m for metric depth)")
    f.add_argument("--focus-mask", help="image whose white part is in focus (median disparity inside)")
    b = p.add_argument_group("blur: K, or a thin lens focused on the focal plane (metric depth)")
    b.add_argument("--K", type=float, help="px of blur radius per 1/m of disparity (default 20; 0 = none)")
    b.add_argument("--f-number", type=float, help="lens f-number, e.g. 1.8 (with --focal-length)")
    b.add_argument("--focal-length", type=float, help="lens focal length in mm")
    b.add_argument("--sensor-width", type=float, default=36.0, help="sensor width in mm (default 36)")
    b.add_argument("--in-focus-m", type=float, default=0.0,
                   help="band of depths kept sharp, in metres, centred on the focus distance (metric depth)")
    b.add_argument("--in-focus-fraction", type=float, default=0.0,
                   help="band of depths kept sharp, as a fraction of the depth range (slider units)")
    b.add_argument("--near-blur", type=float, default=1.0, help="strength of the blur in front of the focal plane")
    b.add_argument("--far-blur", type=float, default=1.0, help="strength of the blur behind the focal plane")
    b.add_argument("--tilt", type=float, default=0.0,
                   help="tilt-shift: how far the focal plane moves across the frame, -2..2 depth ranges "
                        "(> 0 leans back like a floor, more of it sharp; < 0 a thin sharp band, the miniature look)")
    b.add_argument("--tilt-angle", type=float, default=0.0,
                   help="direction of the sharp line in degrees (0 = horizontal); it passes through the focus point")


def focus_kwargs(args, size: tuple[int, int]) -> dict:
    """The one focus choice of the options as `resolve_focus` keywords; checked before any long work."""
    H, W = size
    if (args.focus_x is None) != (args.focus_y is None):
        raise InputError("--focus-x and --focus-y go together.")
    chosen = {"--focus": args.focus, "--focus-x/--focus-y": args.focus_x, "--focus-norm": args.focus_norm,
              "--focus-distance": args.focus_distance, "--focus-slider": args.focus_slider,
              "--focus-disparity": args.focus_disparity, "--focus-mask": args.focus_mask}
    given = [k for k, v in chosen.items() if v is not None]
    if len(given) > 1:
        raise InputError(f"Give the focus as one of these options, not {' and '.join(given)}.")
    if args.focus is not None or args.focus_x is not None:
        x, y = _pair(args.focus, "--focus") if args.focus is not None else (args.focus_x, args.focus_y)
        x, y = round(x), round(y)
        if not (0 <= x < W and 0 <= y < H):
            raise InputError(f"Focus point (x={x}, y={y}) lies outside the {W}x{H} image.")
        return {"point": (x, y)}
    if args.focus_norm is not None:
        point = _pair(args.focus_norm, "--focus-norm")
        if not all(0.0 <= v <= 1.0 for v in point):
            raise InputError(f"--focus-norm {args.focus_norm}: both fractions must lie in [0, 1].")
        return {"point": point, "normalized": True}
    if args.focus_mask is not None:
        from ..basics.images import load_image
        return {"mask": load_image(args.focus_mask)[0].mean(-1)}
    return {"distance_m": args.focus_distance, "depth": args.focus_slider, "value": args.focus_disparity}


def lens_from_args(args) -> Lens | None:
    if args.f_number is None and args.focal_length is None:
        return None
    if args.K is not None:
        raise InputError("Give either --K or the lens (--f-number, --focal-length), not both.")
    if args.f_number is None or args.focal_length is None:
        raise InputError("Lens blur needs both --f-number and --focal-length.")
    return Lens(args.f_number, args.focal_length, args.sensor_width)


def tilt_from_args(args, size: tuple[int, int], kwargs: dict) -> FocusTilt | None:
    """The focal plane's tilt, about the focus point of `kwargs` (`focus_kwargs`) when one is given,
    else the centre."""
    if not args.tilt:
        return None
    H, W = size
    pivot = (0.5, 0.5)
    if "point" in kwargs:
        x, y = kwargs["point"]
        pivot = (x, y) if kwargs.get("normalized") else (x / max(W - 1, 1), y / max(H - 1, 1))
    return FocusTilt(args.tilt_angle, args.tilt, pivot)


def check_focus_and_blur(args, size: tuple[int, int]) -> None:
    """The focus and blur options' mistakes, found before any long work."""
    tilt_from_args(args, size, focus_kwargs(args, size))
    lens_from_args(args)
    if args.K is not None:
        check_blur_level(args.K)


def defocus_from_args(args, disparity: torch.Tensor, metric: bool) -> Defocus:
    """Focal plane and defocus map from the options, by the core's rules (as the Defocus Map node)."""
    size = tuple(disparity.shape[-2:])
    kwargs = {k: v for k, v in focus_kwargs(args, size).items() if v is not None}  # a mask file is read once
    focus = resolve_focus(disparity, metric=metric, **kwargs)
    return build_defocus(disparity, focus, K=args.K, lens=lens_from_args(args), metric=metric,
                         in_focus_m=args.in_focus_m, in_focus_fraction=args.in_focus_fraction,
                         near_scale=args.near_blur, far_scale=args.far_blur, tilt=tilt_from_args(args, size, kwargs))
