"""FocusPull: a defocus map per frame from focus keyframes, for Classical Bokeh and BokehNet (rack focus)."""
from __future__ import annotations

from genrefocus_core.basics.defocus import MAX_COC, Lens, in_focus_mask
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.focus_pull import EASINGS, clip_length, focus_pull
from genrefocus_core.basics.images import to_image_batch

from . import comfy_bridge
from .common import CATEGORY, DEFOCUS, DEPTH, DepthMaps, tip
from .defocus_nodes import BAND_UNITS, BLUR_MODES, GenRefocusDefocusMap, defocus_preview

DEFAULT_KEYFRAMES = "0: depth 0.1\nlast: depth 0.9"


# the lens controls of Defocus Map, shared by every frame of the pull (same widgets, same meaning)
LENS_CONTROLS = ("blur_mode", "f_number", "focal_length_mm", "sensor_width_mm", "in_focus_range", "in_focus_unit",
                 "near_blur", "far_blur")


def _lens_controls() -> dict:
    spec = GenRefocusDefocusMap.INPUT_TYPES()
    inputs = {**spec["required"], **spec["optional"]}
    out = {name: inputs[name] for name in LENS_CONTROLS}
    kind, opts = out["blur_mode"]
    out["blur_mode"] = (kind, {**opts, "tooltip": "'K': the blur level K (and keyframes' K=); 'lens': K from "
                               "f-number, focal length and sensor width for a lens focused at each frame's focal "
                               "plane, so the blur breathes with the focus distance as a real lens's does (thin "
                               "lens, metric depth)."})
    return out


class GenRefocusFocusPull:
    DESCRIPTION = ("Focus pull (rack focus) over a batch of frames: focus keyframes (frame: point / distance in metres "
                   "/ 0-1 depth / disparity value, optional K=, easing) -> one defocus map per frame for Classical "
                   "Bokeh or BokehNet, with Defocus Map's lens controls (a real lens, in-focus band, near/far "
                   "blur). A still (one depth map) with 'frames' set, or a clip with depth per frame.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "depth": (DEPTH, tip("Depth of the clip (one map per frame) or of a still (one map for every frame).")),
                "keyframes": ("STRING", tip(
                    "One keyframe per line, '<frame>: <focus> [K=<blur level>] [easing]'; frames count from 0, "
                    "'last' = the last frame. Focus: 'point x y' (fractions of width/height, resolved on that "
                    "frame), 'distance <metres>' (metric depth), 'depth <0-1>' (0 = nearest of the clip, "
                    "1 = farthest), 'value <disparity>'. Easing (how the focus arrives at the keyframe): linear, "
                    "ease-in-out, hold. Example: '0: point 0.2 0.7' / '12: distance 6' / 'last: depth 1 hold'.",
                    default=DEFAULT_KEYFRAMES, multiline=True)),
                "frames": ("INT", tip("Frames of the pull; 0 = the batch of the depth (or of the image, for a "
                                      "still repeated into frames).", default=0, min=0, max=10000, step=1)),
                "K": ("FLOAT", tip("Blur level until a keyframe sets another (K=...): blur radius in pixels per "
                                   "unit of disparity (1/m) away from the focal plane.",
                                   default=20.0, min=0.0, max=1000.0, step=0.1)),
                "easing": (list(EASINGS), tip("Easing of keyframes that name none: linear, ease-in-out (starts and "
                                              "stops gently) or hold (jumps at the keyframe).",
                                              default="ease-in-out")),
            },
            "optional": {
                "image": ("IMAGE", tip("The frames (or the still), to draw the previews over; with frames = 0 its "
                                       "batch sets the number of frames.")),
                **_lens_controls(),
            },
        }

    RETURN_TYPES = GenRefocusDefocusMap.RETURN_TYPES
    RETURN_NAMES = GenRefocusDefocusMap.RETURN_NAMES
    OUTPUT_TOOLTIPS = ("One signed blur-radius map per frame, for Classical Bokeh / BokehNet (give them the frames, "
                       "or the still: one image serves every frame).",
                       "Colour preview per frame: orange = in front of the focal plane, blue = behind, green = in focus.",
                       *GenRefocusDefocusMap.OUTPUT_TOOLTIPS[2:])
    FUNCTION = "pull"
    CATEGORY = CATEGORY

    def pull(self, depth: DepthMaps, keyframes, frames, K, easing, image=None, blur_mode="K", f_number=2.0,
             focal_length_mm=50.0, sensor_width_mm=36.0, in_focus_range=0.0, in_focus_unit="metres", near_blur=1.0,
             far_blur=1.0):
        if not isinstance(depth, DepthMaps):
            raise InputError("Focus Pull: 'depth' must come from a GenRefocus depth node.")
        disp = depth.disparity.float()
        img = None if image is None else to_image_batch(image, "image")
        n = int(frames) or max(disp.shape[0], 1 if img is None else int(img.shape[0]))
        n = clip_length(int(disp.shape[0]), n)
        if img is not None and img.shape[0] not in (1, n):
            raise InputError(f"Focus Pull: the image batch of {img.shape[0]} does not match the {n} frames of the pull.")
        if blur_mode not in BLUR_MODES:
            raise InputError(f"Focus Pull: unknown blur_mode {blur_mode!r}; use one of {BLUR_MODES}.")
        if in_focus_unit not in BAND_UNITS:
            raise InputError(f"Focus Pull: unknown in_focus_unit {in_focus_unit!r}; use one of {BAND_UNITS}.")
        lens = Lens(f_number, focal_length_mm, sensor_width_mm) if blur_mode == "lens" else None
        band = {"in_focus_m" if in_focus_unit == "metres" else "in_focus_fraction": in_focus_range}
        d = focus_pull(disp, keyframes, frames=n, K=K, easing=easing, metric=depth.metric, lens=lens,
                       near_scale=near_blur, far_scale=far_blur, **band).defocus(disp)
        preview = defocus_preview(d.signed_coc, img)
        comfy_bridge.throw_if_interrupted()
        radius = (d.signed_coc.abs() / MAX_COC).clamp(0.0, 1.0)
        return {"ui": {"images": comfy_bridge.save_preview_images(preview, "genrefocus_focus_pull")},
                "result": (d, preview, radius, in_focus_mask(d.signed_coc))}


NODE_CLASS_MAPPINGS = {"GenRefocusFocusPull": GenRefocusFocusPull}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusFocusPull": "Focus Pull (GenRefocus)"}
