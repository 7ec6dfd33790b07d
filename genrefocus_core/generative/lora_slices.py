"""GenRefocus LoRA files on a BFL-layout FLUX (ComfyUI's model), kept outside the model.

The released files name diffusers modules (`transformer_blocks.N.attn.to_q`, `proj_mlp`, ...). In
BFL's layout several of them are rows of one fused layer: to_q/to_k/to_v are rows [0:D], [D:2D],
[2D:3D] of `img_attn.qkv` (double blocks) or of `linear1` (single blocks, where proj_mlp is rows
[3D:7D]); the rest map to whole layers (`flux_loading.bfl_transformer_key_plan` is the map). Each
adapter is stored here as (lora_A [r, in], lora_B [rows, r], row range) per BFL module path and is
added by `BflLayout.linear` to those output rows, for the condition tokens only, at scale exactly 1:
the model's own weights (whatever their storage: fp8, GGUF, ...) are never changed.

`LoraSlices` is a torch module, so its tensors move with `.to(device)` and can be handed to a
memory manager (ComfyUI wraps it in a ModelPatcher beside FLUX).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..basics.errors import ModelFileError
from .flux_layouts import sequence_rows
from .flux_loading import bfl_transformer_key_plan
from .lora import read_lora_file
from .model_files import file_stamp


def _bfl_targets(model) -> dict:
    """diffusers module path -> (BFL module path, output rows or None, in features, output width) for
    the linear layers of a BFL-layout model."""
    dim = model.hidden_size
    single = list(model.single_blocks)
    mlp = single[0].mlp_hidden_dim if single else int(dim * 4)
    plan = bfl_transformer_key_plan(len(model.double_blocks), len(single), dim, mlp)
    split_sizes = plan.pop("_split_sizes")
    modules = dict(model.named_modules())
    out = {}
    for key, (src, op) in plan.items():
        if not (key.endswith(".weight") and src.endswith(".weight")):
            continue
        layer = modules.get(src[: -len(".weight")])
        in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if in_f is None or out_f is None:
            continue
        rows = None
        if op not in (None, "swap"):
            kind, j = op
            start = j * (out_f // 3) if kind == "chunk" else sum(split_sizes[:j])
            rows = (start, start + (out_f // 3 if kind == "chunk" else split_sizes[j]))
        width = out_f if rows is None else rows[1] - rows[0]
        out[key[: -len(".weight")]] = (src[: -len(".weight")], rows, in_f, width, op == "swap")
    return out


class LoraSlices(torch.nn.Module):
    """The LoRA adapters of one BFL-layout model, by BFL module path:
    {path: {adapter: [(A key, B key, row range or None)]}}, stored in `dtype`.

    Holds no reference to the model (only its layer map), so handing it to a memory manager moves
    the adapters alone. `files` records the file stamp each adapter came from (`lora.use_lora_files`).
    """

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._targets = _bfl_targets(model)
        self.dtype = dtype
        self._entries: dict[str, dict[str, list[tuple[str, str, tuple[int, int] | None]]]] = {}
        self._count = 0
        self.files: dict[str, tuple] = {}

    @property
    def adapters(self) -> list[str]:
        names: list[str] = []
        for per in self._entries.values():
            names += [a for a in per if a not in names]
        return names

    def load_file(self, path, adapter_name: str) -> list[str]:
        """Read a LoRA file in the released format and keep it as `adapter_name` (replacing one of that
        name). The whole file is checked against the model before anything changes."""
        weights = read_lora_file(path)
        planned = []
        for name, (a, b) in weights.items():
            if name not in self._targets:
                raise ModelFileError(f"LoRA file {path} targets module '{name}', which this FLUX transformer does not "
                                     "have: the file is for another base model or another architecture.")
            bfl, rows, in_f, width, swap = self._targets[name]
            if a.shape[1] != in_f or b.shape[0] != width:
                raise ModelFileError(
                    f"LoRA file {path}: shapes of '{name}' (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) do not "
                    f"fit the layer ({in_f} -> {width}); the file is for another model size.")
            if swap:  # final AdaLN: diffusers stores (scale, shift), BFL (shift, scale)
                b = torch.cat(b.chunk(2, dim=0)[::-1], dim=0)
            planned.append((bfl, rows, a, b))
        self.unload(adapter_name)
        device = next((t.device for t in self.buffers()), torch.device("cpu"))
        for bfl, rows, a, b in planned:
            key_a, key_b = f"t{self._count}_A", f"t{self._count}_B"
            self._count += 1
            self.register_buffer(key_a, a.to(device=device, dtype=self.dtype).contiguous())
            self.register_buffer(key_b, b.to(device=device, dtype=self.dtype).contiguous())
            self._entries.setdefault(bfl, {}).setdefault(adapter_name, []).append((key_a, key_b, rows))
        self.files[adapter_name] = file_stamp(path)
        return sorted(weights)

    def unload(self, adapter_name: str | None = None) -> None:
        """Drop one adapter (all when None)."""
        for bfl in list(self._entries):
            per = self._entries[bfl]
            for name in [n for n in per if adapter_name is None or n == adapter_name]:
                for key_a, key_b, _ in per.pop(name):
                    delattr(self, key_a)
                    delattr(self, key_b)
            if not per:
                del self._entries[bfl]
        for name in [n for n in self.files if adapter_name is None or n == adapter_name]:
            del self.files[name]

    def add_deltas(self, path: str | None, x: torch.Tensor, y: torch.Tensor, segments) -> None:
        """y[..., start:stop, rows] += lora_B(lora_A(x[..., start:stop, :])) for each segment and each
        of its adapters that has this module; tensors are cast to x's device and dtype on the fly."""
        per = self._entries.get(path)
        if not per:
            return
        for start, stop, adapters in segments:
            for name in adapters:
                for key_a, key_b, rows in per.get(name, ()):
                    a = getattr(self, key_a).to(device=x.device, dtype=x.dtype)
                    b = getattr(self, key_b).to(device=x.device, dtype=x.dtype)
                    cols = slice(None) if rows is None else slice(*rows)
                    for xs, ys in sequence_rows(x, y, start, stop):
                        ys[:, cols] += F.linear(F.linear(xs, a), b).to(y.dtype)
