"""The toy world: scenes of a few flat shapes on a plain background, small enough for a CPU to learn.

A :class:`Scene` is a value (background colour and shapes, each a kind, a colour, a centre and a size);
:func:`render` draws it, :func:`random_scene` samples one from a seeded generator. Every shape in a scene
has its own (colour, kind), so an instruction can name it ("the red circle"). Nothing here knows a model
family: the toy models of each family are trained on these scenes (``python -m qflux.toy``).

Sizes are in pixels of the rendered image (``Scene.size``, 64 by default); shapes are drawn at 4× and
box-filtered down, so edges are anti-aliased and the image is a deterministic function of the scene.
"""

from __future__ import annotations

import attrs
import numpy as np
from PIL import Image, ImageDraw, ImageOps

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
    "orange": (240, 130, 30),
}
"""The shapes' colours, by the word the instructions use."""
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "pink": (245, 190, 200),
}
"""The backgrounds' colours (none is a shape colour, so a shape never vanishes into its background)."""
KINDS = ("circle", "square", "triangle")
"""The shapes."""
SUPERSAMPLE = 4
"""Shapes are drawn at this multiple of the scene size, then box-filtered down."""
SIZES = (0.08, 0.28)
"""The range of a random shape's half-size, as a fraction of the scene's size (5 to 18 px at 64 px), wide
enough that a shape twice or half as big is still one the models have seen."""
DARK = 0.5
"""The shade of a dark shape (its colour's RGB × 0.5); a random shape is dark with probability
:data:`DARK_SHARE`, so the models have seen dark shapes of every colour."""
DARK_SHARE = 0.25


@attrs.frozen
class Shape:
    """One flat shape: ``kind`` in :data:`KINDS`, ``colour`` in :data:`SHAPE_COLOURS`, centre (x, y) and
    half-size ``r`` in pixels (a circle's radius, half a square's side, a triangle's circumradius), and
    ``shade``, the factor its colour's RGB is drawn at (1: as named; the ``darken`` edit halves it), and
    ``inverted``, whether it is drawn in its colour's negative (c → 255 − c, the ``invert_shape`` edit)."""

    kind: str
    colour: str
    x: float
    y: float
    r: float
    shade: float = 1.0
    inverted: bool = False

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour it is drawn in: its named colour's RGB × ``shade`` (then 255 − c where ``inverted``)."""
        r, g, b = (round(c * self.shade) for c in SHAPE_COLOURS[self.colour])
        return (255 - r, 255 - g, 255 - b) if self.inverted else (r, g, b)

    @property
    def name(self) -> str:
        """How an instruction names it: ``"red circle"``."""
        return f"{self.colour} {self.kind}"


@attrs.frozen
class Scene:
    """A background colour (:data:`BACKGROUNDS`) and shapes drawn in order, on a ``size`` × ``size`` image;
    ``grayscale`` draws the picture in grays (each pixel its luma, 0.299 R + 0.587 G + 0.114 B, so a gray
    pixel stays exactly as it was), ``inverted`` its negative (every channel c → 255 − c), in that order."""

    background: str
    shapes: tuple[Shape, ...]
    size: int = 64
    inverted: bool = False
    grayscale: bool = False

    def find(self, name: str) -> int:
        """The index of the shape called ``name`` ("red circle")."""
        return [s.name for s in self.shapes].index(name)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image [size, size]."""
    k = SUPERSAMPLE
    img = Image.new("RGB", (scene.size * k, scene.size * k), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x, y, r = s.x * k, s.y * k, s.r * k
        fill = s.rgb
        if s.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:  # an upright equilateral triangle inscribed in the circle of radius r
            h = r * np.sqrt(3) / 2
            draw.polygon([(x, y - r), (x + h, y + r / 2), (x - h, y + r / 2)], fill=fill)
    img = img.resize((scene.size, scene.size), Image.Resampling.BOX)
    if scene.grayscale:
        img = img.convert("L").convert("RGB")
    return ImageOps.invert(img) if scene.inverted else img


def fits(shape: Shape, others: tuple[Shape, ...], size: int, gap: float = 2.0) -> bool:
    """Whether ``shape`` lies inside the image and clear (by ``gap`` px) of every shape in ``others``."""
    inside = shape.r + 1 <= shape.x <= size - shape.r - 1 and shape.r + 1 <= shape.y <= size - shape.r - 1
    return inside and all(np.hypot(shape.x - o.x, shape.y - o.y) >= shape.r + o.r + gap for o in others)


def random_shape(rng: np.random.Generator, size: int, taken: tuple[Shape, ...]) -> Shape | None:
    """A shape of a (colour, kind) not in ``taken``, placed clear of it; None when 50 tries found no room."""
    names = {s.name for s in taken}
    free = [(c, k) for c in SHAPE_COLOURS for k in KINDS if f"{c} {k}" not in names]
    for _ in range(50):
        colour, kind = free[int(rng.integers(len(free)))]
        r = float(rng.uniform(*SIZES) * size)
        x, y = (float(rng.uniform(r + 1, size - r - 1)) for _ in range(2))
        shape = Shape(kind, colour, x, y, r, DARK if rng.random() < DARK_SHARE else 1.0)
        if fits(shape, taken, size):
            return shape
    return None


def random_scene(rng: np.random.Generator, size: int = 64, shapes: tuple[int, int] = (1, 3)) -> Scene:
    """A scene of ``shapes[0]`` to ``shapes[1]`` shapes (fewer where no room is found) on a random background."""
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    placed: tuple[Shape, ...] = ()
    for _ in range(int(rng.integers(shapes[0], shapes[1] + 1))):
        shape = random_shape(rng, size, placed)
        if shape is not None:
            placed = (*placed, shape)
    return Scene(background, placed, size)
