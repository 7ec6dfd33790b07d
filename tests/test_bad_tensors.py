"""Success reported, image wrong (or torch's own traceback): tensors that cannot be what they claim.
LoRA files with integer/bool tensors or shapes for another model, prompt embeddings with NaN or of
the wrong width, 1-px-wide images whose [B,H,1] maps were read as [H,W,1], metric depth that holds no
depth. Each is refused with a message naming the problem, before any sampling, and nothing changes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile import forbid, photo_and_depth, run_cli, snapshot
from tiny_flux import build_tiny
from genrefocus_core.basics.errors import InputError, ModelFileError


@pytest.fixture()
def tiny(tiny_dir):
    return build_tiny(tiny_dir)


def _state(transformer):
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8])
def test_lora_with_integer_or_bool_tensors_is_refused(tiny, tiny_dir, tmp_path, dtype):
    from genrefocus_core.generative import lora

    transformer, _ = tiny
    lora.load_lora(transformer, tiny_dir / "bokehNet.safetensors", "bokeh")
    before = _state(transformer)
    tensors = load_file(str(tiny_dir / "bokehNet.safetensors"))
    key = sorted(tensors)[3]
    tensors[key] = (tensors[key] * 100).to(dtype)
    bad = tmp_path / "bokehNet_int.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(ModelFileError, match=f"holds .*{str(dtype).split('.')[-1]}.*floating-point"):
        lora.load_lora(transformer, bad, "bokeh")
    assert lora.loaded_adapters(transformer) == ["bokeh"] and _same_state(before, _state(transformer))


def test_lora_with_shapes_for_another_model_is_refused_against_the_transformer(tiny, tiny_dir, tmp_path):
    from genrefocus_core.generative import lora

    transformer, _ = tiny
    before = _state(transformer)
    tensors = load_file(str(tiny_dir / "bokehNet.safetensors"))
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    r, n_in = tensors[key].shape
    tensors[key] = torch.zeros(r, n_in * 2)  # consistent in itself, wrong for this FLUX
    bad = tmp_path / "bokehNet_big.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(ModelFileError, match="do not fit the layer .*another model size"):
        lora.load_lora(transformer, bad, "bokeh")
    tensors[key] = torch.zeros(0, n_in)  # rank 0
    save_file(tensors, str(bad))
    with pytest.raises(ModelFileError, match="inconsistent shapes"):
        lora.load_lora(transformer, bad, "bokeh")
    assert lora.loaded_adapters(transformer) == [] and _same_state(before, _state(transformer))


def _embedding(tiny_dir, stage="bokeh"):
    from genrefocus_core.generative.prompt_embedding import PromptEmbedding

    return PromptEmbedding.from_safetensors(tiny_dir / "prompt_embeds.safetensors", stage)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_prompt_embeddings_with_nan_or_inf_are_refused(tiny_dir, tmp_path, bad):
    from genrefocus_core.generative.loader import resolve_prompt_embeddings

    tensors = load_file(str(tiny_dir / "prompt_embeds.safetensors"))
    for key in ("bokeh_prompt_embeds", "bokeh_pooled_prompt_embeds"):
        broken = dict(tensors)
        broken[key] = broken[key].clone()
        broken[key].view(-1)[5] = bad
        path = tmp_path / "embeds.safetensors"
        save_file(broken, str(path))
        with pytest.raises(ModelFileError, match="NaN or infinite"):
            resolve_prompt_embeddings(["bokeh"], path)
    emb = _embedding(tiny_dir)
    with pytest.raises(InputError, match="NaN or infinite"):
        resolve_prompt_embeddings(["bokeh"], {"bokeh": (emb.prompt_embeds * bad, emb.pooled)})


def test_prompt_embeddings_of_the_wrong_width_are_refused_when_given(tiny, tiny_dir):
    """Not torch's 'mat1 and mat2 shapes cannot be multiplied' at the first step: the pipeline checks
    the widths against the transformer when the embeddings are given (at load, or replaced later as
    Load GenRefocus does on a cache hit)."""
    from genrefocus_core.generative.pipeline import GenRefocusPipeline
    from genrefocus_core.generative.prompt_embedding import PromptEmbedding

    transformer, vae = tiny
    good = _embedding(tiny_dir)
    wide = PromptEmbedding(torch.zeros(1, 512, 48), good.pooled, good.text_ids)
    pooled = PromptEmbedding(good.prompt_embeds, torch.zeros(1, 16), good.text_ids)
    with pytest.raises(ModelFileError, match="'bokeh' T5 prompt embedding is 48 wide but this FLUX transformer reads 32"):
        GenRefocusPipeline(transformer, vae, {"bokeh": wide})
    pipe = GenRefocusPipeline(transformer, vae, {"bokeh": good})
    with pytest.raises(ModelFileError, match="pooled CLIP embedding is 16 wide .* reads 32"):
        pipe.prompt_embeddings = {"bokeh": pooled}
    assert pipe.prompt_embeddings["bokeh"] is good


# ---------------------------------------------------------------------------------------------- 1-px-wide images

def test_one_pixel_wide_maps_are_read_by_the_image_shape():
    from genrefocus_core.basics.images import to_map_batch
    from genrefocus_core.depth.sources import disparity_from_external

    H = 12
    column = torch.linspace(1.0, 5.0, H)
    mask_batch = column.reshape(1, H, 1)            # a ComfyUI MASK [B, H, W] of a 1-px-wide image
    assert to_map_batch(mask_batch, size=(H, 1)).shape == (1, H, 1)
    assert torch.equal(to_map_batch(mask_batch, size=(H, 1))[0, :, 0], column)
    assert to_map_batch(column.reshape(H, 1, 1), size=(H, 1)).shape == (1, H, 1)  # [H, W, 1]
    assert to_map_batch(column.reshape(1, 1, H, 1), size=(1, H)).shape == (1, 1, H)  # [B, H, W, 1], 1 px high
    disp = disparity_from_external(mask_batch, kind="depth", scale="metric", size=(H, 1), batch=1)
    assert torch.allclose(disp[0, :, 0], 1.0 / column)


def test_load_depth_map_and_depth_from_image_accept_a_one_pixel_wide_image(tmp_path, monkeypatch):
    from nodes import comfy_bridge
    from nodes.depth_nodes import GenRefocusDepthFromImage, GenRefocusLoadDepthMap

    H = 20
    column = np.linspace(1, 5, H, dtype=np.float32)
    np.save(tmp_path / "thin.npy", column.reshape(H, 1))
    monkeypatch.setattr(comfy_bridge, "input_directory", lambda: str(tmp_path))
    image = torch.rand(1, H, 1, 3)
    options = dict(kind="depth", near="auto", scale="metric", near_m=1.0, far_m=20.0, unit=1.0)
    loaded, _ = GenRefocusLoadDepthMap().load("thin.npy", image=image, **options)
    converted, _ = GenRefocusDepthFromImage().convert(torch.from_numpy(column).reshape(1, H, 1), image=image, **options)
    for maps in (loaded, converted):
        assert maps.disparity.shape == (1, H, 1)
        assert torch.allclose(maps.disparity[0, :, 0], 1.0 / torch.from_numpy(column))


def test_render_reads_the_depth_of_a_one_pixel_wide_photo_the_right_way_round(tmp_path, capsys):
    """The column of depth must stay a column: near at the top (sharp there, focus at the top pixel)."""
    from genrefocus_core.basics.images import load_image, save_image

    H = 40
    photo = torch.zeros(1, H, 1, 3)
    photo[:, ::2] = 1.0  # stripes: blur shows as grey
    save_image(photo, tmp_path / "thin.png")
    depth = np.concatenate([np.full(H // 2, 1.0), np.full(H // 2, 50.0)]).astype(np.float32).reshape(H, 1)
    np.save(tmp_path / "thin.npy", depth)
    code, err = run_cli(capsys, "render", "--image", tmp_path / "thin.png", "--depth", tmp_path / "thin.npy",
                        "--focus-x", 0, "--focus-y", 0, "--K", 8, "--out", tmp_path / "out.png")
    assert code == 0, err
    out = load_image(tmp_path / "out.png")
    assert out.shape == (1, H, 1, 3)
    top, bottom = out[0, 2:H // 2 - 4, 0], out[0, H // 2 + 4:H - 2, 0]
    assert torch.allclose(top, photo[0, 2:H // 2 - 4, 0], atol=1 / 255)   # in focus: the stripes stay
    assert float((bottom[1:] - bottom[:-1]).abs().max()) < 0.2            # far: the stripes blurred away


# ---------------------------------------------------------------------------------------------- depth with no depth

@pytest.mark.parametrize("values", [0.0, -3.0, float("inf")])
def test_render_refuses_metric_depth_that_holds_no_depth_like_refocus_and_the_nodes(tmp_path, capsys, monkeypatch,
                                                                                  values):
    from genrefocus_core.depth.sources import disparity_from_external

    photo, depth = photo_and_depth(tmp_path)
    np.save(depth, np.full((24, 32), values, dtype=np.float32))
    forbid(monkeypatch, "genrefocus_core.cli.render.render_bokeh")
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "render", "--image", photo, "--depth", depth, "--out", tmp_path / "o.png")
    assert code == 1 and "has no positive finite depth (all zero, negative or infinite)" in err, err
    assert snapshot(tmp_path) == before
    with pytest.raises(InputError, match=r"has no positive finite depth \(all zero, negative or infinite\)"):
        disparity_from_external(np.full((4, 4), values, dtype=np.float32), kind="depth", scale="metric")
