"""The generative stages and their LoRA adapters: the one place that names them.

Two stages, each with a fixed prompt, FLUX guidance and default seed:
- "deblur" (DeblurNet): blurry or sharp photo -> all-in-focus image;
- "bokeh" (BokehNet): all-in-focus image + defocus map -> refocused image.

Four LoRA adapters, each serving one stage (its prompt embedding is that stage's):
- "deblurring" (deblurNet.safetensors) and "pre_deblur" (deblurNet_with_pre_deblur.safetensors,
  which also takes a pre-deblurred image) for deblur;
- "bokeh" (bokehNet.safetensors) and "aperture" (an aperture-shape LoRA, not released by the
  authors) for bokeh; "aperture" is trained on top of "bokeh" and needs it.

Each adapter's `option` is its keyword in `load_genrefocus`, its input of Load GenRefocus and (with
dashes) its CLI flag.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..basics.errors import InputError


@dataclass(frozen=True)
class Stage:
    name: str
    prompt: str
    guidance: float  # FLUX guidance-embedding scale the LoRA was trained with
    seed: int  # default seed of the initial noise in the node and the reference scripts


@dataclass(frozen=True)
class Adapter:
    name: str  # peft adapter name
    stage: str  # the stage whose prompt and sampler it runs with
    option: str  # load_genrefocus keyword / node input / CLI flag
    file: str  # the released file's usual name (node defaults, messages)
    released: bool
    requires: tuple[str, ...] = ()  # adapters that must be loaded with it


# The reference's deblur script seeds everything with 42; its bokeh demo fixes 1234, so that re-rendering
# with another K or focus changes only the blur.
DEBLUR = Stage("deblur", "a sharp photo with everything in focus", guidance=3.5, seed=42)
BOKEH = Stage("bokeh", "an excellent photo with a large aperture", guidance=1.0, seed=1234)
STAGES = {s.name: s for s in (DEBLUR, BOKEH)}

DEBLUR_ADAPTER = Adapter("deblurring", "deblur", "deblur_lora", "deblurNet.safetensors", released=True)
PRE_DEBLUR_ADAPTER = Adapter("pre_deblur", "deblur", "pre_deblur_lora", "deblurNet_with_pre_deblur.safetensors",
                             released=True)
BOKEH_ADAPTER = Adapter("bokeh", "bokeh", "bokeh_lora", "bokehNet.safetensors", released=True)
APERTURE_ADAPTER = Adapter("aperture", "bokeh", "aperture_lora",
                           "an aperture-shape LoRA (not released by the authors)", released=False, requires=("bokeh",))
ADAPTERS = {a.name: a for a in (DEBLUR_ADAPTER, PRE_DEBLUR_ADAPTER, BOKEH_ADAPTER, APERTURE_ADAPTER)}

DEBLUR_VARIANTS = ("auto", "plain", "pre_deblur")


def adapter(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise InputError(f"Unknown GenRefocus adapter {name!r}; known: {list(ADAPTERS)}.") from None


def stages_of(adapter_names: Iterable[str]) -> list[str]:
    """The stages (sorted names) whose prompts the given adapters need."""
    return sorted({adapter(a).stage for a in adapter_names})


def check_requirements(adapter_names: Iterable[str]) -> None:
    """InputError when an adapter is chosen without one it works on top of (aperture without bokeh)."""
    names = set(adapter_names)
    for name in names:
        for needed in adapter(name).requires:
            if needed not in names:
                raise InputError(f"The {name} LoRA works on top of the {needed} LoRA ({ADAPTERS[needed].file}): "
                                 f"give {ADAPTERS[needed].option} as well.")


def deblur_adapter(variant: str, loaded: Iterable[str], pre_deblurred_given: bool) -> str:
    """The adapter DeblurNet runs with. variant "plain" -> deblurring, "pre_deblur" -> pre_deblur,
    "auto" -> pre_deblur when a pre-deblurred image is given or only the pre_deblur adapter is loaded."""
    if variant not in DEBLUR_VARIANTS:
        raise InputError(f"variant must be one of {DEBLUR_VARIANTS}, got {variant!r}.")
    if variant == "auto":
        loaded = set(loaded)
        only_pre = PRE_DEBLUR_ADAPTER.name in loaded and DEBLUR_ADAPTER.name not in loaded
        variant = "pre_deblur" if pre_deblurred_given or only_pre else "plain"
    if variant == "plain" and pre_deblurred_given:
        raise InputError("A pre-deblurred image was given with variant='plain'; use variant='pre_deblur' or 'auto'.")
    return PRE_DEBLUR_ADAPTER.name if variant == "pre_deblur" else DEBLUR_ADAPTER.name
