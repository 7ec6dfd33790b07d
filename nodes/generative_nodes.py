"""Generative nodes on FLUX.1-dev: Load GenRefocus, DeblurNet, BokehNet and TiledSampler.

They run on ComfyUI's own models: Load GenRefocus takes the MODEL of any FLUX.1-dev loader (Load
Diffusion Model in any weight dtype, a checkpoint, ComfyUI-GGUF's loader) and adds the GenRefocus LoRA
adapters beside it (never merged into its weights; `native_flux`); DeblurNet and BokehNet encode and
decode with the connected VAE; the stage prompts come from the connected CLIP (or a prompt-embeddings
file / the disk cache). ComfyUI's model management loads, offloads and frees FLUX and the adapters:
a graph that also samples with KSampler holds one FLUX. (The standalone core and CLI keep their own
diffusers loading.)
"""
from __future__ import annotations

import logging

import torch

from genrefocus_core.basics.defocus import Defocus
from genrefocus_core.basics.errors import InputError
from genrefocus_core.basics.images import to_image_batch
from genrefocus_core.generative.loader import resolve_prompt_embeddings
from genrefocus_core.generative.prompt_cache import (T5_MAX_LENGTH, default_cache_dir, read_cached,
                                          store_prompt_embedding)
from genrefocus_core.generative.prompt_embedding import PromptEmbedding
from genrefocus_core.generative.sampling import SamplerSettings
from genrefocus_core.generative.stages import (ADAPTERS, APERTURE_ADAPTER, BOKEH, BOKEH_ADAPTER, DEBLUR,
                                               DEBLUR_ADAPTER, DEBLUR_VARIANTS, STAGES, deblur_adapter, stages_of)

from . import comfy_bridge
from .native_flux import NativeGenRefocus, attach
from .common import APERTURE, CATEGORY, DEFOCUS, MODEL, SAMPLER, broadcast_batches, tip

log = logging.getLogger("GenRefocus")

NONE = "none"
# Encodings made with ComfyUI's FLUX text encoder go into the core's prompt cache under this identity, so
# later runs can leave the (10 GB) text encoder out entirely.
COMFY_CLIP_IDENTITY = "comfyui:flux-text-encoder(clip_l+t5xxl)"


def _with_none(names: list[str]) -> list[str]:
    return [NONE] + [n for n in names if n != NONE]


def _pick_default(choices: list[str], wanted: str) -> str:
    return wanted if wanted in choices else choices[0] if choices else wanted


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


