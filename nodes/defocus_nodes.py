"""DefocusMap: the defocus (circle-of-confusion) map from depth, a focus choice and a blur level."""
from __future__ import annotations

import torch

from genrefocus_core.basics import defocus as core_defocus
from genrefocus_core.basics.defocus import blur_level_from_lens, check_blur_level, signed_coc
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import resize_map, to_image_batch, to_map_batch

from . import comfy_bridge
from .common import CATEGORY, DEFOCUS, DEPTH, DefocusData, DepthMaps, tip

FOCUS_MODES = ["point", "mask", "value"]
BLUR_MODES = ["K", "lens"]


def defocus_preview(signed: torch.Tensor, image: torch.Tensor | None = None, in_focus_px: float = 1.0) -> torch.Tensor:
    """Colour picture of a signed CoC map [B,H,W] -> [B,H,W,3].

    In front of the focal plane: orange, behind it: blue, brightness = blur radius (relative to the
    largest in the batch item); the in-focus band (|CoC| < in_focus_px) is green. Over a given image the
    colours are blended onto its grey version so that the scene stays recognisable.
    """
    B, H, W = signed.shape
    mag = signed.abs()
    peak = mag.flatten(1).amax(1).clamp_min(1e-6).view(B, 1, 1)
    s = (mag / peak).clamp(0, 1)
    front = torch.tensor([1.0, 0.55, 0.1])
    back = torch.tensor([0.15, 0.45, 1.0])
    col = torch.where((signed > 0)[..., None], front, back) * s[..., None]
    focus = mag < in_focus_px
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
    DESCRIPTION = ("Defocus map |K * (disparity - focus disparity)| in pixels of blur radius: choose the focus by a "
                   "point (click the preview), a mask or a disparity value, and the blur level K directly or from "
                   "lens parameters. Feeds BokehNet and Classical Bokeh.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "depth": (DEPTH, tip("Depth of the image (from Depth Estimate, Depth From Image, Load Depth Map "
                                     "or the scene node).")),
                "focus_mode": (FOCUS_MODES, tip("How the focal plane is chosen: 'point' = the pixel at (focus_x, "
                                                "focus_y); 'mask' = median disparity inside focus_mask; 'value' = "
                                                "focus_disparity directly.", default="point")),
                "focus_x": ("FLOAT", tip("Focus point, horizontal position as a fraction of the width (0 = left, "
                                         "1 = right). Click on this node's preview to set it.",
                                         default=0.5, min=0.0, max=1.0, step=0.001)),
                "focus_y": ("FLOAT", tip("Focus point, vertical position as a fraction of the height (0 = top, "
                                         "1 = bottom). Click on this node's preview to set it.",
                                         default=0.5, min=0.0, max=1.0, step=0.001)),
                "focus_disparity": ("FLOAT", tip("Disparity of the focal plane (1/metres for metric depth: 0.5 = "
                                                 "focus at 2 m). Used when focus_mode is 'value'.",
                                                 default=0.5, min=0.0, max=1000.0, step=0.001)),
                "blur_mode": (BLUR_MODES, tip("'K': the blur level below; 'lens': compute K from f-number, focal "
                                              "length, sensor width and focus distance (thin lens, metric depth).",
                                              default="K")),
                "K": ("FLOAT", tip("Blur level: blur radius in pixels per unit of disparity (1/m) away from the "
                                   "focal plane. 0 = no blur; the paper's range is about 0-50.",
                                   default=20.0, min=0.0, max=1000.0, step=0.1)),
                "f_number": ("FLOAT", tip("Lens f-number N (blur_mode 'lens'); smaller = more blur.",
                                          default=2.0, min=0.5, max=64.0, step=0.1)),
                "focal_length_mm": ("FLOAT", tip("Lens focal length in millimetres (blur_mode 'lens').",
                                                 default=50.0, min=1.0, max=2000.0, step=0.5)),
                "sensor_width_mm": ("FLOAT", tip("Sensor width in millimetres (36 = full frame; blur_mode 'lens').",
                                                 default=36.0, min=1.0, max=200.0, step=0.1)),
                "focus_distance_m": ("FLOAT", tip("blur_mode 'lens': distance the lens is focused at, in metres; "
                                                  "0 = the depth of the chosen focal plane (physically consistent).",
                                                  default=0.0, min=0.0, max=10000.0, step=0.01)),
            },
            "optional": {
                "focus_mask": ("MASK", tip("In-focus region for focus_mode 'mask' (white = keep sharp).")),
                "image": ("IMAGE", tip("The image, only to draw the preview over it (optional).")),
            },
        }

    RETURN_TYPES = (DEFOCUS, "IMAGE")
    RETURN_NAMES = ("defocus", "preview")
    OUTPUT_TOOLTIPS = ("Signed blur-radius map in pixels, for BokehNet / Classical Bokeh.",
                       "Colour preview: orange = in front of the focal plane, blue = behind, green = in focus.")
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, depth: DepthMaps, focus_mode, focus_x, focus_y, focus_disparity, blur_mode, K,
              f_number, focal_length_mm, sensor_width_mm, focus_distance_m, focus_mask=None, image=None):
        if not isinstance(depth, DepthMaps):
            raise InputError("DefocusMap: 'depth' must come from a GenRefocus depth node.")
        disp = depth.disparity.float()
        B, H, W = disp.shape
        if focus_mode == "point":
            f = focus_disparity_at(disp, focus_x, focus_y)
        elif focus_mode == "mask":
            if focus_mask is None:
                raise InputError("DefocusMap: focus_mode is 'mask' but no focus_mask is connected.")
            m = to_map_batch(focus_mask, "focus_mask")
            if m.shape[0] not in (1, B):
                raise InputError(f"focus_mask: batch of {m.shape[0]} does not match the depth batch of {B}.")
            if m.shape[-2:] != (H, W):
                m = resize_map(m, (H, W), mode="nearest")
            f = core_defocus.focus_disparity(disp, mask=m)
        elif focus_mode == "value":
            f = core_defocus.focus_disparity(disp, value=focus_disparity)
        else:
            raise InputError(f"DefocusMap: unknown focus_mode {focus_mode!r}; use one of {FOCUS_MODES}.")
        if blur_mode == "lens":
            if not depth.metric:
                raise InputError("DefocusMap: blur_mode 'lens' needs metric depth (1/m disparity); this depth is "
                                 "relative. Use blur_mode 'K', or a metric depth source.")
            ks = lens_blur_levels(f, f_number, focal_length_mm, sensor_width_mm, focus_distance_m, max(H, W))
        elif blur_mode == "K":
            ks = [check_blur_level(K)] * B
        else:
            raise InputError(f"DefocusMap: unknown blur_mode {blur_mode!r}; use one of {BLUR_MODES}.")
        coc = torch.cat([signed_coc(disp[b:b + 1], f[b:b + 1], ks[b]) for b in range(B)])
        data = DefocusData(signed_coc=coc, disparity=disp, focus_disparity=f, K=float(ks[0]),
                           extra={"focus_mode": focus_mode, "metric": depth.metric, "K_per_image": ks})
        preview = defocus_preview(coc, image)
        ui = comfy_bridge.save_preview_images(preview, "genrefocus_defocus")
        return {"ui": {"images": ui, "genrefocus_focus": [[float(focus_x), float(focus_y)]]},
                "result": (data, preview)}


