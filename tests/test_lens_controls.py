"""Lens controls against exact expectations on the built-in scene (exact metric depth): focus distance,
in-focus band, near/far blur strength, tilt-shift, apertures with holes, energy-keeping highlight boost, grain.

Tolerances: the defocus maps are a handful of float32 operations on disparities of order 1, so they
match the closed forms to a few ulps (rtol 1e-5, atol 1e-5 px). Pixels whose blur radius is exactly 0
and that no other level's light reaches come back bit-identical (the renderer copies them), so those are
compared exactly. Energies are sums over the FFT convolutions in float32: relative rounding ~1e-6, far
below the 1 % the boost must keep."""
import math

import pytest
import torch
import torch.nn.functional as F

from genrefocus_core.basics import apertures
from genrefocus_core.basics.defocus import FocusTilt, Lens, build_defocus, disparity_from_depth, resolve_focus
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.scene import CAMERA_HEIGHT_M, FAR_WALL_M, HORIZON, PILLAR_M, make_scene
from genrefocus_core.classical.renderer import highlight_gain, render_bokeh

H, W = 192, 256
LENS = Lens(1.4, 85.0)  # full frame: about 18.6 px of blur radius per 1/m at this size


@pytest.fixture(scope="module")
def scene():
    image, depth = make_scene(H, W, seed=0)
    return image, depth, disparity_from_depth(depth)


def _untouched(signed: torch.Tensor) -> torch.Tensor:
    """Pixels with zero blur that no blurred pixel's disc (radius + 2 px of ramp) can reach."""
    reach = int(math.ceil(float(signed.abs().max()))) + 2
    blurred = (signed.abs() >= 0.5).float()[:, None]
    near_blur = F.max_pool2d(blurred, 2 * reach + 1, stride=1, padding=reach)[:, 0] > 0
    return (signed == 0) & ~near_blur


def _sharp_where_expected(image, signed, aperture=None):
    out = render_bokeh(image, defocus_px=signed, aperture=aperture)
    keep = _untouched(signed)
    assert int(keep.sum()) > 100  # enough pixels to say something
    assert torch.equal(out[keep], image[keep])
    return out


def test_focus_distance_puts_zero_blur_at_that_depth(scene):
    image, depth, disp = scene
    for dist in (PILLAR_M, FAR_WALL_M):
        f = resolve_focus(disp, distance_m=dist)
        d = build_defocus(disp, f, lens=LENS)
        # thin lens: K = f^2 / (2 N (1 - f / D)) * px/mm / 1000
        k = 85.0 ** 2 / (2 * 1.4 * (1 - 85.0 / (dist * 1000))) * (W / 36.0) / 1000
        assert d.K.tolist() == pytest.approx([k], rel=1e-6)
        at = depth == dist
        assert int(at.sum()) > 500 and bool((d.signed_coc[at] == 0).all())
        expected = k * (1.0 / depth - 1.0 / dist)  # > 0 in front
        assert torch.allclose(d.signed_coc, expected, rtol=1e-5, atol=1e-5)
    # the pillar focused: its pixels away from blurred light come back exactly
    d = build_defocus(disp, resolve_focus(disp, distance_m=PILLAR_M), lens=LENS)
    out = _sharp_where_expected(image, d.signed_coc)
    assert (out - image).abs().mean() > 0.01  # and the rest is blurred
    # focused at infinity: disparity 0 and the thin-lens limit f^2 / 2N
    inf = build_defocus(disp, resolve_focus(disp, distance_m=math.inf), lens=LENS)
    assert inf.focus_disparity.tolist() == [0.0]
    assert inf.K.tolist() == pytest.approx([85.0 ** 2 / 2.8 * W / 36.0 / 1000], rel=1e-6)


