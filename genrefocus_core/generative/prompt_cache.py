"""Encode each fixed stage prompt once and keep the result on disk.

The stages use fixed prompts, so the ~10 GB T5-XXL encoder (and CLIP-L) are needed only the first
time a given encoder meets a given prompt. The encoding follows diffusers' FluxPipeline.encode_prompt,
which the reference uses: CLIP-L pooled output of the prompt padded/truncated to 77 tokens, T5 last
hidden states of the prompt padded/truncated to `max_length` = 512 tokens, no attention mask, and all-zero
text position ids [512, 3].

Cache entries are safetensors files named by sha256(encoder identity, prompt, max_length) in a
directory (default `~/.cache/genrefocus/prompt_embeds`, or $GENREFOCUS_CACHE_DIR/prompt_embeds, or
the `cache_dir` argument). The encoder identity is a fingerprint of the encoder weight files (size, header and
sampled bytes), so another T5 checkpoint never reuses embeddings of a different one. Inside ComfyUI
the node layer encodes with the user's CLIP loader and hands the tensors plus its own identity string
to `store_prompt_embedding` / `get_prompt_embeddings(precomputed=...)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from ..basics.errors import InputError, ModelFileError, OutputError
from ..basics.files import save_bytes
from .prompt_embedding import PromptEmbedding
from .stages import ADAPTERS, STAGES
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
_FORMAT = "genrefocus-prompt-embedding-v1"


def default_cache_dir() -> Path:
    root = os.environ.get("GENREFOCUS_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "genrefocus"
    return base / "prompt_embeds"


def resolve_prompt(stage_or_prompt: str) -> str:
    """A stage or adapter name (`stages`) -> its stage's prompt; any other text is the prompt."""
    if not isinstance(stage_or_prompt, str) or not stage_or_prompt.strip():
        raise InputError(f"A stage name or prompt text is needed, got {stage_or_prompt!r}.")
    if stage_or_prompt in ADAPTERS:
        return STAGES[ADAPTERS[stage_or_prompt].stage].prompt
    return STAGES[stage_or_prompt].prompt if stage_or_prompt in STAGES else stage_or_prompt


