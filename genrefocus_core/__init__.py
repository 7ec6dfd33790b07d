"""GenRefocus core: generative refocusing (DeblurNet/BokehNet on FLUX.1-dev) and a classical
physically based bokeh renderer. Never imports ComfyUI; usable from scripts, the CLI and other apps.

Submodules are imported on first use so that `import genrefocus_core` stays light.
"""
from .basics.errors import GenRefocusError, InputError, Interrupted, MissingModelFileError, ModelFileError, \
    OutputError

__version__ = "0.1.0"

__all__ = ["GenRefocusError", "InputError", "Interrupted", "MissingModelFileError", "ModelFileError", "OutputError", "__version__"]
