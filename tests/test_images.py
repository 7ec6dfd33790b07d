import numpy as np
import pytest
import torch
from PIL import Image

from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import (crop, load_image, pad_to_multiple, save_image, to_image_batch, to_map_batch,
                                    to_uint8)


def test_uint8_rgb_numpy_becomes_batch_in_unit_range():
    arr = np.zeros((5, 7, 3), np.uint8)
    arr[0, 0] = (255, 128, 0)
    t = to_image_batch(arr)
    assert t.shape == (1, 5, 7, 3) and t.dtype == torch.float32
    assert torch.allclose(t[0, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))


def test_grey_rgba_and_16bit_are_converted():
    grey = to_image_batch(np.full((4, 4), 0.25, np.float32))
    assert grey.shape == (1, 4, 4, 3) and torch.all(grey == 0.25)
    rgba = to_image_batch(torch.rand(2, 4, 4, 4))
    assert rgba.shape == (2, 4, 4, 3)
    sixteen = to_image_batch(np.full((3, 3, 3), 65535, np.uint16))
    assert torch.all(sixteen == 1.0)
    pil = to_image_batch(Image.new("RGBA", (6, 2), (10, 20, 30, 0)))
    assert pil.shape == (1, 2, 6, 3)
    assert to_image_batch(np.zeros((4, 4, 5), np.uint8)).shape == (4, 4, 5, 3)  # [B,H,W] grey batch
    assert torch.allclose(pil[0, 0, 0] * 255, torch.tensor([10.0, 20.0, 30.0]))


@pytest.mark.parametrize("bad", [np.full((3, 3, 3), np.nan, np.float32), np.zeros((0, 4, 3), np.uint8),
                                 np.zeros((1, 4, 4, 5), np.uint8), "not an image", np.zeros((2, 2, 2, 2, 3))])
def test_bad_images_raise_input_error(bad):
    with pytest.raises(InputError):
        to_image_batch(bad)


def test_list_of_images_must_match_in_size():
    assert to_image_batch([np.zeros((4, 4, 3), np.uint8)] * 3).shape == (3, 4, 4, 3)
    with pytest.raises(InputError, match="same size"):
        to_image_batch([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])


def test_maps_accept_common_layouts_and_broadcast_batch():
    assert to_map_batch(np.ones((5, 6))).shape == (1, 5, 6)
    assert to_map_batch(torch.ones(2, 1, 5, 6)).shape == (2, 5, 6)
    assert to_map_batch(torch.ones(2, 5, 6, 3)).shape == (2, 5, 6)
    assert to_map_batch(np.ones((5, 6, 1))).shape == (1, 5, 6)  # numpy: channels last
    assert to_map_batch(torch.ones(5, 6, 1)).shape == (5, 6, 1)  # torch: [B, H, W] (a MASK of 1-px-wide images)...
    assert to_map_batch(torch.ones(5, 6, 1), size=(5, 6)).shape == (1, 5, 6)  # ...unless the image says [H, W, 1]
    assert to_map_batch(torch.ones(1, 5, 6), batch=4).shape == (4, 5, 6)
    with pytest.raises(InputError, match="batch"):
        to_map_batch(torch.ones(2, 5, 6), batch=3)


@pytest.mark.parametrize("h,w", [(1, 1), (15, 17), (16, 16), (33, 100)])
def test_pad_then_crop_restores_exact_input(h, w):
    x = torch.rand(2, 3, h, w)
    padded, size = pad_to_multiple(x, 16)
    assert padded.shape[-2] % 16 == 0 and padded.shape[-1] % 16 == 0
    assert padded.shape[-2] >= h and padded.shape[-1] >= w
    assert torch.equal(crop(padded, size), x)


def test_save_and_load_round_trip(tmp_path):
    x = torch.rand(1, 9, 11, 3)
    save_image(x, tmp_path / "a.png")
    y = load_image(tmp_path / "a.png")
    assert np.array_equal(to_uint8(x), to_uint8(y))
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="Cannot read"):
        load_image(tmp_path / "junk.png")
