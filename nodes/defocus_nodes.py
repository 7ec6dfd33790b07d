"""DefocusMap: the defocus (circle-of-confusion) map from depth, a focus choice and a blur level."""
from __future__ import annotations

import logging
import math

import torch

from genrefocus_core.basics.defocus import (FOCUS_MODES, MAX_COC, MAX_TILT, FocusTilt, Lens, build_defocus,
                                            in_focus_mask, resolve_focus)
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import to_image_batch, to_map_batch

from . import comfy_bridge
from .common import CATEGORY, DEFOCUS, DEPTH, DepthMaps, tip

log = logging.getLogger(__name__)

FOCUS_MODES = list(FOCUS_MODES)
BLUR_MODES = ["K", "lens"]
BAND_UNITS = ["metres", "fraction"]


def defocus_preview(signed: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
    """Colour picture of a signed CoC map [B,H,W] -> [B,H,W,3].

    In front of the focal plane: orange, behind it: blue, brightness = blur radius (relative to the
    largest in the batch item); the in-focus region (`in_focus_mask`) is green. Over a given image the
    colours are blended onto its grey version so that the scene stays recognisable.
    """
    B, H, W = signed.shape
    mag = signed.abs()
    peak = mag.flatten(1).amax(1).clamp_min(1e-6).view(B, 1, 1)
    s = (mag / peak).clamp(0, 1)
    front = torch.tensor([1.0, 0.55, 0.1])
    back = torch.tensor([0.15, 0.45, 1.0])
    col = torch.where((signed > 0)[..., None], front, back) * s[..., None]
    focus = in_focus_mask(signed) > 0
    col = torch.where(focus[..., None], torch.tensor([0.2, 1.0, 0.3]), col)
    if image is not None:
        img = to_image_batch(image, "image")
        if img.shape[0] not in (1, B):
            img = img[:1]
        if img.shape[1:3] != (H, W):
            img = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=(H, W), mode="bilinear",
                                                  align_corners=False).permute(0, 2, 3, 1)
        grey = img.mean(-1, keepdim=True).expand(-1, -1, -1, 3).to(col)
        alpha = torch.where(focus, 0.6, 0.35 + 0.5 * s)[..., None]
        col = grey * (1 - alpha) + col * alpha
    return col.clamp(0, 1).contiguous()


