"""ApertureShape: the bokeh shape for Classical Bokeh and (with an aperture LoRA) BokehNet."""
from __future__ import annotations

from genrefocus_core.basics import apertures
from genrefocus_core.basics.errors import InputError

from .common import APERTURE, CATEGORY, tip

SHAPE_CHOICES = list(apertures.SHAPES) + ["custom"]


class GenRefocusApertureShape:
    DESCRIPTION = ("The lens aperture's shape, i.e. the shape of out-of-focus highlights: circle, n-blade polygon "
                   "(rotation, rounded blades), triangle, star, heart, cat-eye, annular (mirror lens: ring bokeh), "
                   "or any custom shape from an image or mask (white = open), kept exactly as drawn.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "shape": (SHAPE_CHOICES, tip("Aperture shape; 'custom' uses custom_image or custom_mask.",
                                             default="circle")),
                "blades": ("INT", tip("Polygon: number of aperture blades (5 = pentagon, 6 = hexagon...).",
                                      default=6, min=3, max=32, step=1)),
                "rotation_deg": ("FLOAT", tip("Rotation of polygon, triangle, star and heart shapes in degrees.",
                                              default=0.0, min=-360.0, max=360.0, step=0.5)),
                "curvature": ("FLOAT", tip("Polygon: blade curvature, 0 = straight blades, 1 = round (a circle).",
                                           default=0.0, min=0.0, max=1.0, step=0.01)),
                "star_points": ("INT", tip("Star: number of points.", default=5, min=3, max=32, step=1)),
                "star_inner_ratio": ("FLOAT", tip("Star: inner radius as a fraction of the outer radius.",
                                                  default=0.5, min=0.05, max=0.95, step=0.01)),
                "cat_eye_strength": ("FLOAT", tip("Cat-eye: how much of the disc is cut off (optical vignetting).",
                                                  default=0.5, min=0.0, max=0.95, step=0.01)),
                "cat_eye_direction_deg": ("FLOAT", tip("Cat-eye: direction of the cut in degrees.",
                                                       default=0.0, min=-360.0, max=360.0, step=0.5)),
                "preview_size": ("INT", tip("Side in pixels of the preview image (and of BokehNet's shape "
                                            "exemplar).", default=256, min=16, max=2048, step=16)),
            },
            "optional": {
                "custom_image": ("IMAGE", tip("Custom shape (shape 'custom'): white = open part of the aperture; "
                                              "the first image of a batch is used.")),
                "custom_mask": ("MASK", tip("Custom shape as a mask (shape 'custom'); used when no custom_image.")),
                "threshold": ("FLOAT", tip("Custom shape: brightness above which a pixel is open. The shape is "
                                           "used exactly as drawn, holes and rings included.",
                                           default=0.5, min=0.0, max=1.0, step=0.01)),
                "annular_inner_ratio": ("FLOAT", tip("Annular (mirror lens): radius of the round central "
                                                     "obstruction as a fraction of the outer radius; the bokeh "
                                                     "become rings.", default=0.45, min=0.0, max=0.95, step=0.01)),
            },
        }

    RETURN_TYPES = (APERTURE, "IMAGE")
    RETURN_NAMES = ("aperture", "preview")
    OUTPUT_TOOLTIPS = ("The aperture shape, for Classical Bokeh or BokehNet.", "White shape on black.")
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, shape, blades, rotation_deg, curvature, star_points, star_inner_ratio, cat_eye_strength,
             cat_eye_direction_deg, preview_size, custom_image=None, custom_mask=None, threshold=0.5,
             annular_inner_ratio=0.45):
        source = None
        if shape == "custom":
            source = custom_image if custom_image is not None else custom_mask
            if source is None:
                raise InputError("Aperture Shape: shape is 'custom' but neither custom_image nor custom_mask is "
                                 "connected.")
            if source.ndim == 4:  # IMAGE [B,H,W,C] -> grey of the first image
                source = source[0].float().mean(-1)
            elif source.ndim == 3:  # MASK [B,H,W]
                source = source[0]
        if shape not in SHAPE_CHOICES:
            raise InputError(f"Aperture Shape: unknown shape {shape!r}; choose one of {SHAPE_CHOICES}.")
        ap = apertures.make_aperture(shape, blades=blades, rotation_deg=rotation_deg, curvature=curvature,
                                     points=star_points, inner_ratio=star_inner_ratio, strength=cat_eye_strength,
                                     direction_deg=cat_eye_direction_deg, hole_ratio=annular_inner_ratio,
                                     mask=source, threshold=threshold)
        preview = ap.condition_image(preview_size, preview_size)
        return (ap, preview)


NODE_CLASS_MAPPINGS = {"GenRefocusApertureShape": GenRefocusApertureShape}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusApertureShape": "Aperture Shape (GenRefocus)"}