class GenRefocusLoadModel:
    DESCRIPTION = ("Adds the GenRefocus LoRAs (DeblurNet, BokehNet; files in models/genrefocus) to a FLUX.1-dev "
                   "MODEL from ComfyUI's loaders (Load Diffusion Model in any weight dtype, a checkpoint, the GGUF "
                   "loader). The adapters act beside FLUX's weights, never merged, so the same MODEL can also feed "
                   "KSampler. The stage prompts are encoded with the connected CLIP (DualCLIPLoader, type flux) "
                   "or read from a prompt-embeddings file.")

    @classmethod
    def INPUT_TYPES(cls):
        ours = _with_none(comfy_bridge.list_models("genrefocus"))
        return {
            "required": {
                "model": ("MODEL", tip("FLUX.1-dev from Load Diffusion Model (flux1-dev.safetensors, any weight "
                                       "dtype), a FLUX checkpoint or the GGUF loader. FLUX.1-schnell or other models "
                                       "do not work with the GenRefocus LoRAs.")),
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
            },
            "optional": {
                "clip": ("CLIP", tip("FLUX text encoder from DualCLIPLoader (clip_l + t5xxl, type flux) to encode "
                                     "the two fixed stage prompts. The encodings are cached on disk, so later runs "
                                     "work without it.")),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, deblur_lora, bokeh_lora, pre_deblur_lora, aperture_lora, prompt_embeddings):
        """Accept any file name here: ComfyUI's own check ("Value not in list") would reject a workflow naming
        a file not installed yet before `load` can say which file goes in which folder."""
        return True

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("genrefocus_model",)
    OUTPUT_TOOLTIPS = ("The FLUX MODEL with the GenRefocus adapters, for DeblurNet and BokehNet.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/loaders"

    def load(self, model, deblur_lora, bokeh_lora, pre_deblur_lora, aperture_lora, prompt_embeddings, clip=None):
        comfy_bridge.require_model_files([("genrefocus", f) for f in (deblur_lora, bokeh_lora, pre_deblur_lora,
                                                                      aperture_lora, prompt_embeddings)])
        chosen = {"deblur_lora": deblur_lora, "bokeh_lora": bokeh_lora, "pre_deblur_lora": pre_deblur_lora,
                  "aperture_lora": aperture_lora}
        loras = {a.name: comfy_bridge.model_path("genrefocus", chosen[a.option]) for a in ADAPTERS.values()
                 if chosen[a.option] and chosen[a.option] != NONE}
        if not loras:
            raise InputError("Load GenRefocus: choose at least one LoRA (deblur_lora and/or bokeh_lora); put "
                             f"{DEBLUR_ADAPTER.file} / {BOKEH_ADAPTER.file} in {comfy_bridge.folder_hint('genrefocus')}.")
        embeddings = stage_embeddings(stages_of(loras), clip, prompt_embeddings)
        return (attach(model, loras, embeddings),)


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


def _model(model) -> NativeGenRefocus:
    if not isinstance(model, NativeGenRefocus):
        raise InputError("'genrefocus_model' must come from Load GenRefocus.")
    return model


def _require_adapter(pipe: NativeGenRefocus, adapter: str, node: str) -> None:
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


def _run_stage(settings: SamplerSettings, fn):
    """Run one stage with ComfyUI's progress bar and interrupt (ComfyUI loads the models it needs inside
    the stage: `native_flux.ComfyMemory`), tidy up."""
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
                "vae": ("VAE", tip("FLUX's autoencoder (ae.safetensors) from Load VAE.")),
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

    def deblur(self, genrefocus_model, vae, image, variant, pre_deblurred=None, sampler=None):
        model = _model(genrefocus_model)
        _require_adapter(model, deblur_adapter(variant, model.adapters, pre_deblurred is not None), "DeblurNet")
        pipe = model.pipeline(vae)
        settings = _settings(sampler, DEBLUR.seed)
        images = to_image_batch(image, "image")
        return (_run_stage(settings, lambda cb: pipe.deblur(images, pre_deblurred=pre_deblurred,
                                                                  settings=settings, callback=cb, variant=variant)),)


class GenRefocusBokehNet:
    DESCRIPTION = ("BokehNet: the all-in-focus image + a defocus map -> the refocused photo, the second GenRefocus "
                   "stage. Blur 0 everywhere (K = 0) returns the image unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "genrefocus_model": (MODEL, tip("From Load GenRefocus (with bokeh_lora).")),
                "vae": ("VAE", tip("FLUX's autoencoder (ae.safetensors) from Load VAE.")),
                "image": ("IMAGE", tip("All-in-focus image (DeblurNet's output, or any sharp image).")),
                "defocus": (DEFOCUS, tip("From Defocus Map, computed on the depth of this image (same size).")),
            },
            "optional": {
                "aperture": (APERTURE, tip("Aperture shape from Aperture Shape; needs aperture_lora in Load "
                                           "GenRefocus.")),
                "sampler": (SAMPLER, tip(f"Settings from TiledSampler; default 28 steps, seed {BOKEH.seed} (fixed noise, as "
                                         "the paper's demo), tiling auto.")),
                "hold_unchanged": ("BOOLEAN", tip("A batch is a clip (a focus pull): where a frame's image and blur "
                                                  "equal the previous frame's, and no changed blur reaches, keep the "
                                                  "previous frame's pixels, so the generated texture does not shimmer "
                                                  "where the focus change does not reach. Off: every frame exactly "
                                                  "as sampled. Needs the fixed (shared) noise of the default sampler.",
                                                  default=True)),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    OUTPUT_TOOLTIPS = ("The refocused image.",)
    FUNCTION = "refocus"
    CATEGORY = CATEGORY

    def refocus(self, genrefocus_model, vae, image, defocus, aperture=None, sampler=None, hold_unchanged=True):
        model = _model(genrefocus_model)
        _require_adapter(model, BOKEH_ADAPTER.name, "BokehNet")
        if aperture is not None:
            _require_adapter(model, APERTURE_ADAPTER.name, "BokehNet with an aperture shape")
        pipe = model.pipeline(vae)
        if not isinstance(defocus, Defocus):
            raise InputError("BokehNet: 'defocus' must come from the Defocus Map node.")
        settings = _settings(sampler, BOKEH.seed)
        images, coc = broadcast_batches((to_image_batch(image, "image"), "image"), (defocus.signed_coc, "defocus"))
        return (_run_stage(settings, lambda cb: pipe.bokeh(images, coc.abs(), aperture=aperture, settings=settings,
                                                           callback=cb, hold_unchanged=bool(hold_unchanged))),)


NODE_CLASS_MAPPINGS = {
    "GenRefocusLoadModel": GenRefocusLoadModel,
    "GenRefocusTiledSampler": GenRefocusTiledSampler,
    "GenRefocusDeblurNet": GenRefocusDeblurNet,
    "GenRefocusBokehNet": GenRefocusBokehNet,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "GenRefocusLoadModel": "Load GenRefocus (LoRAs on a FLUX MODEL)",
    "GenRefocusTiledSampler": "Tiled Sampler (GenRefocus)",
    "GenRefocusDeblurNet": "DeblurNet (GenRefocus)",
    "GenRefocusBokehNet": "FLUX BokehNet (GenRefocus)",
}
