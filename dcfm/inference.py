"""Clip inference with keyframe reuse (METHOD.md §4).

``ClipSegmenter.segment`` streams ``FrameResult``s in frame order from a tensor of frames or any frame
iterator. It works in blocks of ``batch_size`` frames: the shallow layers run on the whole block in one
batch, the deep layers on the block's keyframes in one batch, and the fusion + head on every frame of
the block in one batch. Memory is bounded by the block: at most ``batch_size`` deep feature maps (plus
the previous keyframe's) are alive, and bidirectional mode buffers only the shallow features of the
frames waiting for their next keyframe — never one deep map per frame of the clip.

What a keyframe caches is not f_com itself but its share of the FFM conv (``FeatureFusion.keyframe_term``),
so a non-keyframe costs only the shallow layers, a thin conv, BN, the norm and the head.

A model trained with ``nonkey_scale`` s < 1 runs its non-keyframes on frames resized by s (AR-Seg's altered
resolution): the keyframe term is aligned once per keyframe to the low-resolution grid, the non-key logits are
coarser and are upsampled to the output size like any others. Keyframes always run at full resolution.

Keyframe policies: a fixed interval (optionally with a ``phase``: keyframes where ``index % interval == phase``,
the frames before the first one using the next keyframe only), adaptive (a distance threshold), or ``codec``:
the stream's own I-frames/seek points (the probe's ``keyframes``), bounded by ``min_interval``/``max_interval``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch
import torch.nn.functional as F

from dcfm.postprocess import frame_labels
from dcfm.model import DCFM, IMAGENET_MEAN, IMAGENET_STD, upsample_logits


class ReuseMode(str, Enum):
    """How a non-keyframe picks the keyframe(s) whose common features it reuses."""

    CAUSAL = "causal"  # previous keyframe only: streaming, one frame of latency
    BIDIRECTIONAL = "bidirectional"  # previous + next keyframe, logits summed (the paper's default)


class KeyframeScore(str, Enum):
    """What adaptive scheduling compares a frame with the last keyframe by."""

    RGB = "rgb"  # mean |I_t - I_key| over normalised RGB (the authors' AKS)
    FEATURE = "feature"  # 1 - mean cosine similarity of the shallow features (TFC-style, free)


@dataclass
class KeyframePolicy:
    """A fixed interval ``interval``; or (``adaptive``) a distance threshold bounded by min/max gaps; or
    (``codec``) the stream's own seek points, kept when at least ``min_interval`` after the last keyframe, with a
    keyframe forced ``max_interval`` after the last one. ``phase`` shifts a fixed schedule (evaluation)."""

    interval: int = 2
    adaptive: bool = False
    min_interval: int = 1
    max_interval: int = 6
    threshold: float = 0.1
    score: KeyframeScore = KeyframeScore.RGB
    codec: bool = False
    phase: int = 0

    def __post_init__(self) -> None:
        self.score = KeyframeScore(self.score)
        if self.interval < 1:
            raise ValueError(f"keyframe interval must be >= 1, got {self.interval}")
        if self.adaptive and self.codec:
            raise ValueError("choose adaptive or codec keyframes, not both")
        if (self.adaptive or self.codec) and not 1 <= self.min_interval <= self.max_interval:
            kind = "adaptive" if self.adaptive else "codec"
            raise ValueError(
                f"{kind} keyframes need 1 <= min_interval <= max_interval, got {self.min_interval}, {self.max_interval}"
            )
        if not 0 <= self.phase < self.interval or (self.phase and (self.adaptive or self.codec)):
            raise ValueError(f"phase must be in 0..interval-1 of a fixed schedule, got {self.phase}")

    @property
    def fixed(self) -> bool:
        return not (self.adaptive or self.codec)

    @property
    def longest_gap(self) -> int:
        """The largest possible distance between consecutive keyframes."""
        return self.interval if self.fixed else self.max_interval


@dataclass
class InferenceConfig:
    """How to run a clip: keyframe policy, reuse mode, batch size and output resolution."""

    keyframes: KeyframePolicy = field(default_factory=KeyframePolicy)
    mode: ReuseMode = ReuseMode.BIDIRECTIONAL
    batch_size: int = 8
    output_size: tuple[int, int] | None = None  # (H, W) of label maps; None = the input frames' size
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    return_logits: bool = False  # keep per-frame logits (CPU, output size) on the results; for evaluation/tests
    # Non-keyframe resolution scale; None: the one the model was trained for (DCFMConfig.nonkey_scale). Any
    # other value is refused: the cross-resolution fusion exists (and is trained) only for the model's own s.
    nonkey_scale: float | None = None

    def __post_init__(self) -> None:
        self.mode = ReuseMode(self.mode)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class FrameResult:
    """One segmented frame."""

    index: int  # frame index within the video (start_index + position in the clip)
    labels: np.ndarray  # H x W class indices, uint8 (uint16 above 256 classes)
    is_keyframe: bool
    keyframes: tuple[int, ...]  # keyframe indices whose common features this frame used
    confidence: float  # mean over pixels of the max softmax probability
    agreement: float | None  # bidirectional: fraction of pixels where prev- and next-keyframe predictions agree
    logits: torch.Tensor | None = None


@dataclass
class _Keyframe:
    index: int
    term: torch.Tensor  # 1 x C x h x w, FeatureFusion.keyframe_term(f_com)
    aligned: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # term on low-res grids


@dataclass
class _Frame:
    index: int
    independent: torch.Tensor  # 1 x C x h x w raw f_ind
    is_keyframe: bool
    emit: bool  # False for a look-ahead frame that only serves as the next keyframe


@dataclass
class _ClipState:
    output_size: tuple[int, int] = (0, 0)
    last_key: _Keyframe | None = None
    last_key_index: int | None = None  # set as soon as a frame is decided a keyframe, before its deep pass
    last_key_reference: torch.Tensor | None = None  # what adaptive scoring compares with
    pending: list[_Frame] = field(default_factory=list)  # bidirectional: waiting for their next keyframe
    deep_frames: int = 0  # frames that went through the deep layers (for tests and stats)
    codec_keyframes: frozenset[int] = frozenset()  # the stream's seek points (codec policy)


def _as_uint8_hwc(frame: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(frame)
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[-1] != 3:
        raise ValueError(
            f"frames must be H x W x 3 uint8 RGB arrays, got dtype {tensor.dtype} shape {tuple(tensor.shape)}"
        )
    return tensor


def label_dtype(num_classes: int) -> np.dtype:
    """Smallest unsigned dtype for label maps of ``num_classes`` classes."""
    return np.dtype(np.uint8) if num_classes <= 256 else np.dtype(np.uint16)


class ClipSegmenter:
    """Segments clips with DCFM keyframe reuse. Build once per model; call ``segment`` per clip."""

    def __init__(self, model: DCFM, config: InferenceConfig | None = None, device: torch.device | None = None):
        self.config = config or InferenceConfig()
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self._mean = torch.tensor(self.config.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.config.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._label_dtype = label_dtype(model.config.num_classes)
        trained = model.config.nonkey_scale
        asked = trained if self.config.nonkey_scale is None else float(self.config.nonkey_scale)
        if asked != trained:
            raise ValueError(
                f"non-keyframe scale {asked:g}: this model was trained for {trained:g} (its checkpoint card says so); "
                f"run it with --nonkey-scale {trained:g}, or train a model for {asked:g} (dcfm train --nonkey-scale)"
            )
        self.nonkey_scale = trained

    # --- public ------------------------------------------------------------------------------------------------
    def segment(
        self,
        frames: torch.Tensor | np.ndarray | Iterable[np.ndarray | torch.Tensor],
        start_index: int = 0,
        lookahead_from: int | None = None,
        codec_keyframes: Iterable[int] | None = None,
    ) -> Iterator[FrameResult]:
        """Segment a clip, yielding one result per frame in order.

        ``frames``: N x H x W x 3 uint8 RGB, or an iterable of H x W x 3 frames (decoded lazily).
        ``start_index``: the first frame's index in its video; fixed schedules place keyframes where
        ``index % interval == 0`` (and always on the clip's first frame), so chunks aligned to the interval
        give the same keyframes as the whole video.
        ``lookahead_from``: positions >= this are look-ahead: the first one is used as the next keyframe of
        the clip's last frames (bidirectional mode) and nothing from it is emitted. A chunked reader passes
        the next chunk's first frame, which is always a keyframe, so chunking does not change the results.
        ``codec_keyframes``: the video's seek points (display indices, ``VideoProbe.keyframes``), which the
        ``codec`` policy takes as keyframes within its interval bounds.
        """
        if self.config.keyframes.codec and codec_keyframes is None:
            raise ValueError("the codec keyframe policy needs the stream's seek points: pass codec_keyframes= "
                             "(VideoProbe.keyframes)")
        state = _ClipState(codec_keyframes=frozenset(codec_keyframes or ()))
        self.last_clip = state  # exposes deep_frames for tests and statistics
        stream = iter(frames)
        position = 0
        while True:
            block = self._next_block(stream, start_index, position, lookahead_from)
            if not block:
                break
            position += len(block)
            results = self._process_block(block, state)
            yield from results
            if not block[-1][2]:  # reached the look-ahead keyframe: nothing more is needed
                break
        yield from self._flush(state)

    # --- blocks ------------------------------------------------------------------------------------------------
    def _next_block(
        self, stream: Iterator, start_index: int, position: int, lookahead_from: int | None
    ) -> list[tuple[int, torch.Tensor, bool]]:
        """Up to batch_size (index, frame, emit) triples; the look-ahead frame, if reached, ends the block."""
        block = []
        causal = self.config.mode is ReuseMode.CAUSAL
        for frame in itertools.islice(stream, self.config.batch_size):
            emit = lookahead_from is None or position < lookahead_from
            if not emit and causal:
                break  # a causal clip never looks ahead
            block.append((start_index + position, _as_uint8_hwc(frame), emit))
            position += 1
            if not emit:
                break
        return block

    def _process_block(self, block: list[tuple[int, torch.Tensor, bool]], state: _ClipState) -> list[FrameResult]:
        model = self.model
        with torch.inference_mode():
            images = torch.stack([f for _, f, _ in block]).to(self.device, non_blocking=True)
            images = (images.permute(0, 3, 1, 2).float() - self._mean) / self._std
            if self.nonkey_scale == 1:
                independent = model.independent(images)
                frames = [
                    _Frame(index, independent[j : j + 1], self._decide_keyframe(index, images[j], independent[j], emit, state), emit)
                    for j, (index, _, emit) in enumerate(block)
                ]
                key_positions = [j for j, f in enumerate(frames) if f.is_keyframe]
                key_independent = independent[key_positions] if key_positions else None
            else:
                frames, key_independent, key_positions = self._lowres_frames(block, images, state)
            keyframes: list[_Keyframe] = [state.last_key] if state.last_key is not None else []
            if key_positions:
                terms = model.fusion.keyframe_term(model.common(key_independent))
                state.deep_frames += len(key_positions)
                keyframes += [_Keyframe(frames[j].index, terms[n : n + 1]) for n, j in enumerate(key_positions)]
            state.output_size = self.config.output_size or (images.shape[-2], images.shape[-1])
            results = self._resolve(state.pending + frames, keyframes, state)
            state.last_key = keyframes[-1] if keyframes else None
        return results

    def _lowres_frames(
        self, block: list[tuple[int, torch.Tensor, bool]], images: torch.Tensor, state: _ClipState
    ) -> tuple[list[_Frame], torch.Tensor | None, list[int]]:
        """Reduced-resolution non-keyframes: keyframes get full-resolution f_ind, the others f_ind at s.

        Returns the frames, the keyframes' full-resolution f_ind (in block order) and their positions. Only
        feature-scored adaptive scheduling needs features before the decision; it scores on the low-res ones.
        """
        policy, model = self.config.keyframes, self.model
        scored = model.independent_lowres(images) if policy.adaptive and policy.score is KeyframeScore.FEATURE else None
        decisions = [
            self._decide_keyframe(index, images[j], scored[j] if scored is not None else None, emit, state)
            for j, (index, _, emit) in enumerate(block)
        ]
        key_positions = [j for j, key in enumerate(decisions) if key]
        others = [j for j, key in enumerate(decisions) if not key]
        full = model.independent(images[key_positions]) if key_positions else None
        lowres: dict[int, torch.Tensor] = {}
        if scored is not None:
            lowres = dict(enumerate(scored))
        elif others:
            lowres = dict(zip(others, model.independent_lowres(images[others])))
        full_of = dict(zip(key_positions, full)) if full is not None else {}
        frames = [
            _Frame(index, (full_of[j] if decisions[j] else lowres[j])[None], decisions[j], emit)
            for j, (index, _, emit) in enumerate(block)
        ]
        return frames, full, key_positions

    def _decide_keyframe(
        self, index: int, image: torch.Tensor, independent: torch.Tensor, emit: bool, state: _ClipState
    ) -> bool:
        policy = self.config.keyframes
        last = state.last_key_index
        if not emit:
            is_key = True  # the look-ahead frame (the next chunk's first frame)
        elif last is None:
            # The clip's first frame; a phased schedule leaves the frames before its first keyframe to the next.
            is_key = not policy.phase or index % policy.interval == policy.phase
        elif policy.codec:
            gap = index - last
            is_key = gap >= policy.max_interval or (gap >= policy.min_interval and index in state.codec_keyframes)
        elif not policy.adaptive:
            is_key = index % policy.interval == policy.phase
        else:
            gap = index - last
            if gap < policy.min_interval:
                is_key = False
            elif gap >= policy.max_interval:
                is_key = True
            else:
                is_key = self._distance(image, independent, state.last_key_reference) > policy.threshold
        if is_key:
            state.last_key_index = index
            state.last_key_reference = image if policy.score is KeyframeScore.RGB else independent
        return is_key

    def _distance(self, image: torch.Tensor, independent: torch.Tensor, reference: torch.Tensor) -> float:
        if self.config.keyframes.score is KeyframeScore.RGB:
            return (image - reference).abs().mean().item()
        return 1.0 - F.cosine_similarity(independent, reference, dim=0).mean().item()

    # --- reuse -------------------------------------------------------------------------------------------------
    def _resolve(self, frames: list[_Frame], keyframes: list[_Keyframe], state: _ClipState) -> list[FrameResult]:
        """Compute every frame whose keyframe(s) are known; bidirectional leftovers stay pending."""
        bidirectional = self.config.mode is ReuseMode.BIDIRECTIONAL
        key_by_index = {k.index: k for k in keyframes}
        plans: list[tuple[_Frame, list[_Keyframe]]] = []
        state.pending = []
        for frame in frames:
            if frame.is_keyframe:
                refs = [key_by_index[frame.index]]
            else:
                earlier = [k for k in keyframes if k.index < frame.index]
                following = [k for k in keyframes if k.index > frame.index]
                if not earlier:  # before the clip's first keyframe (phased schedules): the next one only
                    if not following:
                        state.pending.append(frame)
                        continue
                    plans.append((frame, [min(following, key=lambda k: k.index)]))
                    continue
                refs = [max(earlier, key=lambda k: k.index)]
                if bidirectional:
                    if not following:
                        state.pending.append(frame)
                        continue
                    refs.append(min(following, key=lambda k: k.index))
            plans.append((frame, refs))
        return self._compute(plans, state.output_size)

    def _flush(self, state: _ClipState) -> list[FrameResult]:
        """End of clip: frames still waiting for a next keyframe use the previous one only."""
        if not state.pending:
            return []
        if state.last_key is None:
            raise ValueError(f"the clip ended before its first keyframe (keyframe phase "
                             f"{self.config.keyframes.phase}); use a smaller phase for clips this short")
        with torch.inference_mode():
            plans = [(frame, [state.last_key]) for frame in state.pending]
            state.pending = []
            return self._compute(plans, state.output_size)

    def _compute(
        self, plans: list[tuple[_Frame, list[_Keyframe]]], output_size: tuple[int, int]
    ) -> list[FrameResult]:
        emitted = [(frame, refs) for frame, refs in plans if frame.emit]
        if not emitted:
            return []
        pairs = [(frame, ref) for frame, refs in emitted for ref in refs]
        if self.nonkey_scale == 1:
            logits = self.model.logits_from_term(
                torch.cat([ref.term for _, ref in pairs]), torch.cat([frame.independent for frame, _ in pairs])
            )
        else:
            logits = self._lowres_logits(pairs)
        results = []
        offset = 0
        for frame, refs in emitted:
            per_ref = logits[offset : offset + len(refs)]
            if isinstance(per_ref, list):  # reduced resolution: one tensor per pair, one grid per frame
                per_ref = torch.cat(per_ref)
            offset += len(refs)
            results.append(self._frame_result(frame, refs, per_ref, output_size))
        if self.device.type != "cpu":
            results = _to_host(results, self._label_dtype)
        return results

    def _lowres_logits(self, pairs: list[tuple[_Frame, _Keyframe]]) -> list[torch.Tensor]:
        """Logits per (frame, keyframe) pair when non-keyframes run at reduced resolution: keyframes and
        non-keyframes go through fusion + head as two batches (their grids differ)."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
        for want_key in (True, False):
            positions = [n for n, (frame, _) in enumerate(pairs) if frame.is_keyframe is want_key]
            if not positions:
                continue
            terms = torch.cat([self._term_for(*pairs[n]) for n in positions])
            logits = self.model.logits_from_term(terms, torch.cat([pairs[n][0].independent for n in positions]))
            for m, n in enumerate(positions):
                out[n] = logits[m : m + 1]
        return out

    def _term_for(self, frame: _Frame, ref: _Keyframe) -> torch.Tensor:
        """The keyframe term on the frame's grid, aligned once per keyframe and grid."""
        if frame.is_keyframe:
            return ref.term
        size = tuple(frame.independent.shape[-2:])
        if size not in ref.aligned:
            ref.aligned[size] = self.model.align_term(ref.term, frame.independent)
        return ref.aligned[size]

    def _frame_result(
        self, frame: _Frame, refs: list[_Keyframe], per_ref: torch.Tensor, output_size: tuple[int, int]
    ) -> FrameResult:
        # Upsampling is linear: the sum over keyframes is upsampled once (see dcfm.postprocess for the rest).
        total = per_ref.sum(dim=0)
        post = frame_labels(total, output_size, self._label_dtype, pair=(per_ref[0], per_ref[1]) if len(refs) == 2 else None)
        return FrameResult(
            index=frame.index,
            labels=post.labels,  # type: ignore[arg-type]  # a device tensor until _to_host
            is_keyframe=frame.is_keyframe,
            keyframes=tuple(ref.index for ref in refs),
            confidence=post.confidence,  # type: ignore[arg-type]
            agreement=post.agreement,  # type: ignore[arg-type]
            logits=upsample_logits(total[None], output_size)[0].cpu() if self.config.return_logits else None,
        )


def _to_host(results: list[FrameResult], dtype: np.dtype) -> list[FrameResult]:
    """Move a block's device labels (as uint8/uint16) and statistics to the host in one transfer each."""
    small = torch.uint8 if dtype == np.uint8 else torch.int32
    labels = torch.stack([r.labels for r in results]).to(small).cpu().numpy().astype(dtype, copy=False)  # type: ignore[misc]
    stats = torch.stack([torch.stack([r.confidence, r.agreement if r.agreement is not None else r.confidence])  # type: ignore[misc]
                         for r in results]).float().cpu().tolist()
    for r, mask, (confidence, agreement) in zip(results, labels, stats):
        r.labels, r.confidence = mask, confidence
        r.agreement = agreement if r.agreement is not None else None
    return results
