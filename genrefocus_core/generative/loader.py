"""`load_genrefocus`: every model file -> a ready GenRefocusPipeline, in a memory-safe order.

1. Prompt embeddings of the stages that have a LoRA: given, or from the disk cache, or encoded with
   CLIP-L + T5 which are then freed, before FLUX is read at all.
2. The FLUX transformer in the memory mode's storage (bf16, fp8 or fp32), then the VAE.
3. The LoRA files as named peft adapters (`stages.ADAPTERS`).
4. The memory plan (memory.Offloader) places the models; the pipeline moves them per stage.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from . import flux_loading as fl
from . import model_files as mf
from ..basics.errors import InputError
from .memory import Offloader, get_memory_mode
from .prompt_embedding import PromptEmbedding
from .stages import ADAPTERS, check_requirements, stages_of


def _read_prompt_file(path, stages) -> dict:
    p = Path(path).expanduser()
    return {stage: PromptEmbedding.from_safetensors(p, stage) for stage in stages}


def resolve_prompt_embeddings(stages, prompt_embeddings=None, *, diffusers_dir=None, clip_l=None, t5=None,
                              tokenizer_dir=None, cache_dir=None, device=None, clip_config=None,
                              t5_config=None) -> dict:
    """{stage: PromptEmbedding} for `stages` ("deblur", "bokeh").

    prompt_embeddings: None (cache, else encode), a mapping {stage: PromptEmbedding or
    (prompt_embeds, pooled[, text_ids])}, or the path of a safetensors file in the
    `<stage>_prompt_embeds` layout (e.g. the parity fixtures' prompt_embeds.safetensors).
    """
    from . import prompt_cache as pc

    stages = list(dict.fromkeys(stages))
    if not stages:
        return {}
    if isinstance(prompt_embeddings, (str, Path)):
        return _read_prompt_file(prompt_embeddings, stages)
    if isinstance(prompt_embeddings, Mapping):
        missing = [s for s in stages if s not in prompt_embeddings]
        if missing:
            raise InputError(f"prompt_embeddings has no entry for stage(s) {missing}.")
        return {s: pc._as_embedding(prompt_embeddings[s]) for s in stages}
    if prompt_embeddings is not None:
        raise InputError("prompt_embeddings must be None, a {stage: embedding} mapping or a safetensors path.")
    encoder = pc.PromptEncoder(diffusers_dir=diffusers_dir, clip_l=clip_l, t5=t5, tokenizer_dir=tokenizer_dir,
                               device=device, clip_config_dir=clip_config, t5_config_dir=t5_config)
    return pc.get_stage_embeddings(stages, encoder, cache_dir)


def load_genrefocus(flux=None, vae=None, clip_l=None, t5=None, diffusers_dir=None, deblur_lora=None,
                    bokeh_lora=None, pre_deblur_lora=None, aperture_lora=None, memory_mode="default",
                    device=None, cache_dir=None, prompt_embeddings=None, *, tokenizer_dir=None,
                    transformer_config=None, vae_config=None, clip_config=None, t5_config=None):
    """Assemble a GenRefocusPipeline from model files.

    flux / vae / clip_l / t5: single files (flux1-dev*.safetensors, ae.safetensors, clip_l.safetensors,
      t5xxl_*.safetensors); any not given comes from `diffusers_dir` (a FLUX.1-dev diffusers folder).
    tokenizer_dir: diffusers folder with tokenizer/ and tokenizer_2/ (default diffusers_dir); only
      needed when a prompt is not cached yet.
    *_lora: LoRA files of the released format; each becomes the adapter its stage uses.
    memory_mode: "default" | "low" | "sequential" | "fp32" (memory.MEMORY_MODES).
    device: execution device (default CUDA if available, else CPU).
    cache_dir: prompt-embedding cache directory (default prompt_cache.default_cache_dir()).
    prompt_embeddings: skip the text encoders (see resolve_prompt_embeddings).
    *_config: config folders for single files of non-standard sizes (default: shipped FLUX.1-dev).
    """
    mode = get_memory_mode(memory_mode)
    offload = Offloader(mode, device)
    if flux is None and diffusers_dir is None:
        raise mf.MissingModelFileError(mf.TYPICAL_NAMES["transformer"], mf.COMFYUI_FOLDERS["transformer"],
                                       "Give the FLUX.1-dev transformer file (flux=...) or a diffusers folder "
                                       "(diffusers_dir=...).")
    if vae is None and diffusers_dir is None:
        raise mf.MissingModelFileError(mf.TYPICAL_NAMES["vae"], mf.COMFYUI_FOLDERS["vae"],
                                       "Give the FLUX autoencoder (vae=...) or a diffusers folder.")
    given = {"deblur_lora": deblur_lora, "pre_deblur_lora": pre_deblur_lora, "bokeh_lora": bokeh_lora,
             "aperture_lora": aperture_lora}
    loras = {a.name: given[a.option] for a in ADAPTERS.values() if given[a.option] is not None}
    check_requirements(loras)
    for name, path in loras.items():
        mf.require_file(path, "lora")

    from . import lora as lora_files
    from .pipeline import GenRefocusPipeline

    # 1. text first: encoders (if needed at all) are loaded, used and freed before FLUX is read.
    #    (sequential mode targets small GPUs: T5-XXL, 8.8 GiB in bf16, then encodes once on the CPU.)
    stages = stages_of(loras)
    encoder_device = "cpu" if mode.offload == "sequential" else offload.device
    embeddings = resolve_prompt_embeddings(stages, prompt_embeddings, diffusers_dir=diffusers_dir, clip_l=clip_l,
                                           t5=t5, tokenizer_dir=tokenizer_dir or diffusers_dir, cache_dir=cache_dir,
                                           device=encoder_device, clip_config=clip_config, t5_config=t5_config)

    # 2. FLUX transformer and VAE.
    transformer = fl.load_flux_transformer(flux if flux is not None else diffusers_dir, dtype=mode.load_dtype,
                                           config_dir=transformer_config, keep_fp8=mode.fp8)
    vae_model = fl.load_flux_vae(vae if vae is not None else diffusers_dir, dtype=mode.compute_dtype,
                                 config_dir=vae_config)

    # 3. adapters (peft; kept in the compute dtype also when the base weights are fp8).
    lora_files.use_lora_files(transformer, loras)

    # 4. placement.
    offload.prepare(transformer)
    offload.prepare(vae_model, allow_sequential=False)
    return GenRefocusPipeline(transformer, vae_model, embeddings, device=offload.device, dtype=mode.compute_dtype,
                              offload=offload)
