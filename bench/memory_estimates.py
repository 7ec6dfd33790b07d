"""Expected peak GPU memory of each memory mode at 1024x1024, from parameter counts and activation sizes.

    python bench/memory_estimates.py              # measure activation factors (about a minute), print tables
    python bench/memory_estimates.py --no-measure # use the factors recorded in bench/README_memory.md
    python bench/memory_estimates.py --size 1536 --tile-batch 2

Weights: FLUX.1-dev 11.9 B parameters (of which the block Linear layers are stored in fp8 in "low"
mode, counted exactly from the shipped config), T5-XXL 4.7 B, CLIP-L 123 M, VAE 84 M, Depth Pro
952 M, LoRA rank x 3.62 M (DeblurNet rank 128, BokehNet rank 64). Model offload brings only the
adapter a stage calls (memory.model_on_device), so a stage holds one LoRA.

Activations: one transformer forward holds `factor x tokens x hidden` activation elements at its peak.
The factor is measured here with an allocation tracker (a TorchDispatchMode counting live tensor
storage) around one call of the project's multi-branch forward on a mid-size random FLUX (hidden 512,
2 double + 2 single blocks, rank-64 LoRA) at exactly the token counts of one 1024-px tile
(text 512 + image 1024 + 1024 per condition), and applied to FLUX's hidden size 3072. Attention runs
through SDPA kernels that never materialise the score matrix (CPU flash / CUDA memory-efficient), so
the factor does not grow with the sequence length. The VAE's activation factor (bytes per output pixel)
is measured the same way on the real FLUX VAE architecture at 256 px and scaled with the pixel count.
A fixed 0.6 GiB is added per stage for the CUDA context and allocator slack.

In ComfyUI the stages run on ComfyUI's own FLUX MODEL (`comfyui_estimate`): weights in the storage of the
file a user loads (bf16, fp8 e4m3fn, GGUF Q8_0 = 34 bytes per 32 weights, Q4_0 = 18 bytes per 32), the
LoRA adapters in bf16 beside them, layers cast to bf16 one at a time by ComfyUI's ops (one copy of the
largest layer), ComfyUI's reserve (0.4 GiB) and the same activations. Two figures per storage: all weights
resident, and the floor with ComfyUI's partial loading (--lowvram / a smaller card: the weights that do not
fit stay in RAM and are streamed per layer, so the GPU holds activations, adapters, one cast layer and
whatever weights fit).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1024 ** 3
PARAMS = {"flux": 11.9e9, "t5": 4.7e9, "clip": 123e6, "vae": 84e6, "depth_pro": 952e6}
LORA_PER_RANK = 3.62e6
RANKS = {"deblur": 128, "bokeh": 64}
FLUX_HIDDEN = 3072
CUDA_OVERHEAD_GIB = 0.6
# Recorded by this script (see README_memory.md); used with --no-measure.
RECORDED = {"transformer_factor_deblur": 14.4, "transformer_factor_bokeh": 14.6, "vae_bytes_per_pixel_bf16": 1536.0}
DEPTH_PRO_ACTIVATIONS_GIB = 1.5  # assumed (not measured): ViT-L patch batches at 1536 px in fp16
CARDS = {"24 GB card": 24.0, "16 GB card": 16.0}
# bytes per FLUX parameter in the files ComfyUI users load (GGUF: blocks of 32 weights + an fp16 scale)
COMFY_STORAGE = {"bf16 (UNETLoader default)": 2.0, "fp8_e4m3fn (UNETLoader)": 1.0,
                 "GGUF Q8_0 (UnetLoaderGGUF)": 34 / 32, "GGUF Q4_0 (UnetLoaderGGUF)": 18 / 32}
COMFY_RESERVE_GIB = 0.4  # comfy.model_management.EXTRA_RESERVED_VRAM


# ------------------------------------------------------------------------------------------------
# allocation tracker

class AllocationTracker(torch.utils._python_dispatch.TorchDispatchMode):
    """Live bytes of tensor storage created inside the mode (storages that existed before are ignored)."""

    def __init__(self, ignore=()):
        super().__init__()
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.live: dict = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for t in flat:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = t.untyped_storage().data_ptr()
            if key == 0 or key in self.ignore:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [t.untyped_storage().nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.live[key]
            self.current -= entry[0]


# ------------------------------------------------------------------------------------------------
# measurements

def _mid_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                  attention_head_dim=64, num_attention_heads=8, joint_attention_dim=256,
                                  pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28)).eval()


def _random_lora_file(model, rank: int, path: Path):
    """A LoRA of the released layout (25 module kinds) for `model`, random weights."""
    import re

    from safetensors.torch import save_file

    pattern = re.compile(r"x_embedder|transformer_blocks\.\d+\.(norm1\.linear|attn\.to_[qkv]|attn\.to_out\.0|ff\.net\.2)"
                         r"|single_transformer_blocks\.\d+\.(norm\.linear|proj_mlp|proj_out|attn\.to_[qkv])")
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or pattern.fullmatch(name) is None:
            continue
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / rank
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    save_file(tensors, str(path))


@torch.no_grad()
def measure_transformer_factor(n_conditions: int, dtype=torch.float32) -> tuple[float, float]:
    """Peak transient activation elements of one forward / (tokens x hidden), and seconds taken."""
    from genrefocus_core.generative import lora as lora_files
    from genrefocus_core.generative.multi_branch_forward import multi_branch_forward, prepare_constants, rotary_embedding
    from genrefocus_core.generative.condition_tokens import position_ids

    model = _mid_flux()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "lora.safetensors"
        _random_lora_file(model, 64, path)
        lora_files.load_lora(model, path, "bokeh")
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    rows = cols = 32  # one 1024-px tile: 32x32 packed tokens
    L, T = rows * cols, 512
    g = torch.Generator().manual_seed(0)
    prompt = torch.randn(1, T, model.config.joint_attention_dim, generator=g, dtype=dtype)
    pooled = torch.randn(1, model.config.pooled_projection_dim, generator=g, dtype=dtype)
    conds = [torch.randn(1, L, 64, generator=g, dtype=dtype) for _ in range(n_conditions)]
    constants = prepare_constants(model, prompt, pooled, conds, [("bokeh",)] * n_conditions, dtype).whole()
    ids = position_ids(rows, cols)
    rope = rotary_embedding(model, torch.zeros(T, 3), ids, [ids] * n_conditions)
    latents = torch.randn(1, L, 64, generator=g, dtype=dtype)
    t, guidance = torch.tensor([0.5], dtype=dtype), torch.tensor([3.5])
    keep = list(model.parameters()) + list(model.buffers()) + [latents, prompt, pooled, *conds, *rope,
                                                               constants.text_hidden]
    keep += [c for c in (constants.cond_hidden, constants.cond_temb) if c is not None]
    start = time.perf_counter()
    with AllocationTracker(ignore=keep) as tracker:
        out = multi_branch_forward(model, latents, t, guidance, constants, rope)
    seconds = time.perf_counter() - start
    tokens = T + L * (1 + n_conditions)
    elements = (tracker.peak - out.numel() * out.element_size()) / torch.tensor([], dtype=dtype).element_size()
    return elements / (tokens * hidden), seconds


@torch.no_grad()
def measure_vae_bytes_per_pixel(size: int = 256) -> float:
    """Peak transient bytes of VAE encode and decode at `size` px (fp32 run, reported for bf16) / pixels."""
    from diffusers import AutoencoderKL

    from genrefocus_core.generative.flux_loading import FLUX_DEV_VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(FLUX_DEV_VAE_CONFIG))).eval()
    x = torch.rand(1, 3, size, size) * 2 - 1
    z = torch.randn(1, 16, size // 8, size // 8)
    keep = list(vae.parameters()) + list(vae.buffers()) + [x, z]
    peak = 0
    for run in (lambda: vae.encode(x).latent_dist.mean, lambda: vae.decode(z).sample):
        with AllocationTracker(ignore=keep) as tracker:
            run()
        peak = max(peak, tracker.peak)
    return peak / 2 / (size * size)  # fp32 -> bf16 bytes


# ------------------------------------------------------------------------------------------------
# the estimate

def flux_fp8_split():
    """(parameters stored in fp8 in "low" mode, parameters kept in bf16), from the shipped config."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from genrefocus_core.generative.flux_loading import FLUX_DEV_TRANSFORMER_CONFIG
    from genrefocus_core.generative.memory import default_fp8_filter

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(FLUX_DEV_TRANSFORMER_CONFIG)))
    fp8 = sum(m.weight.numel() for n, m in model.named_modules()
              if type(m) is torch.nn.Linear and default_fp8_filter(n, m))
    total = sum(p.numel() for p in model.parameters())
    largest = max(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return fp8, total - fp8, largest


def estimate(size: int, tile_batch: int, factors: dict, untiled: bool = False) -> dict:
    fp8_params, bf16_params, largest_linear = flux_fp8_split()
    scale = PARAMS["flux"] / (fp8_params + bf16_params)  # the design figure 11.9 B vs the exact count
    rows = cols = size // 16
    tiled = min(rows, cols) >= 32 and not untiled  # the "auto" rule: tiles from a 512-px short side
    tile_tokens = 32 * 32 if tiled else rows * cols
    text = 512
    per_stage = {}
    for stage, n_cond in (("deblur", 1), ("bokeh", 2)):
        tokens = text + tile_tokens * (1 + n_cond)
        act = factors[f"transformer_factor_{stage}"] * tokens * FLUX_HIDDEN * 2 * (tile_batch if tiled else 1)
        lora = RANKS[stage] * LORA_PER_RANK * 2
        per_stage[stage] = {"tokens": tokens, "act": act, "lora": lora}
    vae_act = factors["vae_bytes_per_pixel_bf16"] * size * size
    largest_bf16 = largest_linear * 2

    rows_out = {}
    for mode in ("default", "low", "sequential"):
        stages = {}
        # text encoders: first run only (then cached). Sequential mode encodes on the CPU.
        enc = 0.0 if mode == "sequential" else (PARAMS["t5"] + PARAMS["clip"]) * 2 + 0.1 * GIB
        stages["encode prompts (first run)"] = (enc, 0.0)
        for stage in ("deblur", "bokeh"):
            s = per_stage[stage]
            if mode == "default":
                w = PARAMS["flux"] * 2 + s["lora"]
            elif mode == "low":
                w = fp8_params * scale * 1 + bf16_params * scale * 2 + s["lora"] + largest_bf16
            else:  # one leaf module (and its LoRA pair) at a time
                w = largest_bf16 + 2 * RANKS[stage] * 15360 * 2
            stages[f"{stage} (transformer)"] = (w, s["act"])
        stages["depth (Depth Pro fp16)*"] = (PARAMS["depth_pro"] * 2, DEPTH_PRO_ACTIVATIONS_GIB * GIB)
        stages["VAE encode/decode"] = (PARAMS["vae"] * 2, vae_act)
        rows_out[mode] = stages
    return {"rows": rows_out, "tiled": tiled, "tile_tokens": tile_tokens, "per_stage": per_stage,
            "fp8_params": fp8_params, "bf16_params": bf16_params}


def comfyui_estimate(result: dict) -> dict:
    """{storage: {stage: (all resident GiB, partial-loading floor GiB)}} for ComfyUI's own FLUX MODEL."""
    _, _, largest_linear = flux_fp8_split()
    cast = largest_linear * 2  # one layer upcast to bf16 at a time (not needed for bf16 storage)
    out = {}
    for storage, per_param in COMFY_STORAGE.items():
        stages = {}
        for stage, s in result["per_stage"].items():
            floor = s["act"] + s["lora"] + (cast if per_param != 2.0 else 0) + (CUDA_OVERHEAD_GIB + COMFY_RESERVE_GIB) * GIB
            stages[stage] = ((floor + PARAMS["flux"] * per_param) / GIB, floor / GIB)
        out[storage] = stages
    return out


def print_comfyui(result: dict):
    print("\nIn ComfyUI, on its own FLUX MODEL (GiB; all weights resident / floor with ComfyUI's partial loading)")
    print(f"  {'storage':30s} {'deblur':>15s} {'bokeh':>15s}  fits")
    for storage, stages in comfyui_estimate(result).items():
        worst = max(v[0] for v in stages.values())
        fits = ", ".join(f"{card}: {'resident' if worst <= gib else 'partial'}" for card, gib in CARDS.items())
        print(f"  {storage:30s} " + " ".join(f"{stages[s][0]:6.2f} / {stages[s][1]:5.2f}" for s in ("deblur", "bokeh"))
              + f"  {fits}")


def print_tables(result: dict, size: int, tile_batch: int, factors: dict):
    print(f"\nPeak GPU memory at {size}x{size}, {'tiled 32x32-token tiles' if result['tiled'] else 'untiled'}"
          f"{f', {tile_batch} tiles per forward' if result['tiled'] and tile_batch > 1 else ''} "
          f"(GiB; + {CUDA_OVERHEAD_GIB} GiB CUDA context/allocator per stage)")
    print(f"tokens per forward: deblur {result['per_stage']['deblur']['tokens']}, "
          f"bokeh {result['per_stage']['bokeh']['tokens']}; activation factors: deblur "
          f"{factors['transformer_factor_deblur']:.1f}, bokeh {factors['transformer_factor_bokeh']:.1f} "
          f"x tokens x 3072 elements; VAE {factors['vae_bytes_per_pixel_bf16']:.0f} B/pixel")
    print(f"FLUX parameters stored in fp8 in 'low' mode: {result['fp8_params'] / 1e9:.2f} B; kept in bf16: "
          f"{result['bf16_params'] / 1e9:.3f} B")
    for mode, stages in result["rows"].items():
        print(f"\nmode '{mode}'")
        print(f"  {'stage':30s} {'weights':>8s} {'activ.':>8s} {'peak':>8s}")
        peaks = []
        for stage, (w, a) in stages.items():
            peak = (w + a) / GIB + (CUDA_OVERHEAD_GIB if w > 0 else 0.0)
            if stage.startswith("encode"):
                first_run = peak
            else:
                peaks.append(peak)
            print(f"  {stage:30s} {w / GIB:8.2f} {a / GIB:8.2f} {peak:8.2f}")
        worst = max(peaks)
        fits = ", ".join(f"{card}: {'fits' if worst <= gib else 'DOES NOT FIT'}" for card, gib in CARDS.items())
        print(f"  => peak {worst:.2f} GiB (first run with prompt encoding: {max(worst, first_run):.2f} GiB); {fits}")
    print(f"\n* Depth Pro activations assumed {DEPTH_PRO_ACTIVATIONS_GIB} GiB (not measured here).")
    print("mode 'fp32' runs on the CPU: RAM ~ FLUX 44.3 GiB + LoRAs + VAE; GPU 0.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="square image side in px (default 1024)")
    ap.add_argument("--tile-batch", type=int, default=1, help="tiles per transformer call")
    ap.add_argument("--untiled", action="store_true", help="one forward over the whole image (tiled=False)")
    ap.add_argument("--no-measure", action="store_true", help="use the recorded activation factors")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    factors = dict(RECORDED)
    if not args.no_measure:
        for stage, n in (("deblur", 1), ("bokeh", 2)):
            f, s = measure_transformer_factor(n)
            factors[f"transformer_factor_{stage}"] = f
            print(f"measured {stage} activation factor {f:.2f} (one mid-size forward, {s:.1f} s)")
        t0 = time.perf_counter()
        factors["vae_bytes_per_pixel_bf16"] = measure_vae_bytes_per_pixel()
        print(f"measured VAE activations {factors['vae_bytes_per_pixel_bf16']:.0f} B/pixel in bf16 "
              f"({time.perf_counter() - t0:.1f} s)")
    result = estimate(args.size, args.tile_batch, factors, args.untiled)
    print_tables(result, args.size, args.tile_batch, factors)
    print_comfyui(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
