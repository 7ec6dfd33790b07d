"""Geometry of the aperture shapes: area, symmetry, rotation, normalisation, user masks."""
import math

import numpy as np
import pytest
import torch

from genrefocus_core.basics import apertures
from genrefocus_core.basics.errors import InputError


def _rot(x, y, deg):
    a = math.radians(deg)
    return x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)


def _cloud(n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(2, n, generator=g, dtype=torch.float64) * 2 - 1) * 1.2
    return pts[0], pts[1]


@pytest.mark.parametrize("ap, area", [
    (apertures.circle(), math.pi),
    (apertures.polygon(6), 3 * math.sqrt(3) / 2),
    (apertures.polygon(5), 2.5 * math.sin(2 * math.pi / 5)),
    (apertures.triangle(), 3 * math.sqrt(3) / 4),
    (apertures.star(5, 0.5), 5 * 0.5 * math.sin(math.pi / 5)),
])
def test_area_at_unit_circumradius(ap, area):
    assert ap.area_unit() == pytest.approx(area, rel=1e-4)
    # the rasterised kernel (coverage) has the same area in pixels
    r = 20.0
    k = ap.kernel(r, supersample=8)
    assert float(k.sum()) == pytest.approx(1.0, abs=1e-5)
    coverage = k / k.max()
    assert float(coverage.sum()) == pytest.approx(area * r * r, rel=0.01)


def test_circumradius_is_one():
    theta = torch.linspace(-math.pi, math.pi, 2001, dtype=torch.float64)
    for ap in (apertures.circle(), apertures.polygon(7, 13.0), apertures.star(6, 0.4), apertures.heart(),
               apertures.cat_eye(0.3, 45)):
        rho = ap.radial(theta)
        assert float(rho.max()) == pytest.approx(1.0, abs=2e-3), ap
        assert float(rho.min()) > 0.05, ap


@pytest.mark.parametrize("n", [3, 5, 6, 8])
def test_polygon_symmetry_and_rotation(n):
    ap = apertures.polygon(n)
    x, y = _cloud()
    inside = ap.inside(x, y, 1.0)
    xr, yr = _rot(x, y, 360.0 / n)  # n-fold symmetric
    assert torch.equal(inside, ap.inside(xr, yr, 1.0))
    assert torch.equal(inside, ap.inside(-x, y, 1.0))  # mirror symmetric about the vertical axis
    # a vertex points straight up (y down in image coordinates), the opposite side is flat for odd n
    assert bool(ap.inside(torch.tensor(0.0), torch.tensor(-0.999), 1.0))
    assert not bool(ap.inside(torch.tensor(0.05), torch.tensor(-0.999), 1.0))
    # rotation_deg turns the shape clockwise on screen
    turned = apertures.polygon(n, rotation_deg=17.0)
    xb, yb = _rot(x, y, -17.0)
    assert torch.equal(turned.inside(x, y, 1.0), ap.inside(xb, yb, 1.0))


def test_blade_curvature_rounds_towards_circle():
    flat, round_, circle = apertures.polygon(6), apertures.polygon(6, curvature=0.5), apertures.polygon(6, curvature=1)
    assert flat.area_unit() < round_.area_unit() < circle.area_unit()
    assert circle.area_unit() == pytest.approx(math.pi, rel=1e-6)
    with pytest.raises(InputError):
        apertures.polygon(6, curvature=1.5)
    with pytest.raises(InputError):
        apertures.polygon(2)


