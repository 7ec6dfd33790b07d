"""Seconds and FLOPs per denoising step of the generative stages (fp32, CPU).

Models: the shared tiny FLUX and a mid-size random FLUX (4 double + 8 single blocks, 8 heads x 64,
joint_attention_dim 256, pooled 64, axes_dims_rope (8, 28, 28), rank-64 LoRA loaded through
genrefocus_core.generative.lora). Cases: 512 px untiled and 1024 px tiled (9 tiles of 32x32 tokens per step),
bokeh (2 conditions) and deblur (1 condition).

Variants, timed in the same run on the same inputs (outputs compared):
- ours: genrefocus_core.generative.sampling.denoise / multi_branch_forward;
- emulated: the same forward with what the reference computes: LoRA deltas on every branch (peft runs
  them at scale 0 for text/image) and one dense masked attention over the whole sequence;
- native: the same forward on ComfyUI's FLUX layout (BFL: fused qkv / linear1, LoRA as deltas on
  output slices), the mid model's weights converted into plain torch modules with ComfyUI's names
  (`bench_native_step.bfl_twin`; mid model only);
- reference: the official Genfocus `transformer_forward`, imported at run time from the directory in
  $GENFOCUS_REFERENCE_DIR (a checkout of github.com/rayray9999/Genfocus; never part of this project).

Timing: the variants take turns at every transformer forward (each variant's step runs in its own
thread and waits for its turn before each forward, so a change of load hits every variant alike,
also within a tiled step); a step's time is the sum of its forwards. Each case runs `--warmup`
untimed and `--repeats` timed steps per variant; min / median / max of the wall-clock seconds and
the median CPU seconds of this process (less sensitive to other processes) are printed with the
1-minute load average at the start and end of the case; "speedup" is the ratio of medians,
reference (or emulated, when the reference is not available) over ours (and over native, after a
slash). FLOPs per step are counted analytically (multiply-add = 2) and split into attention, base
matmuls and LoRA, for our computation and for the reference's.

    python bench/bench_step.py                      # everything (several minutes on 2 cores)
    python bench/bench_step.py --models tiny --sizes 512
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import statistics
import tempfile
import threading
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from genrefocus_core.generative import lora  # noqa: E402
from genrefocus_core.generative import flux_layouts  # noqa: E402
from genrefocus_core.generative import multi_branch_forward as mbf  # noqa: E402
from genrefocus_core.generative import sampling  # noqa: E402
from genrefocus_core.generative.condition_tokens import position_ids  # noqa: E402
from genrefocus_core.generative.sampling import (DenoiseInputs, SamplerSettings, denoise, tile_origins,  # noqa: E402
                                      tile_token_index, tile_weights, flow_match_schedule)

SHARED = Path(os.environ.get("GENREFOCUS_SHARED_DIR", ROOT.parent / "shared"))
TINY = Path(os.environ.get("GENREFOCUS_PARITY_DIR", SHARED / "fixtures" / "parity")) / "tiny"
MID_CONFIG = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
                  num_attention_heads=8, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
                  axes_dims_rope=(8, 28, 28))
TEXT_TOKENS = 512
STAGES = {"bokeh": (2, 1.0), "deblur": (1, 3.5)}  # conditions, guidance


# ------------------------------------------------------------------------------------------ models

def make_model(kind: str, lora_rank: int, workdir: Path):
    from diffusers import FluxTransformer2DModel

    if kind == "tiny":
        config = json.loads((TINY / "configs.json").read_text())["transformer"]
        model = FluxTransformer2DModel(**config)
        model.load_state_dict(load_file(str(TINY / "transformer.safetensors")))
        lora_path = TINY / "bokehNet.safetensors"
    else:
        torch.manual_seed(0)
        config = dict(MID_CONFIG)
        model = FluxTransformer2DModel(**config)
        lora_path = workdir / f"mid_rank{lora_rank}.safetensors"
        save_file(random_lora(model, lora_rank), str(lora_path))
    model.eval().requires_grad_(False)
    lora.load_lora(model, lora_path, "bokeh")
    return model, config


def random_lora(model, rank: int) -> dict:
    """A LoRA in the released key layout on the 25 kinds of target modules, random weights."""
    targets = ["x_embedder"]
    for i in range(len(model.transformer_blocks)):
        targets += [f"transformer_blocks.{i}.{m}" for m in
                    ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")]
    for i in range(len(model.single_transformer_blocks)):
        targets += [f"single_transformer_blocks.{i}.{m}" for m in
                    ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")]
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name in targets:
        m = modules[name]
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / rank ** 0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    return sd


# ------------------------------------------------------------------------------------------ FLOPs

def linear_shapes(config: dict) -> dict:
    """(in, out) of each linear kind of one block, by where it runs."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * d
    return {
        # double block, image/condition side (LoRA targets) and text side (no LoRA)
        "double_img": [(d, 6 * d), (d, d), (d, d), (d, d), (d, d), (d, mlp), (mlp, d)],
        "double_img_lora": [(d, 6 * d), (d, d), (d, d), (d, d), (d, d), (mlp, d)],
        "double_txt": [(d, 6 * d), (d, d), (d, d), (d, d), (d, d), (d, mlp), (mlp, d)],
        "single": [(d, 3 * d), (d, d), (d, d), (d, d), (d, mlp), (d + mlp, d)],
        "single_lora": [(d, 3 * d), (d, d), (d, d), (d, d), (d, mlp), (d + mlp, d)],
    }


