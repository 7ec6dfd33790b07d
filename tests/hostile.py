"""Helpers of the bad-input tests: run a CLI command in-process, and prove that no file changed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def snapshot(*folders) -> dict:
    """{path: (bytes, mtime_ns)} of every file under the folders: equal before and after a failed
    run means nothing was written, replaced, truncated or left behind (temporary files included)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `python -m genrefocus_core ...` run in this process."""
    from genrefocus_core.__main__ import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def photo_and_depth(folder, h: int = 24, w: int = 32):
    """A small photo (PNG) and its metric depth (.npy) in `folder` -> (photo path, depth path)."""
    from genrefocus_core.basics.images import save_image

    folder = Path(folder)
    g = torch.Generator().manual_seed(0)
    photo, depth = folder / "photo.png", folder / "depth.npy"
    save_image(torch.rand(1, h, w, 3, generator=g), photo)
    np.save(depth, np.linspace(1.0, 5.0, h * w, dtype=np.float32).reshape(h, w))
    return photo, depth


def forbid(monkeypatch, target: str):
    """Make `target` (module.attr) fail the test if called: the run must stop before that work."""
    def called(*args, **kwargs):
        raise AssertionError(f"{target} ran although the input was refused beforehand")
    monkeypatch.setattr(target, called)
