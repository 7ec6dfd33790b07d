"""Procedural scene, the demo command and the render command."""
import numpy as np
import pytest
import torch
from PIL import Image

from genrefocus_core.cli import render as cli_render, demo
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import save_image
from genrefocus_core.basics.scene import (CARD_M, FAR_WALL_M, PILLAR_M, SIGN_M, make_scene, make_scene_clip,
                                         scene_landmarks)


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


def test_scene_clip_a_sign_enters_behind_the_card():
    images, depth = make_scene_clip(64, 96, frames=5, seed=2)
    still, still_depth = make_scene(64, 96, seed=2)
    assert images.shape == (5, 64, 96, 3) and depth.shape == (5, 64, 96)
    assert torch.equal(images[0], still[0]) and torch.equal(depth[0], still_depth[0])  # frame 0: no sign
    sign = [int((depth[f] == SIGN_M).sum()) for f in range(5)]
    assert sign[0] == 0 and 0 < sign[1] < sign[4]
    changed = depth[4] != depth[0]
    assert (depth[4][changed] == SIGN_M).all() and (depth[0][changed] > SIGN_M).all()  # never in front of the card
    assert (depth[4][depth[0] == depth[0].min()] < SIGN_M).all()
    assert make_scene_clip(16, 16, frames=1)[0].shape == (1, 16, 16, 3)
    for bad in (0, 2.5, True):
        with pytest.raises(InputError, match="frames"):
            make_scene_clip(16, 16, frames=bad)


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


def test_render_disparity_file_reads_as_depth_sources(tmp_path):
    """`render --disparity` places a relative disparity map in the scene as Depth From Image does (one
    conversion in the core), not a 0..1 rescale of its own."""
    import torch

    from genrefocus_core.cli.focus_options import disparity_from_args
    from genrefocus_core.depth.sources import disparity_from_external
    rel = torch.linspace(3.0, 250.0, 40 * 30).reshape(30, 40)
    np.save(tmp_path / "rel.npy", rel.numpy())
    args = cli_render.build_parser().parse_args(["--image", "x.png", "--out", "y.png", "--disparity",
                                                 str(tmp_path / "rel.npy")])
    disp, metric = disparity_from_args(args, (30, 40))
    assert not metric
    assert torch.equal(disp, disparity_from_external(rel, kind="disparity", scale="relative", size=(30, 40), batch=1))
    assert float(disp.max()) == pytest.approx(1.0) and float(disp.min()) == pytest.approx(1 / 20)
