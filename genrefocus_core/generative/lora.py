"""GenRefocus LoRA files as peft named adapters on diffusers' FluxTransformer2DModel.

The released files (`stages.ADAPTERS`; deblurNet rank 128, bokehNet rank 64) hold
`transformer.<module path>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] for 25 kinds of
modules (spec: "LoRA sits on"). They are injected through peft under their adapter name; several
adapters can live side by side, so switching stages needs no reloading (`use_lora_files`).

The adapters are never merged and never run through peft's own forward: `multi_branch_forward`
calls each peft layer's `base_layer` for the text/image branches and adds
`lora_B(lora_A(x))` (scale exactly 1, the file's alpha/rank ignored as in the reference) for the
condition branches only. Base weights are therefore never modified, and `unload_lora` restores
the original modules bit for bit.
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from pathlib import Path

import torch

from ..basics.errors import MissingModelFileError, ModelFileError
from .model_files import file_stamp
from .stages import check_requirements

log = logging.getLogger(__name__)

# On the transformer: {adapter: file stamp} of the adapters loaded through load_lora, kept by load_lora
# and unload_lora themselves so that it always tells what is loaded.
_FILES_ATTR = "genrefocus_lora_files"

_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_ALPHA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.alpha$")


def _lora_layer_type():
    from peft.tuners.lora import LoraLayer
    return LoraLayer


def is_lora_layer(module: torch.nn.Module) -> bool:
    return isinstance(module, _lora_layer_type())


def base_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under a peft LoRA layer (the module itself when it has no LoRA)."""
    return module.get_base_layer() if is_lora_layer(module) else module


def loaded_adapters(transformer: torch.nn.Module) -> list[str]:
    """Names of the LoRA adapters present on the transformer, in load order."""
    names: list[str] = []
    for module in transformer.modules():
        if is_lora_layer(module):
            for name in module.lora_A.keys():
                if name not in names:
                    names.append(name)
    return names


def read_lora_file(path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read and check a LoRA file's layout -> {module path: (lora_A [r, in], lora_B [out, r])}.

    Raises MissingModelFileError if the file is absent, ModelFileError if it is not a readable
    safetensors file or not a FLUX transformer LoRA in the released key layout.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MissingModelFileError(path.name, path.parent if str(path.parent) else ".",
                                    "LoRA files go in ComfyUI's models/genrefocus folder (or pass the full path).")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"LoRA file {path} is corrupt or not a safetensors file ({e}).") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = tensor
        elif not _ALPHA_KEY.match(key):  # alpha is ignored: the adapters run at scale exactly 1
            unexpected.append(key)
    if unexpected or not pairs:
        shown = ", ".join(unexpected[:3]) or "(no LoRA tensors)"
        raise ModelFileError(
            f"LoRA file {path} is not a GenRefocus FLUX transformer LoRA: expected keys "
            f"'transformer.<module>.lora_A.weight' / '.lora_B.weight', found {shown}"
            f"{' and more' if len(unexpected) > 3 else ''}."
        )
    out = {}
    for module_path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ModelFileError(f"LoRA file {path}: module '{module_path}' has no {missing} weight.")
        a, b = ab["A"], ab["B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ModelFileError(
                f"LoRA file {path}: module '{module_path}' holds {a.dtype} / {b.dtype} tensors; LoRA weights are "
                "floating-point numbers (integer or bool data is not a LoRA, or the file is damaged).")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ModelFileError(
                f"LoRA file {path}: module '{module_path}' has inconsistent shapes lora_A {tuple(a.shape)}, "
                f"lora_B {tuple(b.shape)} (expected [r, in] and [out, r])."
            )
        if not (_all_finite(a) and _all_finite(b)):
            raise ModelFileError(f"LoRA file {path}: module '{module_path}' holds NaN or infinite values.")
        out[module_path] = (a, b)
    return out


def _all_finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())  # no isfinite for fp8


def _check_against_model(transformer, path, weights) -> None:
    modules = dict(transformer.named_modules())
    for module_path, (a, b) in weights.items():
        module = modules.get(module_path)
        if module is None:
            raise ModelFileError(
                f"LoRA file {path} targets module '{module_path}', which this FLUX transformer does not have: "
                f"the file is for another base model or another architecture."
            )
        base = base_module(module)
        in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if in_f is None or out_f is None:
            raise ModelFileError(f"LoRA file {path} targets '{module_path}', which is not a linear layer.")
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise ModelFileError(
                f"LoRA file {path}: shapes of '{module_path}' (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) "
                f"do not fit the layer ({in_f} -> {out_f}); the file is for another model size."
            )


