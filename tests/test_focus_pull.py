"""Focus pulls: keyframes (point, distance, depth slider, value) with easing -> per-frame focal planes,
on the built-in scene with its exact depth."""
import pytest
import torch

from genrefocus_core.basics import focus_pull as fp
from genrefocus_core.basics.defocus import disparity_from_depth
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.scene import CARD_M, FAR_WALL_M, PILLAR_M, make_scene, scene_landmarks

H, W = 96, 128


@pytest.fixture(scope="module")
def scene():
    image, depth = make_scene(H, W, seed=0)
    return image, depth, disparity_from_depth(depth)


def test_easing_curves_are_exact():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert torch.equal(fp.ease("linear", t), t)
    # smoothstep 3t^2 - 2t^3: 0, 0.15625, 0.5, 0.84375, 1 (exact binary fractions)
    assert torch.equal(fp.ease("ease-in-out", t), torch.tensor([0.0, 0.15625, 0.5, 0.84375, 1.0], dtype=torch.float64))
    assert torch.equal(fp.ease("hold", t), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(InputError, match="Easing"):
        fp.ease("bounce", t)


def test_interpolation_between_keyframes_follows_each_easing():
    # values 0 at frame 0, 8 at frame 4 (linear), 0 at frame 8 (ease-in-out), 5 at frame 10 (hold)
    (v,) = fp.interpolate([0, 4, 8, 10], [(0.0,), (8.0,), (0.0,), (5.0,)], ["linear", "linear", "ease-in-out", "hold"], 13)
    expected = [0, 2, 4, 6, 8, 8 - 8 * 0.15625, 4, 8 - 8 * 0.84375, 0, 0, 5, 5, 5]
    assert v.tolist() == pytest.approx(expected, abs=0)  # every value is an exact binary fraction
    # before the first keyframe the focus holds
    (late,) = fp.interpolate([3, 5], [(1.0,), (3.0,)], ["linear", "linear"], 7)
    assert late.tolist() == [1, 1, 1, 1, 2, 3, 3]


def test_frames_focus_at_the_keyframed_depths(scene):
    """Each keyframe's frame has blur radius exactly zero on the keyframed surface: a point on the
    near card, the pillar by its distance (6 m), the far wall by the depth slider (1 = farthest)."""
    image, depth, disp = scene
    cx, cy = scene_landmarks(H, W)["near card"]
    keys = f"""
        0: point {cx / (W - 1)} {cy / (H - 1)}   # the near card
        8: distance {PILLAR_M} ease-in-out      # the pillar
        12: depth 1 K=40 hold                     # the far wall, with more blur
    """
    pull = fp.focus_pull(disp, keys, frames=16, K=25.0)
    assert pull.frames == 16
    coc = pull.signed_coc(disp)
    assert coc.shape == (16, H, W)
    assert coc[0, cy, cx] == 0
    assert coc[8][depth[0] == PILLAR_M].abs().max() == 0
    assert coc[12][depth[0] == FAR_WALL_M].abs().max() == 0
    assert coc[15][depth[0] == FAR_WALL_M].abs().max() == 0  # held after the last keyframe
    # elsewhere the blur is real: the card is sharp only at frame 0
    assert coc[8, cy, cx].abs() > 5 and coc[12, cy, cx].abs() > 5
    # the in-between frames follow the easing in disparity: ease-in-out half way (frame 4) = the mean
    f_card, f_pillar, f_wall = float(disp[0, cy, cx]), 1.0 / PILLAR_M, 1.0 / FAR_WALL_M
    assert float(pull.focus_disparity[4]) == pytest.approx((f_card + f_pillar) / 2, rel=1e-6)
    # hold: frames 9..11 stay on the pillar, frame 12 jumps to the wall
    assert torch.allclose(pull.focus_disparity[8:12], torch.tensor(f_pillar))
    assert float(pull.focus_disparity[12]) == pytest.approx(f_wall, rel=1e-6)
    # K: 25 until the keyframe that sets 40, reached with that keyframe's easing (hold)
    assert pull.K[:12].tolist() == [25.0] * 12 and pull.K[12:].tolist() == [40.0] * 4


def test_a_clip_of_frames_resolves_points_on_their_own_frames(scene):
    _, depth, disp = scene
    clip = torch.cat([disp, disp.flip(-1)])  # frame 1 is the mirrored scene
    cx, cy = scene_landmarks(H, W)["near card"]
    pull = fp.focus_pull(clip, f"0: point {cx / (W - 1)} {cy / (H - 1)}\n1: point {cx / (W - 1)} {cy / (H - 1)}")
    assert pull.frames == 2
    assert float(pull.focus_disparity[0]) == float(clip[0, cy, cx])
    assert float(pull.focus_disparity[1]) == float(clip[1, cy, cx])  # the far side of the mirrored frame
    assert pull.focus_disparity[0] != pull.focus_disparity[1]
    # the depth slider spans the whole clip: 0 = its nearest disparity
    near = fp.focus_pull(clip, "0: depth 0").focus_disparity
    assert torch.allclose(near, clip.max().expand(2))


def test_parsing_and_bad_keyframes(scene):
    _, _, disp = scene
    keys = fp.parse_keyframes("# rack focus\n10: distance 2.5, K=30 linear\n\n0: point 0.5, 0.5\nLast: value .25 hold")
    assert [k.frame for k in keys] == [10, 0, fp.LAST_FRAME]
    assert keys[0] == fp.FocusKeyframe(10, "distance", (2.5,), 30.0, "linear")
    assert keys[2].easing == "hold" and keys[1].values == (0.5, 0.5)
    # "last" is the clip's last frame, whatever its length
    pull = fp.focus_pull(disp, keys, frames=12)
    assert float(pull.focus_disparity[11]) == 0.25 and float(pull.focus_disparity[10]) == pytest.approx(0.4)
    with pytest.raises(InputError, match="twice"):
        fp.focus_pull(disp, "0: depth 0\nlast: depth 1", frames=1)
    bad = {
        "point 0.5 0.5": "line 1",                      # no frame
        "0: point 0.5": "2 number",                      # one coordinate
        "0: ring 3": "unknown focus",
        "0: distance 2 quickly": "unknown word",
        "0: distance 2 K=lots": "blur level",
        "0: distance 2 K=-3": "Blur level",
        "0: distance nan": "line 1",
        "-1: depth 0.5": "line 1",
        "0:": "no focus",
    }
    for text, message in bad.items():
        with pytest.raises(InputError, match=message):
            fp.parse_keyframes(text)
    with pytest.raises(InputError, match="twice"):
        fp.focus_pull(disp, "0: depth 0\n0: depth 1", frames=4)
    with pytest.raises(InputError, match="past the clip"):
        fp.focus_pull(disp, "0: depth 0\n9: depth 1", frames=8)
    with pytest.raises(InputError, match="at least one"):
        fp.focus_pull(disp, "# nothing", frames=4)
    with pytest.raises(InputError, match="frame 3: .*metric"):
        fp.focus_pull(disp, "0: depth 0\n3: distance 2", frames=4, metric=False)
    with pytest.raises(InputError, match="frame 0: .*outside|frame 0: .*\\[0, 1\\]"):
        fp.focus_pull(disp, "0: point 1.5 0.5", frames=4)
    with pytest.raises(InputError, match="depth has 2 frames"):
        fp.focus_pull(torch.cat([disp, disp]), "0: depth 0", frames=5)
    with pytest.raises(InputError, match="frames"):
        fp.focus_pull(disp, "0: depth 0", frames=-2)
    with pytest.raises(InputError, match="Easing"):
        fp.focus_pull(disp, "0: depth 0", frames=2, easing="fast")


def test_a_still_and_one_keyframe_give_a_constant_focus(scene):
    _, depth, disp = scene
    pull = fp.focus_pull(disp, [fp.FocusKeyframe(0, "distance", (CARD_M * 1.0,))], frames=3, K=10.0)
    assert torch.allclose(pull.focus_disparity, torch.tensor(1.0 / CARD_M).expand(3))
    assert pull.K.tolist() == [10.0, 10.0, 10.0]


def test_hold_unchanged_keeps_the_previous_output_outside_the_reach_of_a_change():
    from genrefocus_core.basics.steady_frames import HOLD_FEATHER_PX, hold_unchanged
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 40, 50, 3, generator=g)
    images = torch.rand(1, 40, 50, 3, generator=g).expand(3, -1, -1, -1)
    defocus = torch.full((3, 40, 50), 3.0)
    defocus[2, 20, 25] = 6.0  # one pixel's blur grows in the last frame
    defocus[1] += 0.01  # below the tolerance: no change
    out = hold_unchanged(frames, images, defocus)
    assert torch.equal(out[0], frames[0]) and torch.equal(out[1], frames[0])
    reach, fade = 6, 2 * HOLD_FEATHER_PX  # the new frame in full within the blur radius, then a ramp to 0
    full = (slice(20 - reach, 21 + reach), slice(25 - reach, 26 + reach))
    assert torch.equal(out[2][full], frames[2][full])
    far = torch.ones(40, 50, dtype=torch.bool)
    far[20 - reach - fade:21 + reach + fade, 25 - reach - fade:26 + reach + fade] = False
    assert torch.equal(out[2][far], frames[0][far])
    seam = ~far
    seam[full] = False
    w = (out[2][seam] - frames[0][seam]) / (frames[2][seam] - frames[0][seam])
    assert float(w.min()) > 0 and float(w.max()) < 1  # a ramp between the two
    # a changed image is a change: nothing is held
    moved = images.clone()
    moved[2] = 1 - moved[2]
    assert torch.equal(hold_unchanged(frames, moved, defocus)[2], frames[2])
    with pytest.raises(InputError):
        hold_unchanged(frames, images[:, :10], defocus)


