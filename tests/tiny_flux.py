"""The shared tiny random FLUX (transformer + VAE) built from ../shared/fixtures/parity/tiny."""
import json
from pathlib import Path

from safetensors.torch import load_file

# One forward of the tiny FLUX transformer as a chain of fp32 reductions (tests/numerics.py): time,
# guidance and text embedders (K up to 256, the sinusoid width) 3; per double block (2) AdaLN, LayerNorm,
# q/k/v, RMSNorm, scores, softmax (24+ tokens), P.V, out, LayerNorm, ff1, ff2 (K=128) = 11; per single
# block (2) AdaLN, LayerNorm, q/k/v+mlp, RMSNorm, scores, softmax, P.V, proj_out (K=160) = 8; output AdaLN,
# LayerNorm, projection 3 -> depth 44, K 256 (condition tokens lengthen only the softmax, K < 256).
FLUX_FORWARD_CHAIN = dict(depth=44, reduction=256)


def build_tiny(tiny_dir: Path):
    """Tiny transformer and VAE from the shared configs and state dicts (fp32, eval, no grad)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    configs = json.loads((Path(tiny_dir) / "configs.json").read_text())
    transformer = FluxTransformer2DModel(**configs["transformer"])
    transformer.load_state_dict(load_file(str(Path(tiny_dir) / "transformer.safetensors")))
    vae = AutoencoderKL(**configs["vae"])
    vae.load_state_dict(load_file(str(Path(tiny_dir) / "vae.safetensors")))
    return transformer.eval().requires_grad_(False), vae.eval().requires_grad_(False)
