"""ComfyUI nodes of GenRefocus: thin wrappers over genrefocus_core, one module per node family.

`collect_nodes()` imports every node module on its own: a module whose dependencies are missing
(for example diffusers for the generative nodes) is skipped with a logged reason, and the others
still register. Only `comfy_bridge` talks to ComfyUI.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("GenRefocus")

# module -> what it needs, for the log message when it cannot be imported
NODE_MODULES = {
    "scene_nodes": "torch, numpy (procedural test scene)",
    "aperture_nodes": "torch (aperture shapes)",
    "depth_nodes": "torch, numpy, pillow (depth maps from images and files)",
    "depth_pro_nodes": "transformers (Depth Pro)",
    "defocus_nodes": "torch (defocus maps)",
    "focus_pull_nodes": "torch (focus pulls over frames)",
    "classical_nodes": "torch (classical bokeh renderer)",
    "generative_nodes": "safetensors (DeblurNet/BokehNet on ComfyUI's FLUX MODEL)",
}


def collect_nodes() -> tuple[dict, dict, dict]:
    """-> (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, {module: error} of disabled modules).
    Every node gets the number-input checks of `common.with_number_checks`."""
    from .common import with_number_checks

    classes, names, failed = {}, {}, {}
    for mod_name, needs in NODE_MODULES.items():
        try:
            mod = importlib.import_module(f"{__name__}.{mod_name}")
        except Exception as e:  # an optional dependency missing or broken: disable only these nodes
            failed[mod_name] = f"{type(e).__name__}: {e}"
            log.warning("GenRefocus: nodes in '%s' disabled (needs %s): %s", mod_name, needs, failed[mod_name])
            continue
        names.update(mod.NODE_DISPLAY_NAME_MAPPINGS)
        classes.update({key: with_number_checks(cls, names.get(key)) for key, cls in mod.NODE_CLASS_MAPPINGS.items()})
    from .search_aliases import attach
    attach(classes)
    return classes, names, failed