def test_a_pull_with_lens_controls_is_defocus_map_frame_by_frame(scene):
    """Lens, in-focus band and near/far strength through a pull: every frame equals what
    `build_defocus` (Defocus Map's rules) gives for that frame's focal plane; the lens's blur
    follows the focus distance (focus breathing of the blur)."""
    from genrefocus_core.basics.defocus import Lens, build_defocus
    image, depth, disp = scene
    lens = Lens(1.8, 85.0)
    pull = fp.focus_pull(disp, f"0: distance {PILLAR_M}\nlast: distance {FAR_WALL_M} linear", frames=5, lens=lens,
                         in_focus_m=1.0, near_scale=0.5, far_scale=1.5)
    d = pull.defocus(disp)
    for i in range(5):
        one = build_defocus(disp, pull.focus_disparity[i:i + 1], lens=lens, in_focus_m=1.0, near_scale=0.5,
                            far_scale=1.5)
        assert torch.equal(d.signed_coc[i], one.signed_coc[0]) and d.K[i] == one.K[0]
    assert float(d.K[0]) > float(d.K[-1])  # nearer focus, more blur per 1/m: the lens's blur breathes
    assert bool((d.signed_coc[0][(depth[0] >= PILLAR_M - 0.5 + 1e-3) & (depth[0] <= PILLAR_M + 0.5 - 1e-3)] == 0).all())
    with pytest.raises(InputError, match="lens"):
        fp.focus_pull(disp, "0: depth 0 K=30", frames=2, lens=lens)
    with pytest.raises(InputError, match="metric"):
        fp.focus_pull(disp, "0: depth 0", frames=2, lens=lens, metric=False)
    with pytest.raises(InputError):
        fp.focus_pull(disp, "0: depth 0", frames=2, near_scale=float("nan"))
