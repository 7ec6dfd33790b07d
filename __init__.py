"""ComfyUI-GenRefocus: generative refocusing (DeblurNet / BokehNet on FLUX.1-dev) and a physically
based classical bokeh renderer as ComfyUI nodes. ComfyUI loads this file from custom_nodes/."""
import logging
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    # genrefocus_core is imported by its own name (it is also used outside ComfyUI); appended, so
    # that nothing of ComfyUI's (its `nodes` module in particular) is shadowed.
    sys.path.append(_here)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
WEB_DIRECTORY = "./web/js"

try:
    from .nodes import collect_nodes
    from .nodes.comfy_bridge import register_model_folders

    register_model_folders()
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, _disabled = collect_nodes()
except Exception as _e:  # never take ComfyUI down with us
    logging.getLogger("GenRefocus").exception("GenRefocus: the node pack could not be loaded: %s", _e)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
