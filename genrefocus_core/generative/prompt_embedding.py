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
