"""Memory modes: how FLUX's weights are stored and when they sit on the GPU.

| mode         | weights stored          | compute  | on the GPU                                     | target card |
|--------------|-------------------------|----------|------------------------------------------------|-------------|
| "default"    | bf16                    | bf16     | the whole transformer during its stages         | 24 GB       |
| "low"        | fp8 (e4m3fn) blocks     | bf16     | the whole (fp8) transformer during its stages   | 16 GB       |
| "sequential" | bf16                    | bf16     | one layer at a time (leaf-module hooks)         | 6-8 GB, slow|
| "fp32"       | fp32                    | fp32     | nothing moves (CPU, tests, reference parity)    | -           |

Order of residency (every mode; see docs/models.md): the prompts are encoded once and cached, and the
text encoders freed before FLUX is loaded; Depth Pro runs between the stages while the transformer is
back on the CPU, and is freed before BokehNet runs. So no text encoder or depth model is ever
resident beside the transformer.

fp8 storage keeps each block Linear weight as float8_e4m3fn with one float32 scale per tensor and
upcasts it to the compute dtype inside the layer's own forward, one layer at a time. The layers stay
`nn.Linear` subclasses, so peft wraps them as usual (`peft_layer.base_layer(x)` runs the upcast), and
`.to(device)`/`.to(dtype)` never silently turn the storage back into bf16.

The offload helpers move weights only inside module calls or stage blocks and keep count of the
bytes they put on the execution device (`OffloadStats`), which is what the tests measure on CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..basics.errors import InputError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class MemoryMode:
    name: str
    storage: str  # "bf16" | "fp8" | "fp32"
    compute_dtype: torch.dtype
    offload: str  # "none" | "model" | "sequential"
    target: str

    @property
    def fp8(self) -> bool:
        return self.storage == "fp8"

    @property
    def load_dtype(self) -> torch.dtype:
        return torch.float32 if self.storage == "fp32" else torch.bfloat16


MEMORY_MODES = {
    "default": MemoryMode("default", "bf16", torch.bfloat16, "model", "24 GB GPUs"),
    "low": MemoryMode("low", "fp8", torch.bfloat16, "model", "16 GB GPUs"),
    "sequential": MemoryMode("sequential", "bf16", torch.bfloat16, "sequential", "6-8 GB GPUs (slow)"),
    "fp32": MemoryMode("fp32", "fp32", torch.float32, "none", "CPU / tests"),
}


def get_memory_mode(name) -> MemoryMode:
    if isinstance(name, MemoryMode):
        return name
    mode = MEMORY_MODES.get(str(name).lower())
    if mode is None:
        raise InputError(f"Unknown memory mode {name!r}; choose one of {', '.join(MEMORY_MODES)}.")
    return mode


# ---------------------------------------------------------------------------------------------
# fp8 weight storage

class Float8StorageLinear(nn.Linear):
    """nn.Linear whose weight is stored as float8_e4m3fn * weight_scale and upcast at call time.

    Instances are made by `to_fp8_storage` (class swap of existing nn.Linear modules), never directly.
    """

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        weight = self.weight.to(dtype)
        weight.mul_(self.weight_scale.to(dtype))
        bias = self.bias.to(dtype) if self.bias is not None else None
        return F.linear(x.to(dtype), weight, bias)

    def _apply(self, fn, recurse=True):
        # Device moves apply as usual; a dtype cast of the module changes only the compute dtype.
        super()._apply(fn, recurse)
        w = self.weight
        if w.dtype != torch.float8_e4m3fn:
            if w.dtype.is_floating_point:
                self.compute_dtype = w.dtype
            w.data = w.data.to(torch.float8_e4m3fn)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale.data = self.weight_scale.data.to(torch.float32)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", storage=float8_e4m3fn, compute_dtype={self.compute_dtype}"


def default_fp8_filter(name: str, module: nn.Module) -> bool:
    """Block Linear layers of the FLUX transformer, not peft's LoRA sub-layers (they stay in bf16)."""
    if ".lora_" in name:
        return False
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


