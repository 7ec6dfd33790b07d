"""Flow-matching sampling as GenRefocus runs it: schedule, dynamic shift, Euler steps, tiled
denoising, initial noise and the sampler settings.

Schedule (FLUX.1-dev settings): sigmas linspace(1, 1/N, N), shifted by
`e^mu / (e^mu + 1/sigma - 1)` with mu from the WHOLE image's token count (also when tiling),
computed in float32 exactly as diffusers' FlowMatchEulerDiscreteScheduler does; timesteps are
sigma * 1000 and the Euler step is `x + (sigma_next - sigma) * prediction`.

Tiled denoising (the reference's high-resolution mode): the packed latent grid is covered by
square tiles of `tile_size` tokens with `tile_overlap` tokens of overlap (defaults 32 and 4, the
reference's 512 px tiles with stride 28); tile starts are 0, stride, 2*stride, ... below
L - tile_size + 1, plus L - tile_size when the last tile falls short; width start outer, height
start inner. Every tile (and every spatial condition slice) gets the same fixed tile_size x
tile_size position grid, so absolute positions and condition position deltas play no role inside
tiles. Predictions are blended with weights exp(-(x^2 + y^2)), x, y = linspace(-2, 2, tile_size),
as a weighted average. Other tile sizes/overlaps generalise these rules unchanged.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from .condition_tokens import position_ids, unpack_latents
from ..basics.errors import InputError
from .flux_layouts import layout_of
from .multi_branch_forward import RunConstants, multi_branch_forward, rotary_embedding

# FlowMatchEulerDiscreteScheduler settings of FLUX.1-dev.
BASE_IMAGE_SEQ_LEN = 256
MAX_IMAGE_SEQ_LEN = 4096
BASE_SHIFT = 0.5
MAX_SHIFT = 1.15
NUM_TRAIN_TIMESTEPS = 1000

# The reference CLI turns tiling off when the image's short side is below this (px).
AUTO_TILING_MIN_SIDE_PX = 512

ProgressCallback = Callable[[int, int, torch.Tensor], None]
BATCH_NOISE = ("shared", "independent")


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample one stage.

    steps: denoising steps (>= 1; the paper uses 28).
    seed: seed of the initial noise (None: a fresh random seed, see `resolve_seed`).
    tiled: "auto" (tiles when the short side is >= 512 px and the grid holds a tile, the
        reference CLI's rule), True (always; the image must hold one tile) or False.
    tile_size / tile_overlap: tile side and overlap in packed tokens (16 px each).
    tile_batch: tiles sent through the transformer together (more = more memory, same result).
    noise: explicit initial noise [B, 16, H/8, W/8] (or packed [B, H*W/256, 64]) instead of a seed.
    rng: "local" (default): one torch.Generator seeded with `seed` draws the initial noise and
        then the conditions' VAE posterior samples; the global RNG is not touched.
        "reference": the official scripts' protocol, for bit-exact comparison with them: the
        global torch RNG is seeded with `reference_global_seed` (their seed_everything(42));
        the initial noise comes from torch.Generator("cpu").manual_seed(seed) when seed is given
        (the bokeh script: 1234), else from the global RNG (the deblur script); the VAE samples
        come from the global RNG in condition order.
    guidance: FLUX guidance-embedding scale; None = the stage's default (deblur 3.5, bokeh 1.0).
    batch_noise: "shared" (default): every image of a batch is sampled from the noise (initial and
        VAE posterior) that a batch of one gets from this seed, so image i equals a run on image i
        alone and the frames of a clip (a focus pull) differ only where their inputs differ;
        "independent": one draw for the whole batch, every image its own noise. The "reference"
        protocol always draws independently, as the official scripts do.
    """

    steps: int = 28
    seed: int | None = None
    tiled: str | bool = "auto"
    tile_size: int = 32
    tile_overlap: int = 4
    tile_batch: int = 1
    noise: torch.Tensor | None = None
    rng: str = "local"
    reference_global_seed: int = 42
    guidance: float | None = None
    batch_noise: str = "shared"

    def validated(self) -> "SamplerSettings":
        """Check every field; raise InputError with the reason."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise InputError(f"Number of steps must be a whole number >= 1, got {self.steps!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= int(self.seed) < 2**64):
            raise InputError(f"Seed must be a whole number in [0, 2^64) or None, got {self.seed!r}.")
        if self.tiled not in ("auto", True, False):
            raise InputError(f"tiled must be 'auto', True or False, got {self.tiled!r}.")
        if not isinstance(self.tile_size, (int, np.integer)) or not 4 <= self.tile_size <= 512:
            raise InputError(f"tile_size must be a whole number of tokens in [4, 512], got {self.tile_size!r}.")
        if not isinstance(self.tile_overlap, (int, np.integer)) or not 0 <= self.tile_overlap < self.tile_size:
            raise InputError(f"tile_overlap must be in [0, tile_size), got {self.tile_overlap!r}.")
        if not isinstance(self.tile_batch, (int, np.integer)) or self.tile_batch < 1:
            raise InputError(f"tile_batch must be a whole number >= 1, got {self.tile_batch!r}.")
        if self.rng not in ("local", "reference"):
            raise InputError(f"rng must be 'local' or 'reference', got {self.rng!r}.")
        if self.batch_noise not in BATCH_NOISE:
            raise InputError(f"batch_noise must be one of {', '.join(BATCH_NOISE)}, got {self.batch_noise!r}.")
        if self.guidance is not None and not (isinstance(self.guidance, (int, float)) and math.isfinite(self.guidance)):
            raise InputError(f"guidance must be a finite number or None, got {self.guidance!r}.")
        if self.noise is not None and not isinstance(self.noise, torch.Tensor):
            raise InputError(f"noise must be a torch tensor or None, got {type(self.noise).__name__}.")
        return self

    def with_seed(self, seed: int) -> "SamplerSettings":
        return replace(self, seed=seed)


def calculate_shift(image_seq_len: int, base_seq_len: int = BASE_IMAGE_SEQ_LEN, max_seq_len: int = MAX_IMAGE_SEQ_LEN,
                    base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """Dynamic-shift mu, linear in the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_match_schedule(steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (sigmas [steps + 1] float32 ending in 0, timesteps [steps] float32 = sigmas * 1000)."""
    if steps < 1:
        raise InputError(f"Number of steps must be >= 1, got {steps}.")
    mu = calculate_shift(image_seq_len)
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    # float32 arithmetic, as diffusers' scheduler does it (numpy keeps float32 with Python scalars)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    sigmas = torch.from_numpy(np.asarray(sigmas, dtype=np.float32))
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return torch.cat([sigmas, torch.zeros(1)]), timesteps


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles along one axis of `length` tokens."""
    stride = tile - overlap
    starts = list(range(0, max(1, length - tile + 1), stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def tile_origins(rows: int, cols: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(row, col) of every tile's top-left token, width start outer, height start inner."""
    return [(r, c) for c in tile_starts(cols, tile, overlap) for r in tile_starts(rows, tile, overlap)]


def tile_weights(tile: int) -> torch.Tensor:
    """Blending weights [tile * tile] = exp(-(x^2 + y^2)), x, y = linspace(-2, 2, tile), row-major."""
    d = torch.linspace(-2, 2, tile, dtype=torch.float32)
    return torch.exp(-(d[:, None] ** 2 + d[None] ** 2)).flatten()


def tile_token_index(origin: tuple[int, int], tile: int, cols: int) -> torch.Tensor:
    """Indices [tile * tile] of a tile's tokens in the row-major packed sequence."""
    r0, c0 = origin
    rows = torch.arange(r0, r0 + tile)
    columns = torch.arange(c0, c0 + tile)
    return (rows[:, None] * cols + columns[None, :]).flatten()


def use_tiling(settings: SamplerSettings, rows: int, cols: int) -> bool:
    """Whether to tile a packed grid of rows x cols tokens (16 px each) under `settings`."""
    T = settings.tile_size
    fits = rows >= T and cols >= T
    if settings.tiled == "auto":
        return fits and min(rows, cols) * 16 >= AUTO_TILING_MIN_SIDE_PX
    if settings.tiled and not fits:
        raise InputError(
            f"Tiled sampling needs an image of at least {T * 16}x{T * 16} px (one tile of {T}x{T} tokens); "
            f"this one is {cols * 16}x{rows * 16} px after padding. Use tiled='auto' or False, or a smaller tile_size."
        )
    return bool(settings.tiled)


def resolve_seed(seed: int | None) -> int:
    """A given seed as is; None -> a fresh random seed (so that it can be reported and reused)."""
    return int(seed) if seed is not None else secrets.randbits(63)


def initial_noise(batch: int, rows: int, cols: int, generator: torch.Generator | None,
                  channels: int = 16) -> torch.Tensor:
    """Initial latents [B, 16, 2*rows, 2*cols] (float32, CPU), drawn like diffusers' FLUX pipeline
    (unpacked shape), from `generator` or, if None, the global torch RNG."""
    return torch.randn(batch, channels, 2 * rows, 2 * cols, generator=generator, dtype=torch.float32)


def check_noise(noise: torch.Tensor, batch: int, rows: int, cols: int, channels: int = 16) -> torch.Tensor:
    """User-given initial noise -> [B, 16, 2*rows, 2*cols]; a single noise is used for every image."""
    if noise.ndim == 3 and noise.shape[1:] == (rows * cols, channels * 4):
        noise = unpack_latents(noise, rows, cols)
    if noise.ndim != 4 or noise.shape[1:] != (channels, 2 * rows, 2 * cols):
        raise InputError(
            f"Initial noise must be [B, {channels}, {2 * rows}, {2 * cols}] (or packed [B, {rows * cols}, {channels * 4}]) "
            f"for this image size, got {tuple(noise.shape)}."
        )
    if noise.shape[0] not in (1, batch):
        raise InputError(f"Initial noise has batch {noise.shape[0]}, the image batch is {batch}.")
    if not torch.isfinite(noise).all():
        raise InputError("Initial noise contains NaN or infinite values.")
    return noise.float().expand(batch, -1, -1, -1)


@dataclass(frozen=True)
class SequenceSize:
    """The size of one stage's transformer forwards, for memory estimates: `batch` images of
    `image_tokens` tokens with `conditions` condition branches (each as long as the image, or as one
    tile) and `text_tokens` of text; tiled: `tile_tokens` per tile, `tile_batch` tiles per forward."""

    batch: int
    image_tokens: int
    conditions: int
    text_tokens: int
    tile_tokens: int | None = None
    tile_batch: int = 1

    @property
    def sequences(self) -> int:
        """Sequences in one forward."""
        return self.batch * (self.tile_batch if self.tile_tokens else 1)

    @property
    def sequence_tokens(self) -> int:
        """Tokens of one sequence: text + image (or tile) + conditions."""
        image = self.tile_tokens or self.image_tokens
        return self.text_tokens + image * (1 + self.conditions)


@dataclass
class DenoiseInputs:
    """Everything the denoising loop needs besides the latents.

    text_ids [T, 3]; image grid rows x cols (packed tokens); cond_ids: per condition [Lc, 3]
    (already shifted by its position delta); cond_spatial: per condition, whether tiles slice it."""

    constants: RunConstants
    text_ids: torch.Tensor
    rows: int
    cols: int
    cond_ids: list[torch.Tensor]
    cond_spatial: list[bool]
    guidance: float | None


def denoise(transformer, latents: torch.Tensor, inputs: DenoiseInputs, settings: SamplerSettings,
            callback: ProgressCallback | None = None,
            prediction_hook: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the Euler sampler from packed latents [B, L, 64] -> final packed latents [B, L, 64] (float32).

    callback(step, total, latents [B, 16, 2*rows, 2*cols]) is called after each step with the
    number of completed steps; an exception raised there (e.g. errors.Interrupted) stops sampling.
    prediction_hook(step index, noise prediction [B, L, 64]) sees each step's (blended) prediction.
    """
    settings.validated()
    transformer = layout_of(transformer)  # once per run (a BFL layout maps its modules once)
    B, L, _ = latents.shape
    rows, cols = inputs.rows, inputs.cols
    if L != rows * cols:
        raise ValueError(f"latents have {L} tokens, the grid {rows}x{cols} needs {rows * cols}.")
    dtype = inputs.constants.text_hidden.dtype
    device = inputs.constants.text_hidden.device
    sigmas, timesteps = flow_match_schedule(int(settings.steps), rows * cols)
    sigmas, timesteps = sigmas.to(device), timesteps.to(device)
    tiled = use_tiling(settings, rows, cols)
    latents = latents.to(device=device, dtype=torch.float32)

    if tiled:
        T = settings.tile_size
        fixed_ids = position_ids(T, T, device=device)
        cond_ids = [fixed_ids if sp else ids.to(device) for ids, sp in zip(inputs.cond_ids, inputs.cond_spatial)]
        rope = rotary_embedding(transformer, inputs.text_ids.to(device), fixed_ids, cond_ids)
        origins = tile_origins(rows, cols, T, settings.tile_overlap)
        indices = [tile_token_index(o, T, cols).to(device) for o in origins]
        weights = tile_weights(T).to(device)
        batches = [indices[i:i + settings.tile_batch] for i in range(0, len(indices), settings.tile_batch)]
        batch_constants = [inputs.constants.tiles(b, inputs.cond_spatial) for b in batches]
    else:
        image_ids = position_ids(rows, cols, device=device)
        rope = rotary_embedding(transformer, inputs.text_ids.to(device), image_ids, [i.to(device) for i in inputs.cond_ids])
        constants = inputs.constants.whole()

    guidance_value = inputs.guidance
    total = int(settings.steps)
    for i in range(total):
        # the reference passes t / 1000 in the model's dtype; the forward multiplies by 1000 again
        t = timesteps[i].to(dtype) / 1000
        if tiled:
            pred = torch.zeros_like(latents)
            weight_sum = torch.zeros(B, L, device=device, dtype=torch.float32)
            for batch_idx, cst in zip(batches, batch_constants):
                k = len(batch_idx)
                tile_latents = torch.cat([latents[:, idx] for idx in batch_idx], dim=0)  # [k*B, T*T, 64]
                n_seq = k * B
                g = None if guidance_value is None else torch.full((n_seq,), float(guidance_value), device=device)
                out = multi_branch_forward(transformer, tile_latents.to(dtype), t.expand(n_seq), g, cst, rope)
                out = out.float().unflatten(0, (k, B))
                for j, idx in enumerate(batch_idx):
                    pred[:, idx] += out[j] * weights[None, :, None]
                    weight_sum[:, idx] += weights
            pred = pred / weight_sum[..., None]
        else:
            g = None if guidance_value is None else torch.full((B,), float(guidance_value), device=device)
            pred = multi_branch_forward(transformer, latents.to(dtype), t.expand(B), g, constants, rope).float()
        if prediction_hook is not None:
            prediction_hook(i, pred)
        latents = latents + (sigmas[i + 1] - sigmas[i]) * pred
        if callback is not None:
            callback(i + 1, total, unpack_latents(latents, rows, cols))
    return latents