class GenRefocusDefocusMap:
    DESCRIPTION = ("Defocus map: the blur radius in pixels of every pixel, zero at the focal plane. Choose the focus by "
                   "a point (click the preview), a mask, a disparity value, a distance in metres or a 0-1 depth "
                   "slider; the blur by a level K or a real lens (thin lens: f-number, focal length, sensor); "
                   "optionally a band of depths kept sharp, separate near/far blur strength and a tilted focal plane "
                   "(tilt-shift). Feeds BokehNet and Classical Bokeh.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "depth": (DEPTH, tip("Depth of the image (from Depth Estimate, Depth From Image, Load Depth Map "
                                     "or the scene node).")),
                "focus_mode": (FOCUS_MODES, tip("How the focal plane is chosen: 'point' = the pixel at (focus_x, "
                                                "focus_y); 'mask' = median disparity inside focus_mask; 'value' = "
                                                "focus_disparity directly; 'distance' = focus_distance_m metres "
                                                "(metric depth); 'depth' = the focus_depth slider (0 = nearest, "
                                                "1 = farthest).", default="point")),
                "focus_x": ("FLOAT", tip("Focus point, horizontal position as a fraction of the width (0 = left, "
                                         "1 = right). Click on this node's preview to set it.",
                                         default=0.5, min=0.0, max=1.0, step=0.001)),
                "focus_y": ("FLOAT", tip("Focus point, vertical position as a fraction of the height (0 = top, "
                                         "1 = bottom). Click on this node's preview to set it.",
                                         default=0.5, min=0.0, max=1.0, step=0.001)),
                "focus_disparity": ("FLOAT", tip("Disparity of the focal plane (1/metres for metric depth: 0.5 = "
                                                 "focus at 2 m). Used when focus_mode is 'value'.",
                                                 default=0.5, min=0.0, max=1000.0, step=0.001)),
                "blur_mode": (BLUR_MODES, tip("'K': the blur level below; 'lens': K from f-number, focal length and "
                                              "sensor width for a lens focused on the chosen focal plane (thin lens, "
                                              "metric depth).", default="K")),
                "K": ("FLOAT", tip("Blur level: blur radius in pixels per unit of disparity (1/m) away from the "
                                   "focal plane. 0 = no blur; the paper's range is about 0-50.",
                                   default=20.0, min=0.0, max=1000.0, step=0.1)),
                "f_number": ("FLOAT", tip("Lens f-number N (blur_mode 'lens'); smaller = more blur.",
                                          default=2.0, min=0.5, max=64.0, step=0.1)),
                "focal_length_mm": ("FLOAT", tip("Lens focal length in millimetres (blur_mode 'lens').",
                                                 default=50.0, min=1.0, max=2000.0, step=0.5)),
                "sensor_width_mm": ("FLOAT", tip("Sensor width in millimetres (36 = full frame; blur_mode 'lens').",
                                                 default=36.0, min=1.0, max=200.0, step=0.1)),
                "focus_distance_m": ("FLOAT", tip("focus_mode 'distance': the distance the lens is focused at, in "
                                                  "metres; the blur is zero at that depth. 0 = infinity. Needs "
                                                  "metric depth.", default=0.0, min=0.0, max=10000.0, step=0.01)),
            },
            "optional": {
                "focus_mask": ("MASK", tip("In-focus region for focus_mode 'mask' (white = keep sharp).")),
                "image": ("IMAGE", tip("The image, only to draw the preview over it (optional).")),
                "focus_depth": ("FLOAT", tip("focus_mode 'depth': a slider through the scene's depth, 0 = the "
                                             "nearest point of the batch, 1 = the farthest (linear in disparity, "
                                             "like a lens's focus ring).", default=0.5, min=0.0, max=1.0,
                                             step=0.001)),
                "in_focus_range": ("FLOAT", tip("A band of depths around the focal plane kept perfectly sharp (depth "
                                                "of field), in the unit of in_focus_unit; outside it the blur grows "
                                                "from the band's edges. 0 = none (a plane, as a thin lens).",
                                                default=0.0, min=0.0, max=10000.0, step=0.01)),
                "in_focus_unit": (BAND_UNITS, tip("'metres': in_focus_range is the band's depth in metres centred "
                                                  "on the focus distance (metric depth); 'fraction': a fraction "
                                                  "(0-1) of the scene's depth range in focus_depth slider units.",
                                                  default="metres")),
                "near_blur": ("FLOAT", tip("Strength of the blur in front of the focal plane (1 = as the lens, "
                                           "0 = foreground sharp).", default=1.0, min=0.0, max=10.0, step=0.01)),
                "far_blur": ("FLOAT", tip("Strength of the blur behind the focal plane (1 = as the lens, "
                                          "0 = background sharp).", default=1.0, min=0.0, max=10.0, step=0.01)),
                "tilt": ("FLOAT", tip("Tilt-shift: turns the focal plane about the focus point (focus_x, focus_y), "
                                      "as a tilt lens does. How far the plane moves across the frame, as a fraction "
                                      "of the scene's depth range: > 0 leans it back like a floor (more of the "
                                      "ground sharp), < 0 against it (a thin sharp band: the miniature look). "
                                      "0 = no tilt.", default=0.0, min=-MAX_TILT, max=MAX_TILT, step=0.01)),
                "tilt_angle": ("FLOAT", tip("Direction of the line that stays sharp through the focus point, in "
                                            "degrees: 0 = horizontal, 90 = vertical.", default=0.0, min=-90.0,
                                            max=90.0, step=0.5)),
            },
        }

    RETURN_TYPES = (DEFOCUS, "IMAGE", "MASK", "MASK")
    RETURN_NAMES = ("defocus", "preview", "blur_radius", "in_focus")
    OUTPUT_TOOLTIPS = ("Signed blur-radius map in pixels, for BokehNet / Classical Bokeh.",
                       "Colour preview: orange = in front of the focal plane, blue = behind, green = in focus.",
                       "Blur radius as a mask: radius in pixels / 100 (1 = 100 px or more), BokehNet's scale.",
                       "In-focus mask: 1 where the blur radius is below half a pixel (rendered exactly sharp).")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, depth: DepthMaps, focus_mode, focus_x, focus_y, focus_disparity, blur_mode, K,
              f_number, focal_length_mm, sensor_width_mm, focus_distance_m, focus_mask=None, image=None,
              focus_depth=0.5, in_focus_range=0.0, in_focus_unit="metres", near_blur=1.0, far_blur=1.0,
              tilt=0.0, tilt_angle=0.0):
        if not isinstance(depth, DepthMaps):
            raise InputError("DefocusMap: 'depth' must come from a GenRefocus depth node.")
        disp = depth.disparity.float()
        B, H, W = disp.shape
        if focus_mode == "point":
            for name, v in (("focus_x", focus_x), ("focus_y", focus_y)):
                if not 0.0 <= float(v) <= 1.0:
                    raise InputError(f"DefocusMap: {name}={v} must lie in [0, 1] (a fraction of the image size).")
        if focus_mode == "mask":
            if focus_mask is None:
                raise InputError("DefocusMap: focus_mode is 'mask' but no focus_mask is connected.")
            if to_map_batch(focus_mask, "focus_mask", size=(H, W)).shape[0] not in (1, B):
                raise InputError(f"focus_mask: batch of {focus_mask.shape[0]} does not match the depth batch of {B}.")
        if blur_mode not in BLUR_MODES:
            raise InputError(f"DefocusMap: unknown blur_mode {blur_mode!r}; use one of {BLUR_MODES}.")
        if in_focus_unit not in BAND_UNITS:
            raise InputError(f"DefocusMap: unknown in_focus_unit {in_focus_unit!r}; use one of {BAND_UNITS}.")
        if focus_mode != "distance" and float(focus_distance_m) > 0:
            if blur_mode == "lens":  # a lens has one focus: two different choices of it are a contradiction
                raise InputError(f"DefocusMap: the lens is focused by focus_mode {focus_mode!r} and also at "
                                 f"focus_distance_m={focus_distance_m} m. Set focus_mode to 'distance' to focus at "
                                 "that distance, or focus_distance_m to 0 to focus where focus_mode says.")
            log.warning("DefocusMap: focus_distance_m is used with focus_mode 'distance' only; focus_mode is %r.",
                        focus_mode)
        distance = float(focus_distance_m) if float(focus_distance_m) > 0 else math.inf
        f = resolve_focus(disp, focus_mode, point=(float(focus_x), float(focus_y)), normalized=True, mask=focus_mask,
                          value=focus_disparity, distance_m=distance, depth=focus_depth, metric=depth.metric)
        lens = Lens(f_number, focal_length_mm, sensor_width_mm) if blur_mode == "lens" else None
        band = {"in_focus_m" if in_focus_unit == "metres" else "in_focus_fraction": in_focus_range}
        tilted = FocusTilt(float(tilt_angle), float(tilt), (float(focus_x), float(focus_y))) if tilt else None
        d = build_defocus(disp, f, K=None if lens else K, lens=lens, metric=depth.metric, near_scale=near_blur,
                          far_scale=far_blur, tilt=tilted, **band)
        preview = defocus_preview(d.signed_coc, image)
        ui = comfy_bridge.save_preview_images(preview, "genrefocus_defocus")
        radius = (d.signed_coc.abs() / MAX_COC).clamp(0.0, 1.0)
        return {"ui": {"images": ui}, "result": (d, preview, radius, in_focus_mask(d.signed_coc))}


NODE_CLASS_MAPPINGS = {"GenRefocusDefocusMap": GenRefocusDefocusMap}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusDefocusMap": "Defocus Map: Depth of Field, Tilt-Shift (GenRefocus)"}
