"""Types, data carriers and small helpers shared by the node modules (no ComfyUI imports)."""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from dataclasses import dataclass

import torch

from genrefocus_core.basics.errors import InputError

CATEGORY = "GenRefocus"

# Custom socket types. Plain strings for ComfyUI; the objects travelling in them are defined below
# or come from genrefocus_core.
MODEL = "GENREFOCUS_MODEL"            # a loaded GenRefocusPipeline (DeblurNet + BokehNet on FLUX)
DEPTH_MODEL = "GENREFOCUS_DEPTH_MODEL"  # a loaded Depth Pro model
DEPTH = "GENREFOCUS_DEPTH"            # DepthMaps: per-pixel disparity of an image batch
DEFOCUS = "GENREFOCUS_DEFOCUS"        # genrefocus_core.basics.defocus.Defocus: signed blur-radius map in px
APERTURE = "GENREFOCUS_APERTURE"      # genrefocus_core.basics.apertures.Aperture
SAMPLER = "GENREFOCUS_SAMPLER"        # genrefocus_core.generative.sampling.SamplerSettings


@dataclass
class DepthMaps:
    """What travels in GENREFOCUS_DEPTH.

    disparity: [B,H,W] float32. In 1/m when `metric` (Depth Pro, the scene node, metric depth files);
    otherwise relative (only its ordering and ratios mean something, and K is then per unit of it).
    """

    disparity: torch.Tensor
    metric: bool

    def __post_init__(self):
        if self.disparity.ndim != 3:
            raise InputError(f"Depth maps must be [B,H,W], got {tuple(self.disparity.shape)}.")


def tip(text: str, **opts) -> dict:
    """Widget options with a tooltip (every input of every node has one)."""
    return {"tooltip": text, **opts}


def match_batch(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Repeat a batch-1 tensor to `batch`; a different batch size is an error naming the input."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise InputError(f"{name}: batch of {x.shape[0]} does not match the image batch of {batch} "
                     "(give one map for all images or one per image).")


def broadcast_batches(*pairs: tuple[torch.Tensor, str]) -> list[torch.Tensor]:
    """Bring several batches to a common size (1 broadcasts); mismatches raise InputError."""
    sizes = {int(t.shape[0]) for t, _ in pairs} - {1}
    if len(sizes) > 1:
        desc = ", ".join(f"{n}={t.shape[0]}" for t, n in pairs)
        raise InputError(f"Batch sizes do not match ({desc}); use equal batches or a batch of 1.")
    b = sizes.pop() if sizes else 1
    return [match_batch(t, b, n) for t, n in pairs]


# ------------------------------------------------------------------ number inputs of every node
NUMBER_TYPES = ("INT", "FLOAT")


def check_number_inputs(node: str, spec: dict, values: dict) -> None:
    """Every INT/FLOAT input a node declares must hold a finite number within its declared min/max.

    ComfyUI checks min/max itself, but NaN compares false with everything and so passes that check
    (and prompts sent to its API may carry any JSON number); one NaN rotation or blur level would
    otherwise come back as a black image reported as success. InputError names the node and input.
    """
    for section in ("required", "optional"):
        for name, declared in (spec.get(section) or {}).items():
            if name not in values or values[name] is None or not isinstance(declared, (tuple, list)) or \
                    not declared or declared[0] not in NUMBER_TYPES:
                continue
            kind, value = declared[0], values[name]
            opts = declared[1] if len(declared) > 1 and isinstance(declared[1], dict) else {}
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise InputError(f"{node}: input '{name}' must be a number, got {value!r}.")
            if not math.isfinite(float(value)):
                raise InputError(f"{node}: input '{name}' must be a finite number, got {value}.")
            if kind == "INT" and value != int(value):
                raise InputError(f"{node}: input '{name}' must be a whole number, got {value}.")
            low, high = opts.get("min"), opts.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                raise InputError(f"{node}: input '{name}' = {value} is outside its range "
                                 f"[{'-inf' if low is None else low}, {'inf' if high is None else high}].")


def with_number_checks(cls, display_name: str | None = None):
    """Wrap the node's FUNCTION so that every call first runs `check_number_inputs` against the
    node's own INPUT_TYPES (idempotent; applied to every node the pack registers)."""
    function = getattr(cls, cls.FUNCTION)
    if getattr(function, "checks_number_inputs", False):
        return cls
    node = display_name or cls.__name__
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(self, *args, **kwargs):
        check_number_inputs(node, cls.INPUT_TYPES(), signature.bind_partial(self, *args, **kwargs).arguments)
        return function(self, *args, **kwargs)

    checked.checks_number_inputs = True
    setattr(cls, cls.FUNCTION, checked)
    return cls
