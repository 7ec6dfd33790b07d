"""Seconds per denoising step on ComfyUI's FLUX layout (BFL: fused qkv, linear1/linear2, LoRA as deltas on
output slices, `flux_layouts.BflLayout`) against the diffusers layout (separate projections, peft adapters),
on the same mid-size random FLUX (bench_step.MID_CONFIG, rank-64 LoRA), fp32 on the CPU.

Both sides run the same `sampling.denoise` step from the same inputs; the BFL model is the diffusers one's
weights converted to BFL's layout (tests/flux_files.py) in plain torch modules with ComfyUI's attribute
names (tests/bfl_flux.py), so the timing compares the two layout adapters, not ComfyUI's ops. Sides alternate
at every repetition, who goes first too (load from other processes hits both alike); medians are printed with the outputs'
largest difference (must be below 1e-4).

    python bench/bench_native_step.py --threads 2 --repeats 7
    python bench/bench_native_step.py --sizes 512 1024 --stages bokeh deblur
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_step import MID_CONFIG, STAGES, TEXT_TOKENS, make_model  # noqa: E402
from bfl_flux import BflFlux  # noqa: E402
from flux_files import diffusers_to_bfl_transformer  # noqa: E402

from genrefocus_core.generative.condition_tokens import position_ids  # noqa: E402
from genrefocus_core.generative.flux_layouts import BflLayout  # noqa: E402
from genrefocus_core.generative.lora_slices import LoraSlices  # noqa: E402
from genrefocus_core.generative.multi_branch_forward import prepare_constants  # noqa: E402
from genrefocus_core.generative.sampling import DenoiseInputs, SamplerSettings, denoise  # noqa: E402


def bfl_twin(model, config, lora_path) -> BflLayout:
    from genrefocus_core.generative.lora import base_module
    plain = {name: base_module(m) for name, m in model.named_modules()}
    sd = {}
    for name, m in plain.items():  # the base weights (peft's wrappers hold them under base_layer)
        for pname, p in m.named_parameters(recurse=False):
            if ".lora_" not in name:
                sd[f"{name}.{pname}" if name else pname] = p.detach()
    sd = {k.replace(".base_layer", ""): v for k, v in sd.items()}
    bfl = BflFlux(config)
    bfl.load_state_dict(diffusers_to_bfl_transformer(sd, config["num_layers"], config["num_single_layers"]))
    bfl.eval().requires_grad_(False)
    slices = LoraSlices(bfl)
    slices.load_file(lora_path, "bokeh")
    return BflLayout(bfl, slices)


def step(model, stage: str, size: int, config: dict) -> torch.Tensor:
    n, guidance = STAGES[stage]
    rows = cols = size // 16
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, rows * cols, 64, generator=g)
    conds = [torch.randn(1, rows * cols, 64, generator=g) for _ in range(n)]
    text = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    with torch.no_grad():
        constants = prepare_constants(model, text, pooled, conds, [("bokeh",)] * n, torch.float32)
        inputs = DenoiseInputs(constants, torch.zeros(TEXT_TOKENS, 3), rows, cols, [position_ids(rows, cols)] * n,
                               [True] * n, guidance)
        return denoise(model, latents, inputs, SamplerSettings(steps=1, tiled=size > 512))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--stages", nargs="+", default=["bokeh", "deblur"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        diffusers_model, config = make_model("mid", 64, Path(tmp))
        native = bfl_twin(diffusers_model, config, Path(tmp) / "mid_rank64.safetensors")
        print(f"mid-size random FLUX {MID_CONFIG['num_layers']}+{MID_CONFIG['num_single_layers']} blocks, "
              f"{config['num_attention_heads']}x{config['attention_head_dim']}, rank-64 LoRA, fp32, "
              f"{args.threads} threads, medians of {args.repeats} interleaved repetitions (1 warm-up)")
        for size in args.sizes:
            for stage in args.stages:
                times = {"diffusers": [], "native": []}
                out = {}
                sides = [("diffusers", diffusers_model), ("native", native)]
                for r in range(args.repeats + 1):
                    for side, model in (sides if r % 2 else sides[::-1]):  # who goes first alternates
                        t0 = time.perf_counter()
                        out[side] = step(model, stage, size, config)
                        if r:
                            times[side].append(time.perf_counter() - t0)
                diff = (out["native"] - out["diffusers"]).abs().max().item()
                med = {k: statistics.median(v) for k, v in times.items()}
                print(f"{size} px {stage}{' tiled' if size > 512 else ''}: diffusers {med['diffusers']:.3f} s, "
                      f"native (BFL) {med['native']:.3f} s, native/diffusers {med['native'] / med['diffusers']:.3f}; "
                      f"max |difference| {diff:.2e}")
                assert diff < 1e-4, diff
    return 0


if __name__ == "__main__":
    sys.exit(main())
