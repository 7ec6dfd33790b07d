"""Loading FLUX parts offline from a diffusers folder and from single files in the original layouts.

The single files are written from the shared tiny weights by the inverse converters of tests/flux_files.py
(diffusers -> Black Forest Labs / LDM keys, fused qkv, swapped final AdaLN), then loaded back through the
public loaders and compared weight by weight and output by output.
"""
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from genrefocus_core.generative import flux_loading as fl
from genrefocus_core.generative import model_files as mf
from genrefocus_core.basics.errors import MissingModelFileError, ModelFileError
from numerics import assert_fp32_close
from tiny_flux import FLUX_FORWARD_CHAIN
from flux_files import diffusers_to_bfl_transformer, diffusers_to_ldm_vae, write_bfl_transformer


# ------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def pipe_dir(tiny_dir):
    return tiny_dir / "pipeline"


@pytest.fixture(scope="module")
def tiny_cfg(tiny_dir):
    import json

    return json.loads((tiny_dir / "configs.json").read_text())


@pytest.fixture(scope="module")
def ref_transformer_sd(tiny_dir):
    return load_file(str(tiny_dir / "transformer.safetensors"))


@pytest.fixture(scope="module")
def bfl_file(tmp_path_factory, tiny_dir):
    return write_bfl_transformer(tiny_dir, tmp_path_factory.mktemp("bfl") / "flux1-dev.safetensors",
                                 prefix="model.diffusion_model.")


def _forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    tokens, text = 16, 8
    dt = model.x_embedder.weight.dtype
    out = model(
        hidden_states=torch.randn(1, tokens, c.in_channels, generator=g).to(dt),
        encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, generator=g).to(dt),
        pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g).to(dt),
        timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                           indexing="ij"), -1).reshape(-1, 3),
        txt_ids=torch.zeros(text, 3), return_dict=False)[0]
    return out


# ------------------------------------------------------------------------------------------------
# diffusers folder

def test_diffusers_folder_transformer_and_vae(pipe_dir, tiny_dir, ref_transformer_sd):
    t = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    sd = t.state_dict()
    assert sd.keys() == ref_transformer_sd.keys()
    assert all(torch.equal(sd[k], ref_transformer_sd[k]) for k in sd)
    # the component folder itself works too
    t2 = fl.load_flux_transformer(pipe_dir / "transformer", dtype=torch.bfloat16)
    assert next(t2.parameters()).dtype == torch.bfloat16
    vae = fl.load_flux_vae(pipe_dir)
    ref_vae = load_file(str(tiny_dir / "vae.safetensors"))
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in ref_vae.items())


# ------------------------------------------------------------------------------------------------
# single files in the original layouts

def test_bfl_single_file_round_trip(bfl_file, pipe_dir, tiny_dir, ref_transformer_sd):
    header = mf.read_safetensors_header(bfl_file)
    assert "model.diffusion_model.double_blocks.0.img_attn.qkv.weight" in header.keys()
    t = fl.load_flux_transformer(bfl_file, dtype=torch.float32, config_dir=pipe_dir / "transformer")
    sd = t.state_dict()
    assert sd.keys() == ref_transformer_sd.keys()
    for k, v in ref_transformer_sd.items():
        assert torch.equal(sd[k], v), k
    ref = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    with torch.no_grad():  # same values, other memory layout (views of fused qkv): the kernels may differ
        assert_fp32_close(_forward(t), _forward(ref), **FLUX_FORWARD_CHAIN)
    # the diffusers key layout as one file works as well
    flat = fl.load_flux_transformer(tiny_dir / "transformer.safetensors", dtype=torch.float32,
                                    config_dir=pipe_dir / "transformer")
    assert all(torch.equal(flat.state_dict()[k], v) for k, v in ref_transformer_sd.items())


