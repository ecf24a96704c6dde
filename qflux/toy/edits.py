"""The toy world's edits: a small grammar of instructions, each a pure function (scene, rng) → (edited
scene, instruction), and the writers of scenes and of (control, target, instruction) datasets.

| edit | instruction | what changes |
| --- | --- | --- |
| ``recolour`` | make the red circle blue | one shape's colour |
| ``remove`` | remove the red circle | one shape, gone |
| ``move`` | move the red circle left | one shape, a quarter of the image over |
| ``background`` | turn the background gray | every background pixel |
| ``grow`` | make the red circle bigger | one shape, 2× |
| ``shrink`` | make the red circle smaller | one shape, ½× |
| ``mirror`` | mirror the picture | every shape, flipped left to right |
| ``darken`` | make the red circle darker | one bright shape, drawn dark (RGB × ½) |
| ``invert`` | invert the picture | every pixel, c → 255 − c |
| ``invert_shape`` | invert the red circle | one shape, drawn in its colour's negative |
| ``grayscale`` | turn the picture gray | every coloured pixel, to its luma (gray pixels stay as they were) |

The toy models are taught :data:`TAUGHT`; the others are left for LoRAs to learn (local: grow, shrink,
darken, invert_shape; global: mirror, invert, grayscale). A user's own edit needs only scenes
(:func:`write_scenes` and its ``scenes.json``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import numpy as np

from qflux.toy.world import BACKGROUNDS, DARK, KINDS, SHAPE_COLOURS, Scene, Shape, fits, random_scene, render

Edit = Callable[[Scene, np.random.Generator], "tuple[Scene, str] | None"]
"""(scene, rng) → (edited scene, instruction), or None where the edit does not apply to the scene."""
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
GROW = 2.0


def _pick(scene: Scene, rng: np.random.Generator) -> int | None:
    return int(rng.integers(len(scene.shapes))) if scene.shapes else None


def _replace(scene: Scene, i: int, shape: Shape | None) -> Scene:
    shapes = [*scene.shapes[:i], *([shape] if shape is not None else []), *scene.shapes[i + 1 :]]
    return attrs.evolve(scene, shapes=tuple(shapes))


def _others(scene: Scene, i: int) -> tuple[Shape, ...]:
    return scene.shapes[:i] + scene.shapes[i + 1 :]


def recolour(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "make the red circle blue": a colour no other shape of that kind has."""
    i = _pick(scene, rng)
    if i is None:
        return None
    s = scene.shapes[i]
    taken = {o.colour for o in scene.shapes if o.kind == s.kind}
    free = [c for c in SHAPE_COLOURS if c not in taken]
    if not free:
        return None
    colour = free[int(rng.integers(len(free)))]
    return _replace(scene, i, attrs.evolve(s, colour=colour)), f"make the {s.name} {colour}"


