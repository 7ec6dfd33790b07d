"""The shared tiny random FLUX (transformer + VAE) built from ../shared/fixtures/parity/tiny."""
import json
from pathlib import Path

from safetensors.torch import load_file


def build_tiny(tiny_dir: Path):
    """Tiny transformer and VAE from the shared configs and state dicts (fp32, eval, no grad)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    configs = json.loads((Path(tiny_dir) / "configs.json").read_text())
    transformer = FluxTransformer2DModel(**configs["transformer"])
    transformer.load_state_dict(load_file(str(Path(tiny_dir) / "transformer.safetensors")))
    vae = AutoencoderKL(**configs["vae"])
    vae.load_state_dict(load_file(str(Path(tiny_dir) / "vae.safetensors")))
    return transformer.eval().requires_grad_(False), vae.eval().requires_grad_(False)
