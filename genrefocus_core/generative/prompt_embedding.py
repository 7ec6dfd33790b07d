"""The encoded text prompt of one stage, as the FLUX transformer consumes it.

The generative stages use fixed prompts (`stages`), so their T5/CLIP encodings can be computed
once and stored. `PromptEmbedding` is that stored encoding; `from_safetensors` reads the layout of
`prompt_embeds.safetensors` (keys `<stage>_prompt_embeds`, `<stage>_pooled_prompt_embeds`,
`<stage>_text_ids`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..basics.errors import MissingModelFileError, ModelFileError


@dataclass(frozen=True)
class PromptEmbedding:
    """T5 sequence embedding [1, 512, D], CLIP pooled embedding [1, P] and text position ids [512, 3]."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor

    def __post_init__(self):
        if self.prompt_embeds.ndim != 3 or self.prompt_embeds.shape[0] != 1:
            raise ModelFileError(f"prompt_embeds must be [1, tokens, D], got {tuple(self.prompt_embeds.shape)}.")
        if self.pooled.ndim != 2 or self.pooled.shape[0] != 1:
            raise ModelFileError(f"pooled prompt embedding must be [1, P], got {tuple(self.pooled.shape)}.")
        if self.text_ids.ndim != 2 or self.text_ids.shape != (self.prompt_embeds.shape[1], 3):
            raise ModelFileError(
                f"text_ids must be [{self.prompt_embeds.shape[1]}, 3] to match prompt_embeds, "
                f"got {tuple(self.text_ids.shape)}."
            )
        for name, t in (("prompt_embeds", self.prompt_embeds), ("pooled prompt embedding", self.pooled),
                        ("text_ids", self.text_ids)):
            if not t.is_floating_point():
                raise ModelFileError(f"{name} must hold floating-point numbers, got {t.dtype}.")
            if not torch.isfinite(t.float()).all():
                raise ModelFileError(f"{name} contains NaN or infinite values: the encoding is broken; encode the "
                                     "prompt again (or use another prompt-embeddings file).")

    def to(self, device=None, dtype=None) -> "PromptEmbedding":
        """Move to `device`; embeddings (not the integer-valued ids) are cast to `dtype`."""
        return PromptEmbedding(
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
            text_ids=self.text_ids.to(device=device),
        )

    @classmethod
    def from_safetensors(cls, path, stage: str) -> "PromptEmbedding":
        """Read stage `stage` (a name of `stages.STAGES`) from a prompt-embedding safetensors file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise MissingModelFileError(path.name, path.parent)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFileError(f"{path}: not a readable safetensors file ({e}).") from None
        keys = [f"{stage}_prompt_embeds", f"{stage}_pooled_prompt_embeds", f"{stage}_text_ids"]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ModelFileError(
                f"{path}: no prompt embedding for stage '{stage}' (missing keys {missing}; "
                f"file has {sorted(tensors)})."
            )
        return cls(prompt_embeds=tensors[keys[0]], pooled=tensors[keys[1]], text_ids=tensors[keys[2]])


# Where diffusers' and the original (BFL) FLUX layouts take the T5 sequence and the pooled CLIP vector.
_TEXT_INPUTS = (("context_embedder", "txt_in"), ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"))


def check_fits_transformer(emb, transformer, stage: str) -> None:
    """ModelFileError when a stage's embedding does not have the widths the transformer reads (T5
    width D of prompt_embeds, CLIP width P of pooled): caught here, with the widths named, instead of
    as a matrix-shape error deep inside the first denoising step."""
    net = transformer if hasattr(transformer, "named_modules") else getattr(transformer, "model", None)  # BflLayout
    if net is None:
        return
    modules = dict(net.named_modules())
    for (diffusers_name, bfl_name), (what, width) in zip(
            _TEXT_INPUTS, (("T5 prompt embedding", emb.prompt_embeds.shape[-1]), ("pooled CLIP embedding",
                                                                                 emb.pooled.shape[-1]))):
        layer = modules.get(diffusers_name, modules.get(bfl_name))
        wanted = getattr(layer, "in_features", None)
        if wanted is not None and int(width) != int(wanted):
            raise ModelFileError(f"The '{stage}' {what} is {width} wide but this FLUX transformer reads {wanted}: the "
                                 "embeddings were made by other text encoders (FLUX.1-dev uses T5-XXL, 4096, and "
                                 "CLIP-L, 768). Encode the prompts with FLUX's text encoders.")