def step_flops(config: dict, rank: int, T: int, L: int, n: int, forwards: int, reference: bool) -> dict:
    """FLOPs of one denoising step = `forwards` transformer calls on T text, L image and n x L condition
    tokens. reference=True counts what the reference computes (LoRA on every branch of a LoRA module,
    queries/MLP of every branch in the last block); modulation rows are left out as negligible."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    nd, ns = config["num_layers"], config["num_single_layers"]
    sh = linear_shapes(config)
    C = n * L
    mm = lambda shapes, tokens: sum(2 * i * o * tokens for i, o in shapes)  # noqa: E731
    lo = lambda shapes, tokens: sum(2 * rank * (i + o) * tokens for i, o in shapes)  # noqa: E731
    # modulation linears act on one row per branch: leave them out of the token counts
    dbl_img = [s for s in sh["double_img"][1:]]
    dbl_txt = [s for s in sh["double_txt"][1:]]
    sgl = [s for s in sh["single"][1:]]
    kv = [(d, d), (d, d)]
    if reference:
        base = nd * (mm(dbl_img, L + C) + mm(dbl_txt, T)) + ns * mm(sgl, T + L + C)
    else:  # our last single block: text and condition tokens give only keys and values
        base = nd * (mm(dbl_img, L + C) + mm(dbl_txt, T)) + (ns - 1) * mm(sgl, T + L + C) + mm(sgl, L) + mm(kv, T + C)
    base += 2 * 64 * d * (L + C) + 2 * config["joint_attention_dim"] * d * T + 2 * d * 64 * L  # embedders, proj_out
    lora_rows_double = L + C if reference else C
    lora_rows_single = T + L + C if reference else C
    if reference:
        lora_fl = nd * lo(sh["double_img_lora"][1:], lora_rows_double) + ns * lo(sh["single_lora"][1:], lora_rows_single)
    else:
        lora_fl = nd * lo(sh["double_img_lora"][1:], C) + (ns - 1) * lo(sh["single_lora"][1:], C) + lo(kv, C)
    lora_fl += 2 * rank * (64 + d) * (L + C if reference else C)
    keys_main, keys_cond = T + L + C, T + L + L
    pairs = (T + L) * keys_main + C * keys_cond
    if reference:
        attention = (nd + ns) * 4 * d * pairs
    else:
        attention = (nd + ns - 1) * 4 * d * pairs + 4 * d * L * keys_main
    return {k: v * forwards for k, v in dict(attention=attention, base_matmul=base, lora=lora_fl).items()}


# ------------------------------------------------------------------------------------------ variants

def emulated_lora_linear(module, x, segments):
    """What peft computes inside the reference: the LoRA delta for every token, scaled 0 where off."""
    if not lora.is_lora_layer(module):
        return module(x)
    y = module.get_base_layer()(x)
    scale = torch.zeros(x.shape[-2], 1, dtype=x.dtype, device=x.device)
    names = []
    for start, stop, adapters in segments:
        scale[start:stop] = 1.0
        names += [a for a in adapters if a not in names]
    for name in names or [n for n in module.lora_A.keys()][:1]:
        if name in module.lora_A:
            y = y + module.lora_B[name](module.lora_A[name](x)) * scale
    return y


def emulated_branch_attention(q, k, v, main_len, n, attention=None):
    """One dense attention over the whole sequence with the reference's group mask -> [N, S, H*D]."""
    S = q.shape[2]
    if n <= 1:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2, 3)
    Lc = (S - main_len) // n
    mask = torch.zeros(S, S, dtype=torch.bool, device=q.device)
    mask[:main_len] = True
    mask[:, :main_len] = True
    for i in range(n):
        s = main_len + i * Lc
        mask[s:s + Lc, s:s + Lc] = True
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2, 3)


_THREAD = threading.local()  # .variant: the variant the current thread computes


def _emulating() -> bool:
    return getattr(_THREAD, "variant", None) == "emulated"