def test_bfl_fp8_scaled_file(tmp_path, ref_transformer_sd, tiny_cfg, pipe_dir):
    """ComfyUI-style scaled fp8 file: block weights e4m3fn + '.scale_weight', a 'scaled_fp8' marker."""
    c = tiny_cfg["transformer"]
    bfl = diffusers_to_bfl_transformer(ref_transformer_sd, c["num_layers"], c["num_single_layers"])
    stored, expect = {}, {}
    for k, v in bfl.items():
        if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448.0
            q = (v / scale).to(torch.float8_e4m3fn)
            stored[k] = q
            stored[k[: -len(".weight")] + ".scale_weight"] = scale.reshape(())
            expect[k] = q.float() * scale
        else:
            stored[k] = v
    stored["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(stored, str(path))

    cfg_dir = pipe_dir / "transformer"
    t8 = fl.load_flux_transformer(path, dtype=torch.bfloat16, config_dir=cfg_dir, keep_fp8=True)
    q = t8.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight.element_size() == 1
    # fp8 bytes kept as stored (no re-quantisation), the scale carried onto every qkv slice
    qkv = stored["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(q.weight.view(torch.uint8), qkv.chunk(3, 0)[0].view(torch.uint8))
    assert torch.equal(q.weight_scale, stored["double_blocks.0.img_attn.qkv.scale_weight"])
    # dequantised load (default mode) gives w_fp8 * scale in bf16
    tb = fl.load_flux_transformer(path, dtype=torch.float32, config_dir=cfg_dir)
    w = tb.single_transformer_blocks[1].proj_mlp.weight
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    assert torch.equal(w, expect["single_blocks.1.linear1.weight"][3 * inner:])
    # both run, and stay close to the fp32 model
    ref = fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    with torch.no_grad():
        r, o8, ob = _forward(ref), _forward(t8).float(), _forward(tb)
    scale = r.abs().max()
    assert (ob - r).abs().max() / scale < 0.15
    assert (o8 - r).abs().max() / scale < 0.15


def test_fp8_e5m2_and_per_channel_scales(tmp_path, ref_transformer_sd, tiny_cfg, pipe_dir):
    c = tiny_cfg["transformer"]
    bfl = diffusers_to_bfl_transformer(ref_transformer_sd, c["num_layers"], c["num_single_layers"])
    stored = dict(bfl)
    w = bfl["single_blocks.0.linear1.weight"]  # per-row scale on a fused tensor
    row_scale = w.abs().amax(dim=1) / 448.0
    stored["single_blocks.0.linear1.weight"] = (w / row_scale[:, None]).to(torch.float8_e4m3fn)
    stored["single_blocks.0.linear1.scale_weight"] = row_scale
    stored["double_blocks.1.img_mlp.2.weight"] = (bfl["double_blocks.1.img_mlp.2.weight"] * 1000).to(torch.float8_e5m2)
    stored["double_blocks.1.img_mlp.2.scale_weight"] = torch.tensor(1e-3)
    path = tmp_path / "mixed-fp8.safetensors"
    save_file(stored, str(path))
    for keep in (False, True):
        t = fl.load_flux_transformer(path, dtype=torch.bfloat16, config_dir=pipe_dir / "transformer", keep_fp8=keep)
        q = t.single_transformer_blocks[0].attn.to_q
        ff = t.transformer_blocks[1].ff.net[2]
        with torch.no_grad():
            for layer, ref in ((q, ref_transformer_sd["single_transformer_blocks.0.attn.to_q.weight"]),
                               (ff, ref_transformer_sd["transformer_blocks.1.ff.net.2.weight"])):
                eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
                got = (layer(eye) - (layer.bias if layer.bias is not None else 0)).float().T
                assert torch.isfinite(got).all()
                assert (got - ref).abs().max() <= 0.15 * ref.abs().max()
        assert (q.weight.dtype == torch.float8_e4m3fn) == keep


def test_vae_single_file_ldm_layout(tmp_path, tiny_dir, pipe_dir):
    ref = load_file(str(tiny_dir / "vae.safetensors"))
    ldm = diffusers_to_ldm_vae(ref, 4)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.3.upsample.conv.weight" in ldm
    path = tmp_path / "ae.safetensors"
    save_file(ldm, str(path))
    vae = fl.load_flux_vae(path, config_dir=pipe_dir / "vae")
    sd = vae.state_dict()
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k
    # a single file in the diffusers layout (e.g. a copied diffusion_pytorch_model.safetensors) loads too
    same = fl.load_flux_vae(tiny_dir / "vae.safetensors", config_dir=pipe_dir / "vae")
    assert all(torch.equal(same.state_dict()[k], v) for k, v in ref.items())
    ref_vae = fl.load_flux_vae(pipe_dir)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vae.encode(x).latent_dist.mean, ref_vae.encode(x).latent_dist.mean)


def test_single_file_text_encoders(tmp_path, tiny_dir, pipe_dir):
    clip_sd = load_file(str(tiny_dir / "clip_text_encoder.safetensors"))
    # ComfyUI's clip_l.safetensors: 'text_model.' prefix plus a projection the text model does not use
    clip_file = {"text_model." + k: v for k, v in clip_sd.items()}
    clip_file["text_projection.weight"] = torch.zeros(32, 32)
    save_file(clip_file, str(tmp_path / "clip_l.safetensors"))
    # t5xxl_fp8_e4m3fn.safetensors: fp8 weights, embeddings as 'shared.weight' only
    t5_sd = load_file(str(tiny_dir / "t5_encoder.safetensors"))
    t5_file = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and "relative" not in k else v)
               for k, v in t5_sd.items() if k != "encoder.embed_tokens.weight"}
    if "shared.weight" not in t5_file:
        t5_file["shared.weight"] = t5_sd["encoder.embed_tokens.weight"].to(torch.float8_e4m3fn)
    save_file(t5_file, str(tmp_path / "t5xxl_fp8_e4m3fn.safetensors"))

    clip = fl.load_clip_text_encoder(tmp_path / "clip_l.safetensors", config_dir=pipe_dir / "text_encoder")
    clip_ref = fl.load_clip_text_encoder(pipe_dir)
    ids = torch.tensor([[512, 5, 9, 13, 513] + [513] * 72])
    with torch.no_grad():
        assert torch.equal(clip(ids).pooler_output, clip_ref(ids).pooler_output)
    t5 = fl.load_t5_encoder(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", config_dir=pipe_dir / "text_encoder_2")
    t5_ref = fl.load_t5_encoder(pipe_dir)
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()
    ids = torch.tensor([[3, 17, 42, 1] + [0] * 12])
    with torch.no_grad():
        a, b = t5(ids).last_hidden_state, t5_ref(ids).last_hidden_state
    assert a.dtype == torch.float32 and (a - b).abs().max() < 0.25 * b.abs().max()
    clip_tok, t5_tok = fl.load_tokenizers(pipe_dir)
    assert clip_tok.model_max_length == 77 and len(t5_tok("a photo").input_ids) >= 2


def test_all_in_one_checkpoint_parts(tmp_path, tiny_dir, pipe_dir, bfl_file, ref_transformer_sd):
    """A ComfyUI 'checkpoint' save holds every part under its own prefix; each loader takes its own."""
    vae_sd = load_file(str(tiny_dir / "vae.safetensors"))
    t5_sd = load_file(str(tiny_dir / "t5_encoder.safetensors"))
    clip_sd = load_file(str(tiny_dir / "clip_text_encoder.safetensors"))
    everything = dict(load_file(str(bfl_file)))  # model.diffusion_model.*
    everything.update({"first_stage_model." + k: v for k, v in diffusers_to_ldm_vae(vae_sd, 4).items()})
    everything.update({"text_encoders.clip_l.transformer.text_model." + k: v for k, v in clip_sd.items()})
    everything.update({"text_encoders.t5xxl.transformer." + k: v for k, v in t5_sd.items()})
    path = tmp_path / "flux1-dev-checkpoint.safetensors"
    save_file(everything, str(path))
    t = fl.load_flux_transformer(path, dtype=torch.float32, config_dir=pipe_dir / "transformer")
    assert all(torch.equal(t.state_dict()[k], v) for k, v in ref_transformer_sd.items())
    vae = fl.load_flux_vae(path, config_dir=pipe_dir / "vae")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in vae_sd.items())
    clip = fl.load_clip_text_encoder(path, config_dir=pipe_dir / "text_encoder")
    clip_ref = fl.load_clip_text_encoder(pipe_dir)
    assert all(torch.equal(v, clip_ref.state_dict()[k]) for k, v in clip.state_dict().items())
    t5 = fl.load_t5_encoder(path, config_dir=pipe_dir / "text_encoder_2")
    t5_ref = fl.load_t5_encoder(pipe_dir)
    assert all(torch.equal(v, t5_ref.state_dict()[k]) for k, v in t5.state_dict().items())


