"""GenRefocusScene: the demo's procedural scene (textured surfaces at several depths, occlusion edges,
point lights) as an IMAGE with its exact depth, so the pack can be tried without any weights."""
from __future__ import annotations

from genrefocus_core.basics.defocus import disparity_from_depth
from genrefocus_core.basics.scene import make_scene

from .common import CATEGORY, DEPTH, DepthMaps, tip
from .previews import disparity_preview


class GenRefocusScene:
    DESCRIPTION = ("A procedurally generated test scene with its exact metric depth (the same one the demo "
                   "renders): try Defocus Map + Classical Bokeh without any model weights.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", tip("Image width in pixels.", default=768, min=8, max=8192, step=8)),
            "height": ("INT", tip("Image height in pixels.", default=512, min=8, max=8192, step=8)),
            "seed": ("INT", tip("Seed of the scene's colours, textures and layout.", default=0, min=0,
                                max=0xFFFFFFFF)),
        }}

    RETURN_TYPES = ("IMAGE", DEPTH, "IMAGE")
    RETURN_NAMES = ("image", "depth", "depth_preview")
    OUTPUT_TOOLTIPS = ("The scene, sharp everywhere.", "Its exact metric depth, for Defocus Map.",
                       "Disparity preview: bright = near.")
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, width, height, seed):
        image, depth_m = make_scene(height=int(height), width=int(width), seed=int(seed))
        disp = disparity_from_depth(depth_m)
        maps = DepthMaps(disparity=disp, metric=True)
        return (image, maps, disparity_preview(disp))


NODE_CLASS_MAPPINGS = {"GenRefocusScene": GenRefocusScene}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusScene": "Test Scene (GenRefocus)"}
