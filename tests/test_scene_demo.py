"""Procedural scene, the demo command and the render command."""
import numpy as np
import pytest
import torch
from PIL import Image

from genrefocus_core.cli import render as cli_render, demo
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import save_image
from genrefocus_core.basics.scene import CARD_M, FAR_WALL_M, PILLAR_M, make_scene, scene_landmarks


def test_scene_is_deterministic_with_exact_depth():
    img, depth = make_scene(96, 128, seed=3)
    assert img.shape == (1, 96, 128, 3) and depth.shape == (1, 96, 128)
    assert img.dtype == torch.float32 and float(img.min()) >= 0 and float(img.max()) <= 1
    assert torch.isfinite(depth).all() and float(depth.min()) > 0
    img2, depth2 = make_scene(96, 128, seed=3)
    assert torch.equal(img, img2) and torch.equal(depth, depth2)
    img3, _ = make_scene(96, 128, seed=4)
    assert not torch.equal(img, img3)
    # the named surfaces sit at their depths; point lights are present
    marks = scene_landmarks(96, 128)
    at = lambda name: float(depth[0, marks[name][1], marks[name][0]])
    assert at("far wall") == FAR_WALL_M and at("pillar") == PILLAR_M
    assert CARD_M * 0.9 <= at("near card") <= CARD_M * 1.1
    assert float((img.amax(-1) > 0.97).sum()) > 5  # point lights
    with pytest.raises(InputError):
        make_scene(4, 100)


def test_demo_writes_renders_and_contact_sheet(tmp_path, capsys):
    assert demo.main(["demo", "--out", str(tmp_path), "--size", "128x96"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert {"contact_sheet.png", "scene_all_in_focus.png", "scene_disparity.png", "render_01.png"} <= names
    renders = sorted(n for n in names if n.startswith("render_"))
    assert len(renders) >= 8
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.width > 3 * 128 and sheet.height > 3 * 96
    scene = np.asarray(Image.open(tmp_path / "scene_all_in_focus.png"), np.float32)
    near = np.asarray(Image.open(tmp_path / "render_01.png"), np.float32)
    assert np.abs(near - scene).mean() > 1.0  # something is blurred
    with pytest.raises(InputError):
        demo.main(["demo", "--out", str(tmp_path), "--size", "big"])


def test_render_command(tmp_path):
    img, depth = make_scene(64, 80, seed=1)
    save_image(img, tmp_path / "in.png")
    np.save(tmp_path / "depth.npy", depth[0].numpy())
    out = tmp_path / "out.png"
    rc = cli_render.main(["render", "--image", str(tmp_path / "in.png"), "--depth", str(tmp_path / "depth.npy"),
                          "--focus-x", "15", "--focus-y", "50", "--K", "15", "--aperture", "hexagon",
                          "--out", str(out)])
    assert rc == 0 and out.exists()
    res = np.asarray(Image.open(out))
    assert res.shape == (64, 80, 3)
    rc = cli_render.main(["render", "--image", str(tmp_path / "in.png"), "--depth", str(tmp_path / "depth.npy"),
                          "--f-number", "1.4", "--focal-length", "50", "--focus-depth", "6", "--out", str(out)])
    assert rc == 0
    with pytest.raises(InputError):
        cli_render.main(["render", "--image", str(tmp_path / "in.png"), "--disparity", str(tmp_path / "depth.npy"),
                         "--focus-depth", "2", "--out", str(out)])
    with pytest.raises(InputError):
        cli_render.main(["render", "--image", str(tmp_path / "in.png"), "--depth", str(tmp_path / "nope.npy"),
                         "--out", str(out)])