@torch.no_grad()
def to_fp8_storage(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, prequantized_scales=None,
                   include=default_fp8_filter) -> int:
    """Store the selected nn.Linear weights of `model` in float8_e4m3fn; returns the number converted.

    Weights already in fp8 are kept as they are (scale from `prequantized_scales` {param name:
    scalar}, else 1). Others get a per-tensor scale amax / 448 so the whole fp8 range is used.
    Everything else in the model is cast to `compute_dtype`.
    """
    prequantized_scales = prequantized_scales or {}
    converted = 0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not include(name, module):
            continue
        w = module.weight
        if w.dtype == torch.float8_e4m3fn:
            scale = prequantized_scales.get(f"{name}.weight")
            scale = torch.ones((), dtype=torch.float32) if scale is None else scale.reshape(()).float()
            stored = w.data
        else:
            w32 = w.data.to(torch.float32)
            amax = w32.abs().max()
            scale = (amax / FP8_MAX).clamp(min=1e-12) if torch.isfinite(amax) and amax > 0 \
                else torch.ones((), dtype=torch.float32)
            stored = (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            del w32
        module.weight = nn.Parameter(stored, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(device=stored.device, dtype=torch.float32))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
        module.__class__ = Float8StorageLinear
        module.compute_dtype = compute_dtype
        converted += 1
    # Remaining parameters (embedders, norms, final layer, LoRA) in the compute dtype.
    for module in model.modules():
        if isinstance(module, Float8StorageLinear):
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.dtype != compute_dtype and p.dtype.is_floating_point:
                p.data = p.data.to(compute_dtype)
    return converted


def storage_bytes(model: nn.Module) -> dict:
    """Bytes of parameters by dtype name, e.g. {"float8_e4m3fn": ..., "bfloat16": ...}."""
    out: dict = {}
    for p in model.parameters():
        key = str(p.dtype).replace("torch.", "")
        out[key] = out.get(key, 0) + p.numel() * p.element_size()
    return out


# ---------------------------------------------------------------------------------------------
# Offload

@dataclass
class OffloadStats:
    """Bytes of weights the offload helpers have put on the execution device (now and at peak)."""

    resident: int = 0
    peak: int = 0
    transfers: int = 0

    def add(self, n: int):
        self.resident += n
        self.peak = max(self.peak, self.resident)
        self.transfers += 1

    def remove(self, n: int):
        self.resident -= n


def _tensor_bytes(module: nn.Module, recurse: bool) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(module.parameters(recurse=recurse)) + list(module.buffers(recurse=recurse)))


_ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_adapter_module(name: str) -> bool:
    """peft's per-adapter sub-modules are named '<layer>.lora_A.<adapter>' etc."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in _ADAPTER_CONTAINERS


@contextlib.contextmanager
def model_on_device(module: nn.Module, device, offload_device="cpu", stats: OffloadStats | None = None,
                    lazy_adapters: bool = True):
    """Model-level offload: the module's weights on `device` for the block, back after (also when the
    block raises, e.g. a cancelled run).

    With lazy_adapters, peft adapter weights move only when their module is first called, so a stage
    brings just its own LoRA (e.g. DeblurNet's rank-128 adapter, 0.86 GiB, stays off the GPU while
    BokehNet runs). The CPU tensors are kept, so moving back is free.
    """
    device = torch.device(device)
    offload_device = torch.device(offload_device)
    adapters = [m for n, m in module.named_modules() if is_adapter_module(n)] if lazy_adapters else []
    lazy_ids = {id(t) for m in adapters for t in list(m.parameters()) + list(m.buffers())}
    saved = []  # (tensor, cpu data) for everything moved
    moved_bytes = 0

    def move(tensors):
        nonlocal moved_bytes
        n = 0
        for t in tensors:
            saved.append((t, t.data))
            t.data = t.data.to(device, non_blocking=True)
            n += t.numel() * t.element_size()
        moved_bytes += n
        if stats is not None:
            stats.add(n)

    hooks = []

    def bring_adapter(m, args):
        if not getattr(m, "_genrefocus_on_device", False):
            m._genrefocus_on_device = True
            move(list(m.parameters()) + list(m.buffers()))
        return None

    try:
        seen = set()
        base = []
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in lazy_ids or id(t) in seen:
                continue
            seen.add(id(t))
            base.append(t)
        move(base)
        for m in adapters:
            hooks.append(m.register_forward_pre_hook(bring_adapter))
        yield module
    finally:
        for h in hooks:
            h.remove()
        for m in adapters:
            m._genrefocus_on_device = False
        for t, data in reversed(saved):
            t.data = data if data.device == offload_device else data.to(offload_device)
        if stats is not None:
            stats.remove(moved_bytes)
        if device.type == "cuda":
            torch.cuda.empty_cache()


class SequentialOffload:
    """Leaf-level CPU offload: every module that owns parameters has them on the execution device
    only while it runs (forward pre-hook moves them in, forward hook restores the CPU tensors).

    Works with any forward that *calls* modules (diffusers', gen-core's multi-branch forward, peft's
    base_layer / lora_A / lora_B). The CPU copies are kept, so moving back costs nothing.
    """

    def __init__(self, model: nn.Module, device, stats: OffloadStats | None = None, pin_memory: bool = True):
        self.model = model
        self.device = torch.device(device)
        self.stats = stats if stats is not None else OffloadStats()
        self._handles = []
        self._hooked = set()
        self._cpu = {}
        self._pin = pin_memory and self.device.type == "cuda" and torch.cuda.is_available()
        model.to("cpu")
        self.refresh()

    def refresh(self) -> int:
        """Hook modules added since (e.g. the lora_A/lora_B layers of an adapter loaded later); returns
        how many were added."""
        added = 0
        for module in self.model.modules():
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            if not own or id(module) in self._hooked:
                continue
            for t in own:
                if t.device.type != "cpu":
                    t.data = t.data.to("cpu")
                if self._pin:
                    t.data = t.data.pin_memory()
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
            self._hooked.add(id(module))
            added += 1
        return added

    def _own(self, module):
        return [t for _, t in module.named_parameters(recurse=False)] + \
               [t for _, t in module.named_buffers(recurse=False)]

    def _pre(self, module, args):
        if id(module) in self._cpu:  # re-entrant call (module calls itself): already resident
            return None
        tensors = self._own(module)
        self._cpu[id(module)] = [t.data for t in tensors]
        nbytes = 0
        for t in tensors:
            t.data = t.data.to(self.device, non_blocking=True)
            nbytes += t.numel() * t.element_size()
        self.stats.add(nbytes)
        module._genrefocus_offload_bytes = nbytes
        return None

    def _post(self, module, args, output):
        saved = self._cpu.pop(id(module), None)
        if saved is None:
            return None
        for t, cpu in zip(self._own(module), saved):
            t.data = cpu
        self.stats.remove(getattr(module, "_genrefocus_offload_bytes", 0))
        return None

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()


class Offloader:
    """The memory plan for one pipeline: which device runs it and how weights get there.

    `stage(module)` wraps each use of a big model (transformer for a stage, VAE for encode/decode):
    with model offload it moves the module in and back out; with sequential offload the leaf hooks
    do that per layer and `stage` does nothing; with no offload the module simply lives on device.
    """

    def __init__(self, mode, device=None):
        self.mode = get_memory_mode(mode)
        try:
            self.device = torch.device(device) if device is not None else \
                torch.device("cuda" if torch.cuda.is_available() else "cpu")
        except (RuntimeError, TypeError):
            raise InputError(f"Unknown device {device!r} (use cpu, cuda, cuda:1, mps, ...).") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"Device {device!r} was asked for, but this PyTorch has no usable CUDA; use cpu.")
        self.stats = OffloadStats()
        self._sequential = {}

    @property
    def execution_device(self) -> torch.device:
        return self.device

    def prepare(self, module: nn.Module, allow_sequential: bool = True) -> nn.Module:
        """Put a freshly loaded module where this plan keeps it between stages.

        allow_sequential=False: in sequential mode this module (e.g. the small VAE, whose callers read
        its parameters' device) is offloaded as a whole instead of layer by layer.
        """
        if self.mode.offload == "sequential" and allow_sequential:
            if id(module) not in self._sequential:
                self._sequential[id(module)] = SequentialOffload(module, self.device, self.stats)
        elif self.mode.offload in ("model", "sequential"):
            module.to("cpu")
        else:
            module.to(self.device)
        return module

    @contextlib.contextmanager
    def stage(self, module: nn.Module, work=None):
        """Run `module` on the execution device for the block (`work`, the stage's
        sampling.SequenceSize, is not needed by these fixed plans)."""
        hooks = self._sequential.get(id(module))
        if hooks is not None:
            hooks.refresh()  # adapters loaded after `prepare` get their hooks too
            yield module
        elif self.mode.offload == "none":
            yield module
        else:
            with model_on_device(module, self.device, "cpu", self.stats):
                yield module

    def release(self, module: nn.Module):
        """Undo `prepare` (remove hooks) and leave the module on the CPU."""
        hooks = self._sequential.pop(id(module), None)
        if hooks is not None:
            hooks.remove()
        module.to("cpu")


def free_module(*modules) -> None:
    """Drop a model's weights now (text encoders, depth model) instead of waiting for the GC."""
    import gc

    for m in modules:
        if isinstance(m, nn.Module):
            m.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
