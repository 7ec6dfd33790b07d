"""Words artists type into the node search, per node (ComfyUI's SEARCH_ALIASES, sent with the node
definitions by ComfyUI versions that know it and searched by their front ends).

Front ends that search only names and display names (1.27 and older) find the classical renderer
through its display name, which starts with "Bokeh" so that it ranks before BokehNet (which needs FLUX).
"""
from __future__ import annotations

ARTIST_WORDS = ["depth of field", "DOF", "lens blur", "bokeh", "refocus", "tilt-shift"]

SEARCH_ALIASES = {
    "GenRefocusClassicalBokeh": ARTIST_WORDS + ["defocus blur", "background blur", "shaped bokeh", "no weights"],
    "GenRefocusDefocusMap": ARTIST_WORDS + ["focus point", "focal plane", "circle of confusion", "CoC", "blur map"],
    "GenRefocusBokehNet": ["bokeh", "refocus", "generative bokeh", "FLUX bokeh", "lens blur"],
    "GenRefocusDeblurNet": ["deblur", "all in focus", "refocus", "sharpen", "defocus deblurring"],
    "GenRefocusApertureShape": ["aperture", "bokeh shape", "iris", "cat's eye", "anamorphic"],
    "GenRefocusScene": ["test scene", "test image", "depth of field test"],
    "GenRefocusDepthFromImage": ["depth", "depth map", "disparity", "depth anything"],
    "GenRefocusLoadDepthMap": ["depth", "depth map", "exr", "npy"],
    "GenRefocusDepthEstimate": ["depth", "depth pro", "metric depth"],
    "GenRefocusLoadDepthPro": ["depth pro"],
    "GenRefocusLoadModel": ["flux", "refocus", "genrefocus"],
    "GenRefocusTiledSampler": ["seed", "tiles", "sampler"],
}


def attach(classes: dict) -> None:
    """Set SEARCH_ALIASES on the node classes that have an entry (a class's own list is kept first)."""
    for name, cls in classes.items():
        words = SEARCH_ALIASES.get(name)
        if words:
            own = list(getattr(cls, "SEARCH_ALIASES", []))
            cls.SEARCH_ALIASES = own + [w for w in words if w not in own]
