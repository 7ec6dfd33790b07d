"""Generative nodes on FLUX.1-dev: LoadGenRefocus, DeblurNet, BokehNet and TiledSampler.

The pipeline is cached between runs: ComfyUI keeps the loader's output while the graph uses it, and
this module keeps a weak reference to it, so a re-run with the same FLUX/VAE/memory mode reuses the
loaded weights (changed LoRA files are swapped as adapters, new prompt embeddings replace the old ones,
FLUX is not reloaded), while ComfyUI's "free memory" and cache eviction still release it. ComfyUI's own models are unloaded before FLUX is loaded and before
each stage runs; in the offloading memory modes the core moves FLUX back to the CPU after each stage.
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path

import diffusers  # noqa: F401  (the generative stages need diffusers and peft; without them only
import peft  # noqa: F401       these nodes are disabled)
import torch

from genrefocus_core.basics.defocus import Defocus
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import to_image_batch
from genrefocus_core.generative.loader import load_genrefocus, resolve_prompt_embeddings
from genrefocus_core.generative.memory import MEMORY_MODES
from genrefocus_core.generative.model_files import file_stamp
from genrefocus_core.generative.pipeline import GenRefocusPipeline
from genrefocus_core.generative.prompt_cache import (T5_MAX_LENGTH, default_cache_dir, read_cached,
                                          store_prompt_embedding)
from genrefocus_core.generative.prompt_embedding import PromptEmbedding
from genrefocus_core.generative.sampling import SamplerSettings
from genrefocus_core.generative.stages import (ADAPTERS, APERTURE_ADAPTER, BOKEH, BOKEH_ADAPTER, DEBLUR,
                                               DEBLUR_ADAPTER, DEBLUR_VARIANTS, STAGES, deblur_adapter, stages_of)

from . import comfy_bridge
from .common import APERTURE, CATEGORY, DEFOCUS, MODEL, SAMPLER, broadcast_batches, tip

log = logging.getLogger("GenRefocus")

NONE = "none"
MEMORY_CHOICES = ["auto"] + list(MEMORY_MODES)
# Encodings made with ComfyUI's FLUX text encoder go into the core's prompt cache under this identity, so
# later runs can leave the (10 GB) text encoder out entirely.
COMFY_CLIP_IDENTITY = "comfyui:flux-text-encoder(clip_l+t5xxl)"


def _with_none(names: list[str]) -> list[str]:
    return [NONE] + [n for n in names if n != NONE]


def _pick_default(choices: list[str], wanted: str) -> str:
    return wanted if wanted in choices else choices[0] if choices else wanted


def resolve_memory_mode(mode: str) -> str:
    """'auto': full precision on the CPU, the 24 GB bf16 mode on a GPU."""
    if mode == "auto":
        return "fp32" if comfy_bridge.torch_device().type == "cpu" else "default"
    if mode not in MEMORY_MODES:
        raise InputError(f"Unknown memory mode {mode!r}; choose one of {MEMORY_CHOICES}.")
    return mode


def config_beside(path: str) -> str | None:
    """A weights file with a config.json beside it (a diffusers component folder such as
    transformer/ or vae/) is loaded with that config instead of the shipped FLUX.1-dev one."""
    folder = Path(path).parent
    return str(folder) if (folder / "config.json").is_file() else None


def encode_with_comfy_clip(clip, prompt: str, min_length: int = T5_MAX_LENGTH) -> PromptEmbedding:
    """Encode a stage prompt with ComfyUI's FLUX text encoder (DualCLIPLoader: clip_l + t5xxl, type
    flux) exactly as the reference does: T5 padded to 512 tokens without attention mask, CLIP-L's
    pooled output; the text position ids are all zero."""
    try:
        tokens = clip.tokenize(prompt, tokenizer_options={"t5xxl_min_length": min_length})
    except TypeError:  # ComfyUI before 0.3.31 has no tokenizer options
        raise InputError("This ComfyUI cannot pad T5 to 512 tokens (tokenizer option t5xxl_min_length, ComfyUI "
                         "0.3.31 or newer). Update ComfyUI or use a prompt-embeddings file instead.") from None
    if not isinstance(tokens, dict) or "t5xxl" not in tokens or "l" not in tokens:
        raise InputError("The connected CLIP is not FLUX's text encoder: load clip_l + t5xxl with DualCLIPLoader "
                         "(type 'flux'), or leave 'clip' unconnected and use a prompt-embeddings file.")
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if cond.ndim != 3 or cond.shape[1] != min_length:
        raise InputError(f"The text encoder returned {tuple(cond.shape)}: T5 must be padded to {min_length} tokens "
                         "(ComfyUI's tokenizer option t5xxl_min_length, ComfyUI 0.3.31 or newer). Update "
                         "ComfyUI or use a prompt-embeddings file instead.")
    if pooled is None:
        raise InputError("The connected CLIP gave no pooled output (CLIP-L is needed besides T5).")
    cond = cond[:1].float().cpu()
    pooled = pooled[:1].float().cpu()
    return PromptEmbedding(prompt_embeds=cond, pooled=pooled, text_ids=torch.zeros(cond.shape[1], 3))


def stage_embeddings(stages, clip=None, prompt_file: str = NONE) -> dict:
    """{stage: PromptEmbedding}: encoded with the connected CLIP (and cached on disk), else from the chosen
    prompt-embeddings file, else from the disk cache of an earlier CLIP encoding."""
    if clip is not None:
        out = {}
        for s in stages:
            out[s] = encode_with_comfy_clip(clip, STAGES[s].prompt)
            try:
                store_prompt_embedding(COMFY_CLIP_IDENTITY, s, out[s])
            except OSError as e:  # a read-only home: no cache, still fine for this run
                log.warning("GenRefocus: could not cache the %s prompt embedding: %s", s, e)
        return out
    if prompt_file and prompt_file != NONE:
        return resolve_prompt_embeddings(stages, comfy_bridge.model_path("genrefocus", prompt_file))
    cached = {s: read_cached(default_cache_dir(), COMFY_CLIP_IDENTITY, STAGES[s].prompt) for s in stages}
    if all(v is not None for v in cached.values()):
        log.info("GenRefocus: stage prompts from the cache in %s", default_cache_dir())
        return cached
    raise InputError("Load GenRefocus needs the stage prompts: connect the FLUX text encoder (DualCLIPLoader with "
                     "clip_l + t5xxl, type flux) to 'clip' (once is enough: the encodings are then cached in "
                     f"{default_cache_dir()}), or choose a prompt_embeddings file "
                     f"(in {comfy_bridge.folder_hint('genrefocus')}).")


class GenRefocusModel:
    """What travels in GENREFOCUS_MODEL: the pipeline and its memory mode."""

    def __init__(self, pipeline: GenRefocusPipeline, memory_mode: str):
        self.pipeline, self.memory_mode = pipeline, memory_mode

    def __repr__(self):
        return f"GenRefocusModel({self.memory_mode}, adapters={self.pipeline.adapters})"


_cache: dict = {}  # {"key": (FLUX, VAE, memory mode, device), "model": weakref to GenRefocusModel}


def _bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


class GenRefocusLoadModel:
    DESCRIPTION = ("Loads FLUX.1-dev with the GenRefocus LoRAs (DeblurNet, BokehNet). FLUX from "
                   "models/diffusion_models (or unet), the VAE (ae.safetensors) from models/vae, the LoRAs from "
                   "models/genrefocus. The stage prompts are encoded with the connected CLIP (DualCLIPLoader, "
                   "type flux) or read from a prompt-embeddings file. Cached between runs.")

    @classmethod
    def INPUT_TYPES(cls):
        flux = comfy_bridge.list_models("diffusion_models")
        vae = comfy_bridge.list_models("vae")
        ours = _with_none(comfy_bridge.list_models("genrefocus"))
        return {
            "required": {
                "flux_model": (flux, tip("FLUX.1-dev transformer (flux1-dev.safetensors, or an fp8 variant) in "
                                         "models/diffusion_models. FLUX.1-schnell or other models do not work with "
                                         "the GenRefocus LoRAs.", default=_pick_default(flux, "flux1-dev.safetensors"))),
                "vae_name": (vae, tip("FLUX autoencoder (ae.safetensors) in models/vae.",
                                      default=_pick_default(vae, "ae.safetensors"))),
                "deblur_lora": (ours, tip("DeblurNet LoRA (deblurNet.safetensors) in models/genrefocus; 'none' "
                                          "disables DeblurNet.", default=_pick_default(ours, DEBLUR_ADAPTER.file))),
                "bokeh_lora": (ours, tip("BokehNet LoRA (bokehNet.safetensors) in models/genrefocus; 'none' "
                                         "disables BokehNet.", default=_pick_default(ours, BOKEH_ADAPTER.file))),
                "pre_deblur_lora": (ours, tip("Optional DeblurNet variant that also takes a pre-deblurred image "
                                              "(deblurNet_with_pre_deblur.safetensors).", default=NONE)),
                "aperture_lora": (ours, tip("Optional aperture-shape LoRA for BokehNet's APERTURE input (works on "
                                            "top of BokehNet; not released by the authors).", default=NONE)),
                "prompt_embeddings": (ours, tip("Used when no CLIP is connected ('none': the cached encodings of "
                                                "an earlier run with CLIP): a safetensors file in "
                                                "models/genrefocus with the encoded stage prompts "
                                                "(<stage>_prompt_embeds, <stage>_pooled_prompt_embeds, "
                                                "<stage>_text_ids).", default=NONE)),
                "memory_mode": (MEMORY_CHOICES, tip("auto: fp32 on the CPU, 'default' on a GPU. default: bf16, "
                                                    "24 GB cards. low: fp8 weights + bf16 compute, 16 GB cards. "
                                                    "sequential: layer-by-layer offload, 6-8 GB, slow. fp32: CPU.",
                                                    default="auto")),
            },
            "optional": {
                "clip": ("CLIP", tip("FLUX text encoder from DualCLIPLoader (clip_l + t5xxl, type flux) to encode "
                                     "the two fixed stage prompts; it is unloaded before FLUX loads. The encodings "
                                     "are cached on disk, so later runs work without it.")),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, flux_model, vae_name, deblur_lora, bokeh_lora, pre_deblur_lora, aperture_lora,
                        prompt_embeddings):
        """Accept any file name here: ComfyUI's own check ("Value not in list") would reject a workflow naming
        a file not installed yet before `load` can say which file goes in which folder."""
        return True

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("genrefocus_model",)
    OUTPUT_TOOLTIPS = ("FLUX.1-dev with the GenRefocus adapters, for DeblurNet and BokehNet.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/loaders"

    def load(self, flux_model, vae_name, deblur_lora, bokeh_lora, pre_deblur_lora, aperture_lora,
             prompt_embeddings, memory_mode, clip=None):
        mode = resolve_memory_mode(memory_mode)
        comfy_bridge.require_model_files([("diffusion_models", flux_model), ("vae", vae_name)] + [
            ("genrefocus", f) for f in (deblur_lora, bokeh_lora, pre_deblur_lora, aperture_lora, prompt_embeddings)])
        flux_path = comfy_bridge.model_path("diffusion_models", flux_model)
        vae_path = comfy_bridge.model_path("vae", vae_name)
        chosen = {"deblur_lora": deblur_lora, "bokeh_lora": bokeh_lora, "pre_deblur_lora": pre_deblur_lora,
                  "aperture_lora": aperture_lora}
        loras = {a.name: comfy_bridge.model_path("genrefocus", chosen[a.option]) for a in ADAPTERS.values()
                 if chosen[a.option] and chosen[a.option] != NONE}
        if not loras:
            raise InputError("Load GenRefocus: choose at least one LoRA (deblur_lora and/or bokeh_lora); put "
                             f"{DEBLUR_ADAPTER.file} / {BOKEH_ADAPTER.file} in {comfy_bridge.folder_hint('genrefocus')}.")
        embeddings = stage_embeddings(stages_of(loras), clip, prompt_embeddings)
        device = comfy_bridge.torch_device()
        key = (file_stamp(flux_path), file_stamp(vae_path), mode, str(device))
        model = _cache["model"]() if _cache.get("key") == key else None
        if model is not None:
            model.pipeline.use_lora_files(loras)  # the core keeps which file each adapter holds
        else:
            _cache.clear()
            comfy_bridge.free_memory(None)  # ComfyUI's models (its text encoders, another FLUX) make room
            pipe = load_genrefocus(flux=flux_path, vae=vae_path, memory_mode=mode, device=device,
                                   prompt_embeddings=embeddings, transformer_config=config_beside(flux_path),
                                   vae_config=config_beside(vae_path),
                                   **{ADAPTERS[a].option: p for a, p in loras.items()})
            model = GenRefocusModel(pipe, mode)
            _cache.update(key=key, model=weakref.ref(model))
        model.pipeline.prompt_embeddings = embeddings
        return (model,)


class GenRefocusTiledSampler:
    DESCRIPTION = ("Sampling settings for DeblurNet / BokehNet: steps, seed (a fixed seed keeps the noise fixed, so "
                   "re-rendering with another K or focus changes only the blur), tiling for high resolutions.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", tip("Denoising steps (the paper uses 28).", default=28, min=1, max=200, step=1)),
                "seed": ("INT", tip("Seed of the initial noise; keep it fixed ('control after generate' = fixed) to "
                                    "compare blur settings on the same render.", default=BOKEH.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                                    control_after_generate=True)),
                "tiling": (["auto", "on", "off"], tip("auto: tiles when the short side is >= 512 px (the reference's "
                                                      "rule); needed above ~1000 px to avoid artefacts.",
                                                      default="auto")),
                "tile_size": ("INT", tip("Tile side in pixels (multiple of 16; the LoRAs were trained at 512).",
                                         default=512, min=64, max=8192, step=16)),
                "tile_overlap": ("INT", tip("Overlap between tiles in pixels (multiple of 16), blended with "
                                            "Gaussian weights.", default=64, min=0, max=4096, step=16)),
                "tile_batch": ("INT", tip("Tiles sent through FLUX together: faster with enough memory, same "
                                          "result.", default=1, min=1, max=64, step=1)),
                "guidance": ("FLOAT", tip("FLUX guidance; 0 = the stage's own (DeblurNet 3.5, BokehNet 1.0).",
                                          default=0.0, min=0.0, max=30.0, step=0.1)),
            },
            "optional": {
                "initial_noise": ("LATENT", tip("Fixed initial noise instead of the seed: a 16-channel FLUX latent "
                                                "[B,16,H/8,W/8] of the image's padded size.")),
            },
        }

    RETURN_TYPES = (SAMPLER,)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Sampling settings for DeblurNet / BokehNet.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, steps, seed, tiling, tile_size, tile_overlap, tile_batch, guidance, initial_noise=None):
        for name, v in (("tile_size", tile_size), ("tile_overlap", tile_overlap)):
            if v % 16:
                raise InputError(f"TiledSampler: {name}={v} px must be a multiple of 16.")
        noise = None
        if initial_noise is not None:
            noise = initial_noise["samples"] if isinstance(initial_noise, dict) else initial_noise
        settings = SamplerSettings(steps=int(steps), seed=int(seed), tiled={"auto": "auto", "on": True, "off": False}[tiling],
                                   tile_size=tile_size // 16, tile_overlap=tile_overlap // 16,
                                   tile_batch=int(tile_batch), noise=noise,
                                   guidance=float(guidance) if guidance > 0 else None)
        return (settings.validated(),)


def _model(model) -> GenRefocusPipeline:
    if not isinstance(model, GenRefocusModel):
        raise InputError("'genrefocus_model' must come from Load GenRefocus.")
    return model.pipeline


def _require_adapter(pipe: GenRefocusPipeline, adapter: str, node: str) -> None:
    """The LoRA a node needs must have been chosen in Load GenRefocus; say which input and file."""
    if adapter not in pipe.adapters:
        raise InputError(f"{node} needs the '{adapter}' LoRA: choose {ADAPTERS[adapter].file} as "
                         f"'{ADAPTERS[adapter].option}' in Load GenRefocus "
                         f"(files in {comfy_bridge.folder_hint('genrefocus')}).")


def _settings(sampler, default_seed: int) -> SamplerSettings:
    if sampler is None:
        return SamplerSettings(seed=default_seed)
    if not isinstance(sampler, SamplerSettings):
        raise InputError("'sampler' must come from the TiledSampler node.")
    return sampler


def _run_stage(pipe: GenRefocusPipeline, settings: SamplerSettings, fn):
    """Make room on the device, run one stage with ComfyUI's progress bar and interrupt, tidy up."""
    comfy_bridge.free_memory(_bytes(pipe.transformer) + _bytes(pipe.vae) + 2 * 1024**3)
    progress = comfy_bridge.StepProgress(settings.steps)
    try:
        return fn(progress).float().cpu().clamp(0, 1)
    finally:
        comfy_bridge.soft_empty_cache()


