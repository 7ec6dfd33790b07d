"""Prompt embeddings: FluxPipeline.encode_prompt semantics on the tiny encoders, and the disk cache."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from genrefocus_core.generative import flux_loading as fl
from genrefocus_core.generative import prompt_cache as pc
from genrefocus_core.generative import stages
from genrefocus_core.basics.errors import InputError, MissingModelFileError
from genrefocus_core.generative.prompt_embedding import PromptEmbedding
from numerics import assert_fp32_close

# The recorded embeddings came from one machine; other kernels (another CPU's vector width, another
# torch or transformers release) round differently. Chains of reductions in the tiny encoders (see
# tests/numerics.py for the bound depth * sqrt(K) * eps * |values|):
# T5 (2 layers): per layer RMSNorm (K=32), q/k/v (32), scores (8), softmax (512 tokens), P.V (512),
#   o (32), RMSNorm (32), wi (32), wo (d_ff 37) = 8, plus the final RMSNorm -> depth 17, K 512.
T5_CHAIN = dict(depth=17, reduction=512)
# CLIP pooled (2 layers): per layer LayerNorm (32), q/k/v (32), scores (8), softmax (77), P.V (77),
#   out (32), LayerNorm (32), fc1 (32), fc2 (37) = 9, plus the final LayerNorm -> depth 19, K 77.
CLIP_CHAIN = dict(depth=19, reduction=77)


def assert_matches_recorded(emb, reference, stage):
    assert_fp32_close(emb.prompt_embeds, reference[f"{stage}_prompt_embeds"], **T5_CHAIN)
    assert_fp32_close(emb.pooled, reference[f"{stage}_pooled_prompt_embeds"], **CLIP_CHAIN)


@pytest.fixture(scope="module")
def pipe_dir(tiny_dir):
    return tiny_dir / "pipeline"


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return load_file(str(tiny_dir / "prompt_embeds.safetensors"))


def test_tiny_encoders_reproduce_reference_embeddings(pipe_dir, reference, tmp_path):
    enc = pc.PromptEncoder(diffusers_dir=pipe_dir)
    out = pc.get_stage_embeddings(["deblur", "bokeh"], enc, cache_dir=tmp_path)
    assert enc.loads == 1 and not enc.loaded  # loaded once for both prompts, freed after
    for stage in ("deblur", "bokeh"):
        emb = out[stage]
        assert emb.prompt_embeds.shape == (1, 512, 32) and emb.pooled.shape == (1, 32)
        assert_matches_recorded(emb, reference, stage)
        assert torch.equal(emb.text_ids, reference[f"{stage}_text_ids"])
    assert pc.resolve_prompt("pre_deblur") == stages.DEBLUR.prompt
    assert pc.resolve_prompt("aperture") == stages.BOKEH.prompt


def test_single_file_encoders_with_tokenizer_folder(pipe_dir, reference, tmp_path, tiny_dir):
    clip_file, t5_file = tmp_path / "clip_l.safetensors", tmp_path / "t5xxl_fp16.safetensors"
    save_file({"text_model." + k: v for k, v in load_file(str(tiny_dir / "clip_text_encoder.safetensors")).items()},
              str(clip_file))
    save_file(load_file(str(tiny_dir / "t5_encoder.safetensors")), str(t5_file))
    enc = pc.PromptEncoder(clip_l=clip_file, t5=t5_file, tokenizer_dir=pipe_dir,
                           clip_config_dir=pipe_dir / "text_encoder", t5_config_dir=pipe_dir / "text_encoder_2")
    emb = pc.get_prompt_embeddings("bokeh", enc, cache_dir=tmp_path / "cache")
    assert_matches_recorded(emb, reference, "bokeh")
    # later runs hit the cache without any tokenizer folder; a miss then asks for one
    no_tok = pc.PromptEncoder(clip_l=clip_file, t5=t5_file, clip_config_dir=pipe_dir / "text_encoder",
                              t5_config_dir=pipe_dir / "text_encoder_2")
    assert torch.equal(pc.get_prompt_embeddings("bokeh", no_tok, cache_dir=tmp_path / "cache").pooled, emb.pooled)
    with pytest.raises(MissingModelFileError, match="tokenizer"):
        pc.get_prompt_embeddings("deblur", no_tok, cache_dir=tmp_path / "cache")
    # identity follows the files: other weights -> another identity -> no reuse
    sd = load_file(str(t5_file))
    sd["encoder.final_layer_norm.weight"] = sd["encoder.final_layer_norm.weight"] * 2
    other = tmp_path / "t5_other.safetensors"
    save_file(sd, str(other))
    enc2 = pc.PromptEncoder(clip_l=clip_file, t5=other, tokenizer_dir=pipe_dir)
    assert enc2.identity != enc.identity
    assert pc.read_cached(tmp_path / "cache", enc2.identity, stages.BOKEH.prompt) is None


def test_cache_hit_loads_no_encoder_and_is_identical(pipe_dir, tmp_path, monkeypatch):
    enc = pc.PromptEncoder(diffusers_dir=pipe_dir)
    first = pc.get_prompt_embeddings("deblur", enc, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].stem == pc.cache_key(enc.identity, stages.DEBLUR.prompt, 512)

    def boom(*a, **k):
        raise AssertionError("an encoder was loaded on a cache hit")

    monkeypatch.setattr(fl, "load_t5_encoder", boom)
    monkeypatch.setattr(fl, "load_clip_text_encoder", boom)
    enc2 = pc.PromptEncoder(diffusers_dir=pipe_dir)
    again = pc.get_prompt_embeddings("deblur", enc2, cache_dir=tmp_path)
    assert enc2.loads == 0
    assert torch.equal(again.prompt_embeds, first.prompt_embeds) and torch.equal(again.pooled, first.pooled)
    # identity alone is enough on a hit (the ComfyUI path knows its own identity)
    same = pc.get_prompt_embeddings("deblur", None, cache_dir=tmp_path, identity=enc.identity)
    assert torch.equal(same.prompt_embeds, first.prompt_embeds)
    # a miss with neither encoder nor tensors is a clear error
    with pytest.raises(InputError, match="No cached embedding"):
        pc.get_prompt_embeddings("bokeh", None, cache_dir=tmp_path, identity=enc.identity)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "nan"])
def test_corrupt_cache_entry_is_reencoded(pipe_dir, tmp_path, reference, damage):
    enc = pc.PromptEncoder(diffusers_dir=pipe_dir)
    ident = enc.identity
    prompt = stages.DEBLUR.prompt
    path = tmp_path / f"{pc.cache_key(ident, prompt, 512)}.safetensors"
    tmp_path.mkdir(exist_ok=True)
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    else:
        good = PromptEmbedding(torch.zeros(1, 512, 32), torch.zeros(1, 32), torch.zeros(512, 3))
        pc.write_cached(tmp_path, ident, prompt, good)
        if damage == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif damage == "wrong_shape":
            save_file({"prompt_embeds": torch.zeros(1, 77, 32), "pooled_prompt_embeds": torch.zeros(1, 32),
                       "text_ids": torch.zeros(77, 3)}, str(path),
                      metadata={"format": pc._FORMAT, "identity": ident, "prompt": prompt, "max_length": "512"})
        else:
            save_file({"prompt_embeds": torch.full((1, 512, 32), float("nan")),
                       "pooled_prompt_embeds": torch.zeros(1, 32), "text_ids": torch.zeros(512, 3)}, str(path),
                      metadata={"format": pc._FORMAT, "identity": ident, "prompt": prompt, "max_length": "512"})
    with pytest.warns(UserWarning, match="re-encoding"):
        emb = pc.get_prompt_embeddings("deblur", enc, cache_dir=tmp_path)
    assert enc.loads == 1
    assert_fp32_close(emb.prompt_embeds, reference["deblur_prompt_embeds"], **T5_CHAIN)
    assert pc.read_cached(tmp_path, ident, prompt) is not None  # rewritten, valid now


def test_precomputed_tensors_for_comfyui(tmp_path, reference):
    ident = "comfyui:DualCLIPLoader:clip_l.safetensors+t5xxl_fp16.safetensors"
    emb = pc.get_prompt_embeddings("bokeh", None, cache_dir=tmp_path, identity=ident,
                                   precomputed=(reference["bokeh_prompt_embeds"],
                                                reference["bokeh_pooled_prompt_embeds"]))
    assert emb.text_ids.shape == (512, 3) and not emb.text_ids.any()
    hit = pc.get_prompt_embeddings("bokeh", None, cache_dir=tmp_path, identity=ident)
    assert torch.equal(hit.prompt_embeds, reference["bokeh_prompt_embeds"])
    with pytest.raises(InputError, match="512"):
        pc.store_prompt_embedding(ident, "deblur", (torch.zeros(1, 256, 32), torch.zeros(1, 32)), tmp_path)
    with pytest.raises(InputError):
        pc.store_prompt_embedding("", "deblur", (torch.zeros(1, 512, 32), torch.zeros(1, 32)), tmp_path)


def test_default_cache_dir_and_missing_encoders(tmp_path, monkeypatch):
    monkeypatch.setenv("GENREFOCUS_CACHE_DIR", str(tmp_path))
    assert pc.default_cache_dir() == tmp_path / "prompt_embeds"
    monkeypatch.delenv("GENREFOCUS_CACHE_DIR")
    assert str(pc.default_cache_dir()).endswith(".cache/genrefocus/prompt_embeds")
    with pytest.raises(MissingModelFileError):
        pc.PromptEncoder()
    enc = pc.PromptEncoder(clip_l=tmp_path / "clip_l.safetensors", t5=tmp_path / "t5xxl_fp16.safetensors",
                           tokenizer_dir=tmp_path)
    with pytest.raises(MissingModelFileError, match="text_encoders"):
        enc.identity


def test_unwritable_cache_warns_and_still_returns(pipe_dir, tmp_path, reference):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    enc = pc.PromptEncoder(diffusers_dir=pipe_dir)
    with pytest.warns(UserWarning, match="could not be cached"):
        emb = pc.get_prompt_embeddings("bokeh", enc, cache_dir=blocker)
    assert_fp32_close(emb.pooled, reference["bokeh_pooled_prompt_embeds"], **CLIP_CHAIN)
    assert not enc.loaded
