"""Physics and input handling of the classical renderer on small synthetic scenes."""
import logging
import math

import numpy as np
import pytest
import torch

from genrefocus_core.basics import apertures
from genrefocus_core.classical.renderer import (build_levels, level_weights, linear_to_srgb, render_bokeh,
                                             srgb_to_linear)
from genrefocus_core.basics.errors import InputError


def _dot_scene(size, radius, value=1.0, at=None):
    """A single bright pixel on a black card at uniform signed defocus `radius`."""
    img = torch.zeros(1, size, size, 3)
    cy, cx = at or (size // 2, size // 2)
    img[0, cy, cx] = value
    return img, torch.full((1, size, size), float(radius)), (cy, cx)


def _support(out, centre, radius):
    """Half-maximum support of a rendered point (plateau = median of the core), like measure.py."""
    o = out[0].mean(-1).double()
    cy, cx = centre
    yy, xx = torch.meshgrid(torch.arange(o.shape[0]), torch.arange(o.shape[1]), indexing="ij")
    dx, dy = (xx - cx).double(), (yy - cy).double()
    core = torch.hypot(dx, dy) <= max(0.5 * radius, 0.5)
    plateau = o[core].median()
    return o >= 0.5 * plateau, dx, dy


@pytest.mark.parametrize("ap", [apertures.circle(), apertures.polygon(6), apertures.triangle(), apertures.star(5, 0.5)],
                         ids=["circle", "hexagon", "triangle", "star"])
@pytest.mark.parametrize("radius", [-3.0, 7.4, -12.6, 27.3])
def test_point_light_gives_the_aperture_at_the_right_radius(ap, radius):
    img, defocus, c = _dot_scene(112, radius)
    out = render_bokeh(img, defocus_px=defocus, aperture=ap, colorspace="linear", flip_front=False)
    support, dx, dy = _support(out, c, abs(radius))
    expected = ap.inside(dx, dy, abs(radius) + 1e-3)  # pixel centres on the outline count as inside
    iou = float((support & expected).sum() / (support | expected).sum())
    assert iou >= 0.97, iou
    r_meas = math.sqrt(float(support.sum()) / ap.area_unit())
    assert abs(r_meas - abs(radius)) < 0.35
    # energy of the light is conserved
    assert float(out.sum()) == pytest.approx(3.0, abs=2e-3)


def test_sub_pixel_radius_is_continuous():
    """Radii between depth levels move the outline smoothly (mean radius error over a sweep)."""
    errs = []
    for r in np.linspace(9.0, 30.0, 9):
        img, defocus, c = _dot_scene(160, -r)  # far from the borders (their coverage is renormalised)
        out = render_bokeh(img, defocus_px=defocus, colorspace="linear")
        support, dx, dy = _support(out, c, r)
        lattice = float(apertures.circle().inside(dx, dy, r).sum())  # pixel-centre count of the exact disc
        errs.append(abs(math.sqrt(float(support.sum()) / math.pi) - math.sqrt(lattice / math.pi)))
    assert np.mean(errs) < 0.06 and max(errs) < 0.25, errs  # level spacing here is 1-4 px


def test_front_bokeh_is_the_shape_turned_180_degrees():
    ap = apertures.heart()
    img, defocus, c = _dot_scene(65, 10.0)
    front = render_bokeh(img, defocus_px=defocus, aperture=ap, colorspace="linear")
    back = render_bokeh(img, defocus_px=-defocus, aperture=ap, colorspace="linear")
    assert torch.allclose(front[0], torch.flip(back[0], dims=(0, 1)), atol=1e-6)
    assert not torch.allclose(front, back, atol=1e-3)


def _two_planes(size=96, fg_value=0.15, bg_value=0.85, seed=0):
    g = torch.Generator().manual_seed(seed)
    fg = fg_value + 0.05 * torch.rand(size, size, 3, generator=g)
    bg = bg_value + 0.1 * torch.rand(size, size, 3, generator=g)
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1.0
    img = torch.where(mask[..., None] > 0, fg, bg)[None]
    return img, mask, fg, bg


def test_in_focus_foreground_receives_no_light_from_behind():
    img, mask, _, _ = _two_planes()
    disp = torch.where(mask > 0, 0.8, 0.3)[None]
    out = render_bokeh(img, disp, 0.8, 40.0, colorspace="linear")  # bg blurred by r = 20
    fg = mask[None, ..., None].expand_as(out) > 0
    assert torch.equal(out[fg], img[fg])  # exactly unchanged, even right at the edge
    # the background is blurred and does not darken from the foreground (no dark halo)
    band = out[0, 10:-10, 50:60].mean()
    assert float(band) > 0.85


# full resolution; coarse lattice, whose edge ramp (4 px) and resampling widen the rim by a few px
@pytest.mark.parametrize("r, rim", [(12.0, 3), (30.0, 8)])
def test_blurred_foreground_spills_over_sharp_background(r, rim):
    size = 160
    img, mask, fg, bg = _two_planes(size)
    disp = torch.where(mask > 0, 0.8, 0.5)[None]
    out = render_bokeh(img, disp, 0.5, r / 0.3, colorspace="linear")
    # exact layered answer for the visible background: (M*FG) (*) A + (1 - M (*) A) * BG
    k = apertures.circle().kernel(r).double()
    pad = k.shape[0] // 2
    conv = lambda x: torch.nn.functional.conv2d(x.permute(2, 0, 1)[:, None].double(), k[None, None],
                                                padding=pad)[:, 0].permute(1, 2, 0)
    mb = conv(mask[..., None])
    gt = conv(mask[..., None] * fg) + (1 - mb) * bg
    cols = slice(size // 2, size // 2 + int(r))
    rows = slice(int(r) + 2, size - int(r) - 2)
    num = (out[0, rows, cols].double() - bg[rows, cols]).abs().mean()
    den = (gt[rows, cols] - bg[rows, cols]).abs().mean()
    assert 0.9 <= float(num / den) <= 1.1
    # beyond the blur radius the in-focus background is untouched
    far = slice(size // 2 + int(r) + rim, size)
    assert float((out[0, rows, far] - img[0, rows, far]).abs().max()) < 1e-4


def test_identity_cases_are_exact():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 40, 56, 3, generator=g)
    disp = torch.rand(1, 40, 56, generator=g)
    assert torch.equal(render_bokeh(img, disp, 0.5, 0.0), img)
    assert torch.equal(render_bokeh(img, torch.full_like(disp, 0.3), 0.3, 50.0), img)
    assert torch.equal(render_bokeh(img, None, None, 0.0), img)
    # radii below half a pixel are in focus
    assert torch.equal(render_bokeh(img, defocus_px=torch.full((1, 40, 56), 0.45)), img)


@pytest.mark.parametrize("colorspace", ["srgb", "linear"])
def test_flat_field_stays_flat_including_borders(colorspace):
    img = torch.tensor([0.7, 0.4, 0.2]).expand(1, 64, 80, 3).contiguous()
    out = render_bokeh(img, defocus_px=torch.full((1, 64, 80), -15.5), colorspace=colorspace)
    assert float((out - img).abs().max()) < 1e-3


def test_all_equal_depth_with_default_focus_is_identity():
    g = torch.Generator().manual_seed(2)
    img = torch.rand(1, 24, 24, 3, generator=g)
    assert torch.equal(render_bokeh(img, torch.full((1, 24, 24), 0.25), None, 30.0), img)


def test_srgb_round_trip():
    x = torch.linspace(0, 1, 1001)
    assert float((linear_to_srgb(srgb_to_linear(x)) - x).abs().max()) < 1e-5


def test_highlight_boost_brightens_blurred_highlights_only():
    img, defocus, c = _dot_scene(64, -8.0, value=1.0)
    img[0, 5, 5] = 0.95  # an in-focus highlight
    defocus[0, :16, :16] = 0.0
    plain = render_bokeh(img, defocus_px=defocus)
    boosted = render_bokeh(img, defocus_px=defocus, highlight_boost=3.0)
    assert float(boosted[0, c[0], c[1]].mean()) > 1.5 * float(plain[0, c[0], c[1]].mean())
    assert torch.equal(boosted[0, 5, 5], img[0, 5, 5])


def test_batch_matches_single_images():
    g = torch.Generator().manual_seed(3)
    img = torch.rand(2, 48, 40, 3, generator=g)
    disp = torch.rand(2, 48, 40, generator=g)
    both = render_bokeh(img, disp, [0.3, 0.7], 20.0)
    for b, f in enumerate((0.3, 0.7)):
        one = render_bokeh(img[b:b + 1], disp[b:b + 1], f, 20.0)
        assert torch.allclose(both[b], one[0], atol=1e-5)


def test_size_mismatch_is_resized_with_a_warning(caplog):
    img = torch.rand(1, 40, 60, 3)
    disp = torch.rand(1, 20, 30)
    with caplog.at_level(logging.WARNING):
        out = render_bokeh(img, disp, 0.5, 10.0)
    assert out.shape == img.shape
    assert "resizing" in caplog.text


def test_nan_and_inf_disparity(caplog):
    img = torch.rand(1, 32, 32, 3)
    disp = torch.rand(1, 32, 32)
    disp[0, 3, 4] = float("nan")
    disp[0, 5, 6] = float("inf")
    with caplog.at_level(logging.WARNING):
        out = render_bokeh(img, disp, 0.5, 10.0)
    assert torch.isfinite(out).all() and "NaN" in caplog.text
    with pytest.raises(InputError):
        render_bokeh(img, torch.full((1, 32, 32), float("nan")), 0.5, 10.0)
    with pytest.raises(InputError):
        render_bokeh(img, defocus_px=torch.full((1, 32, 32), float("nan")))
    with pytest.raises(InputError):
        render_bokeh(img, disp, float("nan"), 10.0)


def test_bad_settings_are_clear_errors():
    img = torch.rand(1, 16, 16, 3)
    disp = torch.rand(1, 16, 16)
    for kwargs in (dict(K=-1.0), dict(K=float("inf")), dict(K=5.0, colorspace="rgb"), dict(K=5.0, quality="max"),
                   dict(K=5.0, highlight_boost=-1), dict(K=5.0, aperture="circle")):
        with pytest.raises(InputError):
            render_bokeh(img, disp, 0.5, **kwargs)
    with pytest.raises(InputError):
        render_bokeh(img, None, None, 5.0)  # blur without depth


def test_huge_blur_is_capped_with_a_warning(caplog):
    img = torch.rand(1, 64, 48, 3)
    disp = torch.rand(1, 64, 48)
    with caplog.at_level(logging.WARNING):
        out = render_bokeh(img, disp, 0.5, 1e6)
    assert "capped" in caplog.text
    assert out.shape == img.shape and torch.isfinite(out).all()
    # capped radius: the level ladder stays short (memory and time bounded)
    assert len(build_levels(32.0, apertures.circle())) < 40


def test_one_pixel_and_thin_images():
    px = torch.tensor([[[[0.2, 0.5, 0.9]]]])
    assert torch.allclose(render_bokeh(px, torch.tensor([[[0.1]]]), 0.9, 20.0), px, atol=1e-5)
    line = torch.rand(1, 1, 50, 3)
    out = render_bokeh(line, torch.linspace(0, 1, 50)[None, None], 0.0, 10.0)
    assert out.shape == line.shape and torch.isfinite(out).all()


def test_large_image_stays_fast():
    img = torch.rand(1, 1536, 2048, 3)
    disp = torch.linspace(0, 1, 2048).expand(1, 1536, 2048)
    out = render_bokeh(img, disp, 0.5, 6.0, quality="fast")
    assert out.shape == img.shape


def test_level_weights_put_half_maximum_at_the_radius():
    levels = build_levels(40.0, apertures.circle())
    r = torch.tensor([[[0.2, 0.7, 1.0, 3.3, 17.9, 40.0]]])
    lo, w_lo, w_hi = level_weights(r, levels)
    assert torch.allclose(w_lo + w_hi, torch.ones_like(w_lo))
    assert float(w_hi[0, 0, 0]) == 0.0 and int(lo[0, 0, 0]) == 0  # in focus
    radii = torch.tensor([lv.radius for lv in levels])
    assert bool(((radii[lo] <= r + 1e-6) & (r <= radii[lo + 1] + 1e-6)).all())


def test_cat_eye_vignetting_changes_the_shape_towards_the_corners():
    size = 150
    img = torch.zeros(1, size, size, 3)
    spots = [(75, 75), (15, 15), (135, 135)]  # centre, top-left, bottom-right regions
    for y, x in spots:
        img[0, y, x] = 1.0
    defocus = torch.full((1, size, size), -9.0)
    plain = render_bokeh(img, defocus_px=defocus, colorspace="linear")
    vig = render_bokeh(img, defocus_px=defocus, colorspace="linear", vignetting=0.8)
    area = lambda out, y, x: int((out[0, y - 12:y + 13, x - 12:x + 13, 0] >= 0.5 * out[0, y, x, 0]).sum())
    assert abs(area(vig, 75, 75) - area(plain, 75, 75)) <= 8  # the centre region is barely clipped
    assert area(vig, 15, 15) < 0.75 * area(plain, 15, 15)  # the corners are
    # clipped on the side away from the image centre: the top-left spot loses its top-left part
    tl = vig[0, 15 - 9:15 + 10, 15 - 9:15 + 10, 0]
    assert float(tl[:6, :6].sum()) < 0.2 * float(tl[-6:, -6:].sum())
    # energy kept up to the coverage renormalisation where neighbouring regions use different shapes
    assert float(vig.sum()) == pytest.approx(float(plain.sum()), rel=0.02)
    with pytest.raises(InputError):
        render_bokeh(img, defocus_px=defocus, vignetting=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(4)
    img = torch.rand(1, 96, 128, 3, generator=g)
    disp = torch.rand(1, 96, 128, generator=g)
    cpu = render_bokeh(img, disp, 0.5, 40.0, apertures.polygon(6), vignetting=0.5)
    gpu = render_bokeh(img.cuda(), disp.cuda(), 0.5, 40.0, apertures.polygon(6), vignetting=0.5)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)


def test_few_tap_kernels_convolved_directly_match_the_fft_path(monkeypatch):
    """Levels with tiny kernels take shifted sums instead of FFTs; both give the same picture."""
    from genrefocus_core.classical import renderer as classical_bokeh
    g = torch.Generator().manual_seed(7)
    img = torch.rand(1, 40, 52, 3, generator=g)
    defocus = torch.rand(1, 40, 52, generator=g) * 3.0 - 1.5  # levels 0 and +-1, +-2 only
    for ap in (apertures.circle(), apertures.triangle()):
        direct = render_bokeh(img, defocus_px=defocus, aperture=ap)
        monkeypatch.setattr(classical_bokeh, "DIRECT_TAPS", 0)
        via_fft = render_bokeh(img, defocus_px=defocus, aperture=ap)
        monkeypatch.undo()
        assert torch.allclose(direct, via_fft, atol=2e-5)
        assert not torch.equal(direct, img)


def test_level_ladder_keeps_a_flat_core_in_every_mixed_psf():
    """1-px steps up to 4 px, then >= 2 px (ramps as wide as the spacing, so the lower of two mixed
    levels stays flat out to half the upper one's radius, from 2 px on); coarse lattices for big radii."""
    for ap in (apertures.circle(), apertures.polygon(8), apertures.triangle()):
        levels = build_levels(40.0, ap)
        assert [lv.radius for lv in levels[:7]] == [0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0]
        assert all(b.radius - a.radius <= b.ramp + 1e-9 for a, b in zip(levels, levels[1:]))
        assert all(a.radius - a.ramp / 2 >= b.radius / 2 - 1e-9 for a, b in zip(levels[2:], levels[3:]))
        assert all(lv.scale > 1 for lv in levels if lv.radius >= 16)


def test_fft_sizes_and_kernel_spectra():
    from genrefocus_core.classical.renderer import _fast_size, _kernel_spectrum
    for n in (1, 7, 100, 127, 130, 513, 530, 1030, 2049):
        m = _fast_size(n)
        assert m >= n and m % 2 == 0 and (n < 128 or m % 16 == 0)
        k = m
        for q in (2, 3, 5, 7, 11, 13):
            while k % q == 0:
                k //= q
        assert k == 1
    # the DFT-by-matrix spectrum equals the FFT of the zero-padded, centred kernel (any shape)
    kernel = apertures.triangle().ramp_kernel(9.3, 2.0)
    p = kernel.shape[-1] // 2
    for lh, lw in ((64, 64), (50, 72)):
        padded = torch.zeros(lh, lw)
        padded[: kernel.shape[0], : kernel.shape[1]] = kernel
        expected = torch.fft.fft2(torch.roll(padded, (-p, -p), (0, 1)).to(torch.complex64))
        assert torch.allclose(_kernel_spectrum(kernel, lh, lw), expected, atol=1e-5)


def test_coarse_lattice_compositing_agrees_with_full_resolution_levels():
    """Behind and in front of full-resolution levels, coarse levels are composited on their own
    lattices; with every level up to 32 px at full resolution ('best') the picture is the same up to
    the softer edge ramps."""
    g = torch.Generator().manual_seed(3)
    size = 160
    img = torch.rand(1, size, size, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    defocus = torch.full((size, size), -26.0)  # far background: coarse lattice, behind
    defocus[(xx - 80) ** 2 + (yy - 80) ** 2 < 45 ** 2] = -6.0  # a disc: full resolution
    defocus[(xx > 95) & (yy > 40) & (yy < 120)] = 22.0  # a near bar: coarse lattice, in front
    for ap in (apertures.circle(), apertures.polygon(5)):
        lattice = render_bokeh(img, defocus_px=defocus[None], aperture=ap, colorspace="linear")
        full = render_bokeh(img, defocus_px=defocus[None], aperture=ap, colorspace="linear", quality="best")
        diff = (lattice - full).abs()
        assert float(diff.mean()) < 0.004 and float(diff.max()) < 0.04


@pytest.mark.parametrize("scale", [2, 4])
def test_resampling_variance_matches_an_impulse_through_splat_and_interpolations(scale):
    """The radius compensation of coarse levels uses this variance: check it on an impulse, splatted by
    the adjoint of bilinear interpolation and brought back by 2x bilinear steps (mean over phases)."""
    from genrefocus_core.classical.renderer import resampling_variance
    n, total = 16 * scale, 0.0
    for phase in range(scale):
        impulse = torch.zeros(1, 1, 1, n, dtype=torch.float64)
        impulse[..., 8 * scale + phase] = 1.0
        cells = torch.zeros(1, 1, 1, 16, dtype=torch.float64, requires_grad=True)
        up = torch.nn.functional.interpolate(cells, size=(1, n), mode="bilinear", align_corners=False)
        (up * impulse).sum().backward()
        y = cells.grad
        for _ in range(int(math.log2(scale))):
            y = torch.nn.functional.interpolate(y, scale_factor=(1, 2), mode="bilinear", align_corners=False)
        w, x = y.flatten(), torch.arange(n, dtype=torch.float64)
        mean = (w * x).sum() / w.sum()
        total += float((w * (x - mean) ** 2).sum() / w.sum())
    assert resampling_variance(scale) == pytest.approx(total / scale, rel=1e-9)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_levels_on_worker_threads_give_the_same_picture(monkeypatch, threads):
    """On a busy machine the levels render on worker threads, each operation on one thread (torch's
    thread count is restored after). Same levels, same operations: only the FFT's threading changes,
    whose rounding differs by a few float32 ulps of values <= 1 (tolerance 1e-5, as in the batch test)."""
    from genrefocus_core.classical import renderer

    g = torch.Generator().manual_seed(5)
    img = torch.rand(1, 90, 120, 3, generator=g)
    defocus = (torch.rand(1, 90, 120, generator=g) - 0.5) * 70.0  # fine and coarse levels, both sides
    before = torch.get_num_threads()
    monkeypatch.setattr(renderer, "_machine_busy", lambda: False)
    quiet = render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), threads=threads)
    monkeypatch.setattr(renderer, "_machine_busy", lambda: True)
    assert renderer._parallelism(threads, "cpu") == ((threads, 1) if threads > 1 else (1, 1))
    busy = render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), threads=threads)
    assert torch.get_num_threads() == before
    assert float((quiet - busy).abs().max()) < 1e-5
    with pytest.raises(InputError, match="threads"):
        render_bokeh(img, defocus_px=defocus, threads=0)


