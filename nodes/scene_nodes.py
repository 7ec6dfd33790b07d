"""GenRefocusScene: the demo's procedural scene (textured surfaces at several depths, occlusion edges,
point lights) as an IMAGE with its exact depth, so the pack can be tried without any weights."""
from __future__ import annotations

from genrefocus_core.basics.defocus import disparity_from_depth
from genrefocus_core.basics.scene import MAX_CLIP_FRAMES, make_scene, make_scene_clip

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
        return scene_outputs(*make_scene(height=int(height), width=int(width), seed=int(seed)))


def scene_outputs(images, depth_m):
    """(images, depth maps, disparity preview) of a generated scene with exact metric depth."""
    disp = disparity_from_depth(depth_m)
    return (images, DepthMaps(disparity=disp, metric=True), disparity_preview(disp))


class GenRefocusSceneClip(GenRefocusScene):
    DESCRIPTION = ("The test scene as a clip with exact metric depth in every frame: the camera stands still and a "
                   "round sign enters from the left (absent from the first frame). Try focus pulls and video "
                   "depth without any footage or weights.")

    @classmethod
    def INPUT_TYPES(cls):
        spec = super().INPUT_TYPES()
        spec["required"]["frames"] = ("INT", tip("Number of frames of the clip.", default=24, min=1,
                                                 max=MAX_CLIP_FRAMES, step=1))
        return spec

    OUTPUT_TOOLTIPS = ("The clip's frames, sharp everywhere.", "Their exact metric depth, for Defocus Map or "
                       "Focus Pull.", "Disparity preview: bright = near (one scale for the whole clip).")

    def make(self, width, height, seed, frames=24):
        return scene_outputs(*make_scene_clip(height=int(height), width=int(width), frames=int(frames), seed=int(seed)))


NODE_CLASS_MAPPINGS = {"GenRefocusScene": GenRefocusScene, "GenRefocusSceneClip": GenRefocusSceneClip}
NODE_DISPLAY_NAME_MAPPINGS = {"GenRefocusScene": "Test Scene (GenRefocus)",
                              "GenRefocusSceneClip": "Test Scene Clip (GenRefocus)"}
