"""External depth/disparity maps and depth files -> the core's disparity (1/m, bigger = nearer)."""
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genrefocus_core.depth.sources import (
    DEFAULT_FAR_M, DEFAULT_NEAR_M, depth_from_external, disparity_from_external, load_depth_file, read_map,
    value_ranges,
)
from genrefocus_core.basics.errors import InputError

NEAR_D, FAR_D = 1.0 / DEFAULT_NEAR_M, 1.0 / DEFAULT_FAR_M  # 1.0 and 0.05 1/m


def ramp(h=4, w=5):
    """Values 0..1 along the row-major order, [H, W]."""
    return torch.linspace(0, 1, h * w).reshape(h, w)


# ---------------------------------------------------------------------------------- relative maps

def test_relative_disparity_spans_the_typical_scene_linearly():
    v = ramp()
    disp = disparity_from_external(v, kind="disparity")  # Depth Anything / MiDaS: near = bright
    assert disp.shape == (1, 4, 5)
    assert torch.isclose(disp[0, 0, 0], torch.tensor(FAR_D)) and torch.isclose(disp[0, -1, -1], torch.tensor(NEAR_D))
    assert torch.allclose(disp[0], FAR_D + v * (NEAR_D - FAR_D), atol=1e-6)
    # any affine change of a relative map gives the same disparity
    assert torch.allclose(disparity_from_external(v * 37.0 + 5.0, kind="disparity"), disp, atol=1e-6)
    # a chosen scene range: a portrait between 0.5 m and 4 m
    d2 = disparity_from_external(v, kind="disparity", near_m=0.5, far_m=4.0)
    assert torch.isclose(d2.max(), torch.tensor(2.0)) and torch.isclose(d2.min(), torch.tensor(0.25))


def test_relative_depth_is_linear_in_depth_and_near_dark():
    v = ramp()
    disp = disparity_from_external(v, kind="depth")  # Marigold-like: 0 = nearest (dark)
    depth = 1.0 / disp[0]
    assert torch.allclose(depth, DEFAULT_NEAR_M + v * (DEFAULT_FAR_M - DEFAULT_NEAR_M), rtol=1e-5)
    assert torch.isclose(disp[0, 0, 0], torch.tensor(1.0)) and torch.isclose(disp[0, -1, -1], torch.tensor(0.05))
    mid = torch.tensor([[0.0, 0.5, 1.0]])
    assert torch.allclose(disparity_from_external(mid, kind="depth")[0, 0, 1], torch.tensor(1 / 10.5))
    assert torch.allclose(depth_from_external(v, kind="depth")[0], depth, rtol=1e-5)


def test_inverted_maps_are_flipped():
    v = ramp()
    # depth displayed with near = bright equals the plain depth map 1 - v
    assert torch.allclose(disparity_from_external(v, kind="depth", near="bright"),
                          disparity_from_external(1 - v, kind="depth"), atol=1e-6)
    # disparity displayed with near = dark equals the plain disparity map 1 - v
    assert torch.allclose(disparity_from_external(v, kind="disparity", near="dark"),
                          disparity_from_external(1 - v, kind="disparity"), atol=1e-6)
    # the kind's own orientation given explicitly equals "auto"
    assert torch.equal(disparity_from_external(v, kind="depth", near="dark"), disparity_from_external(v, kind="depth"))
    # bigger disparity = nearer in the result whatever the input orientation
    out = disparity_from_external(v, kind="disparity", near="dark")
    assert out[0, 0, 0] > out[0, -1, -1]


def test_8_bit_16_bit_and_comfy_images_agree():
    codes8 = np.array([[0, 51, 102], [153, 204, 255]], dtype=np.uint8)
    codes16 = codes8.astype(np.uint16) * 257
    comfy = torch.from_numpy(codes8.astype(np.float32) / 255.0)[None, ..., None].expand(1, 2, 3, 3)  # IMAGE
    from_8 = disparity_from_external(codes8, kind="disparity")
    assert torch.allclose(from_8, disparity_from_external(codes16, kind="disparity"), atol=1e-6)
    assert torch.allclose(from_8, disparity_from_external(comfy, kind="disparity"), atol=1e-6)
    assert torch.allclose(from_8, disparity_from_external(Image.fromarray(codes8), kind="disparity"), atol=1e-6)
    assert torch.allclose(from_8[0, 0], torch.tensor([0.05, 0.24, 0.43]), atol=1e-6)
    # a colour-mapped visualisation cannot be read back
    colour = torch.rand(1, 4, 4, 3)  # ComfyUI IMAGE of a colour map
    with pytest.raises(InputError, match="colour"):
        disparity_from_external(colour)
    with pytest.raises(InputError, match="colour"):
        disparity_from_external((colour[0].numpy() * 255).astype(np.uint8))  # numpy [H,W,3]
    # JPEG-like noise on a grey image is tolerated
    grey = torch.rand(1, 8, 8, 1).expand(1, 8, 8, 3) + torch.randn(1, 8, 8, 3) * 0.002
    assert disparity_from_external(grey).shape == (1, 8, 8)