def cache_key(encoder_identity: str, prompt: str, max_length: int = T5_MAX_LENGTH) -> str:
    blob = json.dumps([_FORMAT, str(encoder_identity), prompt, int(max_length)], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def file_fingerprint(path) -> str:
    """Cheap content fingerprint of a (possibly 10 GB) file: size, first 1 MB (incl. the safetensors
    header) and last 1 MB."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:32]


def folder_fingerprint(folder) -> str:
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".json", ".safetensors", ".model", ".txt", ".bin"):
            h.update(str(p.relative_to(folder)).encode())
            h.update(file_fingerprint(p).encode())
    return h.hexdigest()[:32]


def _source_fingerprint(src, subfolders, kind: str) -> str:
    """Fingerprint of a single file, or of the given sub-folders of a diffusers folder."""
    p = Path(src).expanduser()
    if p.is_file():
        return file_fingerprint(p)
    if p.is_dir():
        dirs = [p / s for s in subfolders if (p / s).is_dir()] or [p]
        return "+".join(folder_fingerprint(d) for d in dirs)
    from .model_files import require_file

    require_file(p, kind)  # raises MissingModelFileError naming the folder
    return ""


# ---------------------------------------------------------------------------------------------
# Encoding

@torch.no_grad()
def encode_prompt(prompt: str, clip_model, clip_tokenizer, t5_model, t5_tokenizer,
                  max_length: int = T5_MAX_LENGTH) -> PromptEmbedding:
    """CLIP-L pooled [1, P] + T5 hidden states [1, max_length, D] (FluxPipeline.encode_prompt semantics)."""
    clip_device = next(clip_model.parameters()).device
    t5_device = next(t5_model.parameters()).device
    clip_ids = clip_tokenizer([prompt], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                              return_overflowing_tokens=False, return_length=False,
                              return_tensors="pt").input_ids
    pooled = clip_model(clip_ids.to(clip_device), output_hidden_states=False).pooler_output
    t5_ids = t5_tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                          return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
    hidden = t5_model(t5_ids.to(t5_device), output_hidden_states=False)[0]
    return PromptEmbedding(prompt_embeds=hidden.float().cpu(), pooled=pooled.float().cpu(),
                           text_ids=torch.zeros(hidden.shape[1], 3))


class PromptEncoder:
    """CLIP-L + T5 encoders, loaded only when something must actually be encoded.

    Sources: `diffusers_dir` (encoders and tokenizers), or single files `clip_l` / `t5` with the
    tokenizers from `tokenizer_dir` (a diffusers folder). `identity` is known without loading.
    """

    def __init__(self, *, diffusers_dir=None, clip_l=None, t5=None, tokenizer_dir=None, device=None,
                 dtype: torch.dtype | None = None, clip_config_dir=None, t5_config_dir=None):
        self.diffusers_dir = Path(diffusers_dir).expanduser() if diffusers_dir else None
        self.clip_l = clip_l if clip_l is not None else self.diffusers_dir
        self.t5 = t5 if t5 is not None else self.diffusers_dir
        self.tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else self.diffusers_dir
        if self.clip_l is None or self.t5 is None:
            from .model_files import COMFYUI_FOLDERS, MissingModelFileError

            raise MissingModelFileError("clip_l.safetensors / t5xxl_fp16.safetensors", COMFYUI_FOLDERS["t5"],
                                        "Encoding the stage prompts needs CLIP-L and T5-XXL (single files or a "
                                        "diffusers folder), unless their embeddings are cached already.")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.clip_config_dir, self.t5_config_dir = clip_config_dir, t5_config_dir
        self._models = None
        self.loads = 0  # how many times the encoders were loaded (tests, diagnostics)

    @property
    def identity(self) -> str:
        """Fingerprint of the two encoders' weights. The tokenizers are not part of it: CLIP-L's and
        T5's vocabularies are fixed by the models, so a cache hit needs no tokenizer folder at all."""
        parts = [_source_fingerprint(self.clip_l, ("text_encoder",), "clip_l"),
                 _source_fingerprint(self.t5, ("text_encoder_2",), "t5")]
        return "flux-clip-l+t5:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    def load(self):
        if self._models is None:
            from . import flux_loading as fl

            clip_tok, t5_tok = fl.load_tokenizers(self.tokenizer_dir)  # first: small, and fails fast
            clip = fl.load_clip_text_encoder(self.clip_l, self.dtype, config_dir=self.clip_config_dir)
            t5 = fl.load_t5_encoder(self.t5, self.dtype, config_dir=self.t5_config_dir)
            self._models = (clip.to(self.device), clip_tok, t5.to(self.device), t5_tok)
            self.loads += 1
        return self._models

    def encode(self, prompt: str, max_length: int = T5_MAX_LENGTH) -> PromptEmbedding:
        clip, clip_tok, t5, t5_tok = self.load()
        return encode_prompt(prompt, clip, clip_tok, t5, t5_tok, max_length)

    def free(self):
        """Drop both encoders (call before FLUX is loaded; they are never resident beside it)."""
        if self._models is not None:
            from .memory import free_module

            clip, _, t5, _ = self._models
            self._models = None
            free_module(clip, t5)

    @property
    def loaded(self) -> bool:
        return self._models is not None


# ---------------------------------------------------------------------------------------------
# Disk cache

def _entry_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"{key}.safetensors"


def read_cached(cache_dir, identity: str, prompt: str, max_length: int = T5_MAX_LENGTH):
    """The cached PromptEmbedding, or None when absent or unreadable (an unreadable entry is removed)."""
    from safetensors import safe_open

    path = _entry_path(cache_dir, cache_key(identity, prompt, max_length))
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT or meta.get("identity") != identity or \
                    meta.get("prompt") != prompt or int(meta.get("max_length", -1)) != int(max_length):
                raise ValueError("metadata does not match the request")
            emb = PromptEmbedding(prompt_embeds=f.get_tensor("prompt_embeds"),
                                  pooled=f.get_tensor("pooled_prompt_embeds"), text_ids=f.get_tensor("text_ids"))
        if emb.prompt_embeds.shape[1] != max_length or not torch.isfinite(emb.prompt_embeds).all() \
                or not torch.isfinite(emb.pooled).all():
            raise ValueError("wrong length or non-finite values")
        return emb
    except Exception as e:  # corrupt / truncated / foreign file: re-encode instead of failing
        warnings.warn(f"Prompt-embedding cache entry {path} is unusable ({type(e).__name__}: {e}); re-encoding.")
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def write_cached(cache_dir, identity: str, prompt: str, emb: PromptEmbedding,
                 max_length: int = T5_MAX_LENGTH) -> Path:
    from safetensors.torch import save

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = _entry_path(cache_dir, cache_key(identity, prompt, max_length))
    data = save({"prompt_embeds": emb.prompt_embeds.detach().float().cpu().contiguous(),
                 "pooled_prompt_embeds": emb.pooled.detach().float().cpu().contiguous(),
                 "text_ids": emb.text_ids.detach().float().cpu().contiguous()},
                metadata={"format": _FORMAT, "identity": identity, "prompt": prompt, "max_length": str(max_length)})
    return save_bytes(path, data, "prompt-embedding cache entry")


def _as_embedding(precomputed) -> PromptEmbedding:
    if isinstance(precomputed, PromptEmbedding):
        return precomputed
    if isinstance(precomputed, (tuple, list)) and len(precomputed) in (2, 3):
        embeds, pooled = precomputed[0], precomputed[1]
        ids = precomputed[2] if len(precomputed) == 3 and precomputed[2] is not None else \
            torch.zeros(embeds.shape[-2], 3)
        if embeds.ndim == 2:
            embeds = embeds[None]
        if pooled.ndim == 1:
            pooled = pooled[None]
        try:
            return PromptEmbedding(prompt_embeds=embeds, pooled=pooled, text_ids=ids)
        except ModelFileError as e:
            raise InputError(f"Precomputed prompt embedding has wrong shapes: {e}") from None
    raise InputError("precomputed must be a PromptEmbedding or (prompt_embeds [1,T,D], pooled [1,P][, text_ids]).")


def store_prompt_embedding(identity: str, stage_or_prompt: str, precomputed, cache_dir=None,
                           max_length: int = T5_MAX_LENGTH) -> PromptEmbedding:
    """Put tensors encoded elsewhere (e.g. by ComfyUI's CLIP) into the cache under `identity`
    (an unwritable cache folder only warns)."""
    if not identity:
        raise InputError("An encoder identity string is needed to cache precomputed prompt embeddings.")
    emb = _as_embedding(precomputed)
    if emb.prompt_embeds.shape[1] != max_length:
        raise InputError(f"Precomputed T5 embedding has {emb.prompt_embeds.shape[1]} tokens; the GenRefocus "
                         f"stages expect {max_length} (T5 padded to {max_length}, e.g. ComfyUI's "
                         f"t5xxl_min_length={max_length}).")
    _try_write(cache_dir or default_cache_dir(), identity, resolve_prompt(stage_or_prompt), emb, max_length)
    return emb


def get_prompt_embeddings(stage_or_prompt: str, encoder: PromptEncoder | None = None, cache_dir=None, *,
                          identity: str | None = None, precomputed=None,
                          max_length: int = T5_MAX_LENGTH, free_encoder: bool = True) -> PromptEmbedding:
    """The embedding of a stage prompt (or any prompt): from the cache, else from `precomputed`
    tensors, else encoded by `encoder` (loaded on demand, freed after unless free_encoder=False)."""
    prompt = resolve_prompt(stage_or_prompt)
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if identity is None:
        if encoder is None:
            raise InputError("get_prompt_embeddings needs an encoder or an identity string for the cache.")
        identity = encoder.identity
    cached = read_cached(cache_dir, identity, prompt, max_length)
    if cached is not None:
        return cached
    if precomputed is not None:
        return store_prompt_embedding(identity, prompt, precomputed, cache_dir, max_length)
    if encoder is None:
        raise InputError(f"No cached embedding for prompt {prompt!r} under encoder identity {identity!r}, and no "
                         "encoder or precomputed tensors were given.")
    was_loaded = encoder.loaded
    try:
        emb = encoder.encode(prompt, max_length)
    finally:
        if free_encoder and not was_loaded:
            encoder.free()
    _try_write(cache_dir, identity, prompt, emb, max_length)
    return emb


def _try_write(cache_dir, identity, prompt, emb, max_length):
    """A cache that cannot be written (read-only, a file in the way) costs a re-encode next time, not the run."""
    try:
        write_cached(cache_dir, identity, prompt, emb, max_length)
    except (OSError, OutputError) as e:
        warnings.warn(f"Prompt embedding could not be cached in {cache_dir} ({e}); it will be encoded again "
                      "next time. Set GENREFOCUS_CACHE_DIR or cache_dir to a writable folder.")


def get_stage_embeddings(stages, encoder: PromptEncoder | None = None, cache_dir=None, *,
                         identity: str | None = None, max_length: int = T5_MAX_LENGTH) -> dict:
    """{stage: PromptEmbedding} for several stages with at most one load of the encoders, freed after."""
    out = {}
    try:
        for stage in stages:
            out[stage] = get_prompt_embeddings(stage, encoder, cache_dir, identity=identity,
                                               max_length=max_length, free_encoder=False)
    finally:
        if encoder is not None:
            encoder.free()
    return out