@contextlib.contextmanager
def emulate_reference():
    """Route the LoRA linear and the branch attention to the emulations in threads computing the
    "emulated" variant (the variants run in concurrent threads that take turns)."""
    saved = flux_layouts.lora_linear, mbf._branch_attention
    lin, att = saved
    flux_layouts.lora_linear = lambda *a: (emulated_lora_linear if _emulating() else lin)(*a)
    mbf._branch_attention = lambda *a: (emulated_branch_attention if _emulating() else att)(*a)
    try:
        yield
    finally:
        flux_layouts.lora_linear, mbf._branch_attention = saved


class TakeTurns:
    """Lets the variants' threads run one transformer forward at a time, in a fixed rotation, and
    sums each variant's wall-clock and process CPU seconds spent in its forwards."""

    def __init__(self, names):
        self.names = list(names)
        self.turn = 0
        self.finished: set[str] = set()
        self.cond = threading.Condition()
        self.wall = dict.fromkeys(self.names, 0.0)
        self.cpu = dict.fromkeys(self.names, 0.0)

    def _advance(self):
        for _ in self.names:
            self.turn = (self.turn + 1) % len(self.names)
            if self.names[self.turn] not in self.finished:
                break
        self.cond.notify_all()

    def timed(self, fn):
        def forward(*args, **kwargs):
            name = _THREAD.variant
            with self.cond:
                self.cond.wait_for(lambda: self.names[self.turn] == name)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.wall[name] += time.perf_counter() - t0
                self.cpu[name] += time.process_time() - c0
                with self.cond:
                    self._advance()
        return forward

    def run(self, steps: dict):
        """steps: variant -> callable computing one step; returns variant -> output."""
        outputs, errors = {}, []

        def work(name):
            _THREAD.variant = name
            try:
                with torch.no_grad():
                    outputs[name] = steps[name]()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                errors.append(exc)
            finally:
                with self.cond:
                    self.finished.add(name)
                    if self.names[self.turn] == name:
                        self._advance()

        threads = [threading.Thread(target=work, args=(name,)) for name in self.names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return outputs


@contextlib.contextmanager
def taking_turns(turns: TakeTurns, reference):
    """Route our forward (as `sampling.denoise` calls it) and the reference's through `turns`."""
    saved = sampling.multi_branch_forward, getattr(reference, "transformer_forward", None)
    sampling.multi_branch_forward = turns.timed(saved[0])
    if reference is not None:
        reference.transformer_forward = turns.timed(saved[1])
    try:
        yield
    finally:
        sampling.multi_branch_forward = saved[0]
        if reference is not None:
            reference.transformer_forward = saved[1]


def import_reference(path: str):
    """The official Genfocus flux.py from a checkout given at run time (cv2 is only used by its
    canny/depth helpers, so a placeholder module is enough)."""
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))
    sys.path.insert(0, path)
    from Genfocus.pipeline import flux as reference  # noqa: WPS433
    return reference


def reference_step(reference, model, latents, conds, text, pooled, text_ids, rows, cols, guidance, tiled, sigma):
    """One Euler step computed with the reference's transformer_forward (its tiling loop re-stated)."""
    n = len(conds)
    t = torch.tensor([sigma])
    g = torch.tensor([guidance])
    group_mask = torch.ones(n + 2, n + 2, dtype=torch.bool)
    group_mask[2:, 2:] = torch.diag(torch.ones(n, dtype=torch.bool))

    def call(lat, cond_list, ids, cond_ids):
        return reference.transformer_forward(
            model, image_features=[lat] + cond_list, text_features=[text], img_ids=[ids] + cond_ids, txt_ids=[text_ids],
            timesteps=[t, t] + [torch.zeros(1)] * n, pooled_projections=[pooled] * (2 + n),
            guidances=[g, g] + [torch.ones(1)] * n, adapters=[None, None] + ["bokeh"] * n, group_mask=group_mask)[0]

    if not tiled:
        ids = position_ids(rows, cols)
        return call(latents, conds, ids, [ids] * n)
    fixed = position_ids(32, 32)
    w = tile_weights(32)
    acc = torch.zeros_like(latents)
    wsum = torch.zeros(latents.shape[:2])
    for origin in tile_origins(rows, cols, 32, 4):
        idx = tile_token_index(origin, 32, cols)
        out = call(latents[:, idx], [c[:, idx] for c in conds], fixed, [fixed] * n)
        acc[:, idx] += out * w[None, :, None]
        wsum[:, idx] += w
    return acc / wsum[..., None]


# ------------------------------------------------------------------------------------------ main