# ---------------------------------------------------------------------------------- metric maps

def test_metric_depth_in_millimetres_and_far_points():
    mm = np.array([[500, 1000, 2000], [4000, 0, 65535]], dtype=np.uint16)
    disp = disparity_from_external(mm, kind="depth", scale="metric", unit=0.001)
    expected = torch.tensor([[[2.0, 1.0, 0.5], [0.25, 0.0, 1.0 / 65.535]]])
    assert torch.allclose(disp, expected, rtol=1e-5)  # depth 0 (no return) -> infinitely far
    metres = torch.tensor([[2.0, float("inf")], [4.0, -1.0]])
    assert torch.allclose(disparity_from_external(metres, kind="depth", scale="metric"),
                          torch.tensor([[[0.5, 0.0], [0.25, 0.0]]]))
    depth = depth_from_external(metres, kind="depth", scale="metric")
    assert depth[0, 0, 0] == 2.0 and torch.isinf(depth[0, 0, 1]) and torch.isinf(depth[0, 1, 1])
    # a ComfyUI image that encodes 0..10 m
    comfy = torch.tensor([[0.1, 0.5]])
    assert torch.allclose(disparity_from_external(comfy, kind="depth", scale="metric", unit=10.0),
                          torch.tensor([[[1.0, 0.2]]]))


def test_metric_disparity_and_its_errors():
    disp = torch.tensor([[0.5, 0.0], [2.0, 0.1]])
    assert torch.allclose(disparity_from_external(disp, kind="disparity", scale="metric"), disp[None])
    with pytest.raises(InputError, match="negative"):
        disparity_from_external(disp - 1.0, kind="disparity", scale="metric")
    with pytest.raises(InputError, match="zero everywhere"):
        disparity_from_external(torch.zeros(3, 3), kind="disparity", scale="metric")
    with pytest.raises(InputError, match="fixed direction"):
        disparity_from_external(disp, kind="depth", scale="metric", near="bright")
    with pytest.raises(InputError, match="unit"):
        disparity_from_external(disp, kind="depth", scale="metric", unit=0)


# ---------------------------------------------------------------------------------- degenerate maps, sizes

def test_all_zero_constant_and_nan_maps(caplog):
    for kind in ("depth", "disparity"):
        with pytest.raises(InputError, match="constant"):
            disparity_from_external(torch.zeros(4, 4), kind=kind)
    with pytest.raises(InputError, match="no positive finite depth"):
        disparity_from_external(torch.zeros(4, 4), kind="depth", scale="metric")
    with pytest.raises(InputError, match="NaN everywhere"):
        disparity_from_external(torch.full((4, 4), float("nan")), kind="depth", scale="metric")
    with pytest.raises(InputError, match="NaN everywhere"):
        disparity_from_external(torch.full((4, 4), float("nan")))
    # a few unknown pixels get the median disparity of the known ones, with a warning
    depth = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 10.0]])
    with caplog.at_level(logging.WARNING):
        disp = disparity_from_external(depth, kind="depth", scale="metric")
    assert "NaN" in caplog.text
    known = torch.tensor([1.0, 0.5, 0.25, 0.2, 0.1])
    assert torch.isclose(disp[0, 0, 2], known.median()) and torch.isfinite(disp).all()
    # one bad image in a batch is named (normalised on its own); in a clip normalised as a whole, a
    # frame filled by one surface is legitimate: it takes the clip's range (all zero = the far end)
    batch = torch.stack([torch.rand(4, 4), torch.zeros(4, 4)])
    with pytest.raises(InputError, match="image 1"):
        disparity_from_external(batch, normalization="per_image")
    clip = disparity_from_external(batch)
    assert torch.allclose(clip[1], torch.full((4, 4), FAR_D))
    with pytest.raises(InputError, match="image 0"):
        disparity_from_external(torch.ones(2, 4, 4))
    with pytest.raises(InputError, match="infinite"):
        disparity_from_external(torch.tensor([[1.0, float("inf")]]))


