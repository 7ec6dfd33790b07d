"""The test-only writers of tests/flux_files.py: the tiny FLUX as a BFL single file and as GGUF files
that read back (with the `gguf` package's reader, as ComfyUI-GGUF reads them) to the right tensors.

Error bounds of the quantised tensors, per block of 32 values with largest magnitude m (gguf-py's
quantisers, scale d stored as fp16, i.e. relative rounding <= 2^-11):
- Q8_0: d = m/127, q = round(x/d) in [-127, 127]: |x - q*d16| <= d/2 + 127*d*2^-11 < 0.57 d.
- Q4_0: d = -(signed max)/8, q = clip(trunc(x/d + 8.5), 0, 15) - 8: round-off <= |d|/2, except that the
  largest value of the other sign (x/d up to +8) is clipped to 7, an error up to |d|; plus
  8*|d|*2^-11 for the fp16 scale: < 1.01 |d| = 1.01 m/8.
"""
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flux_files as ff

BOUND_IN_BLOCK_MAX = {"Q8_0": 0.57 / 127, "Q4_0": 1.01 / 8}


def test_bfl_file_layout_and_values(tiny_dir, tmp_path):
    path = ff.write_bfl_transformer(tiny_dir, tmp_path / "flux1-dev.safetensors", dtype=torch.bfloat16)
    sd = load_file(str(path))
    c = ff.tiny_configs(tiny_dir)["transformer"]
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    assert sd["double_blocks.1.img_attn.qkv.weight"].shape == (3 * inner, inner)
    assert sd["single_blocks.1.linear1.weight"].shape == (3 * inner + 4 * inner, inner)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_file_reads_back(tiny_dir, tmp_path, qtype):
    path = ff.write_gguf_transformer(tiny_dir, tmp_path / f"flux1-dev-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(str(path))
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[-1]]).decode() == "flux"
    want = ff.tiny_bfl_transformer(tiny_dir)
    got = {t.name: t for t in reader.tensors}
    assert got.keys() == want.keys()
    quantised = 0
    for name, ref in want.items():
        t = got[name]
        # ComfyUI-GGUF's loader takes the torch shape as the reversed GGUF shape
        assert tuple(int(n) for n in reversed(t.shape)) == tuple(ref.shape), name
        assert t.tensor_type == ff.gguf_tensor_type(name, tuple(ref.shape), qtype)
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ref.shape)
        ref = ref.numpy()
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert ref.ndim == 1 and np.array_equal(values, ref), name
            continue
        quantised += 1
        blocks, got_blocks = ref.reshape(-1, 32), values.reshape(-1, 32)
        limit = np.abs(blocks).max(axis=1, keepdims=True) * BOUND_IN_BLOCK_MAX[qtype]
        assert (np.abs(got_blocks - blocks) <= limit).all(), name
        assert not np.array_equal(values, ref)  # really quantised
    # every 2-D weight of the tiny model has a whole number of 32-value blocks per row
    assert quantised == sum(1 for v in want.values() if v.ndim == 2)


def test_gguf_tensor_type_keeps_partial_blocks_and_vectors_unquantised():
    f32 = gguf.GGMLQuantizationType.F32
    assert ff.gguf_tensor_type("img_in.bias", (32,), "Q8_0") == f32
    assert ff.gguf_tensor_type("double_blocks.0.img_attn.norm.key_norm.scale", (16,), "Q4_0") == f32
    assert ff.gguf_tensor_type("x.weight", (32, 48), "Q8_0") == f32  # 48 is not a whole 32-value block
    assert ff.gguf_tensor_type("x.weight", (48, 64), "Q4_0") == gguf.GGMLQuantizationType.Q4_0
    with pytest.raises(ValueError, match="Q4_K"):
        ff.write_gguf_transformer(None, "unused.gguf", "Q4_K")