class GenRefocusDeblurNet:
    DESCRIPTION = ("DeblurNet: a blurry (or sharp) photo -> an all-in-focus image, the first GenRefocus stage. "
                   "Optionally with a pre-deblurred image from another deblurring model (needs pre_deblur_lora).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "genrefocus_model": (MODEL, tip("From Load GenRefocus (with deblur_lora or pre_deblur_lora).")),
                "image": ("IMAGE", tip("Photo(s) to make all-in-focus; any size (padded to multiples of 16 and "
                                       "cropped back).")),
                "variant": (list(DEBLUR_VARIANTS), tip("auto: the pre-deblur variant when pre_deblurred is "
                                                                 "connected (or only that LoRA is loaded), else plain.",
                                                                 default="auto")),
            },
            "optional": {
                "pre_deblurred": ("IMAGE", tip("Output of a conventional deblurring model for the pre-deblur "
                                               "variant (black if not given).")),
                "sampler": (SAMPLER, tip(f"Settings from TiledSampler; default 28 steps, seed {DEBLUR.seed}, tiling auto.")),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("all_in_focus",)
    OUTPUT_TOOLTIPS = ("All-in-focus image, same size as the input.",)
    FUNCTION = "deblur"
    CATEGORY = CATEGORY

    def deblur(self, genrefocus_model, image, variant, pre_deblurred=None, sampler=None):
        pipe = _model(genrefocus_model)
        _require_adapter(pipe, deblur_adapter(variant, pipe.adapters, pre_deblurred is not None), "DeblurNet")
        settings = _settings(sampler, DEBLUR.seed)
        images = to_image_batch(image, "image")
        return (_run_stage(pipe, settings, lambda cb: pipe.deblur(images, pre_deblurred=pre_deblurred,
                                                                  settings=settings, callback=cb, variant=variant)),)


class GenRefocusBokehNet:
    DESCRIPTION = ("BokehNet: the all-in-focus image + a defocus map -> the refocused photo, the second GenRefocus "
                   "stage. Blur 0 everywhere (K = 0) returns the image unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "genrefocus_model": (MODEL, tip("From Load GenRefocus (with bokeh_lora).")),
                "image": ("IMAGE", tip("All-in-focus image (DeblurNet's output, or any sharp image).")),
                "defocus": (DEFOCUS, tip("From Defocus Map, computed on the depth of this image (same size).")),
            },
            "optional": {
                "aperture": (APERTURE, tip("Aperture shape from Aperture Shape; needs aperture_lora in Load "
                                           "GenRefocus.")),
                "sampler": (SAMPLER, tip(f"Settings from TiledSampler; default 28 steps, seed {BOKEH.seed} (fixed noise, as "
                                         "the paper's demo), tiling auto.")),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The refocused image.",)
    FUNCTION = "refocus"
    CATEGORY = CATEGORY

    def refocus(self, genrefocus_model, image, defocus, aperture=None, sampler=None):
        pipe = _model(genrefocus_model)
        _require_adapter(pipe, BOKEH_ADAPTER.name, "BokehNet")
        if aperture is not None:
            _require_adapter(pipe, APERTURE_ADAPTER.name, "BokehNet with an aperture shape")
        if not isinstance(defocus, Defocus):
            raise InputError("BokehNet: 'defocus' must come from the Defocus Map node.")
        settings = _settings(sampler, BOKEH.seed)
        images, coc = broadcast_batches((to_image_batch(image, "image"), "image"), (defocus.signed_coc, "defocus"))
        return (_run_stage(pipe, settings, lambda cb: pipe.bokeh(images, coc.abs(), aperture=aperture,
                                                                 settings=settings, callback=cb)),)


NODE_CLASS_MAPPINGS = {
    "GenRefocusLoadModel": GenRefocusLoadModel,
    "GenRefocusTiledSampler": GenRefocusTiledSampler,
    "GenRefocusDeblurNet": GenRefocusDeblurNet,
    "GenRefocusBokehNet": GenRefocusBokehNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GenRefocusLoadModel": "Load GenRefocus (FLUX + LoRAs)",
    "GenRefocusTiledSampler": "Tiled Sampler (GenRefocus)",
    "GenRefocusDeblurNet": "DeblurNet (GenRefocus)",
    "GenRefocusBokehNet": "FLUX BokehNet (GenRefocus)",
}
