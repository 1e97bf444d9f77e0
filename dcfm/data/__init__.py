"""Labelled datasets: one module per on-disk layout, each serving training pairs and evaluation clips.

This module is the registry. It stays light (no torch, no PyAV) so command lines can read ``LAYOUTS``
for their choices; a layout's module is imported when it is used. Adding a layout is one module (with
``detect``, ``open_pairs`` and ``open_clips``; see :mod:`dcfm.data.synth`) and one line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dcfm.data.base import ClipSet, PairDataset

IGNORE_INDEX = 255  # label value no loss, metric or dataset counts, everywhere in dcfm


@dataclass(frozen=True)
class Layout:
    """A registered layout: its name, the module that reads it, and what marks a root as this layout."""

    name: str
    module: str
    marker: str  # shown when no layout matches

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


# Detection tries these in order; the first whose ``detect(root)`` says yes wins.
_REGISTRY = (
    Layout("synth", "dcfm.data.synth", "manifest.json"),
    Layout("cityscapes", "dcfm.data.cityscapes", "leftImg8bit_sequence/ + gtFine/"),
    Layout("vspw", "dcfm.data.vspw", "data/<video>/origin/"),
    Layout("camvid", "dcfm.data.camvid", "<split>/ + <split>annot/ [+ frames/]"),
)
LAYOUTS = tuple(layout.name for layout in _REGISTRY)


def layout_module(name: str) -> ModuleType:
    """The module that reads layout ``name``; ValueError naming the known layouts otherwise."""
    for layout in _REGISTRY:
        if layout.name == name:
            return layout.load()
    raise ValueError(f"unknown layout {name!r}; expected 'auto' or one of {LAYOUTS}")


def detect_layout(root: str | Path) -> str:
    """Name the layout of ``root`` from its marker files; ValueError naming root and layouts if none match."""
    r = Path(root)
    for layout in _REGISTRY:
        if layout.load().detect(r):
            return layout.name
    expected = ", ".join(f"{layout.name} ({layout.marker})" for layout in _REGISTRY)
    raise ValueError(f"cannot detect a dataset layout in {r}; expected one of: {expected}")


def _resolve(root: str | Path, layout: str) -> tuple[Path, ModuleType, str]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root does not exist: {root}")
    name = detect_layout(root) if layout == "auto" else layout
    return root, layout_module(name), name


def open_pair_dataset(root: str | Path, layout: str = "auto", split: str = "train", delta: int = 1,
                      **kwargs: Any) -> PairDataset:
    """Open ``root`` as a :class:`~dcfm.data.base.PairDataset`; ``layout`` is one of LAYOUTS or "auto".

    A synth corpus is one split by itself (``dcfm synth`` writes train and held-out corpora to separate
    roots), so ``split`` selects ``manifest["splits"][split]`` only when the manifest has splits and is
    otherwise ignored; pass ``video_ids=`` for a subset.  Extra keyword arguments go to the dataset class.
    """
    root, module, _ = _resolve(root, layout)
    return module.open_pairs(root, split=split, delta=delta, **kwargs)


def open_clips(root: str | Path, layout: str = "auto", split: str = "val",
               video_ids: list[str] | None = None) -> ClipSet:
    """The labelled clips of a local dataset root (``split`` is ignored by synth corpora without splits)."""
    root, module, name = _resolve(root, layout)
    clips = module.open_clips(root, split, video_ids)
    if not clips.videos:
        raise ValueError(f"no labelled clips in {root} (layout {name}, split {split!r})")
    return clips
