"""Depth Pro nodes: LoadDepthPro (models/depth_pro) and DepthEstimate (metric depth of an image)."""
from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path

import torch

import transformers  # noqa: F401  (Depth Pro runs on transformers; without it only these nodes are disabled)

from genrefocus_core.basics.defocus import disparity_from_depth
from genrefocus_core.depth.depth_pro import estimate_depth, load_depth_pro
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import to_image_batch

from . import comfy_bridge
from .common import CATEGORY, DEPTH, DEPTH_MODEL, DepthMaps, tip
from .previews import disparity_preview

log = logging.getLogger("GenRefocus")

PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class DepthProModel:
    """What travels in GENREFOCUS_DEPTH_MODEL: the transformers model and where it was loaded from."""

    def __init__(self, model, source: str, dtype: torch.dtype):
        self.model, self.source, self.dtype = model, source, dtype

    def __repr__(self):
        return f"DepthProModel({self.source}, {self.dtype})"


# One entry: key -> weak reference to the DepthProModel. ComfyUI's output cache keeps the model alive while
# graphs use it (reused between runs); when ComfyUI frees its caches the model goes too.
_cache: dict = {}


def depth_pro_location(full_path: str) -> str:
    """A file inside a Hugging Face folder (config.json beside it) means the folder."""
    p = Path(full_path)
    if p.suffix == ".safetensors" and (p.parent / "config.json").is_file():
        return str(p.parent)
    return str(p)


class GenRefocusLoadDepthPro:
    DESCRIPTION = ("Loads Depth Pro (metric depth + focal length) from ComfyUI/models/depth_pro: Apple's "
                   "depth_pro.pt or a Hugging Face folder (config.json + model.safetensors). Cached between runs.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (comfy_bridge.list_models("depth_pro"),
                           tip("Depth Pro weights in models/depth_pro: depth_pro.pt (Apple layout, as shipped with "
                               "GenRefocus) or <folder>/model.safetensors of the Hugging Face layout.")),
            "precision": (PRECISIONS, tip("Weight precision: auto = fp16 on a GPU, fp32 on the CPU.",
                                          default="auto")),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        """Any name passes here, so that a missing file reaches `load`'s message (file, folder, download)
        instead of ComfyUI's "Value not in list"."""
        return True

    RETURN_TYPES = (DEPTH_MODEL,)
    RETURN_NAMES = ("depth_model",)
    OUTPUT_TOOLTIPS = ("The loaded Depth Pro model, for Depth Estimate.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/loaders"

    def load(self, model_name, precision):
        path = depth_pro_location(comfy_bridge.model_path("depth_pro", model_name))
        device = comfy_bridge.offload_device()
        if precision == "auto":
            dtype = torch.float16 if comfy_bridge.torch_device().type in ("cuda", "mps", "xpu") else torch.float32
        elif precision in _DTYPES:
            dtype = _DTYPES[precision]
        else:
            raise InputError(f"Unknown precision {precision!r}; choose one of {PRECISIONS}.")
        key = (path, os.path.getmtime(path), str(dtype))
        ref = _cache.get(key)
        hit = ref() if ref is not None else None
        if hit is not None and not next(hit.model.parameters()).is_meta:
            return (hit,)
        _cache.clear()
        comfy_bridge.soft_empty_cache()
        loaded = DepthProModel(load_depth_pro(path, device=device, dtype=dtype), path, dtype)
        _cache[key] = weakref.ref(loaded)
        return (loaded,)


class GenRefocusDepthEstimate:
    DESCRIPTION = ("Metric depth of an image with Depth Pro (the paper's depth model). To use depth from another "
                   "node instead (Depth Anything, Marigold...), use Depth From Image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "depth_model": (DEPTH_MODEL, tip("Depth Pro from Load Depth Pro.")),
                "image": ("IMAGE", tip("Image(s) to estimate depth for; best the all-in-focus image from DeblurNet.")),
            },
            "optional": {
                "focal_length_px": ("FLOAT", tip("Known focal length in pixels (e.g. from EXIF); 0 = let Depth Pro "
                                                 "estimate it.", default=0.0, min=0.0, max=100000.0, step=1.0)),
            },
        }

    RETURN_TYPES = (DEPTH, "IMAGE")
    RETURN_NAMES = ("depth", "preview")
    OUTPUT_TOOLTIPS = ("Metric depth (as disparity 1/m) for Defocus Map.",
                       "Disparity preview: bright = near, dark = far.")
    FUNCTION = "estimate"
    CATEGORY = CATEGORY + "/depth"

    def estimate(self, depth_model, image, focal_length_px=0.0):
        if not isinstance(depth_model, DepthProModel):
            raise InputError("Depth Estimate: 'depth_model' must come from Load Depth Pro.")
        images = to_image_batch(image, "image")
        model = depth_model.model
        device = comfy_bridge.torch_device()
        rest = comfy_bridge.offload_device()
        # Depth Pro runs on the compute device, then goes back so that FLUX has the memory.
        comfy_bridge.free_memory(_model_bytes(model) * 1.5)
        model.to(device)
        try:
            comfy_bridge.throw_if_interrupted()
            result = estimate_depth(model, images.to(device), focal_px=focal_length_px or None)
        finally:
            if torch.device(rest) != torch.device(device):
                model.to(rest)
                comfy_bridge.soft_empty_cache()
        disp = disparity_from_depth(result.depth_m.float().cpu())
        maps = DepthMaps(disparity=disp, metric=True)
        return (maps, disparity_preview(disp))


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


NODE_CLASS_MAPPINGS = {
    "GenRefocusLoadDepthPro": GenRefocusLoadDepthPro,
    "GenRefocusDepthEstimate": GenRefocusDepthEstimate,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GenRefocusLoadDepthPro": "Load Depth Pro (GenRefocus)",
    "GenRefocusDepthEstimate": "Depth Estimate (Depth Pro)",
}
