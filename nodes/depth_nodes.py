"""Depth from elsewhere: DepthFromImage (any depth/disparity IMAGE or MASK from another node) and
LoadDepthMap (.npy/.npz/.pfm/.exr/16-bit PNG/TIFF in ComfyUI's input folder)."""
from __future__ import annotations

import os

import torch

from genrefocus_core.depth.sources import (DEFAULT_FAR_M, DEFAULT_NEAR_M, DEFAULT_SMOOTHING_FRAMES,
                                           NORMALIZATIONS, disparity_from_external, load_depth_file)
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import to_image_batch

from . import comfy_bridge
from .common import CATEGORY, DEPTH, DepthMaps, tip
from .previews import disparity_preview

DEPTH_FILE_EXTENSIONS = (".npy", ".npz", ".pfm", ".exr", ".png", ".tif", ".tiff")


def _meaning_inputs():
    return {
        "kind": (["disparity", "depth"], tip("What the map holds: 'disparity' (inverse depth, bigger = nearer: Depth "
                                             "Anything, MiDaS, DPT) or 'depth' (bigger = farther: ZoeDepth, Marigold, "
                                             "Depth Pro, sensors).", default="disparity")),
        "near": (["auto", "bright", "dark"], tip("Which end of the map is near: 'auto' = the kind's own orientation; "
                                                  "'bright'/'dark' for maps displayed the other way round "
                                                  "(relative scale only).", default="auto")),
        "scale": (["relative", "metric"], tip("'relative': known only up to scale and shift (most depth networks); "
                                              "placed in a near_m..far_m scene. 'metric': values are metres (or 1/m) "
                                              "times unit.", default="relative")),
        "near_m": ("FLOAT", tip("Relative maps: distance in metres given to the nearest value.",
                                default=DEFAULT_NEAR_M, min=0.001, max=10000.0, step=0.01)),
        "far_m": ("FLOAT", tip("Relative maps: distance in metres given to the farthest value.",
                               default=DEFAULT_FAR_M, min=0.002, max=100000.0, step=0.1)),
        "unit": ("FLOAT", tip("Metric maps: metres per stored unit (0.001 for millimetres; 10 for an image whose "
                              "0..1 range encodes 0..10 m).", default=1.0, min=1e-6, max=1e6, step=0.001)),
        "normalization": (list(NORMALIZATIONS), tip("Relative maps of a batch (video frames): 'batch' = one value range "
                                                   "for all frames, so the blur does not pump when something enters "
                                                   "the frame; 'smoothed' = the range follows the clip slowly "
                                                   "(smoothing_frames); 'per_image' = each map on its own (unrelated "
                                                   "images). Metric maps are never normalised.", default="batch")),
        "smoothing_frames": ("INT", tip("normalization 'smoothed': how many frames before and after each frame "
                                        "its value range follows (0 = per image).",
                                        default=DEFAULT_SMOOTHING_FRAMES, min=0, max=1000, step=1)),
    }


def _depth_maps(disp: torch.Tensor, scale: str) -> DepthMaps:
    return DepthMaps(disparity=disp.float().cpu(), metric=scale == "metric")


def _size_and_batch(image):
    if image is None:
        return None, None
    img = to_image_batch(image, "image")
    return (int(img.shape[1]), int(img.shape[2])), int(img.shape[0])


def _photo_input():
    return {"image": ("IMAGE", tip("The photo the depth belongs to: the map is resized to its size (same aspect "
                                   "ratio required) and repeated to its batch."))}


class _DepthOutputs:
    """Outputs shared by the nodes that turn an external map into GenRefocus depth."""
    RETURN_TYPES = (DEPTH, "IMAGE")
    RETURN_NAMES = ("depth", "preview")
    OUTPUT_TOOLTIPS = ("Depth as disparity for Defocus Map.", "Disparity preview: bright = near.")
    CATEGORY = CATEGORY + "/depth"


class GenRefocusDepthFromImage(_DepthOutputs):
    DESCRIPTION = ("Use depth from any other node (Depth Anything, Marigold, ZoeDepth, a loaded depth image...) as "
                   "GenRefocus depth. Say what the map means; relative maps are placed in a near_m..far_m scene.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"depth_image": ("IMAGE", tip("Grey depth or disparity image (or batch) from another node."))}
            | _meaning_inputs(),
            "optional": _photo_input(),
        }

    FUNCTION = "convert"

    def convert(self, depth_image, kind, near, scale, near_m, far_m, unit, normalization="batch",
                smoothing_frames=DEFAULT_SMOOTHING_FRAMES, image=None):
        size, batch = _size_and_batch(image)
        disp = disparity_from_external(depth_image, kind=kind, near=near, scale=scale, near_m=near_m, far_m=far_m,
                                       unit=unit, size=size, batch=batch, name="depth_image",
                                       normalization=normalization, smoothing_frames=smoothing_frames)
        maps = _depth_maps(disp, scale)
        return (maps, disparity_preview(maps.disparity))


def depth_files() -> list[str]:
    """Depth files in ComfyUI's input folder (recursive), for the file picker."""
    root = comfy_bridge.input_directory()
    if not root or not os.path.isdir(root):
        return []
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.lower().endswith(DEPTH_FILE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


class GenRefocusLoadDepthMap(_DepthOutputs):
    DESCRIPTION = ("Load a depth or disparity map file from ComfyUI's input folder: .npy, .npz, .pfm, .exr, 16-bit "
                   "PNG or TIFF (integer files keep their codes: set unit, e.g. 0.001 for millimetres).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"depth_file": (depth_files(), tip("Depth file in ComfyUI/input (refresh after adding one)."))}
            | _meaning_inputs(),
            "optional": _photo_input(),
        }

    FUNCTION = "load"

    @classmethod
    def IS_CHANGED(cls, depth_file, **kwargs):
        path = cls._path(depth_file)
        return os.path.getmtime(path) if path and os.path.isfile(path) else float("nan")

    @staticmethod
    def _path(depth_file):
        root = comfy_bridge.input_directory()
        if not depth_file:
            raise InputError("Load Depth Map: no depth file chosen; put one in ComfyUI/input and refresh.")
        path = depth_file if os.path.isabs(depth_file) or root is None else os.path.join(root, depth_file)
        if root is not None and not os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
            raise InputError(f"Load Depth Map: {depth_file!r} is outside ComfyUI's input folder.")
        return path

    def load(self, depth_file, kind, near, scale, near_m, far_m, unit, normalization="batch",
             smoothing_frames=DEFAULT_SMOOTHING_FRAMES, image=None):
        values = load_depth_file(self._path(depth_file))
        size, batch = _size_and_batch(image)
        disp = disparity_from_external(values, kind=kind, near=near, scale=scale, near_m=near_m, far_m=far_m,
                                       unit=unit, size=size, batch=batch, name=os.path.basename(depth_file),
                                       normalization=normalization, smoothing_frames=smoothing_frames)
        maps = _depth_maps(disp, scale)
        return (maps, disparity_preview(maps.disparity))


NODE_CLASS_MAPPINGS = {
    "GenRefocusDepthFromImage": GenRefocusDepthFromImage,
    "GenRefocusLoadDepthMap": GenRefocusLoadDepthMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GenRefocusDepthFromImage": "Depth From Image (GenRefocus)",
    "GenRefocusLoadDepthMap": "Load Depth Map (GenRefocus)",
}
