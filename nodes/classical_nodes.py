"""ClassicalBokeh: the physically based depth-of-field renderer (no weights, CPU or GPU)."""
from __future__ import annotations

from genrefocus_core.classical.renderer import (HIGHLIGHT_BOOST_DEFAULT, HIGHLIGHT_THRESHOLD_DEFAULT, QUALITY_PRESETS,
                                               render_bokeh)
from genrefocus_core.basics.defocus import Defocus
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import to_image_batch

from . import comfy_bridge
from .common import APERTURE, CATEGORY, DEFOCUS, broadcast_batches, tip


class GenRefocusClassicalBokeh:
    DESCRIPTION = ("Refocus an image with the classical renderer: occlusion-aware, in linear light, any aperture "
                   "shape, exact where the blur radius is 0. Needs no model weights; runs on the CPU in seconds.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", tip("The sharp (all-in-focus) image to refocus.")),
                "defocus": (DEFOCUS, tip("Blur radius map from Defocus Map (its sign tells front from back).")),
                "highlight_boost": ("FLOAT", tip("Give clipped highlights back the light their pixels could not "
                                                 "hold, so they bloom like the point lights they were: 0 = off, "
                                                 "1 = a point light's bokeh disc as bright as the light (energy "
                                                 "kept), above 1 brighter (discs clip). Only pixels above "
                                                 "highlight_threshold that are blurred change.",
                                                 default=HIGHLIGHT_BOOST_DEFAULT, min=0.0, max=20.0, step=0.05)),
                "highlight_threshold": ("FLOAT", tip("Linear brightness (brightest channel) above which a pixel "
                                                     "counts as a clipped highlight for highlight_boost.",
                                                     default=HIGHLIGHT_THRESHOLD_DEFAULT, min=0.0, max=0.999,
                                                     step=0.01)),
                "colorspace": (["srgb", "linear"], tip("'srgb' for ordinary images (blurred in linear light); "
                                                       "'linear' if the image data is already linear.",
                                                       default="srgb")),
            },
            "optional": {
                "aperture": (APERTURE, tip("Aperture shape from Aperture Shape (default: a circle).")),
                "max_radius": ("FLOAT", tip("Cap on the blur radius in pixels (0 = half the image's long edge).",
                                            default=0.0, min=0.0, max=4096.0, step=1.0)),
                "quality": (list(QUALITY_PRESETS), tip("Depth-level spacing: 'best' keeps large bokeh shapes crisp-edged "
                                                       "(stars, hearts, polygons) at about 1.8x the time, 'fast' is "
                                                       "softer and quicker; the blur radius is equally exact.",
                                                       default="balanced")),
                "flip_front": ("BOOLEAN", tip("Turn the aperture shape by 180 degrees in front of the focal plane, "
                                              "as a real lens does.", default=True)),
                "cat_eye_across_frame": ("FLOAT", tip("Cat's-eye bokeh towards the frame's edges (mechanical "
                                                      "vignetting): the aperture is clipped more the farther from "
                                                      "the centre, by up to this much at the corners. 0 = off.",
                                                      default=0.0, min=0.0, max=0.95, step=0.01)),
                "grain": ("FLOAT", tip("Add the noise/grain measured in the sharp region where the image was "
                                       "blurred, so blurred areas do not look plastic: 0 = off, 1 = matched.",
                                       default=0.0, min=0.0, max=4.0, step=0.05)),
                "grain_seed": ("INT", tip("Seed of the added grain (the same seed gives the same grain).",
                                          default=0, min=0, max=2 ** 32 - 1, step=1)),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The refocused image.",)
    FUNCTION = "render"
    CATEGORY = CATEGORY

    def render(self, image, defocus, highlight_boost, highlight_threshold, colorspace, aperture=None,
               max_radius=0.0, quality="balanced", flip_front=True, cat_eye_across_frame=0.0, grain=0.0,
               grain_seed=0):
        if not isinstance(defocus, Defocus):
            raise InputError("Classical Bokeh: 'defocus' must come from the Defocus Map node.")
        img = to_image_batch(image, "image")
        img, coc = broadcast_batches((img, "image"), (defocus.signed_coc, "defocus"))
        device = comfy_bridge.torch_device()
        comfy_bridge.throw_if_interrupted()
        out = render_bokeh(img.to(device), defocus_px=coc.to(device), aperture=aperture, colorspace=colorspace,
                           highlight_boost=highlight_boost, highlight_threshold=highlight_threshold,
                           max_radius=max_radius if max_radius > 0 else None, quality=quality,
                           flip_front=flip_front, vignetting=cat_eye_across_frame, grain=grain, grain_seed=grain_seed)
        return (out.float().cpu().clamp(0, 1),)


NODE_CLASS_MAPPINGS = {"GenRefocusClassicalBokeh": GenRefocusClassicalBokeh}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusClassicalBokeh": "Bokeh Lens Blur, DOF (GenRefocus)"}
