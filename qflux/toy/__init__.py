"""The toy world (``python -m qflux.toy``): scenes of flat shapes, a grammar of edits on them, and the
datasets both make. Small enough for a CPU to train a model that really edits; independent of the model
families, whose toy models are trained on it."""

from qflux.toy.edits import EDITS, TAUGHT, write_pairs, write_scenes
from qflux.toy.world import Scene, Shape, random_scene, render

__all__ = ["EDITS", "TAUGHT", "Scene", "Shape", "random_scene", "render", "write_pairs", "write_scenes"]