def remove(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "remove the red circle"."""
    i = _pick(scene, rng)
    return None if i is None else (_replace(scene, i, None), f"remove the {scene.shapes[i].name}")


def move(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "move the red circle left": a quarter of the image, where it stays inside and clear of the others."""
    i = _pick(scene, rng)
    if i is None:
        return None
    s, step = scene.shapes[i], scene.size / 4
    options = []
    for word, (dx, dy) in DIRECTIONS.items():
        moved = attrs.evolve(s, x=s.x + dx * step, y=s.y + dy * step)
        if fits(moved, _others(scene, i), scene.size):
            options.append((word, moved))
    if not options:
        return None
    word, moved = options[int(rng.integers(len(options)))]
    return _replace(scene, i, moved), f"move the {s.name} {word}"


def background(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "turn the background gray"."""
    free = [b for b in BACKGROUNDS if b != scene.background]
    colour = free[int(rng.integers(len(free)))]
    return attrs.evolve(scene, background=colour), f"turn the background {colour}"


def _scaled(factor: float, word: str) -> Edit:
    def edit(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
        i = _pick(scene, rng)
        if i is None:
            return None
        s = scene.shapes[i]
        scaled = attrs.evolve(s, r=s.r * factor)
        if not fits(scaled, _others(scene, i), scene.size):
            return None
        return _replace(scene, i, scaled), f"make the {s.name} {word}"

    edit.__doc__ = f'"make the red circle {word}": its size × {factor:.3g}, where it still fits.'
    return edit


def mirror(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "mirror the picture": left and right swapped (every shape is symmetric about its vertical axis)."""
    shapes = tuple(attrs.evolve(s, x=scene.size - s.x) for s in scene.shapes)
    return attrs.evolve(scene, shapes=shapes), "mirror the picture"


def darken(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "make the red circle darker": a shape of full shade drawn dark (its colour's RGB × :data:`DARK`)."""
    bright = [i for i, s in enumerate(scene.shapes) if s.shade == 1.0]
    if not bright:
        return None
    i = bright[int(rng.integers(len(bright)))]
    s = scene.shapes[i]
    return _replace(scene, i, attrs.evolve(s, shade=DARK)), f"make the {s.name} darker"


def invert(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "invert the picture": its negative, every channel c → 255 − c."""
    return attrs.evolve(scene, inverted=not scene.inverted), "invert the picture"


def invert_shape(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "invert the red circle": one shape drawn in its colour's negative (c → 255 − c), the rest as it was."""
    i = _pick(scene, rng)
    if i is None:
        return None
    s = scene.shapes[i]
    return _replace(scene, i, attrs.evolve(s, inverted=not s.inverted)), f"invert the {s.name}"


def grayscale(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str] | None:
    """ "turn the picture gray": every pixel its luma; the white, gray and black backgrounds stay exactly
    as they were, so a global edit has an unchanged region to keep."""
    if scene.grayscale:
        return None
    return attrs.evolve(scene, grayscale=True), "turn the picture gray"


EDITS: dict[str, Edit] = {
    "recolour": recolour,
    "remove": remove,
    "move": move,
    "background": background,
    "grow": _scaled(GROW, "bigger"),
    "shrink": _scaled(1 / GROW, "smaller"),
    "mirror": mirror,
    "darken": darken,
    "invert": invert,
    "invert_shape": invert_shape,
    "grayscale": grayscale,
}
"""Every edit by name."""
TAUGHT = ("recolour", "remove", "move", "background")
"""The edits the toy models are pretrained on."""
VOCABULARY = sorted(
    {"make", "the", "remove", "move", "turn", "background", "bigger", "smaller", "mirror", "picture",
     "darker", "invert"}
    | set(SHAPE_COLOURS) | set(BACKGROUNDS) | set(KINDS) | set(DIRECTIONS)
)  # fmt: skip
"""Every word an instruction uses (the toy tokenizers' vocabulary)."""


def edited_pair(rng: np.random.Generator, edits: Sequence[str], size: int = 64) -> tuple[Scene, Scene, str]:
    """A random scene and one of ``edits`` applied to it (scenes are drawn until one applies)."""
    unknown = [e for e in edits if e not in EDITS]
    if unknown:
        raise ValueError(f"unknown edit {unknown[0]!r}; the edits are {', '.join(EDITS)}")
    while True:
        scene = random_scene(rng, size)
        result = EDITS[edits[int(rng.integers(len(edits)))]](scene, rng)
        if result is not None:
            return scene, result[0], result[1]


def scene_json(scene: Scene) -> dict[str, object]:
    """The scene as JSON: background, size, inverted, grayscale and each shape's kind, colour, x, y, r, shade
    and inverted."""
    return attrs.asdict(scene)


def write_scenes(out: str | Path, n: int, seed: int, size: int = 64) -> Path:
    """``scene_0000.png`` … and ``scenes.json`` (each scene's description, in file order) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    listing = {}
    for i in range(n):
        scene = random_scene(rng, size)
        render(scene).save(out / f"scene_{i:04d}.png")
        listing[f"scene_{i:04d}.png"] = scene_json(scene)
    (out / "scenes.json").write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
    return out


def write_pairs(out: str | Path, edits: Sequence[str], n: int, seed: int, size: int = 64) -> Path:
    """A training folder of ``n`` pairs of ``edits`` (``control_images/NAME.png``, ``training_images/NAME.png``
    and ``NAME.txt``) and ``pairs.json`` (each pair's scenes and instruction)."""
    out = Path(out)
    for sub in ("control_images", "training_images"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    listing = {}
    for i in range(n):
        control, target, text = edited_pair(rng, edits, size)
        name = f"pair_{i:04d}"
        render(control).save(out / "control_images" / f"{name}.png")
        render(target).save(out / "training_images" / f"{name}.png")
        (out / "training_images" / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        listing[name] = {"control": scene_json(control), "target": scene_json(target), "instruction": text}
    (out / "pairs.json").write_text(json.dumps(listing, indent=1) + "\n", encoding="utf-8")
    return out
