"""Checks every command runs on its parsed options before any work: numbers finite, outputs writable
and distinct from the inputs (argparse's `type=float` accepts "nan" and "inf")."""
from __future__ import annotations

import argparse
import math

from ..basics.errors import InputError
from ..basics.files import ARRAY_EXTENSIONS, check_output_path, saveable_image_extensions


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# Options where 'inf' means something (a lens focused at infinity); NaN is refused there too.
INFINITY_ALLOWED = {"focus_distance"}


def check_finite_options(args: argparse.Namespace) -> None:
    """Every float option must be a finite number (NaN and inf are refused, naming the option; +inf
    only where it has a meaning, INFINITY_ALLOWED)."""
    for dest, value in vars(args).items():
        if not isinstance(value, float) or math.isfinite(value):
            continue
        if dest in INFINITY_ALLOWED and value == math.inf:
            continue
        raise InputError(f"{_flag(dest)} must be a finite number, got {value}.")


def check_outputs(args: argparse.Namespace, images=(), arrays=(), inputs=()) -> None:
    """Output options (dest names) checked before any work: image outputs need an image extension,
    array outputs .npy; none may be an input file or another output."""
    inputs = [getattr(args, d, None) for d in inputs]
    kinds = {**{d: saveable_image_extensions() for d in images}, **{d: ARRAY_EXTENSIONS for d in arrays}}
    given = {d: getattr(args, d) for d in kinds if getattr(args, d, None) is not None}
    for dest, path in given.items():
        check_output_path(path, _flag(dest), extensions=kinds[dest], inputs=inputs,
                          others=[v for d, v in given.items() if d != dest])
