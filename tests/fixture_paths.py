"""Paths to the project and to ../shared fixtures, importable from any test module.

(Test modules import this, not `conftest`: with tests/comfyui/conftest.py beside the root one, the
name `conftest` refers to whichever pytest loaded last.)
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENREFOCUS_SHARED_DIR", ROOT.parent / "shared"))
PARITY_DIR = Path(os.environ.get("GENREFOCUS_PARITY_DIR", SHARED / "fixtures" / "parity"))
DEPTH_PRO_FIXTURES = SHARED / "fixtures" / "depth_pro"
BOKEH_TOOLS = SHARED / "tools" / "bokeh"