def test_tokenizers_from_a_comfyui_layout(tmp_path, pipe_dir):
    import os
    import shutil

    root = tmp_path / "ComfyUI"
    shutil.copytree(pipe_dir / "tokenizer", root / "comfy" / "sd1_tokenizer")
    shutil.copytree(pipe_dir / "tokenizer_2", root / "comfy" / "text_encoders" / "t5_tokenizer")
    text = "a sharp photo with everything in focus"
    want = [tok(text).input_ids for tok in fl.load_tokenizers(pipe_dir)]
    for folder in (root, root / "comfy"):
        assert [tok(text).input_ids for tok in fl.load_tokenizers(folder)] == want
    comfy = os.environ.get("COMFYUI_DIR")
    if comfy:  # the real CLIP-L / T5 tokenizers that ComfyUI ships
        clip_tok, t5_tok = fl.load_tokenizers(comfy)
        assert clip_tok(text).input_ids[0] == 49406 and t5_tok(text).input_ids[-1] == 1
    else:
        print("COMFYUI_DIR unset: the real ComfyUI tokenizers were not checked")


def test_loading_never_touches_the_network(monkeypatch, bfl_file, pipe_dir):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fl.load_flux_transformer(bfl_file, dtype=torch.float32, config_dir=pipe_dir / "transformer")
    fl.load_flux_transformer(pipe_dir, dtype=torch.float32)
    fl.load_flux_vae(pipe_dir)
    fl.load_tokenizers(pipe_dir)
    fl.load_clip_text_encoder(pipe_dir)