def test_in_focus_band_is_sharp_across_its_depths(scene):
    image, depth, disp = scene
    f = resolve_focus(disp, distance_m=PILLAR_M)
    d = build_defocus(disp, f, lens=LENS, in_focus_m=4.0)  # 4 m .. 8 m kept sharp
    k = float(d.K[0])
    inside = (depth >= 4.0 + 1e-3) & (depth <= 8.0 - 1e-3)
    assert int(inside.sum()) > 1000  # the ground and the pillar span it
    assert bool((d.signed_coc[inside] == 0).all())
    # outside, the blur grows from the band's edges: continuous with the band
    front, behind = depth < 4.0 - 1e-3, depth > 8.0 + 1e-3
    assert torch.allclose(d.signed_coc[front], k * (1 / depth[front] - 1 / 4.0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(d.signed_coc[behind], k * (1 / depth[behind] - 1 / 8.0), rtol=1e-5, atol=1e-5)
    _sharp_where_expected(image, d.signed_coc)
    # as a fraction of the depth range (slider units): half of it on each side of the focal plane
    near, far = float(disp.max()), float(disp.min())
    g = build_defocus(disp, f, K=20.0, in_focus_fraction=0.2)
    half = 0.1 * (near - far)
    dd = disp - f.view(-1, 1, 1)
    assert bool((g.signed_coc[dd.abs() <= half * (1 - 1e-5)] == 0).all())
    assert torch.allclose(g.signed_coc[dd > half], 20.0 * (dd[dd > half] - half), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="metric"):
        build_defocus(disp, f, K=20.0, in_focus_m=1.0, metric=False)


def test_near_and_far_blur_strength(scene):
    image, depth, disp = scene
    f = resolve_focus(disp, distance_m=PILLAR_M)
    plain = build_defocus(disp, f, lens=LENS).signed_coc
    scaled = build_defocus(disp, f, lens=LENS, near_scale=0.5, far_scale=2.0).signed_coc
    assert torch.allclose(scaled, torch.where(plain > 0, 0.5 * plain, 2.0 * plain), rtol=1e-6, atol=1e-6)
    # far_blur 0: everything behind the focal plane stays sharp (the far wall is reproduced exactly)
    no_far = build_defocus(disp, f, lens=LENS, far_scale=0.0).signed_coc
    assert bool((no_far[depth > PILLAR_M] == 0).all()) and float(no_far.max()) > 5
    out = _sharp_where_expected(image, no_far)
    wall = (depth == FAR_WALL_M) & _untouched(no_far)
    assert int(wall.sum()) > 1000 and torch.equal(out[wall], image[wall])


def _point_render(aperture, radius=20.0, size=81):
    img = torch.zeros(1, size, size, 3)
    img[0, size // 2, size // 2] = 1.0
    coc = torch.full((1, size, size), -radius)  # behind the focal plane: the shape as given
    out = render_bokeh(img, defocus_px=coc, aperture=aperture, colorspace="linear")
    return out[0].mean(-1)


@pytest.mark.parametrize("make", [lambda: apertures.annular(0.5),
                                  lambda: apertures.make_aperture("custom", mask=_ring_mask())])
def test_annular_and_drawn_ring_keep_their_hole(make):
    psf = _point_render(make())
    c = psf.shape[0] // 2
    yy, xx = torch.meshgrid(torch.arange(psf.shape[0]), torch.arange(psf.shape[1]), indexing="ij")
    dist = torch.hypot((yy - c).float(), (xx - c).float())
    ring = (dist > 13) & (dist < 17)
    plateau = float(psf[ring].mean())
    assert plateau > 0
    # the hole is dark (no filling) inside the inner edge's ramp (about 5 px wide on this coarse level)
    assert float(psf[dist < 5].max()) < 0.01 * plateau
    assert float(psf[ring].min()) > 0.9 * plateau  # the ring is lit
    assert float(psf[dist > 25].max()) < 0.01 * plateau  # and nothing beyond the outer ramp
    # the half-maximum outlines: inner at 10 px, outer at 20 px (to about a pixel)
    row = psf[c, c:]
    lit = (row > 0.5 * plateau).nonzero().flatten()
    assert abs(int(lit.min()) - 10) <= 1 and abs(int(lit.max()) - 20) <= 1


def _ring_mask(n=101):
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    r = torch.hypot((yy - n // 2).float(), (xx - n // 2).float())
    return ((r <= 50) & (r >= 25)).float()  # a ring drawn by a user: outer 50 px, hole 25 px


def test_drawn_mask_with_two_parts_is_kept():
    m = torch.zeros(64, 64)
    m[8:56, 8:20] = 1
    m[8:56, 44:56] = 1  # two bars with a gap between them
    ap = apertures.from_image(m)
    assert not bool(ap.inside(0.0, 0.0, 1.0))  # the gap at the centre stays open
    assert bool(ap.inside(0.55, 0.0, 1.0)) and bool(ap.inside(-0.55, 0.0, 1.0))


def test_highlight_boost_keeps_energy_and_acts_only_on_highlights():
    size, r = 96, 6.0
    img = torch.full((1, size, size, 3), 0.02)
    for y, x in ((20, 20), (20, 70), (70, 30), (60, 75)):
        img[0, y, x] = 1.0  # isolated clipped point lights
    coc = torch.full((1, size, size), r)
    base = render_bokeh(img, defocus_px=coc, colorspace="linear")
    for boost in (0.5, 0.95):  # (at 1 the discs reach the light's own 1.0, plus the background: clipped)
        gain = highlight_gain(img, coc, boost, 0.9)
        assert bool((gain[img.amax(-1, keepdim=True) <= 0.9] == 1).all())  # below the threshold: nothing
        out = render_bokeh(img, defocus_px=coc, colorspace="linear", highlight_boost=boost)
        assert float(out.max()) < 1.0  # nothing clips
        # the total light above the flat background: the boosted lights' (each light pixel replaces 0.02)
        expected = float((img * gain).sum()) - 0.02 * img.numel()
        got = float(out.sum()) - 0.02 * out.numel()
        assert got == pytest.approx(expected, rel=0.01)
    # an isolated light at boost 1 fills its disc as bright as itself: gain = pi r^2
    assert float(highlight_gain(img, coc, 1.0, 0.9)[0, 20, 20, 0]) == pytest.approx(math.pi * r * r, rel=1e-6)
    assert float(base[0, 20, 20].max()) < 0.06  # without the boost the disc is a dim grey
    # in focus, the boost changes nothing; below the threshold neither
    sharp = torch.zeros(1, size, size)
    assert torch.equal(render_bokeh(img, defocus_px=sharp, highlight_boost=5.0), img)
    dim = img * 0.8
    assert torch.equal(render_bokeh(dim, defocus_px=coc, highlight_boost=5.0), render_bokeh(dim, defocus_px=coc))


def test_grain_matches_the_sharp_region(scene):
    image, depth, disp = scene
    g = torch.Generator().manual_seed(3)
    noisy = (image + 0.03 * torch.randn(image.shape, generator=g)).clamp(0, 1)
    d = build_defocus(disp, resolve_focus(disp, distance_m=PILLAR_M), lens=LENS)
    plain = render_bokeh(noisy, defocus_px=d.signed_coc)
    grainy = render_bokeh(noisy, defocus_px=d.signed_coc, grain=1.0, grain_seed=7)
    assert torch.equal(grainy, render_bokeh(noisy, defocus_px=d.signed_coc, grain=1.0, grain_seed=7))
    assert not torch.equal(grainy, render_bokeh(noisy, defocus_px=d.signed_coc, grain=1.0, grain_seed=8))
    sharp = d.signed_coc.abs() < 0.5
    assert torch.equal(grainy[sharp], plain[sharp])  # the sharp region is left as it is
    # "not plastic": the fine detail (3x3 high-pass, robust sigma) of the blurred far wall matches the
    # sharp region's (within 15 %: sampling error of a MAD over ~10^4 pixels is ~1 %, the rest is the
    # sharp region's own texture), where without grain it is a fraction of it
    def fine(x, where):
        hp = x - F.avg_pool2d(F.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate"), 3, 1).permute(0, 2, 3, 1)
        v = hp[where]
        return float(1.4826 * (v - v.median(0).values).abs().median())

    wall = (depth == FAR_WALL_M) & (d.signed_coc.abs() > 1.5)
    wall = wall & (F.max_pool2d((~wall).float()[:, None], 5, 1, 2)[:, 0] == 0)  # not at its borders
    assert fine(grainy, wall) == pytest.approx(fine(noisy, sharp), rel=0.15)
    assert fine(plain, wall) < 0.5 * fine(noisy, sharp)
    assert torch.equal(render_bokeh(noisy, defocus_px=d.signed_coc, grain=0.0), plain)


def test_cat_eye_across_the_frame_clips_drawn_and_annular_apertures():
    """The position-dependent cat's eye works on apertures with holes too: clipped by the offset circle,
    the hole kept."""
    for ap in (apertures.annular(0.5), apertures.from_image(_ring_mask())):
        eye = apertures.vignetted(ap, 0.6, 0.0)  # offset towards +x (the image centre lies to the right)
        assert bool(eye.inside(0.75, 0.0, 1.0)) and not bool(eye.inside(-0.75, 0.0, 1.0))
        assert not bool(eye.inside(0.1, 0.0, 1.0))  # the hole stays
    img, depth = make_scene(64, 96, seed=1)
    disp = disparity_from_depth(depth)
    d = build_defocus(disp, resolve_focus(disp, distance_m=1.6), K=25.0)
    plain = render_bokeh(img, defocus_px=d.signed_coc, aperture=apertures.annular(0.5))
    eye = render_bokeh(img, defocus_px=d.signed_coc, aperture=apertures.annular(0.5), vignetting=0.7)
    assert (plain - eye).abs().mean() > 1e-3


def test_tilt_turns_the_focal_plane_onto_the_ground(scene):
    """A plane's disparity is affine in image coordinates, so the tilt that follows the ground (a
    Scheimpflug setup) leaves the whole ground sharp, while the untilted lens blurs it."""
    image, depth, disp = scene
    # the scene's ground: disparity (row - horizon) / (camera height * focal length in px), where visible
    slope = 1.0 / (CAMERA_HEIGHT_M * 0.9 * W)  # disparity per row
    rows = torch.arange(H, dtype=torch.float32)[:, None]
    model = (rows - HORIZON * H) * slope
    ground = ((disp - model).abs() < 1e-6) & (rows > HORIZON * H + 0.5) & (depth < FAR_WALL_M)
    assert int(ground.sum()) > 3000
    near, far = float(disp.max()), float(disp.min())
    ys, xs = ground[0].nonzero().T
    pivot = (float(xs[-1]) / (W - 1), float(ys[-1]) / (H - 1))  # a ground pixel in the bottom row
    f = resolve_focus(disp, point=pivot, normalized=True)
    amount = slope * (H - 1) / (near - far)
    tilted = build_defocus(disp, f, lens=LENS, tilt=FocusTilt(0.0, amount, pivot)).signed_coc
    plain = build_defocus(disp, f, lens=LENS).signed_coc
    # float32 disparities of order 0.5 times K ~ 19 px per 1/m: a few 1e-6 px
    assert float(tilted[ground].abs().max()) < 1e-4
    assert float(plain[ground].abs().max()) > 3.0  # the untilted lens blurs the far ground by ~4 px
    out = render_bokeh(image, defocus_px=tilted)
    reach = int(math.ceil(float(tilted.abs().max()))) + 2
    blurred = (tilted.abs() >= 0.5).float()[:, None]
    clear = F.max_pool2d(blurred, 2 * reach + 1, stride=1, padding=reach)[:, 0] == 0
    keep = ground & clear
    assert int(keep.sum()) > 1000 and torch.equal(out[keep], image[keep])


def test_tilt_amount_angle_and_pivot_are_exact():
    """On a floor whose disparity spans the depth range from the top row to the bottom row, tilt 1
    makes it all sharp, tilt -1 doubles the blur (the miniature look), and the ramp follows the
    angle: at 90 degrees it runs left to right through the pivot."""
    h, w = 40, 60
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w) / (h - 1)
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w) / (w - 1)
    floor = (0.2 + 0.6 * rows).float()[None]
    f = floor[0, 20, 30].reshape(1)
    pivot = (30 / (w - 1), 20 / (h - 1))
    k = 20.0
    exact = k * (floor.double() - f.double())  # untilted
    for amount, factor in ((1.0, 0.0), (0.0, 1.0), (-1.0, 2.0), (0.5, 0.5)):
        got = build_defocus(floor, f, K=k, tilt=FocusTilt(0.0, amount, pivot)).signed_coc
        assert torch.allclose(got.double(), factor * exact, rtol=0, atol=2e-5), amount  # float32 of values ~ 12 px
    wall = (0.2 + 0.6 * cols).float()[None]  # nearer toward the right
    fw = wall[0, 20, 30].reshape(1)
    got = build_defocus(wall, fw, K=k, tilt=FocusTilt(90.0, 1.0, pivot)).signed_coc
    assert float(got.abs().max()) < 2e-5
    got = build_defocus(wall, fw, K=k, tilt=FocusTilt(-90.0, 1.0, pivot)).signed_coc
    assert torch.allclose(got.double(), 2 * k * (wall.double() - fw.double()), rtol=0, atol=2e-5)
    # the pivot's own focus is kept: zero blur on the tilt line through it
    got = build_defocus(floor, f, K=k, tilt=FocusTilt(0.0, -0.7, pivot)).signed_coc
    assert float(got[0, 20].abs().max()) < 1e-5
    for bad in (dict(amount=2.5), dict(amount=float("nan")), dict(angle_deg=float("inf")), dict(pivot=(1.2, 0.5))):
        with pytest.raises(InputError):
            FocusTilt(**{"angle_deg": 0.0, "amount": 0.5, "pivot": (0.5, 0.5), **bad})