def test_star_heart_cat_eye_shapes():
    star = apertures.star(5, 0.5)
    x, y = _cloud()
    assert torch.equal(star.inside(x, y, 1.0), star.inside(*_rot(x, y, 72.0), 1.0))
    heart = apertures.heart()
    assert torch.equal(heart.inside(x, y, 1.0), heart.inside(-x, y, 1.0))
    # the heart points down: its lowest point is on the axis, the top has a notch on the axis
    theta_down, theta_up = torch.tensor(math.pi / 2), torch.tensor(-math.pi / 2)
    assert float(heart.radial(theta_down)) > float(heart.radial(theta_up))
    # cat-eye: clipped on the side away from its direction
    eye = apertures.cat_eye(0.5, 0.0)
    assert bool(eye.inside(torch.tensor(0.95), torch.tensor(0.0), 1.0))
    assert not bool(eye.inside(torch.tensor(-0.6), torch.tensor(0.0), 1.0))
    assert eye.area_unit() < math.pi
    assert apertures.cat_eye(0.0).area_unit() == pytest.approx(math.pi, rel=1e-6)


def test_kernel_edge_cases():
    assert torch.equal(apertures.circle().kernel(0.3), torch.ones(1, 1))
    with pytest.raises(InputError):
        apertures.circle().kernel(-1)
    k = apertures.polygon(6).kernel(7.3)
    assert k.shape == (17, 17) and torch.allclose(k, torch.flip(k, dims=(1,)))


def test_ramp_kernel_half_maximum_on_outline():
    ap = apertures.circle()
    raw = ap.ramp_kernel(6.0, 2.0, normalize=False, dtype=torch.float64)
    c = raw.shape[0] // 2
    assert float(raw[c, c]) == 1.0
    assert float(raw[c, c + 6]) == pytest.approx(0.5, abs=2e-3)  # on the outline: half maximum
    assert float(raw[c, c + 5]) == 1.0 and float(raw[c, c + 7]) < 0.01


def test_from_image_centred_and_normalised():
    yy, xx = np.mgrid[0:120, 0:160]
    disc = ((xx - 100.0) ** 2 + (yy - 40.0) ** 2 <= 30.0 ** 2).astype(np.float32)
    ap = apertures.from_image(disc)
    assert ap.area_unit() == pytest.approx(math.pi, rel=0.04)
    x, y = _cloud()
    assert (ap.inside(x, y, 1.0) == apertures.circle().inside(x, y, 0.98)).float().mean() > 0.97
    # 8-bit images and the mask's own circumradius
    hexmask = apertures.polygon(6).kernel(32.0).numpy()
    ap6 = apertures.from_image((hexmask / hexmask.max() * 255).astype(np.uint8), circumradius_px=32.0)
    assert ap6.area_unit() == pytest.approx(3 * math.sqrt(3) / 2, rel=0.03)


def test_from_image_rejects_empty_and_bad_masks():
    with pytest.raises(InputError, match="empty"):
        apertures.from_image(np.zeros((32, 32), np.float32))
    with pytest.raises(InputError, match="empty"):
        apertures.from_image(np.full((32, 32), 0.2, np.float32))
    with pytest.raises(InputError):
        apertures.from_image(np.full((8, 8), np.nan, np.float32))


def test_condition_image():
    img = apertures.star(5, 0.5).condition_image(64, 96)
    assert img.shape == (1, 64, 96, 3) and img.dtype == torch.float32
    assert float(img.min()) >= 0 and float(img.max()) == 1.0
    assert torch.equal(img[..., 0], img[..., 2])
    r = 0.8 * 64 / 2
    assert float(img[0, :, :, 0].sum()) == pytest.approx(5 * 0.5 * math.sin(math.pi / 5) * r * r, rel=0.03)
    with pytest.raises(InputError):
        apertures.circle().condition_image(0, 10)


def test_make_aperture_by_name():
    assert apertures.make_aperture("hexagon").params["blades"] == 6
    assert apertures.make_aperture("star", points=6).params["points"] == 6
    with pytest.raises(InputError):
        apertures.make_aperture("banana")
    # each shape reads its own settings (the node and the CLI pass all of theirs)
    assert apertures.make_aperture("circle", blades=3, hole_ratio=0.3).params == {"shape": "circle"}
    assert apertures.make_aperture("annular", hole_ratio=0.3).params["inner_ratio"] == 0.3
    with pytest.raises(InputError, match="mask"):
        apertures.make_aperture("custom")
