"""Focus and blur-level math of genrefocus_core.basics.defocus against hand-computed values."""
import logging
import math

import pytest
import torch

from genrefocus_core.basics.defocus import (blur_level_from_lens, check_blur_level, defocus_map, disparity_from_depth,
                                     focus_disparity, network_condition, signed_coc)
from genrefocus_core.basics.errors import InputError


def test_lens_formula_hand_computed():
    # f = 50 mm, N = 2, focus 2 m, 36 mm sensor, 3600 px: f^2 D / (2 N (D - f)) = 2500*2000/(4*1950)
    # = 641.0256 mm*... times 100 px/mm / 1000 -> 64.10 px per 1/m of disparity
    K = blur_level_from_lens(2.0, 50.0, 36.0, 2.0, 3600)
    assert K == pytest.approx(2500 * 2000 / (4 * 1950) * 100 / 1000, rel=1e-12)
    assert K == pytest.approx(64.1026, abs=1e-3)
    # a point at 1 m with focus at 2 m: |1/1 - 1/2| = 0.5 1/m -> CoC radius 32.05 px; check against
    # the thin-lens CoC directly: diameter c = f^2 |D - Df| / (N D (Df - f)) on the sensor (mm)
    c_mm = 50.0 ** 2 * abs(1000 - 2000) / (2.0 * 1000 * (2000 - 50))
    assert K * 0.5 == pytest.approx(c_mm / 2 * 100, rel=1e-9)
    # wider aperture and longer lens blur more
    assert blur_level_from_lens(1.4, 85.0, 36.0, 2.0, 3600) > K


def test_lens_formula_rejects_bad_values():
    with pytest.raises(InputError):
        blur_level_from_lens(2.0, 50.0, 36.0, 0.04, 3600)  # focus inside the focal length
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(InputError):
            blur_level_from_lens(bad, 50.0, 36.0, 2.0, 3600)


def test_disparity_from_depth_handling(caplog):
    depth = torch.tensor([[[2.0, 0.0, float("inf")], [-1.0, 4.0, float("nan")]]])
    with caplog.at_level(logging.WARNING):
        disp = disparity_from_depth(depth)
    assert disp[0, 0, 0] == 0.5 and disp[0, 0, 1] == 0 and disp[0, 0, 2] == 0 and disp[0, 1, 0] == 0
    assert disp[0, 1, 1] == 0.25
    assert torch.isfinite(disp).all() and "NaN" in caplog.text
    with pytest.raises(InputError):
        disparity_from_depth(torch.full((1, 2, 2), float("nan")))


def test_focus_by_point_mask_value(caplog):
    disp = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    assert float(focus_disparity(disp, point=(2, 1))[0]) == 6.0
    assert float(focus_disparity(disp)[0]) == disp[0, 1, 2]  # centre pixel
    assert float(focus_disparity(disp, point=(1.0, 1.0), normalized=True)[0]) == 11.0
    mask = torch.zeros(3, 4)
    mask[0, :3] = 1  # values 0, 1, 2 -> median 1
    assert float(focus_disparity(disp, mask=mask)[0]) == 1.0
    assert float(focus_disparity(disp, value=0.25)[0]) == 0.25
    with caplog.at_level(logging.WARNING):
        whole = focus_disparity(disp, mask=torch.zeros(3, 4))
    assert float(whole[0]) == float(disp.flatten().median()) and "empty" in caplog.text
    with pytest.raises(InputError):
        focus_disparity(disp, point=(4, 0))
    with pytest.raises(InputError):
        focus_disparity(disp, point=(0, 0), value=1.0)
    with pytest.raises(InputError):
        focus_disparity(disp, value=float("nan"))


def test_signed_coc_and_condition():
    disp = torch.tensor([[[0.1, 0.5, 0.9]]])
    r = signed_coc(disp, 0.5, 20.0)
    assert torch.allclose(r, torch.tensor([[[-8.0, 0.0, 8.0]]]))  # > 0 in front of focus
    assert torch.allclose(defocus_map(disp, 0.5, 20.0), r.abs())
    cond = network_condition(torch.tensor([[[0.0, 50.0, 250.0]]]))
    assert cond.shape == (1, 3, 1, 3) and torch.allclose(cond[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert check_blur_level(0) == 0.0
    with pytest.raises(InputError):
        check_blur_level(-0.1)
    with pytest.raises(InputError):
        check_blur_level("a lot")
    assert math.isclose(check_blur_level(5000.0), 5000.0)


def test_resolve_focus_distance_depth_slider_and_modes():
    from genrefocus_core.basics.defocus import disparity_range, resolve_focus
    # two images; disparities 0.05 .. 1.0 1/m (20 m .. 1 m)
    disp = torch.stack([torch.linspace(0.05, 0.5, 12).reshape(3, 4), torch.linspace(0.1, 1.0, 12).reshape(3, 4)])
    assert disparity_range(disp) == (pytest.approx(1.0), pytest.approx(0.05))
    # distance in metres: the focal plane is at 1 / distance; one per image; infinity -> 0
    assert torch.allclose(resolve_focus(disp, distance_m=2.0), torch.tensor([0.5, 0.5]))
    assert torch.allclose(resolve_focus(disp, distance_m=[4.0, float("inf")]), torch.tensor([0.25, 0.0]))
    # slider: 0 = nearest of the batch, 1 = farthest, linear in disparity; or in a given range
    assert torch.allclose(resolve_focus(disp, depth=[0.0, 1.0]), torch.tensor([1.0, 0.05]))
    assert torch.allclose(resolve_focus(disp, depth=0.5), torch.tensor([0.525, 0.525]))
    assert torch.allclose(resolve_focus(disp, depth=0.5, depth_range=(2.0, 0.0)), torch.tensor([1.0, 1.0]))
    # per-image points
    f = resolve_focus(disp, point=[(0, 0), (3, 2)])
    assert torch.allclose(f, torch.stack([disp[0, 0, 0], disp[1, 2, 3]]))
    # mode given: the matching input is used, the others ignored (the node passes all its widgets)
    f = resolve_focus(disp, "distance", point=(0.5, 0.5), normalized=True, value=0.3, distance_m=5.0, depth=0.1)
    assert torch.allclose(f, torch.tensor([0.2, 0.2]))
    assert torch.allclose(resolve_focus(disp, "value", value=0.3, distance_m=5.0), torch.tensor([0.3, 0.3]))
    with pytest.raises(InputError, match="distance_m"):
        resolve_focus(disp, "distance")
    with pytest.raises(InputError, match="metric"):
        resolve_focus(disp, distance_m=2.0, metric=False)
    with pytest.raises(InputError, match="several"):
        resolve_focus(disp, distance_m=2.0, depth=0.5)
    with pytest.raises(InputError, match="Unknown focus mode"):
        resolve_focus(disp, "ring")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="distance"):
            resolve_focus(disp, distance_m=bad)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(InputError, match="slider"):
            resolve_focus(disp, depth=bad)
    with pytest.raises(InputError, match="finite"):
        resolve_focus(disp, point=(float("nan"), 1.0))
    with pytest.raises(InputError, match="expected 1 or 2"):
        resolve_focus(disp, distance_m=[1.0, 2.0, 3.0])