def lens_blur_levels(focus: torch.Tensor, f_number, focal_length_mm, sensor_width_mm, focus_distance_m,
                     long_edge_px: int) -> list[float]:
    """K per image from thin-lens parameters; the focus distance is given, or (0) that of the focal plane,
    1 / focus disparity (a focal plane at infinity, disparity 0, gives the limit f^2 / 2N)."""
    out = []
    for d in focus.tolist():
        if focus_distance_m and focus_distance_m > 0:
            dist = float(focus_distance_m)
        else:
            dist = 1.0 / d if d > 1e-9 else 1e9
        out.append(check_blur_level(blur_level_from_lens(f_number, focal_length_mm, sensor_width_mm, dist,
                                                         long_edge_px)))
    return out


def focus_disparity_at(disp: torch.Tensor, fx: float, fy: float) -> torch.Tensor:
    """Disparity at a normalised point (fractions of width/height, as the picker stores them) -> [B]."""
    for name, v in (("focus_x", fx), ("focus_y", fy)):
        if not 0.0 <= float(v) <= 1.0:
            raise InputError(f"DefocusMap: {name}={v} must lie in [0, 1] (a fraction of the image size).")
    return core_defocus.focus_disparity(disp, point=(float(fx), float(fy)), normalized=True)


NODE_CLASS_MAPPINGS = {"GenRefocusDefocusMap": GenRefocusDefocusMap}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusDefocusMap": "Defocus Map (GenRefocus)"}
