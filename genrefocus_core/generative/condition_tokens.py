"""Images <-> FLUX latent tokens, and the position ids of the unified token sequence.

FLUX works on 2x2-packed latents: a VAE latent [B, 16, h, w] (h = H/8, w = W/8) becomes
[B, (h/2)*(w/2), 64] tokens in row-major order. Each token has a position id
(0, row, col) on the packed grid; a condition image shares the grid, shifted by its
position delta (OminiControl's way of telling conditions apart, e.g. (0, 32) for the
pre-deblurred image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

VAE_SCALE = 8          # pixels per latent cell
PIXELS_PER_TOKEN = 16  # pixels per packed token side (8x VAE, 2x2 packing)


@dataclass
class ConditionTokens:
    """One condition branch: packed tokens [B, L, 64], position ids [L, 3], the LoRA adapter
    names applied to this branch (scale 1 each), and whether tiles slice it spatially."""

    tokens: torch.Tensor
    ids: torch.Tensor
    adapters: tuple[str, ...]
    spatial: bool = True


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), C*4] (row-major 2x2 patches)."""
    B, C, h, w = latents.shape
    x = latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, rows*cols, C*4] -> [B, C, 2*rows, 2*cols] (inverse of `pack_latents`)."""
    B, L, D = tokens.shape
    C = D // 4
    x = tokens.view(B, rows, cols, C, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, rows * 2, cols * 2)


def position_ids(rows: int, cols: int, delta=(0, 0), device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [rows*cols, 3] = (0, row + delta_row, col + delta_col), row-major."""
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None] + delta[0]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :] + delta[1]
    return ids.reshape(rows * cols, 3)


def token_grid(height: int, width: int) -> tuple[int, int]:
    """Packed token grid (rows, cols) of an image of height x width px (multiples of 16)."""
    return height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN


class DiffusersVae:
    """The VAE codec over diffusers' AutoencoderKL of FLUX. A codec is what the stages need of a VAE:
    `dtype`, `shift_factor`, `scaling_factor`, `encode_posterior(x) -> (mean, std)` of the latent
    posterior for x [B, 3, H, W] in the VAE's input range, and `decode_image(z) -> [B, 3, 8h, 8w]` in
    [0, 1] from raw latents z. Other front ends (ComfyUI's VAE) provide their own codec."""

    def __init__(self, vae):
        self.vae = vae
        self.shift_factor = vae.config.shift_factor
        self.scaling_factor = vae.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode_posterior(self, x: torch.Tensor):
        dist = self.vae.encode(x.to(dtype=self.dtype)).latent_dist
        return dist.mean, dist.std

    def decode_image(self, z: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(z.to(dtype=self.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


def vae_codec(vae):
    """A VAE codec for `vae`: a codec as is, a diffusers AutoencoderKL wrapped in `DiffusersVae`."""
    return vae if hasattr(vae, "encode_posterior") else DiffusersVae(vae)


def vae_encode(vae, images_bchw: torch.Tensor, generator: torch.Generator | None = None,
               shared_noise: bool = False) -> torch.Tensor:
    """VAE-encode [B, 3, H, W] (in the VAE's input range, on the execution device) and draw one posterior sample
    -> normalised latents `(z - shift) * scale` [B, 16, H/8, W/8].

    generator None draws from the global torch RNG (the reference's protocol: diffusers' `sample()`).
    shared_noise: one posterior noise for every image of the batch, drawn as for a batch of one (with a
    generator).
    """
    codec = vae_codec(vae)
    # inputs stay on their device (the execution device; offload hooks bring the weights there)
    mean, std = codec.encode_posterior(images_bchw)
    if generator is None:
        noise = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device)
    else:
        shape = (1, *mean.shape[1:]) if shared_noise else mean.shape
        noise = torch.randn(shape, generator=generator, dtype=mean.dtype,
                            device=generator.device).to(mean.device)
    z = mean + std * noise
    return (z - codec.shift_factor) * codec.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, h, w] (on the execution device) -> image [B, 3, 8h, 8w] in [0, 1]."""
    codec = vae_codec(vae)
    return codec.decode_image(latents / codec.scaling_factor + codec.shift_factor)


def encode_condition(vae, images_bchw: torch.Tensor, adapters, delta=(0, 0), *, rgb: bool = True,
                     generator: torch.Generator | None = None, spatial: bool = True,
                     shared_noise: bool = False) -> ConditionTokens:
    """A condition image [B, 3, H, W] -> ConditionTokens on the image grid shifted by `delta`.

    rgb=True maps [0, 1] to the VAE's [-1, 1] (as the reference's image preprocessing does);
    rgb=False feeds the values raw (the defocus-map condition).
    """
    x = images_bchw * 2.0 - 1.0 if rgb else images_bchw
    latents = vae_encode(vae, x, generator, shared_noise)
    tokens = pack_latents(latents)
    rows, cols = latents.shape[-2] // 2, latents.shape[-1] // 2
    ids = position_ids(rows, cols, delta, device=tokens.device)
    if isinstance(adapters, str):
        adapters = (adapters,)
    return ConditionTokens(tokens=tokens, ids=ids, adapters=tuple(adapters), spatial=spatial)
