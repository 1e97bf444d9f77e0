"""Class colours: the fallback for models without names and colours, and the checks colour-coded masks need.

The training data decides a model's classes; each layout's module in ``dcfm.data`` holds its class names and
colours, training copies them into the checkpoint card (``dcfm.checkpoint.ModelCard``), and everything that
shows masks to people (CVAT export, overlays, reports) takes them from there.

A card written before names and colours were recorded gets ``default_class_names`` (``class_<id>``) and
``default_palette``: the PASCAL VOC colour map from entry 1 on, so no class is black (CVAT's and the VOC
layout's ``background`` colour) and no two classes share a colour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Palette = list[tuple[int, int, int]]


def voc_colormap(indices: Iterable[int]) -> Palette:
    """PASCAL VOC's bit-interleaved colours for the given colour-map entries (entry 0 is black)."""
    def channel(i: int, k: int) -> int:
        return sum(((i >> (3 * j + k)) & 1) << (7 - j) for j in range(8))
    return [(channel(i, 0), channel(i, 1), channel(i, 2)) for i in indices]


def default_class_names(num_classes: int) -> list[str]:
    """``class_0, class_1, ...``: the names of a model whose card records none."""
    return [f"class_{i}" for i in range(num_classes)]


def default_palette(num_classes: int) -> Palette:
    """Distinct colours for a model whose card records none: VOC colour-map entries 1..num_classes."""
    return voc_colormap(range(1, num_classes + 1))


def check_palette(names: Sequence[str], palette: Sequence[Sequence[int]]) -> None:
    """Colour-coded masks (VOC/CVAT) need one distinct colour per class, and none black (background)."""
    if len(names) != len(palette):
        raise ValueError(f"{len(palette)} colours for {len(names)} classes")
    seen: dict[tuple[int, ...], str] = {}
    for name, colour in zip(names, palette):
        key = tuple(int(c) for c in colour)
        if key in seen:
            raise ValueError(f"classes {seen[key]!r} and {name!r} share the colour {key}; colour-coded masks "
                             "cannot tell them apart. Give the model card distinct colours.")
        seen[key] = name