def run_case(model, config, rank, size, stage, variants, reference, repeats, warmup=1, native=None):
    n, guidance = STAGES[stage]
    rows = cols = size // 16
    tiled = size > 512
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, rows * cols, 64, generator=g)
    conds = [torch.randn(1, rows * cols, 64, generator=g) for _ in range(n)]
    text = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=g)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=g)
    text_ids = torch.zeros(TEXT_TOKENS, 3)
    settings = SamplerSettings(steps=1, tiled=tiled)
    sigma = flow_match_schedule(1, rows * cols)[1][0].item() / 1000
    forwards = len(tile_origins(rows, cols, 32, 4)) if tiled else 1
    L = 1024 if tiled else rows * cols
    def step(variant):
        if variant == "reference":
            pred = reference_step(reference, model, latents, conds, text, pooled, text_ids, rows, cols,
                                  guidance, tiled, sigma)
            return latents + (0.0 - 1.0) * pred
        net = native if variant == "native" else model
        constants = mbf.prepare_constants(net, text, pooled, conds, [("bokeh",)] * n, torch.float32)
        inputs = DenoiseInputs(constants, text_ids, rows, cols, [position_ids(rows, cols)] * n,
                               [True] * n, guidance)
        return denoise(net, latents, inputs, settings)

    times, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    ctx = emulate_reference() if "emulated" in variants else contextlib.nullcontext()
    load = [os.getloadavg()[0]]
    with ctx:
        for r in range(repeats + warmup):
            order = variants if r % 2 == 0 else variants[::-1]  # who goes first alternates too
            turns = TakeTurns(order)
            with taking_turns(turns, reference):
                outputs = turns.run({v: (lambda v=v: step(v)) for v in order})
            if r >= warmup:
                for v in variants:
                    times[v].append(turns.wall[v])
                    cpu[v].append(turns.cpu[v])
    load.append(os.getloadavg()[0])
    results = {v: (min(ts), statistics.median(ts), max(ts)) for v, ts in times.items()}
    results_cpu = {v: statistics.median(ts) for v, ts in cpu.items()}
    flops_ours = step_flops(config, rank, TEXT_TOKENS, L, n, forwards, reference=False)
    flops_ref = step_flops(config, rank, TEXT_TOKENS, L, n, forwards, reference=True)
    diffs = {v: (outputs[v] - outputs["ours"]).abs().max().item() for v in outputs if v != "ours"} if "ours" in outputs else {}
    return results, results_cpu, flops_ours, flops_ref, diffs, forwards, load


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,mid")
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--stages", default="bokeh,deblur")
    parser.add_argument("--variants", default="ours,emulated,reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (min/median/max reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the mid-size model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    reference = None
    if "reference" in variants:
        ref_dir = os.environ.get("GENFOCUS_REFERENCE_DIR")
        if ref_dir:
            reference = import_reference(ref_dir)
        else:
            print("reference: skipped (set GENFOCUS_REFERENCE_DIR to a Genfocus checkout to time it)")
            variants.remove("reference")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, 1 step per case, "
          f"medians of {args.repeats} interleaved repetitions after {args.warmup} warm-up run(s), variants taking "
          f"turns at every forward; load average (1 min) {os.getloadavg()[0]:.1f}")
    header = (f"{'model':5} {'size':>5} {'stage':6} {'fwd':>3} "
              + " ".join(f"{v + ' s min/med/max':>24}" for v in variants)
              + "  speedup | " + " ".join(f"{v + ' cpu s':>14}" for v in variants)
              + "  speedup | GFLOP ours attn/base/lora | GFLOP ref attn/base/lora | max|diff| | load")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for model_kind in args.models.split(","):
            model, config = make_model(model_kind, args.rank, Path(tmp))
            rank = 4 if model_kind == "tiny" else args.rank
            native = None
            if "native" in variants:
                if model_kind == "tiny":
                    raise SystemExit("the native variant runs on the mid model only")
                from bench_native_step import bfl_twin
                native = bfl_twin(model, config, Path(tmp) / f"mid_rank{rank}.safetensors")
            for size in [int(s) for s in args.sizes.split(",")]:
                for stage in args.stages.split(","):
                    res, res_cpu, fo, fr, diffs, fwd, load = run_case(model, config, rank, size, stage, variants, reference,
                                                                args.repeats, args.warmup, native)

                    medians = {v: r[1] for v, r in res.items()}

                    def speedup(r):
                        base = r.get("reference", r.get("emulated"))
                        ratios = [f"{base / r[v]:.2f}x" for v in ("ours", "native") if base and v in r]
                        return "/".join(ratios) or "-"

                    g = lambda f: "/".join(f"{f[k] / 1e9:.1f}" for k in ("attention", "base_matmul", "lora"))  # noqa: E731
                    print(f"{model_kind:5} {size:5d} {stage:6} {fwd:3d} " + " ".join(f"{'/'.join(f'{x:.3f}' for x in res[v]):>24}" for v in variants)
                          + f"  {speedup(medians):>11} | " + " ".join(f"{res_cpu[v]:14.3f}" for v in variants)
                          + f"  {speedup(res_cpu):>11} | {g(fo):>24} | {g(fr):>24} | "
                          + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
                          + f" | {load[0]:.1f}->{load[1]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