def test_other_size_batch_and_options():
    v = ramp(8, 12)
    same_aspect = disparity_from_external(v, size=(16, 24))
    assert same_aspect.shape == (1, 16, 24)
    assert torch.isclose(same_aspect.max(), torch.tensor(NEAR_D), atol=0.05)
    with pytest.raises(InputError, match="aspect"):
        disparity_from_external(v, size=(16, 16))
    repeated = disparity_from_external(v, batch=3)
    assert repeated.shape == (3, 8, 12) and torch.equal(repeated[0], repeated[2])
    with pytest.raises(InputError, match="batch"):
        disparity_from_external(torch.rand(2, 8, 12), batch=3)
    with pytest.raises(InputError, match="kind"):
        disparity_from_external(v, kind="height")
    with pytest.raises(InputError, match="near"):
        disparity_from_external(v, near="left")
    with pytest.raises(InputError, match="near_m"):
        disparity_from_external(v, near_m=5.0, far_m=2.0)
    with pytest.raises(InputError, match="far_m"):
        disparity_from_external(v, far_m="far")
    numpy_numbers = disparity_from_external(v, near_m=np.float32(0.5), far_m=np.int64(4))
    assert torch.isclose(numpy_numbers.max(), torch.tensor(2.0))
    with pytest.raises(InputError):
        disparity_from_external("not a map")
    # layouts: [B,1,H,W] and ComfyUI MASK [B,H,W]
    assert read_map(torch.rand(2, 1, 5, 6)).shape == (2, 5, 6)
    assert read_map(torch.rand(2, 5, 6)).shape == (2, 5, 6)


# ---------------------------------------------------------------------------------- clips

def _clip_with_entering_object(frames=12, enter=6, h=16, w=24):
    """Relative disparity frames (bigger = nearer, as Depth Anything gives): a static background ramp
    0.2..0.6 and, from frame `enter` on, a near object (value 0.9 + 0.05 per frame) sliding in from the
    left; pixels the object covers are marked in the returned mask."""
    background = torch.linspace(0.2, 0.6, w)[None].expand(h, w)
    maps, covered = [], []
    for f in range(frames):
        m = background.clone()
        cover = torch.zeros(h, w, dtype=torch.bool)
        if f >= enter:
            cover[4:12, : 2 * (f - enter + 1)] = True
            m[cover] = 0.9 + 0.05 * (f - enter)
        maps.append(m)
        covered.append(cover)
    return torch.stack(maps), torch.stack(covered)


def test_clip_keeps_one_normalisation_so_the_background_blur_does_not_pump():
    """An object entering later frames must not change the blur of the static background."""
    from genrefocus_core.basics.defocus import defocus_map
    values, covered = _clip_with_entering_object()
    background = ~covered.any(0)  # pixels never covered
    K, focus = 30.0, 0.5  # focused at 2 m (disparity 0.5 1/m)
    blur = defocus_map(disparity_from_external(values, kind="disparity"), focus, K)
    # one normalisation over the batch: the background's disparity, hence its blur, is the same in
    # every frame (same values through the same affine map: equal up to float32 rounding, 1e-5 px)
    assert (blur[:, background] - blur[0, background]).abs().max() < 1e-5
    # the object enters as the nearest thing of the clip: nearer than anything in the first frames
    assert blur[-1][covered[-1]].min() > blur[0][background].max()
    # per image (the earlier behaviour) the background blur jumps when the object enters: the test can fail
    per_image = defocus_map(disparity_from_external(values, kind="disparity", normalization="per_image"), focus, K)
    assert (per_image[6:, background] - per_image[0, background]).abs().max() > 1.0


def test_smoothed_normalisation_follows_the_clip_gradually_and_contains_every_frame():
    values, covered = _clip_with_entering_object(frames=20, enter=10)
    lo, hi = value_ranges(values, "smoothed", 4)
    own_lo, own_hi = values.flatten(1).amin(1), values.flatten(1).amax(1)
    assert (lo <= own_lo + 1e-7).all() and (hi >= own_hi - 1e-7).all()  # no frame leaves its range
    # far from the entry (more than 2 x 4 frames before it) the range is the background's own
    assert torch.allclose(hi[:2], own_hi[:2]) and torch.allclose(lo, own_lo)
    # the range rises over the window before the entry instead of jumping at frame 10
    steps = hi.diff()
    per_image_jump = float(own_hi[10] - own_hi[9])
    assert float(steps.max()) < 0.5 * per_image_jump and (steps[2:10] > 0).all()
    # a window of 0 is per image; "batch" is the whole clip's range
    assert torch.equal(value_ranges(values, "smoothed", 0)[1], value_ranges(values, "per_image")[1])
    assert torch.allclose(value_ranges(values, "batch")[1], own_hi.max().expand(20))
    # through the public function: smoothed disparities stay inside the scene range
    disp = disparity_from_external(values, kind="disparity", normalization="smoothed", smoothing_frames=4)
    assert float(disp.min()) >= FAR_D - 1e-6 and float(disp.max()) <= NEAR_D + 1e-6
    with pytest.raises(InputError, match="normalization"):
        disparity_from_external(values, normalization="global")
    with pytest.raises(InputError, match="smoothing_frames"):
        value_ranges(values, "smoothed", -1)