# ------------------------------------------------------------------------------------------------
# shipped configs vs diffusers' own converter, on the real FLUX.1-dev layout (meta tensors)

def test_shipped_configs_and_converter_agree_with_diffusers():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(fl.FLUX_DEV_TRANSFORMER_CONFIG)))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(fl.FLUX_DEV_VAE_CONFIG)))
        clip = CLIPTextModel(CLIPTextConfig.from_pretrained(str(fl.CLIP_L_CONFIG)))
        t5 = T5EncoderModel(T5Config.from_pretrained(str(fl.T5_XXL_CONFIG)))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(model) / 1e9 - 11.90) < 0.01
    assert abs(count(vae) / 1e6 - 83.8) < 0.5
    assert abs(count(clip) / 1e6 - 123.1) < 0.5
    assert 4.7 < count(t5) / 1e9 < 4.95  # 4.76 B + 0.13 B token embeddings
    sd = {k: v for k, v in model.state_dict().items()}
    bfl = diffusers_to_bfl_transformer(sd, 19, 38)  # meta tensors: layout only
    # real values on the (small) biases, so slicing and the AdaLN swap are compared by value
    g = torch.Generator().manual_seed(0)
    for k in list(bfl):
        if k.endswith(".bias"):
            bfl[k] = torch.randn(bfl[k].shape, generator=g)
    ours, _ = fl.convert_bfl_transformer(dict(bfl), dict(model.config))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert ours.keys() == theirs.keys() == sd.keys()
    for k in sd:
        assert ours[k].shape == theirs[k].shape == sd[k].shape, k
        if k.endswith(".bias"):
            assert torch.equal(ours[k], theirs[k]), k


# ------------------------------------------------------------------------------------------------
# wrong files: clear errors

def _write_keys(path, keys, shape=(4, 4), dtype=torch.float32):
    save_file({k: torch.zeros(shape, dtype=dtype) for k in keys}, str(path))
    return path


def test_missing_files_name_file_and_folder(tmp_path):
    with pytest.raises(MissingModelFileError) as e:
        fl.load_flux_transformer(tmp_path / "flux1-dev.safetensors")
    assert "flux1-dev.safetensors" in str(e.value) and "diffusion_models" in str(e.value)
    with pytest.raises(MissingModelFileError) as e:
        fl.load_flux_vae(tmp_path / "ae.safetensors")
    assert "models/vae" in str(e.value)
    with pytest.raises(MissingModelFileError) as e:
        fl.load_t5_encoder(tmp_path / "t5xxl_fp16.safetensors")
    assert "text_encoders" in str(e.value) and "clip/" in str(e.value)
    with pytest.raises(MissingModelFileError):
        fl.load_tokenizers(tmp_path)
    with pytest.raises(MissingModelFileError):
        fl.load_tokenizers(None)


