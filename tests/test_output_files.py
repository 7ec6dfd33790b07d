"""Lost data: no failed, interrupted or refused write may destroy or change an existing file, and bad
output paths are refused before any computation (class "lost data" and "output paths" of issue 10)."""
from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fixture_paths import ROOT
from hostile import forbid, photo_and_depth, run_cli, snapshot
from genrefocus_core.basics import files
from genrefocus_core.basics.errors import OutputError
from genrefocus_core.basics.images import load_image, save_image


def _disk_full_after_some_bytes(monkeypatch):
    """PIL's save writes part of the file, then the disk is full."""
    def save(self, fp, format=None, **params):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", save)


def test_disk_full_keeps_the_previous_image(tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    save_image(torch.zeros(1, 4, 4, 3), out)
    before = snapshot(tmp_path)
    _disk_full_after_some_bytes(monkeypatch)
    with pytest.raises(OutputError, match="No space left on device.*previous file is unchanged"):
        save_image(torch.ones(1, 4, 4, 3), out)
    assert snapshot(tmp_path) == before  # same bytes, and no temporary file left


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    out = tmp_path / "depth.npy"
    files.save_array(np.zeros(3), out)
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(out) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert snapshot(tmp_path) == before


def test_atomic_write_replaces_and_keeps_permissions(tmp_path):
    out = tmp_path / "a.png"
    save_image(torch.zeros(1, 4, 4, 3), out)
    os.chmod(out, 0o640)
    save_image(torch.ones(1, 4, 4, 3), out)
    assert float(load_image(out).min()) == 1.0
    assert out.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_every_file_write_goes_through_the_atomic_helper():
    """Structural: outside basics/files.py no module writes a file directly (PIL .save to a path,
    np.save, safetensors save_file, open(..., 'w')); they all use files.atomic_write. The one
    exception writes a whole folder into a temporary folder and renames it (depth_pro's cache)."""
    allowed = {("genrefocus_core/depth/depth_pro.py", "save_file"),  # into a temporary folder, renamed after
               ("genrefocus_core/depth/depth_pro.py", "to_json_file"),
               ("genrefocus_core/generative/prompt_cache.py", "save")}  # safetensors to bytes -> files.save_bytes
    offenders = []
    for path in list((ROOT / "genrefocus_core").rglob("*.py")) + list((ROOT / "nodes").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "genrefocus_core/basics/files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            writes = name in ("save", "save_file", "to_json_file", "write_text", "write_bytes", "tofile")
            if name == "open" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                    any(c in str(node.args[1].value) for c in "wax+"):
                writes = True
            if writes and (rel, name) not in allowed:
                offenders.append(f"{rel}:{node.lineno} {name}")
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------- CLI outputs

@pytest.fixture
def scene(tmp_path):
    photo, depth = photo_and_depth(tmp_path)
    return tmp_path, photo, depth


def test_render_refuses_out_equal_to_an_input(scene, capsys, monkeypatch):
    folder, photo, depth = scene
    forbid(monkeypatch, "genrefocus_core.cli.render.render_bokeh")
    (folder / "sub").mkdir()
    os.symlink(photo, folder / "link.png")
    before = snapshot(folder)
    for out in (photo, folder / "sub" / ".." / "photo.png", folder / "link.png"):
        code, err = run_cli(capsys, "render", "--image", photo, "--depth", depth, "--out", out)
        assert code == 1 and "is the input file" in err, err
    code, err = run_cli(capsys, "render", "--image", photo, "--depth", depth, "--focus-mask", folder / "m.png",
                        "--out", folder / "m.png")
    assert code == 1 and "is the input file" in err
    assert snapshot(folder) == before


@pytest.mark.parametrize("out, problem", [
    ("missing/out.png", "does not exist"),
    ("out.xyz", "unknown extension '.xyz'"),
    ("out", "unknown extension '(none)'"),
    (".", "is a folder"),
    ("/proc/genrefocus_out.png", "cannot write in the folder /proc"),
    ("photo.png/out.png", "is not a folder"),
])
def test_render_refuses_bad_output_paths_before_rendering(scene, capsys, monkeypatch, out, problem):
    folder, photo, depth = scene
    forbid(monkeypatch, "genrefocus_core.cli.render.render_bokeh")
    forbid(monkeypatch, "genrefocus_core.cli.render.load_image")  # refused before even reading the inputs
    target = out if out.startswith("/") else folder / out
    before = snapshot(folder)
    code, err = run_cli(capsys, "render", "--image", photo, "--depth", depth, "--out", target)
    assert code == 1 and problem in err, err
    assert snapshot(folder) == before


def test_render_disk_full_keeps_the_previous_output(scene, capsys, monkeypatch):
    folder, photo, depth = scene
    out = folder / "out.png"
    save_image(torch.zeros(1, 24, 32, 3), out)
    before = snapshot(folder)
    _disk_full_after_some_bytes(monkeypatch)
    code, err = run_cli(capsys, "render", "--image", photo, "--depth", depth, "--K", "2", "--out", out)
    assert code == 1 and "No space left on device" in err and "previous file is unchanged" in err
    assert snapshot(folder) == before


def test_demo_out_naming_an_existing_file_is_refused(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "genrefocus_core.cli.demo.make_scene")
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "demo", "--out", existing)
    assert code == 1 and "is an existing file, not a folder" in err
    assert snapshot(tmp_path) == before


def test_generative_cli_refuses_outputs_before_loading_models(tmp_path, capsys, monkeypatch):
    """--out / --save-aif / --save-defocus are checked before any model file is read: none may be an
    input (the photo, a LoRA, the FLUX file...), another output, or of the wrong kind."""
    forbid(monkeypatch, "genrefocus_core.cli.generative._load")
    photo, _ = photo_and_depth(tmp_path)
    lora = tmp_path / "bokehNet.safetensors"
    lora.write_bytes(b"not really a LoRA, but it must survive")
    before = snapshot(tmp_path)
    base = ["refocus", "--image", photo, "--flux", tmp_path / "f.safetensors", "--vae", tmp_path / "ae.safetensors",
            "--bokeh-lora", lora, "--depth", tmp_path / "depth.npy"]
    cases = [
        (["--out", lora], "is the input file"),
        (["--out", photo], "is the input file"),
        (["--out", tmp_path / "o.png", "--save-aif", tmp_path / "o.png"], "another output"),
        (["--out", tmp_path / "o.png", "--save-defocus", tmp_path / "d.png"], "unknown extension '.png'"),
        (["--out", tmp_path / "nope" / "o.png"], "does not exist"),
        (["--out", tmp_path / "o.png", "--K", "nan"], "--K must be a finite number"),
        (["--out", tmp_path / "o.png", "--bokeh-seed", "-1"], "Seed must be a whole number"),
        (["--out", tmp_path / "o.png", "--seed", "-5"], "Seed must be a whole number"),
    ]
    for extra, problem in cases:
        code, err = run_cli(capsys, *base, *extra)
        assert code == 1 and problem in err, (extra, err)
    assert snapshot(tmp_path) == before


def test_demo_refuses_bad_requests_before_creating_its_folder(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "genrefocus_core.cli.demo.make_scene")
    for extra, problem in ((["--size", "99999x99999"], "too large"), (["--seed", "-1"], "seed must be a whole number"),
                           (["--K", "-2"], "Blur level K")):
        code, err = run_cli(capsys, "demo", "--out", tmp_path / "demo", *extra)
        assert code == 1 and problem in err, (extra, err)
    assert list(tmp_path.iterdir()) == []