def test_a_batch_rendered_frame_by_frame_equals_the_whole_batch(monkeypatch):
    """Large batches (video) go FRAME_PIXELS_PER_CALL at a time on the batch's level ladder, so peak memory
    is one frame's; the picture is the batch render's up to FFT rounding (1e-5, as in the batch test)."""
    from genrefocus_core.classical import renderer

    g = torch.Generator().manual_seed(9)
    img = torch.rand(3, 40, 56, 3, generator=g)
    defocus = (torch.rand(3, 40, 56, generator=g) - 0.5) * 50.0
    whole = render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), highlight_boost=0.5, grain=0.5)
    monkeypatch.setattr(renderer, "FRAME_PIXELS_PER_CALL", 1)
    frames = render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), highlight_boost=0.5, grain=0.5)
    assert float((whole - frames).abs().max()) < 1e-5


@pytest.mark.parametrize("vignetting, picked_without_sort", [(0.0, 0), (0.6, 0), (0.0, 10 ** 6)])
def test_levels_drawn_densely_or_from_pixel_lists_give_the_same_picture(monkeypatch, vignetting, picked_without_sort):
    """A level is drawn over its box from the per-pixel level keys, or, when its pixels are scattered
    (fill < SCATTERED_FILL), from a list of its pixels (picked by one sort, or key by key). Both write the same products into the same
    grids, so the pictures are identical, for a batch, smooth and jumping depth, and vignetting regions."""
    from genrefocus_core.classical import renderer

    g = torch.Generator().manual_seed(11)
    img = torch.rand(2, 48, 64, 3, generator=g)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 48, 64, generator=g), 9, 1, 4)[0]
    defocus = torch.cat([(smooth - 0.5) * 200.0, (torch.rand(1, 48, 64, generator=g) - 0.5) * 60.0])
    monkeypatch.setattr(renderer, "SCATTERED_KEYS_WITHOUT_SORT", picked_without_sort)  # lists by sort / by key
    pictures = []
    for fill in (0.0, 2.0):  # every level dense, every level from lists
        monkeypatch.setattr(renderer, "SCATTERED_FILL", fill)
        pictures.append(render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), vignetting=vignetting))
    assert torch.equal(pictures[0], pictures[1])
    assert float((pictures[0] - img).abs().mean()) > 0.01  # blurred