def test_metric_clips_are_not_normalised():
    values, _ = _clip_with_entering_object()
    depth = 1.0 + 10.0 * values  # metres
    for normalization in ("batch", "smoothed", "per_image"):
        disp = disparity_from_external(depth, kind="depth", scale="metric", normalization=normalization)
        assert torch.allclose(disp, 1.0 / depth)


# ---------------------------------------------------------------------------------- files

def _write_pfm(path, arr):
    h, w = arr.shape
    with open(path, "wb") as f:
        f.write(b"Pf\n%d %d\n-1.0\n" % (w, h))
        f.write(np.ascontiguousarray(arr[::-1], dtype="<f4").tobytes())


def test_load_depth_files(tmp_path):
    depth = (np.arange(12, dtype=np.float32).reshape(3, 4) + 1.0) * 0.5
    np.save(tmp_path / "d.npy", depth)
    np.savez(tmp_path / "d.npz", depth=depth, other=np.zeros(2))
    _write_pfm(tmp_path / "d.pfm", depth)
    Image.fromarray(depth, mode="F").save(tmp_path / "d.tif")
    for name in ("d.npy", "d.npz", "d.pfm", "d.tif"):
        loaded = load_depth_file(tmp_path / name)
        assert loaded.shape == (1, 3, 4) and loaded.dtype == torch.float32, name
        assert torch.allclose(loaded[0], torch.from_numpy(depth)), name

    mm = np.array([[500, 1000], [2000, 65535]], dtype=np.uint16)
    Image.fromarray(mm).save(tmp_path / "mm.png")  # 16-bit greyscale PNG
    codes = load_depth_file(tmp_path / "mm.png")
    assert torch.equal(codes[0], torch.from_numpy(mm.astype(np.float32)))  # codes kept, not scaled to [0, 1]
    disp = disparity_from_external(codes, kind="depth", scale="metric", unit=0.001)
    assert torch.allclose(disp[0, 0], torch.tensor([2.0, 1.0]))

    Image.fromarray(np.array([[0, 128], [255, 64]], dtype=np.uint8)).convert("RGB").save(tmp_path / "grey.png")
    assert torch.equal(load_depth_file(tmp_path / "grey.png")[0], torch.tensor([[0.0, 128.0], [255.0, 64.0]]))


def test_bad_depth_files(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not found"):
        load_depth_file(tmp_path / "missing.npy")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InputError):
        load_depth_file(tmp_path / "junk.png")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(InputError):
        load_depth_file(tmp_path / "junk.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError):  # pickled objects are never loaded
        load_depth_file(tmp_path / "objects.npy")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4, 5), dtype=np.float32))
    with pytest.raises(InputError, match="shape"):
        load_depth_file(tmp_path / "cube.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 2)), b=np.ones((2, 2)))
    with pytest.raises(InputError, match="several arrays"):
        load_depth_file(tmp_path / "two.npz")
    _write_pfm(tmp_path / "short.pfm", np.ones((4, 4), dtype=np.float32))
    data = (tmp_path / "short.pfm").read_bytes()
    (tmp_path / "short.pfm").write_bytes(data[:-20])
    with pytest.raises(InputError, match="truncated"):
        load_depth_file(tmp_path / "short.pfm")
    # .exr without the optional OpenEXR package: a clear message saying what to install
    (tmp_path / "d.exr").write_bytes(b"v/1\x01")
    monkeypatch.setitem(sys.modules, "OpenEXR", None)
    with pytest.raises(InputError, match="pip install OpenEXR"):
        load_depth_file(tmp_path / "d.exr")


def test_exr_when_openexr_is_installed(tmp_path):
    OpenEXR = pytest.importorskip("OpenEXR", reason="OpenEXR is optional; the error path is tested without it")
    if not hasattr(OpenEXR, "File"):
        pytest.skip("writing the test file needs OpenEXR >= 3.3")
    depth = np.linspace(1, 5, 12, dtype=np.float32).reshape(3, 4)
    with OpenEXR.File({"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage},
                      {"Z": depth}) as f:
        f.write(str(tmp_path / "d.exr"))
    assert torch.allclose(load_depth_file(tmp_path / "d.exr")[0], torch.from_numpy(depth))
