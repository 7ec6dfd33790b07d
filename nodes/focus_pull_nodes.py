"""FocusPull: a defocus map per frame from focus keyframes, for Classical Bokeh and BokehNet (rack focus)."""
from __future__ import annotations

from genrefocus_core.basics.defocus import MAX_COC, in_focus_mask
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.focus_pull import EASINGS, clip_length, focus_pull
from genrefocus_core.basics.images import to_image_batch

from . import comfy_bridge
from .common import CATEGORY, DEFOCUS, DEPTH, DepthMaps, tip
from .defocus_nodes import GenRefocusDefocusMap, defocus_preview

DEFAULT_KEYFRAMES = "0: depth 0.1\nlast: depth 0.9"


class GenRefocusFocusPull:
    DESCRIPTION = ("Focus pull (rack focus) over a batch of frames: focus keyframes (frame: point / distance in metres "
                   "/ 0-1 depth / disparity value, optional K=, easing) -> one defocus map per frame for Classical "
                   "Bokeh or BokehNet. A still (one depth map) with 'frames' set, or a clip with depth per frame.")

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

    def pull(self, depth: DepthMaps, keyframes, frames, K, easing, image=None):
        if not isinstance(depth, DepthMaps):
            raise InputError("Focus Pull: 'depth' must come from a GenRefocus depth node.")
        disp = depth.disparity.float()
        img = None if image is None else to_image_batch(image, "image")
        n = int(frames) or max(disp.shape[0], 1 if img is None else int(img.shape[0]))
        n = clip_length(int(disp.shape[0]), n)
        if img is not None and img.shape[0] not in (1, n):
            raise InputError(f"Focus Pull: the image batch of {img.shape[0]} does not match the {n} frames of the pull.")
        d = focus_pull(disp, keyframes, frames=n, K=K, easing=easing, metric=depth.metric).defocus(disp)
        preview = defocus_preview(d.signed_coc, img)
        comfy_bridge.throw_if_interrupted()
        radius = (d.signed_coc.abs() / MAX_COC).clamp(0.0, 1.0)
        return {"ui": {"images": comfy_bridge.save_preview_images(preview, "genrefocus_focus_pull")},
                "result": (d, preview, radius, in_focus_mask(d.signed_coc))}


NODE_CLASS_MAPPINGS = {"GenRefocusFocusPull": GenRefocusFocusPull}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusFocusPull": "Focus Pull (GenRefocus)"}