def test_a_still_repeated_over_a_focus_pull_is_converted_to_linear_light_once(monkeypatch):
    """A rack focus from a still renders the same frame at every focus: its linear-light conversion is
    made once and reused while the frames are equal, and made again for a frame that differs. Each frame
    is the picture of its own render (same level ladder: every map peaks at the same radius; same
    operations on the same values: exact)."""
    from genrefocus_core.classical import renderer

    g = torch.Generator().manual_seed(3)
    still = torch.rand(1, 36, 52, 3, generator=g)
    defocus = torch.stack([torch.full((36, 52), 0.0), (torch.rand(36, 52, generator=g) - 0.5) * 30.0,
                           (torch.rand(36, 52, generator=g) - 0.5) * 50.0])
    defocus[:, 5, 7] = 30.0
    alone = [render_bokeh(still, defocus_px=defocus[i:i + 1], max_radius=30.0) for i in range(3)]
    calls = []
    convert = renderer.srgb_to_linear
    monkeypatch.setattr(renderer, "srgb_to_linear", lambda x: calls.append(x.shape[0]) or convert(x))
    monkeypatch.setattr(renderer, "FRAME_PIXELS_PER_CALL", 1)
    pulled = render_bokeh(still.expand(3, -1, -1, -1), defocus_px=defocus, max_radius=30.0)
    assert calls == [1]
    for i in range(3):
        assert torch.equal(pulled[i:i + 1], alone[i])
    calls.clear()
    clip = still.repeat(3, 1, 1, 1)
    clip[2, 0, 0] = 1.0 - clip[2, 0, 0]
    changed = render_bokeh(clip, defocus_px=defocus, max_radius=30.0)
    assert calls == [1, 1]
    assert torch.equal(changed[2:], render_bokeh(clip[2:], defocus_px=defocus[2:], max_radius=30.0))


