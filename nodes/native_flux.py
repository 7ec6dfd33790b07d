"""GenRefocus on ComfyUI's own FLUX: the glue between ComfyUI's MODEL / VAE and the core.

- The MODEL's diffusion model (ComfyUI's `comfy.ldm.flux.model.Flux`, BFL layout, any weight storage:
  fp8, scaled fp8, GGUF, a checkpoint) runs the core's multi-branch forward through
  `flux_layouts.BflLayout`, which calls its layers (ComfyUI's ops cast or dequantise on the fly).
- The LoRA adapters live in a `lora_slices.LoraSlices` beside the model (one per diffusion model, kept
  while the model lives), handed to ComfyUI's memory manager as a ModelPatcher of their own, attached
  to the MODEL clone, so ComfyUI loads them to the model's device, counts them and frees them.
- Before a stage runs, `comfy.model_management.load_models_gpu` loads FLUX and the adapters with a
  memory estimate for the real sequence (text + image + every condition branch).
- Attention runs through ComfyUI's optimized attention on GPUs (its sage/flash/xformers choice).
- The VAE codec draws the posterior sample the reference uses (ComfyUI's own encode returns the mode),
  and decodes with ComfyUI's VAE.decode (its batching and out-of-memory fallback).
Outside ComfyUI (unit tests) any objects with the same attributes work; memory management is skipped.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from genrefocus_core.basics.errors import InputError
from genrefocus_core.generative.flux_layouts import BflLayout
from genrefocus_core.generative.lora_slices import LoraSlices
from genrefocus_core.generative.pipeline import GenRefocusPipeline

from . import comfy_bridge

LORA_KEY = "genrefocus_lora"
_slices: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # diffusion model -> LoraSlices


def diffusion_model(model):
    """The FLUX.1-dev diffusion model inside a ComfyUI MODEL; InputError for anything else."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None:
        raise InputError("'model' must be a ComfyUI MODEL (Load Diffusion Model, a checkpoint loader or the GGUF "
                         "loader).")
    if not (hasattr(inner, "double_blocks") and hasattr(inner, "single_blocks") and hasattr(inner, "img_in")
            and hasattr(inner, "txt_in")):
        raise InputError(f"The connected MODEL is a {type(inner).__name__}, not FLUX: the GenRefocus LoRAs need "
                         "FLUX.1-dev (flux1-dev.safetensors, an fp8 copy or a GGUF file).")
    guidance_in = getattr(inner, "guidance_in", None)
    if guidance_in is None or isinstance(guidance_in, torch.nn.Identity):
        raise InputError("The connected FLUX has no guidance embedding: it is FLUX.1-schnell (or a distilled "
                         "variant), but the GenRefocus LoRAs need FLUX.1-dev.")
    return inner


def compute_dtype(model) -> torch.dtype:
    """The dtype ComfyUI computes this MODEL in (its manual-cast dtype for fp8/GGUF storage)."""
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def lora_slices(model, dtype: torch.dtype) -> LoraSlices:
    """The adapter store of this MODEL's diffusion model (one per model object, reused across runs)."""
    inner = diffusion_model(model)
    slices = _slices.get(inner)
    if slices is None or slices.dtype != dtype:
        slices = LoraSlices(inner, dtype)
        _slices[inner] = slices
    return slices


class ComfyVae:
    """VAE codec (see condition_tokens.DiffusersVae) over ComfyUI's VAE, with the FLUX latent
    normalisation of the MODEL's latent format."""

    def __init__(self, vae, latent_format):
        fsm = getattr(vae, "first_stage_model", None)
        if fsm is None or not hasattr(fsm, "encoder") or getattr(vae, "latent_channels", None) != 16:
            raise InputError("'vae' must be FLUX's autoencoder (ae.safetensors through Load VAE; 16 latent "
                             f"channels), got {getattr(vae, 'latent_channels', type(vae).__name__)} channels.")
        self.vae = vae
        self.shift_factor = float(latent_format.shift_factor)
        self.scaling_factor = float(latent_format.scale_factor)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.vae_dtype

    def encode_posterior(self, x: torch.Tensor):
        mm = comfy_bridge.model_management()
        vae = self.vae
        if mm is not None:
            mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(x.shape, vae.vae_dtype))
        device = getattr(vae, "device", x.device)
        fsm = vae.first_stage_model
        moments = fsm.encoder(x.to(device=device, dtype=vae.vae_dtype))
        if getattr(fsm, "quant_conv", None) is not None:
            moments = fsm.quant_conv(moments)
        mean, logvar = moments.float().chunk(2, dim=1)
        return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))

    def decode_image(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).float().movedim(-1, 1)


class ComfyMemory:
    """The pipeline's offload interface backed by ComfyUI's model management."""

    def __init__(self, model, slices: LoraSlices):
        self.model, self.slices = model, slices

    @contextlib.contextmanager
    def stage(self, module, work=None):
        mm = comfy_bridge.model_management()
        if mm is not None and isinstance(module, BflLayout):
            shape = [work.sequences, 16, 2, 2 * work.sequence_tokens] if work is not None else None
            # ComfyUI's estimate for FLUX scales with the token count: give it every branch's tokens
            required = self.model.model.memory_required(shape) if shape is not None else 0
            patchers = [self.model] + self.model.get_nested_additional_models()
            mm.load_models_gpu(patchers, memory_required=required, minimum_memory_required=required)
        yield module


class NativeGenRefocus:
    """What travels in GENREFOCUS_MODEL: the MODEL (a clone carrying the adapters), its adapter
    store and the stage prompts; `pipeline(vae)` gives the core pipeline for one stage."""

    def __init__(self, model, slices: LoraSlices, embeddings: dict):
        self.model, self.slices, self.embeddings = model, slices, embeddings
        self.dtype = compute_dtype(model)
        self.layout = BflLayout(diffusion_model(model), slices)
        attention = comfy_bridge.attention_function(model.load_device)
        if attention is not None:
            self.layout.attention = attention

    @property
    def adapters(self) -> list[str]:
        return self.slices.adapters

    def pipeline(self, vae) -> GenRefocusPipeline:
        codec = ComfyVae(vae, self.model.model.latent_format)
        return GenRefocusPipeline(self.layout, codec, self.embeddings, device=self.model.load_device,
                                  dtype=self.dtype, offload=ComfyMemory(self.model, self.slices))

    def __repr__(self):
        return f"NativeGenRefocus({type(self.layout.model).__name__}, {self.dtype}, adapters={self.adapters})"


def attach(model, files: dict, embeddings: dict) -> NativeGenRefocus:
    """A clone of `model` carrying the GenRefocus adapters `files` ({adapter: path}; unchanged files are
    not read again) as an additional model ComfyUI loads and frees with it."""
    from genrefocus_core.generative.lora import use_lora_files

    diffusion_model(model)  # a clear error for anything but FLUX.1-dev
    dtype = compute_dtype(model)
    slices = lora_slices(model, dtype)
    use_lora_files(slices, files)
    clone = model.clone()
    patcher_type = comfy_bridge.model_patcher_type()
    if patcher_type is not None:
        lora_patcher = patcher_type(slices, load_device=model.load_device, offload_device=model.offload_device,
                                    size=max(1, sum(t.numel() * t.element_size() for t in slices.buffers())))
        clone.set_additional_models(LORA_KEY, [lora_patcher])
    return NativeGenRefocus(clone, slices, embeddings)
