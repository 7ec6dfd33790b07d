"""Focus pulls over a batch of frames: focus keyframes with easing -> one focal plane (and blur level)
per frame.

A keyframe says where the focus is at one frame: a point (fractions of width and height, as the
preview picker stores them), a distance in metres, a 0-1 depth slider (0 = the nearest disparity of
the whole clip, 1 = the farthest) or a disparity value. Each keyframe is resolved on its own frame by
`defocus.resolve_focus` (the one place where a focus choice becomes a focal plane), so a point
keyframe focuses on whatever lies under that point in that frame. Between two keyframes the focal
plane's disparity moves with the easing of the keyframe it moves towards:
- "linear": at a constant rate;
- "ease-in-out": smoothstep 3t^2 - 2t^3 (starts and stops gently, as a focus puller's hand);
- "hold": stays until the keyframe's frame, then jumps (a snap focus).
Moving linearly in disparity, not in distance, is what a focus ring does: the blur of every depth
changes at a constant rate. Before the first keyframe and after the last the focus holds.

A keyframe may also set the blur level K; K then moves with the same easing. A keyframe without K
keeps the one before it (the first: the pull's default K).

Keyframes as text (what the node's widget holds), one per line, `#` starts a comment; `last` is
the clip's last frame, whatever its length:
    0: point 0.2 0.72
    12: distance 6 ease-in-out
    20: depth 1 K=35 hold
    last: value 0.5 linear
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from .defocus import Defocus, Lens, build_defocus, check_blur_level, disparity_range, resolve_focus
from .errors import InputError
from .images import to_map_batch

EASINGS = ("linear", "ease-in-out", "hold")
KEYFRAME_MODES = {"point": 2, "distance": 1, "depth": 1, "value": 1}  # mode -> how many numbers
MAX_FRAMES = 100_000
LAST_FRAME = -1  # a keyframe's frame: the clip's last frame


@dataclass(frozen=True)
class FocusKeyframe:
    """Focus at one frame (LAST_FRAME: the clip's last). mode: one of KEYFRAME_MODES; values: (x, y)
    for a point, else one number;
    K: blur level from here on (None = keep the previous one); easing: how the focus arrives here
    (None = the pull's default)."""

    frame: int
    mode: str
    values: tuple[float, ...]
    K: float | None = None
    easing: str | None = None

    def __post_init__(self):
        if isinstance(self.frame, bool) or not isinstance(self.frame, int) or not LAST_FRAME <= self.frame < MAX_FRAMES:
            raise InputError(f"Keyframe frame must be a whole number in [0, {MAX_FRAMES}) or the last frame, "
                             f"got {self.frame!r}.")
        if self.mode not in KEYFRAME_MODES:
            raise InputError(f"Keyframe at frame {self.frame}: unknown focus {self.mode!r}; use one of "
                             f"{', '.join(KEYFRAME_MODES)}.")
        if len(self.values) != KEYFRAME_MODES[self.mode]:
            raise InputError(f"Keyframe at frame {self.frame}: '{self.mode}' takes {KEYFRAME_MODES[self.mode]} "
                             f"number(s), got {len(self.values)}.")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.values):
            raise InputError(f"Keyframe at frame {self.frame}: focus values must be finite numbers, got {self.values}.")
        if self.K is not None:
            check_blur_level(self.K)
        if self.easing is not None:
            check_easing(self.easing)


@dataclass
class FocusPull:
    """Per-frame focal planes: focus_disparity [N] (1/m for metric depth) and K [N] (px per 1/m), and
    the lens controls every frame shares (`defocus.build_defocus`'s: a thin lens instead of K, an
    in-focus band, near/far blur strength; the band's fraction and the slider are of the clip's
    depth range)."""

    focus_disparity: torch.Tensor
    K: torch.Tensor
    lens: Lens | None = None
    in_focus_m: float = 0.0
    in_focus_fraction: float = 0.0
    near_scale: float = 1.0
    far_scale: float = 1.0
    metric: bool = True
    depth_range: tuple[float, float] | None = None

    @property
    def frames(self) -> int:
        return int(self.focus_disparity.shape[0])

    def signed_coc(self, disparity) -> torch.Tensor:
        """Signed CoC radius [N,H,W] in px of every frame; a single disparity map serves every frame."""
        return self.defocus(disparity).signed_coc

    def defocus(self, disparity) -> Defocus:
        """The clip's defocus maps, each frame as Defocus Map makes one for one image (BokehNet,
        Classical Bokeh); with a lens, K follows the focus distance frame by frame."""
        disp = to_map_batch(disparity, "disparity", batch=self.frames)
        frames = [build_defocus(disp[i:i + 1], self.focus_disparity[i:i + 1],
                                K=None if self.lens else float(self.K[i]), lens=self.lens, metric=self.metric,
                                in_focus_m=self.in_focus_m, in_focus_fraction=self.in_focus_fraction,
                                near_scale=self.near_scale, far_scale=self.far_scale, depth_range=self.depth_range)
                  for i in range(self.frames)]
        return Defocus(signed_coc=torch.cat([d.signed_coc for d in frames]), focus_disparity=self.focus_disparity,
                       K=torch.cat([d.K for d in frames]))


def check_easing(easing: str) -> str:
    if easing not in EASINGS:
        raise InputError(f"Easing must be one of {', '.join(EASINGS)}, got {easing!r}.")
    return easing


def ease(easing: str, t: torch.Tensor) -> torch.Tensor:
    """Fraction of the way travelled at time fraction t in [0, 1] (float64 in, float64 out)."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
    if check_easing(easing) == "linear":
        return t
    if easing == "ease-in-out":
        return t * t * (3.0 - 2.0 * t)
    return (t >= 1.0).to(torch.float64)  # hold


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"


def parse_keyframes(text: str) -> list[FocusKeyframe]:
    """Keyframe text (module docstring) -> keyframes sorted by frame. Errors name the line."""
    if not isinstance(text, str):
        raise InputError(f"Focus keyframes must be text, got {type(text).__name__}.")
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        head = head.strip().lower()
        if not sep or not (head.isdigit() or head == "last"):
            raise InputError(f"Focus keyframes, line {n} ({raw.strip()!r}): expected '<frame>: <focus> ...', "
                             "e.g. '0: point 0.5 0.5', '12: distance 2.5', 'last: depth 0.8 hold'.")
        frame = LAST_FRAME if head == "last" else int(head)
        words = rest.replace(",", " ").split()
        if not words:
            raise InputError(f"Focus keyframes, line {n}: no focus after the frame number.")
        mode, numbers, K, easing = words[0].lower(), [], None, None
        for w in words[1:]:
            low = w.lower()
            if re.fullmatch(_NUMBER, low):
                numbers.append(float(low))
            elif low.startswith("k="):
                try:
                    K = float(low[2:])
                except ValueError:
                    raise InputError(f"Focus keyframes, line {n}: {w!r} is not a blur level (write K=25).") from None
            elif low in EASINGS:
                easing = low
            else:
                raise InputError(f"Focus keyframes, line {n}: unknown word {w!r} (numbers, K=<blur level> or an "
                                 f"easing: {', '.join(EASINGS)}).")
        try:
            out.append(FocusKeyframe(frame, mode, tuple(numbers), K, easing))
        except InputError as e:
            raise InputError(f"Focus keyframes, line {n}: {e}") from None
    return out


def _checked(keyframes, frames: int) -> list[FocusKeyframe]:
    """Keyframes (text or objects) with `last` placed at frame `frames - 1`, sorted by frame."""
    keys = parse_keyframes(keyframes) if isinstance(keyframes, str) else list(keyframes)
    if not keys:
        raise InputError("A focus pull needs at least one keyframe, e.g. '0: point 0.5 0.5'.")
    if not all(isinstance(k, FocusKeyframe) for k in keys):
        raise InputError("Focus keyframes must be FocusKeyframe objects or keyframe text.")
    keys = sorted((replace(k, frame=frames - 1) if k.frame == LAST_FRAME else k for k in keys), key=lambda k: k.frame)
    frames = [k.frame for k in keys]
    if len(set(frames)) != len(frames):
        dup = sorted({f for f in frames if frames.count(f) > 1})
        raise InputError(f"Focus keyframes: frame(s) {dup} given twice.")
    return keys


def clip_length(batch: int, frames: int = 0) -> int:
    """Frames of the pull: `frames` when > 0 (a still, batch 1, is repeated), else the depth batch."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
        raise InputError(f"frames must be a whole number >= 0 (0 = the depth batch), got {frames!r}.")
    n = frames or batch
    if batch not in (1, n):
        raise InputError(f"The depth has {batch} frames but the pull asks for {n}: give one depth map (a still) "
                         "or one per frame.")
    if n > MAX_FRAMES:
        raise InputError(f"A focus pull of {n} frames is more than {MAX_FRAMES}.")
    return n


def resolve_keyframe(disparity: torch.Tensor, key: FocusKeyframe, metric: bool,
                     depth_range: tuple[float, float]) -> float:
    """The focal-plane disparity one keyframe asks for, on its frame's disparity [1,H,W]."""
    v = key.values
    try:
        f = resolve_focus(disparity, key.mode, point=v if key.mode == "point" else None, normalized=True,
                          value=v[0], distance_m=v[0], depth=v[0], metric=metric, depth_range=depth_range)
    except InputError as e:
        raise InputError(f"Keyframe at frame {key.frame}: {e}") from None
    return float(f[0])


def focus_pull(disparity, keyframes, frames: int = 0, K: float = 20.0, easing: str = "ease-in-out",
               metric: bool = True, lens: Lens | None = None, in_focus_m: float = 0.0, in_focus_fraction: float = 0.0,
               near_scale: float = 1.0, far_scale: float = 1.0) -> FocusPull:
    """Per-frame focal planes and blur levels for a clip.

    disparity: [B,H,W] of the clip's frames (B = frames), or one map [1,H,W] for a still.
    keyframes: keyframe text or FocusKeyframe objects; frames at or past the clip's end are an error.
    frames: length of the clip (0 = the disparity batch). K: the blur level until a keyframe sets one.
    easing: the easing of keyframes that name none. metric: whether the disparity is in 1/m (needed
    for distance keyframes and a lens). lens: a thin lens instead of K (its blur follows the focus
    distance; keyframes may not set K then); in_focus_m / in_focus_fraction, near_scale / far_scale:
    as `defocus.build_defocus`, for every frame.
    """
    disp = to_map_batch(disparity, "disparity")
    n = clip_length(int(disp.shape[0]), frames)
    keys = _checked(keyframes, n)
    check_easing(easing)
    K = check_blur_level(K)
    late = [k.frame for k in keys if k.frame >= n]
    if late:
        raise InputError(f"Focus keyframes at frame(s) {late} lie past the clip's last frame {n - 1} "
                         f"(frames are counted from 0).")
    if lens is not None:
        with_k = [k.frame for k in keys if k.K is not None]
        if with_k:
            raise InputError(f"Keyframe(s) at frame {with_k} set K, but the blur comes from the lens (f-number and "
                             "focal length); remove K= or use the blur level K instead of the lens.")
        if not metric:
            raise InputError("Lens blur needs metric depth (1/m disparity); this depth is relative. Give the blur "
                             "level K instead, or use a metric depth source.")
    depth_range = disparity_range(disp)  # one slider for the whole clip
    focus = [resolve_keyframe(disp[k.frame if disp.shape[0] > 1 else 0][None], k, metric, depth_range) for k in keys]
    blur = []
    for k in keys:
        blur.append(K if k.K is None else float(k.K))
        K = blur[-1]
    track = interpolate([k.frame for k in keys], [(f, b) for f, b in zip(focus, blur)],
                        [k.easing or easing for k in keys], n)
    pull = FocusPull(*track, lens=lens, in_focus_m=in_focus_m, in_focus_fraction=in_focus_fraction,
                     near_scale=near_scale, far_scale=far_scale, metric=metric, depth_range=depth_range)
    # the controls' mistakes now, not after the caller's first long step
    build_defocus(disp[:1, :1, :1], pull.focus_disparity[:1], K=None if lens else float(pull.K[0]), lens=lens,
                  metric=metric, in_focus_m=in_focus_m, in_focus_fraction=in_focus_fraction, near_scale=near_scale,
                  far_scale=far_scale, depth_range=depth_range)
    return pull


def interpolate(key_frames: list[int], key_values: list[tuple[float, ...]], easings: list[str],
                frames: int) -> tuple[torch.Tensor, ...]:
    """Values at keyframes -> one float32 tensor [frames] per component, eased between keyframes
    (keyframe i's easing takes the value from keyframe i-1 to i) and held before the first and after
    the last; a keyframe's own frame gets exactly its value."""
    t = torch.arange(frames, dtype=torch.float64)
    vals = torch.tensor(key_values, dtype=torch.float64)  # [K, C]
    out = vals[0].expand(frames, -1).clone()
    for i in range(1, len(key_frames)):
        a, b = key_frames[i - 1], key_frames[i]
        seg = (t > a) & (t <= b)
        s = ease(easings[i], (t[seg] - a) / (b - a))[:, None]
        out[seg] = vals[i - 1] + (vals[i] - vals[i - 1]) * s
        out[b] = vals[i]
    out[t > key_frames[-1]] = vals[-1]
    return tuple(out[:, c].float() for c in range(out.shape[1]))