def test_not_safetensors_and_truncated(tmp_path, bfl_file):
    garbage = tmp_path / "flux1-dev.safetensors"
    garbage.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ModelFileError, match="too short"):
        fl.load_flux_transformer(garbage)
    pt = tmp_path / "model.safetensors"
    torch.save({"a": torch.zeros(2)}, str(pt))  # a zip pickle under a .safetensors name
    with pytest.raises(ModelFileError, match="pickle"):
        fl.load_flux_transformer(pt)
    html = tmp_path / "ae.safetensors"
    html.write_bytes(b"<!DOCTYPE html><html>Not found</html>")
    with pytest.raises(ModelFileError, match="HTML"):
        fl.load_flux_vae(html)
    data = bfl_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="truncated"):
        fl.load_flux_transformer(cut)
    cut.write_bytes(data[:40])
    with pytest.raises(ModelFileError, match="truncated|not a safetensors"):
        fl.load_flux_transformer(cut)


def test_wrong_families(tmp_path, tiny_dir, bfl_file, pipe_dir):
    sdxl = _write_keys(tmp_path / "sdxl.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.output_blocks.0.0.weight",
        "model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.ln_final.weight"])
    with pytest.raises(ModelFileError, match="XL"):
        fl.load_flux_transformer(sdxl)
    sd15 = _write_keys(tmp_path / "v1-5.safetensors", [
        "model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.output_blocks.0.0.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"])
    with pytest.raises(ModelFileError, match="1.x"):
        fl.load_flux_transformer(sd15)
    with pytest.raises(ModelFileError, match="LoRA") as e:
        fl.load_flux_transformer(tiny_dir / "deblurNet.safetensors")
    assert "base" in str(e.value)
    # schnell: the same layout without the guidance embedding
    t = load_file(str(bfl_file))
    schnell = tmp_path / "flux1-schnell.safetensors"
    save_file({k: v for k, v in t.items() if "guidance_in" not in k}, str(schnell))
    with pytest.raises(ModelFileError, match="schnell") as e:
        fl.load_flux_transformer(schnell, config_dir=pipe_dir / "transformer")
    assert "guidance" in str(e.value)
    # a tiny file against the shipped FLUX.1-dev config: shapes do not fit, the message says so
    with pytest.raises(ModelFileError, match="config"):
        fl.load_flux_transformer(bfl_file)
    # an SD VAE (4 latent channels) instead of FLUX's ae
    sdvae = _write_keys(tmp_path / "sdxl_vae.safetensors", ["encoder.down.0.block.0.conv1.weight",
                                                             "decoder.up.0.block.0.conv1.weight"])
    save_file({**load_file(str(sdvae)), "encoder.conv_out.weight": torch.zeros(8, 512, 3, 3)}, str(sdvae))
    with pytest.raises(ModelFileError, match="4 latent channels"):
        fl.load_flux_vae(sdvae)
    # encoders swapped / a transformer given as VAE
    with pytest.raises(ModelFileError, match="T5"):
        fl.load_clip_text_encoder(tiny_dir / "t5_encoder.safetensors", config_dir=pipe_dir / "text_encoder")
    with pytest.raises(ModelFileError, match="CLIP"):
        fl.load_t5_encoder(tiny_dir / "clip_text_encoder.safetensors", config_dir=pipe_dir / "text_encoder_2")
    with pytest.raises(ModelFileError, match="autoencoder"):
        fl.load_flux_vae(bfl_file)
    # an incomplete BFL file
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in t.items() if "single_blocks.1." not in k}, str(partial))
    with pytest.raises(ModelFileError, match="missing"):
        fl.load_flux_transformer(partial, config_dir=pipe_dir / "transformer")
    # a diffusers folder of schnell
    import json
    import shutil

    fake = tmp_path / "schnell_pipe" / "transformer"
    shutil.copytree(pipe_dir / "transformer", fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["guidance_embeds"] = False
    (fake / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="schnell"):
        fl.load_flux_transformer(fake.parent)


def test_extra_tensors_are_reported(tmp_path, bfl_file, pipe_dir, caplog):
    t = load_file(str(bfl_file))
    t["model.diffusion_model.distilled_guidance_layer.in_proj.weight"] = torch.zeros(4, 4)
    path = tmp_path / "variant.safetensors"
    save_file(t, str(path))
    with caplog.at_level("WARNING", logger="genrefocus_core.generative.flux_loading"):
        fl.load_flux_transformer(path, dtype=torch.float32, config_dir=pipe_dir / "transformer")
    assert "distilled_guidance_layer" in caplog.text and "ignored" in caplog.text
