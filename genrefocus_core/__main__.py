"""`python -m genrefocus_core <command> ...`: the core without ComfyUI.

Each command lives in its own module and exposes `main(argv) -> int`; they are imported only when
chosen so that `demo` needs nothing beyond torch, numpy and pillow.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("genrefocus_core.cli.demo", "render the built-in procedural scene with the classical renderer (no weights)"),
    "render": ("genrefocus_core.cli.render", "classical refocus of an image file with a depth file"),
    "deblur": ("genrefocus_core.cli.generative", "DeblurNet: all-in-focus image from a photo (needs FLUX weights)"),
    "refocus": ("genrefocus_core.cli.generative", "deblur + depth + BokehNet refocus of a photo (needs weights)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m genrefocus_core <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:10s} {doc}")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    from .basics.errors import GenRefocusError
    try:
        return int(module.main(argv) or 0)
    except GenRefocusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