def load_lora(transformer: torch.nn.Module, path, adapter_name: str) -> list[str]:
    """Inject the LoRA file at `path` into `transformer` as peft adapter `adapter_name`.

    Returns the module paths that received the adapter. An adapter of the same name is replaced.
    The whole file is checked against the model before anything is changed, so a bad file leaves
    the transformer untouched.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"Adapter name must be a non-empty string without dots, got {adapter_name!r}.")
    stamp = file_stamp(path)  # before reading: a file rewritten meanwhile differs next time and is reloaded
    weights = read_lora_file(path)
    _check_against_model(transformer, path, weights)
    if adapter_name in loaded_adapters(transformer):
        unload_lora(transformer, adapter_name)

    ranks = {name: a.shape[0] for name, (a, _) in weights.items()}
    common_rank = max(set(ranks.values()), key=list(ranks.values()).count)
    target = "^(?:" + "|".join(re.escape(name) for name in weights) + ")$"
    config = LoraConfig(
        r=common_rank,
        lora_alpha=common_rank,
        target_modules=target,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != common_rank},
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    modules_before = dict(transformer.named_modules())
    was_training = transformer.training
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")
        inject_adapter_in_model(config, transformer, adapter_name=adapter_name, low_cpu_mem_usage=True)
    transformer.train(was_training)
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, (a, b) in weights.items():
            layer = modules[name]
            if not is_lora_layer(layer) or adapter_name not in layer.lora_A:
                raise ModelFileError(f"LoRA file {path}: could not attach the adapter to '{name}'.")
            base = base_module(layer)
            device, dtype = _param_device_dtype(base, modules_before.get(name))
            for target_linear, value in ((layer.lora_A[adapter_name], a), (layer.lora_B[adapter_name], b)):
                target_linear.weight = torch.nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False)
    for module in transformer.modules():
        if is_lora_layer(module):
            for p in module.parameters():
                p.requires_grad_(False)
    _loaded_files(transformer)[adapter_name] = stamp
    return sorted(weights)


def _loaded_files(transformer: torch.nn.Module) -> dict:
    files = transformer.__dict__.get(_FILES_ATTR)
    if files is None:
        files = {}
        transformer.__dict__[_FILES_ATTR] = files
    return files


class _PeftAdapters:
    """The adapter-store view of a diffusers transformer with peft adapters (`lora_slices.LoraSlices`
    is the other store: adapters kept outside a BFL-layout model)."""

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def adapters(self) -> list[str]:
        return loaded_adapters(self.transformer)

    @property
    def files(self) -> dict:
        return _loaded_files(self.transformer)

    def load_file(self, path, name):
        return load_lora(self.transformer, path, name)

    def unload(self, name):
        unload_lora(self.transformer, name)


def use_lora_files(target, files) -> None:
    """Make the adapters of `target` (a diffusers transformer, or a store such as
    `lora_slices.LoraSlices`) exactly `files` ({adapter name: LoRA path}), reading only what changed.

    The adapter rules (`stages.check_requirements`) are checked on every call. An adapter is
    reloaded unless it is loaded from a file with the same stamp; adapters not in `files` are
    unloaded. The record of which file each adapter came from is kept by the loads and unloads
    themselves, so after a failed load (which leaves the previous adapter in place) it still tells the
    truth, and switching back to the previous file needs no reload while any other file is read again.
    """
    files = dict(files)
    check_requirements(files)
    store = target if hasattr(target, "load_file") else _PeftAdapters(target)
    for name in store.adapters:
        if name not in files:
            store.unload(name)
    present = store.adapters
    for name, path in files.items():
        if name not in present or store.files.get(name) != file_stamp(path):
            store.load_file(path, name)
            log.info("Loaded LoRA %s as adapter '%s'.", path, name)


def _param_device_dtype(base: torch.nn.Module, fallback):
    """Device/dtype for LoRA weights: those of the base layer's weight, floats only (fp8 storage
    gets bf16 LoRA weights; meta/offloaded layers get CPU weights)."""
    param = next(iter(base.parameters()), None)
    if param is None and fallback is not None:
        param = next(iter(fallback.parameters()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    dtype = param.dtype if param.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.bfloat16
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    return device, dtype


def unload_lora(transformer: torch.nn.Module, adapter_name: str | None = None) -> None:
    """Remove adapter `adapter_name` (all adapters if None). Layers left without any adapter are
    replaced by their original module, so the model is exactly as before loading."""
    LoraLayer = _lora_layer_type()
    for name, module in list(transformer.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        names = list(module.lora_A.keys()) if adapter_name is None else [adapter_name]
        for n in names:
            if n in module.lora_A:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                    module.delete_adapter(n)
        if len(module.lora_A) == 0:
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
    record = _loaded_files(transformer)
    for n in list(record) if adapter_name is None else [adapter_name]:
        record.pop(n, None)
    if not loaded_adapters(transformer) and hasattr(transformer, "peft_config"):
        # left by peft's injection; without adapters it would only mislead other tools
        with contextlib.suppress(AttributeError):
            del transformer.peft_config
