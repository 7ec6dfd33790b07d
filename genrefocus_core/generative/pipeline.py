"""GenRefocusPipeline: the generative stages over images (stages, adapters, prompts, guidance and
default seeds: `stages`).

- `deblur`: DeblurNet, blurry or sharp image -> all-in-focus image. One condition (the input at
  position delta (0, 0)). The pre-deblur variant (adapter pre_deblur) has two conditions:
  [pre-deblurred image at delta (0, 32) (black if none), input at (0, 0)].
- `bokeh`: BokehNet, all-in-focus image + defocus map (px of CoC radius) -> refocused image.
  Conditions [AIF image, clamp(defocus / 100) raw into the VAE]; a fixed default seed, so that
  re-rendering with another K or focus changes only the blur.
  Optional aperture shape: a third condition, the shape exemplar `aperture.condition_image(h, w)`,
  with its own adapter (see the exemplar layout below: our choice, the weights are unreleased).

Images are float [B, H, W, 3] in [0, 1] of any size: they are padded to multiples of 16 px
(reflection) and the result is cropped back to exactly the input size.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import lora as lora_files
from .condition_tokens import (ConditionTokens, encode_condition, pack_latents, token_grid, unpack_latents, vae_codec,
                               vae_decode)
from ..basics import steady_frames
from ..basics.defocus import network_condition
from ..basics.errors import InputError, ModelFileError
from ..basics.images import bchw_to_bhwc, bhwc_to_bchw, crop, pad_to_multiple, to_image_batch, to_map_batch
from .flux_layouts import BflLayout
from .multi_branch_forward import prepare_constants
from .prompt_embedding import check_fits_transformer
from .stages import ADAPTERS, APERTURE_ADAPTER, BOKEH, BOKEH_ADAPTER, DEBLUR, PRE_DEBLUR_ADAPTER, deblur_adapter
from .sampling import (DenoiseInputs, ProgressCallback, SamplerSettings, SequenceSize, check_noise, denoise,
                       initial_noise, resolve_seed, use_tiling)

log = logging.getLogger(__name__)

PRE_DEBLUR_DELTA = (0, 32)
# Aperture-shape exemplar (our choice, no released weights to match): an image of the shape the size
# of the sampled area (whole image, or one tile when tiling), placed immediately left of the image
# grid (column delta = -grid width), so that its tokens never share positions with the image's.


class GenRefocusPipeline:
    """DeblurNet / BokehNet sampling on FLUX with the GenRefocus LoRA adapters.

    transformer: a diffusers FluxTransformer2DModel with the stage adapters loaded as peft adapters
        (`lora.load_lora` or `self.load_lora`), or a `flux_layouts.BflLayout` (BFL-layout FLUX, e.g.
        ComfyUI's) whose `lora` (`lora_slices.LoraSlices`) holds them; then device and dtype must be given.
    vae: diffusers AutoencoderKL of FLUX, or any VAE codec (`condition_tokens.DiffusersVae` says what
        one provides); prompt_embeddings: mapping
        {stage name: emb} of objects with `.prompt_embeds [1, 512, D]`, `.pooled [1, P]`,
        `.text_ids [512, 3]` (prompt_embedding.PromptEmbedding).
    device: where the models run (default: the offloader's device, else the transformer's);
    dtype: compute dtype (default: the offloader's, else the transformer's weight dtype);
    offload: a memory.Offloader (or anything with `.stage(module, work)` context managers; `work` is a
        `SequenceSize` for the transformer's stage, None for the VAE's), or None.
    """

    def __init__(self, transformer, vae, prompt_embeddings: Mapping, *, device=None, dtype=None, offload=None):
        self.transformer = transformer
        self.vae = vae
        self.prompt_embeddings = prompt_embeddings  # checked against the transformer (setter below)
        self.offload = offload
        if device is None:
            device = getattr(offload, "execution_device", None) if offload is not None else None
        native = isinstance(transformer, BflLayout)
        if native and (device is None or dtype is None):
            raise ValueError("A BFL-layout transformer needs the pipeline's device and dtype.")
        if device is None:
            param = next(transformer.parameters())
            device = param.device if param.device.type != "meta" else torch.device("cpu")
        self.device = torch.device(device)
        if dtype is None and offload is not None and hasattr(offload, "mode"):
            dtype = offload.mode.compute_dtype
        if dtype is None:
            dtype = next(transformer.parameters()).dtype
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                dtype = torch.bfloat16  # fp8 storage computes in bf16
        self.dtype = dtype
        self.last_seed: int | None = None

    @property
    def prompt_embeddings(self) -> Mapping:
        return self._prompt_embeddings

    @prompt_embeddings.setter
    def prompt_embeddings(self, embeddings: Mapping) -> None:
        """Every embedding given is checked against the transformer it will meet (widths), so a wrong
        file fails when it is given, not at the first denoising step."""
        for stage, emb in (embeddings or {}).items():
            if emb is not None:
                check_fits_transformer(emb, self.transformer, stage)
        self._prompt_embeddings = embeddings

    # ------------------------------------------------------------------ adapters
    def load_lora(self, path, adapter_name: str) -> list[str]:
        """Load a LoRA file as a named adapter (a name of `stages.ADAPTERS`)."""
        if isinstance(self.transformer, BflLayout):
            return self.transformer.lora.load_file(path, adapter_name)
        return lora_files.load_lora(self.transformer, path, adapter_name)

    def use_lora_files(self, files) -> None:
        """Adapters exactly `files` ({adapter: path}); only changed files are read (`lora.use_lora_files`)."""
        lora_files.use_lora_files(self.transformer.lora if isinstance(self.transformer, BflLayout)
                                  else self.transformer, files)

    def unload_lora(self, adapter_name: str | None = None) -> None:
        if isinstance(self.transformer, BflLayout):
            self.transformer.lora.unload(adapter_name)
        else:
            lora_files.unload_lora(self.transformer, adapter_name)

    @property
    def adapters(self) -> list[str]:
        if isinstance(self.transformer, BflLayout):
            return self.transformer.lora.adapters
        return lora_files.loaded_adapters(self.transformer)

    def _require_adapters(self, names) -> None:
        missing = [n for n in names if n not in self.adapters]
        if missing:
            raise ModelFileError(f"The '{missing[0]}' LoRA is not loaded (needs {ADAPTERS[missing[0]].file}); "
                                 f"loaded adapters: {self.adapters or 'none'}.")

    # ------------------------------------------------------------------ helpers
    def _stage(self, module, work: SequenceSize | None = None):
        if self.offload is None:
            from contextlib import nullcontext
            return nullcontext(module)
        return self.offload.stage(module, work) if work is not None else self.offload.stage(module)

    def _prompt(self, stage: str):
        try:
            emb = self.prompt_embeddings[stage]
        except (KeyError, TypeError):
            emb = None
        if emb is None:
            raise ModelFileError(f"No prompt embedding for the '{stage}' stage was given to the pipeline.")
        return emb

    def _rng(self, settings: SamplerSettings, batch: int, rows: int, cols: int):
        """Initial packed latents [B, L, 64] and (generator for the VAE samples (None = global RNG),
        whether one noise serves the whole batch), drawn in the reference's order (latents first).
        With batch_noise "shared" (local RNG) every image gets the noise a batch of one would get, so
        the frames of a clip differ only where their inputs differ."""
        if settings.rng == "reference":
            torch.manual_seed(settings.reference_global_seed)
            self.last_seed = settings.seed
            latent_gen = torch.Generator("cpu").manual_seed(int(settings.seed)) if settings.seed is not None else None
            vae_gen = None
        else:
            seed = resolve_seed(settings.seed)
            self.last_seed = seed
            latent_gen = vae_gen = torch.Generator("cpu").manual_seed(seed)
        shared = settings.rng == "local" and settings.batch_noise == "shared"
        if settings.noise is not None:
            noise = check_noise(settings.noise, batch, rows, cols)
        else:
            noise = initial_noise(1 if shared else batch, rows, cols, latent_gen).expand(batch, -1, -1, -1)
        return pack_latents(noise.contiguous()), (vae_gen, shared)

    def _encode(self, images_bchw: torch.Tensor, adapters, delta, vae_noise, *, rgb=True, spatial=True) -> ConditionTokens:
        x = images_bchw.to(device=self.device, dtype=vae_codec(self.vae).dtype)
        generator, shared = vae_noise
        cond = encode_condition(self.vae, x, adapters, delta, rgb=rgb, generator=generator, spatial=spatial,
                                shared_noise=shared)
        cond.tokens = cond.tokens.to(self.device)
        return cond

    def _sample(self, stage_prompt: str, latents: torch.Tensor, conditions: list[ConditionTokens], rows: int,
                cols: int, guidance: float, settings: SamplerSettings, callback) -> torch.Tensor:
        emb = self._prompt(stage_prompt)
        B = latents.shape[0]
        tiled = use_tiling(settings, rows, cols)
        work = SequenceSize(B, rows * cols, len(conditions), emb.prompt_embeds.shape[1],
                            settings.tile_size ** 2 if tiled else None, settings.tile_batch)
        with torch.no_grad(), self._stage(self.transformer, work):
            prompt_embeds = emb.prompt_embeds.to(self.device).expand(B, -1, -1)
            pooled = emb.pooled.to(self.device).expand(B, -1)
            constants = prepare_constants(self.transformer, prompt_embeds, pooled,
                                          [c.tokens for c in conditions], [c.adapters for c in conditions], self.dtype)
            inputs = DenoiseInputs(constants, emb.text_ids.to(self.device, torch.float32), rows, cols,
                                   [c.ids for c in conditions], [c.spatial for c in conditions], guidance)
            return denoise(self.transformer, latents.to(self.device), inputs, settings, callback)

    def _decode(self, latents: torch.Tensor, rows: int, cols: int, size: tuple[int, int]) -> torch.Tensor:
        z = unpack_latents(latents, rows, cols)
        with torch.no_grad(), self._stage(self.vae):
            images = [vae_decode(self.vae, z[i:i + 1].to(self.device)).float().cpu() for i in range(z.shape[0])]
        return bchw_to_bhwc(crop(torch.cat(images, 0), size))

    @staticmethod
    def _padded(image_bhwc: torch.Tensor):
        x, size = pad_to_multiple(bhwc_to_bchw(image_bhwc), 16)
        return x, size

    # ------------------------------------------------------------------ stages
    def deblur(self, image, pre_deblurred=None, settings: SamplerSettings = SamplerSettings(),
               callback: ProgressCallback | None = None, variant: str = "auto") -> torch.Tensor:
        """All-in-focus image [B, H, W, 3] from `image` (anything `images.to_image_batch` takes).

        variant: "plain", "pre_deblur" (`pre_deblurred` or black as the first condition) or "auto"
        (`stages.deblur_adapter` picks the adapter). A pre-deblurred image of another size is
        resized to the input's (as the reference does); its batch must be 1 or B.
        """
        settings = settings.validated()
        image = to_image_batch(image, "image")
        B, H, W, _ = image.shape
        adapter = deblur_adapter(variant, self.adapters, pre_deblurred is not None)
        self._require_adapters([adapter])

        x, size = self._padded(image)
        rows, cols = token_grid(*x.shape[-2:])
        pre = None
        if adapter == PRE_DEBLUR_ADAPTER.name:
            if pre_deblurred is None:
                pre = torch.zeros_like(x)
            else:
                pre = bhwc_to_bchw(to_image_batch(pre_deblurred, "pre-deblurred image"))
                if pre.shape[0] not in (1, B):
                    raise InputError(f"pre-deblurred image batch {pre.shape[0]} does not match the image batch {B}.")
                if pre.shape[-2:] != (H, W):
                    log.info("Resizing the pre-deblurred image from %s to %s.", tuple(pre.shape[-2:]), (H, W))
                    pre = F.interpolate(pre, size=(H, W), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
                pre = pad_to_multiple(pre.expand(B, -1, -1, -1), 16)[0]

        latents, vae_noise = self._rng(settings, B, rows, cols)
        with torch.no_grad(), self._stage(self.vae):
            conditions = []
            if pre is not None:
                conditions.append(self._encode(pre, (adapter,), PRE_DEBLUR_DELTA, vae_noise))
            conditions.append(self._encode(x, (adapter,), (0, 0), vae_noise))
        guidance = DEBLUR.guidance if settings.guidance is None else settings.guidance
        final = self._sample(DEBLUR.name, latents, conditions, rows, cols, guidance, settings, callback)
        return self._decode(final, rows, cols, size)

    def bokeh(self, aif_image, defocus_px, aperture=None, settings: SamplerSettings = SamplerSettings(seed=BOKEH.seed),
              callback: ProgressCallback | None = None, hold_unchanged: bool = True) -> torch.Tensor:
        """Refocused image [B, H, W, 3] from the all-in-focus image and the defocus map [B, H, W]
        (|K * (disparity - focus disparity)| in px, `defocus.defocus_map`; a single map serves a whole
        batch, and a single image serves a batch of maps: a still refocused frame by frame, as in a
        focus pull). Images whose defocus map is all zero (K = 0) are returned unchanged without sampling.
        `aperture`: an apertures.Aperture (anything with `.condition_image(h, w)`) -> needs the
        aperture adapter. hold_unchanged: a batch is a clip; with shared noise each frame keeps the
        previous output wherever its inputs leave it unchanged (`steady_frames.hold_unchanged`).
        """
        settings = settings.validated()
        image = to_image_batch(aif_image, "all-in-focus image")
        maps = to_map_batch(defocus_px, "defocus map", size=tuple(image.shape[1:3]))
        if image.shape[0] == 1 and maps.shape[0] > 1:
            image = image.expand(maps.shape[0], -1, -1, -1)
        B, H, W, _ = image.shape
        defocus = to_map_batch(maps, "defocus map", batch=B).float()
        if defocus.shape[-2:] != (H, W):
            raise InputError(
                f"Defocus map is {defocus.shape[-1]}x{defocus.shape[-2]} px but the image is {W}x{H}: they must match "
                f"(the map is in pixels of this image; compute it at the image's size)."
            )
        if not torch.isfinite(defocus).all():
            raise InputError("Defocus map contains NaN or infinite values.")
        if (defocus < 0).any():
            raise InputError("Defocus map has negative values; it is |K * (disparity - focus)| in pixels, >= 0.")
        in_focus = (defocus.flatten(1) == 0).all(dim=1)  # [B]
        if bool(in_focus.all()):
            return image.clone()
        adapters = [BOKEH_ADAPTER.name] + ([APERTURE_ADAPTER.name] if aperture is not None else [])
        self._require_adapters(adapters)

        x, size = self._padded(image)
        rows, cols = token_grid(*x.shape[-2:])
        d, _ = pad_to_multiple(defocus[:, None], 16)
        condition_map = network_condition(d[:, 0])  # [B, 3, Hp, Wp] in [0, 1]
        tiled = use_tiling(settings, rows, cols)

        latents, vae_noise = self._rng(settings, B, rows, cols)
        with torch.no_grad(), self._stage(self.vae):
            conditions = [
                self._encode(x, (BOKEH_ADAPTER.name,), (0, 0), vae_noise),
                self._encode(condition_map, (BOKEH_ADAPTER.name,), (0, 0), vae_noise, rgb=False),
            ]
            if aperture is not None:
                ap_rows, ap_cols = (settings.tile_size, settings.tile_size) if tiled else (rows, cols)
                shape_image = to_image_batch(aperture.condition_image(ap_rows * 16, ap_cols * 16), "aperture image")
                shape_bchw = bhwc_to_bchw(shape_image[:1]).expand(B, -1, -1, -1)
                conditions.append(self._encode(shape_bchw, (APERTURE_ADAPTER.name,), (0, -ap_cols), vae_noise, spatial=False))
        guidance = BOKEH.guidance if settings.guidance is None else settings.guidance
        final = self._sample(BOKEH.name, latents, conditions, rows, cols, guidance, settings, callback)
        out = self._decode(final, rows, cols, size)
        if bool(in_focus.any()):
            out[in_focus] = image[in_focus].to(out.dtype)
        _, shared_noise = vae_noise
        if hold_unchanged and B > 1 and shared_noise:
            out = steady_frames.hold_unchanged(out, image.to(out.dtype), defocus.to(out.dtype))
        return out