@pytest.mark.parametrize("colorspace", ["srgb", "linear"])
def test_frame_sized_passes_in_bands_of_rows_give_the_same_picture(monkeypatch, colorspace):
    """Colour conversion, level weights and the output run on bands of rows (no frame-sized temporaries at
    4K). Bands of a few rows, cutting frames of a batch alike, give the picture of one band and the same
    level weights: exactly in linear light (correctly rounded operations), within a few float32 ulps of
    values <= 1 through the sRGB curves (exp2 rounds differently in a vector and at its scalar tail,
    and the bands move the tails)."""
    from genrefocus_core.classical import renderer

    g = torch.Generator().manual_seed(11)
    img = torch.rand(2, 37, 61, 3, generator=g)
    defocus = (torch.rand(2, 37, 61, generator=g) - 0.5) * 40.0
    defocus[:, 10:20, 10:30] = 0.2  # in focus
    levels = build_levels(20.0, apertures.polygon(6))
    whole = render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), colorspace=colorspace)
    weights = level_weights(defocus, levels)
    monkeypatch.setattr(renderer, "BAND_PIXELS", 3 * 61)  # one or two rows of the batch at a time
    assert len(renderer._row_bands(img)) > 30
    banded = render_bokeh(img, defocus_px=defocus, aperture=apertures.polygon(6), colorspace=colorspace)
    if colorspace == "linear":
        assert torch.equal(banded, whole)
    else:
        assert float((banded - whole).abs().max()) <= 1e-6
    for a, b in zip(level_weights(defocus, levels), weights):
        assert torch.equal(a, b)
    assert float((linear_to_srgb(srgb_to_linear(img)) - img).abs().max()) < 1e-5


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_coarse_splat_is_the_adjoint_of_bilinear_interpolation(scale):
    """Coarse levels are splatted densely (the level's pixels drawn into a cell-aligned box, reduced cell
    by cell); the result must be the adjoint of the bilinear interpolation (align_corners=False) that
    brings the lattice back, over scale^2 (a cell's light is spread over its scale^2 pixels by the
    interpolation): <splat(v), c> = <v, interpolate(c)> / scale^2 for every lattice field c. fp32 sums of
    <= 4 * scale^2 terms of values <= 1 per cell: a few ulps (bound 1e-5)."""
    from genrefocus_core.classical.renderer import ALPHA_SCALE, _Grid, _LevelPixels, _LevelRenderer

    g = torch.Generator().manual_seed(scale)
    H, W, lead = 37, 53, 2 * scale
    lin = torch.rand(1, H, W, 3, generator=g)
    weight = torch.rand(1, H, W, generator=g) * (torch.rand(1, H, W, generator=g) < 0.15)
    y0, y1, x0, x1 = 3, 31, 5, 50  # the level's box: not aligned to the cells
    h, w = -(-(H + 2 * lead) // scale) + 1, -(-(W + 2 * lead) // scale) + 1
    grid = _Grid(scale, -lead, -lead, h, w, h + 3, w + 5)
    planes = torch.zeros(1, 2, grid.fft_h, grid.fft_w, dtype=torch.complex64)
    pixels = _LevelPixels(y0, y1, x0, x1, lin[:, y0:y1, x0:x1], weight[:, y0:y1, x0:x1])
    _LevelRenderer._splat(pixels, grid, planes)
    # reference: the adjoint of interpolating the lattice (cells at image pixel -lead + scale * i) to the image
    cells = torch.zeros(1, 4, h, w, dtype=torch.float64, requires_grad=True)
    up = torch.nn.functional.interpolate(cells, scale_factor=scale, mode="bilinear", align_corners=False)
    image = torch.zeros(1, 4, h * scale, w * scale, dtype=torch.float64)
    light = torch.cat([lin * weight[..., None], weight[..., None] * ALPHA_SCALE], dim=-1)[0, y0:y1, x0:x1]
    image[0, :, y0 + lead:y1 + lead, x0 + lead:x1 + lead] = light.permute(2, 0, 1).double()
    (up * image).sum().backward()
    expected = torch.complex(cells.grad[0, 0::2], cells.grad[0, 1::2]) / scale ** 2
    assert torch.equal(planes[0, :, h:], torch.zeros_like(planes[0, :, h:]))
    assert float((planes[0, :, :h, :w] - expected).abs().max()) < 1e-5
    assert float(expected.abs().max()) > 0.5 / scale ** 2


def test_front_levels_cross_to_full_resolution_only_where_they_reach(monkeypatch):
    """Coarse levels in front of the full-resolution ones cross to full resolution only in the window
    their light and coverage reach (`_window`); outside it they hold only FFT rounding noise. The picture
    equals the one composited over the whole frame up to that noise and the reordered sum there (a few
    float32 ulps of values <= 1: bound 1e-5, as in the batch test)."""
    from genrefocus_core.classical import renderer

    g = torch.Generator().manual_seed(11)
    H, W = 120, 200
    img = torch.rand(1, H, W, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    defocus = (15.0 - yy.float() / H * 20.0)[None].clone()  # a ground plane: every full-resolution level
    defocus[0, 10:40, 20:50] = 24.0  # a small near card: coarse levels in front
    windows = []
    window = renderer._window
    monkeypatch.setattr(renderer, "_window", lambda *a: windows.append(window(*a)) or windows[-1])
    for ap in (apertures.circle(), apertures.polygon(6)):
        cropped = render_bokeh(img, defocus_px=defocus, aperture=ap)
        assert windows[-1] is not None and windows[-1] != (0, H, 0, W)
        monkeypatch.setattr(renderer, "_window", lambda supports, h, w: (0, h, 0, w))
        whole = render_bokeh(img, defocus_px=defocus, aperture=ap)
        monkeypatch.setattr(renderer, "_window", lambda *a: windows.append(window(*a)) or windows[-1])
        assert float((cropped - whole).abs().max()) < 1e-5
        assert float((whole - img).abs().max()) > 0.1
