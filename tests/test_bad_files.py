"""Raw tracebacks from files that lie: an image header promising a huge image (PIL's decompression
bomb), arrays whose header promises more data or memory than there is, images too large for the
memory, corrupt diffusers folders (config not JSON, truncated weights, pickle .bin). Each gives a
message naming the file and the problem, nothing is allocated or executed first, no file changes."""
from __future__ import annotations

import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch

from hostile import forbid, photo_and_depth, run_cli, snapshot
from genrefocus_core.basics import files
from genrefocus_core.basics.errors import GenRefocusError, InputError
from genrefocus_core.basics.images import load_image
from genrefocus_core.depth.sources import load_depth_file


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header promises width x height RGB pixels, with a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (20_000, 12_000)])
def test_png_promising_a_huge_image_is_refused_with_its_size(tmp_path, width, height):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, width, height)
    with pytest.raises(InputError, match=rf"header promises a huge image.*{width * height} pixels"):
        load_image(bomb)
    with pytest.raises(InputError, match="header promises a huge image"):
        load_depth_file(bomb)


def test_image_too_large_for_the_free_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    photo, _ = photo_and_depth(tmp_path)
    monkeypatch.setattr(files, "available_memory_bytes", lambda: 1000)
    with pytest.raises(InputError, match=r"\(32x24 px\) needs about .* of memory, but only .* is available"):
        load_image(photo)


def test_render_cli_with_a_bomb_as_any_of_its_images(tmp_path, capsys, monkeypatch):
    photo, depth = photo_and_depth(tmp_path)
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 100_000, 100_000)
    forbid(monkeypatch, "genrefocus_core.cli.render.render_bokeh")
    before = snapshot(tmp_path)
    for option in ("--image", "--focus-mask", "--aperture-image", "--depth"):
        args = {"--image": photo, "--depth": depth, option: bomb}
        code, err = run_cli(capsys, "render", *[x for kv in args.items() for x in kv], "--out", tmp_path / "o.png")
        assert code == 1 and "header promises a huge image" in err, (option, err)
    assert snapshot(tmp_path) == before


def _npy_header(shape, dtype="<f8") -> bytes:
    buf = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npy_whose_header_promises_more_than_the_file_holds(tmp_path):
    lying = tmp_path / "lying.npy"
    lying.write_bytes(_npy_header((1_000_000, 1_000_000)) + b"\x00" * 64)
    with pytest.raises(InputError, match=r"promises an array of shape \(1000000, 1000000\).*holds only 64 bytes"):
        load_depth_file(lying)
    packed = tmp_path / "lying.npz"
    import zipfile
    with zipfile.ZipFile(packed, "w") as z:
        z.writestr("depth.npy", _npy_header((50_000, 70_000), "<f4") + b"\x00" * 10)
    with pytest.raises(InputError, match=r"promises an array of shape \(50000, 70000\)"):
        load_depth_file(packed)


def test_npy_larger_than_the_free_memory_is_refused_before_loading(tmp_path, monkeypatch):
    honest = tmp_path / "big.npy"
    np.save(honest, np.ones((300, 400), np.float64))
    monkeypatch.setattr(files, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(InputError, match=r"shape \(300, 400\) of float64\) needs about .* of memory, but only"):
        load_depth_file(honest)


def test_npy_with_pickled_objects_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([_Boom(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="Python objects"):
        load_depth_file(evil)
    assert not marker.exists()


class _Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------- diffusers folders

def _damage(folder, how: str, marker):
    t = folder / "transformer"
    if how == "config not JSON":
        (t / "config.json").write_text("{ this is not json")
    elif how == "config a list":
        (t / "config.json").write_text("[1, 2, 3]")
    elif how == "truncated weights":
        w = t / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[:-1000])
    elif how == "pickle .bin":
        (t / "diffusion_pytorch_model.safetensors").unlink()
        (t / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    elif how == "missing shard":
        w = t / "diffusion_pytorch_model.safetensors"
        w.rename(t / "diffusion_pytorch_model-00001-of-00002.safetensors")
        (t / "diffusion_pytorch_model.safetensors.index.json").write_text(
            '{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", '
            '"b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}')
    elif how == "vae config not JSON":
        (folder / "vae" / "config.json").write_text("\x00\x01garbage")
    elif how == "text encoder truncated":
        w = folder / "text_encoder" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:200])
    elif how == "tokenizer config not JSON":
        (folder / "tokenizer" / "tokenizer_config.json").write_text("{{{")


@pytest.mark.parametrize("how, problem", [
    ("config not JSON", "transformer/config.json: not a readable JSON config"),
    ("config a list", "not a model config"),
    ("truncated weights", "truncated"),
    ("pickle .bin", "pickle files .*never loaded"),
    ("missing shard", "diffusion_pytorch_model-00002-of-00002.safetensors"),
    ("vae config not JSON", "vae/config.json: not a readable JSON config"),
    ("text encoder truncated", "text_encoder/model.safetensors"),
    ("tokenizer config not JSON", "cannot be loaded as the CLIP and T5 tokenizers"),
])
def test_corrupt_diffusers_folder(tiny_dir, tmp_path, how, problem):
    from genrefocus_core.generative import flux_loading as fl

    folder = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny_dir / "pipeline", folder)
    marker = tmp_path / "pwned"
    _damage(folder, how, marker)
    before = snapshot(tmp_path)
    loaders = {"transformer": lambda: fl.load_flux_transformer(folder, torch.float32),
               "vae": lambda: fl.load_flux_vae(folder, torch.float32),
               "text_encoder": lambda: fl.load_clip_text_encoder(folder, torch.float32),
               "tokenizer": lambda: fl.load_tokenizers(folder)}
    part = next(k for k in loaders if k in how) if any(k in how for k in loaders) else "transformer"
    part = "text_encoder" if "text encoder" in how else part
    with pytest.raises(GenRefocusError, match=problem):  # ModelFileError, or MissingModelFileError for a shard
        loaders[part]()
    assert not marker.exists()
    assert snapshot(tmp_path) == before


def test_render_too_large_for_the_free_memory_is_refused_before_rendering(monkeypatch):
    from genrefocus_core.classical.renderer import render_bokeh

    monkeypatch.setattr(files, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(InputError, match=r"Rendering 1 image\(s\) of 40x30 px needs about .* but only 9.8 KiB"):
        render_bokeh(torch.rand(1, 30, 40, 3), torch.rand(1, 30, 40), 0.5, 5.0)
