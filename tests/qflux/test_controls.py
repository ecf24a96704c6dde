"""Control sizing (``data.control_size``, ``data.control_max_pixels``): the rule's invariants, each family's
default against its diffusers pipeline, and training and predict sizing a control the same way."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qflux.config.data import DataConfig
from qflux.config.errors import QfluxError
from qflux.data.checks import size_warnings
from qflux.data.controls import ControlRule, ControlSizes, fit_size
from qflux.data.pairs import PairRule
from qflux.models.flux2.predict import CONTROLS, reference_tensor
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.batch import vl_images
from qflux.models.qwen_image_edit.predict import PLUS_VAE_AREA, PLUS_VL_AREA, control_inputs, control_rule
from qflux.train.run import samples_at
from recipes import flux2_klein_lora, flux_kontext_lora, qwen_image_edit_lora

sides = st.integers(8, 3000)
caps = st.one_of(st.none(), st.integers(64 * 64, 2048 * 2048))


@settings(max_examples=200, deadline=None)
@given(source=st.tuples(sides, sides), target=st.tuples(sides, sides), cap=caps,
       multiple=st.sampled_from([8, 16, 32]), sizing=st.sampled_from(["target", "own", "keep"]))  # fmt: skip
def test_every_rule_gives_multiples_within_the_cap(source, target, cap, multiple, sizing) -> None:
    target = fit_size(*target, None, multiple)  # a target's size is a multiple already
    w, h = ControlSizes(sizing, cap).size(source, target, multiple, area=2048 * 2048)
    assert w % multiple == 0 and h % multiple == 0 and w >= multiple and h >= multiple
    if cap is not None and w > multiple and h > multiple:
        assert w * h <= cap
    if sizing == "keep":  # its own aspect, within the floor to the multiple
        assert (w, h) == fit_size(*source, cap, multiple)
        assert w <= max(source[0], multiple) and h <= max(source[1], multiple)  # never enlarged
    if sizing == "target":
        assert (w, h) == fit_size(*target, cap, multiple)
        if cap is None or target[0] * target[1] <= cap:
            assert (w, h) == target


@settings(max_examples=100, deadline=None)
@given(source=st.tuples(st.integers(32, 3000), st.integers(32, 3000)), cap=caps)
def test_a_control_of_its_targets_source_size_takes_the_targets_geometry(source, cap) -> None:
    target = fit_size(*source, 512 * 512, 16)
    for sizing in ("target", "own"):
        got = ControlSizes(sizing, cap).size(source, target, 16, area=512 * 512, target_source=source)
        assert got == fit_size(*target, cap, 16)


def test_model_is_the_family_rule_with_the_smaller_cap() -> None:
    rule = ControlRule("own", 1024 * 1024)
    assert rule.resolve(DataConfig()) == ControlSizes("own", 1024 * 1024)
    assert rule.resolve(DataConfig(control_max_pixels=4096)).max_pixels == 4096
    assert rule.resolve(DataConfig(control_max_pixels=4 << 20)).max_pixels == 1024 * 1024
    assert rule.resolve(DataConfig(control_size="keep")) == ControlSizes("keep", None)  # only the user's cap
    assert rule.resolve(DataConfig(control_size="target", control_max_pixels=99)) == ControlSizes("target", 99)
    # predict's "own" is also at most the training area (training's own controls are)
    assert rule.at_inference(DataConfig(max_pixels=256 * 256)).max_pixels == 256 * 256
    assert rule.at_inference(DataConfig(control_size="keep", max_pixels=256 * 256)).max_pixels is None


def test_the_keys_are_checked() -> None:
    with pytest.raises((ValueError, QfluxError)):
        DataConfig(control_size="bucket")  # type: ignore[arg-type]
    with pytest.raises((ValueError, QfluxError)):
        DataConfig(control_max_pixels=0)


def _write(path: Path, size: tuple[int, int], seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _pair(root: Path, target: tuple[int, int], control: tuple[int, int]) -> Path:
    _write(root / "training_images" / "a.png", target)
    _write(root / "control_images" / "a.png", control, seed=1)
    (root / "training_images" / "a.txt").write_text("edit it\n")
    return root


RULES = {
    "flux_kontext": flux_kontext_lora.PAIRS,
    "qwen_edit": qwen_image_edit_lora.PAIRS["edit"],
    "qwen_edit_plus": qwen_image_edit_lora.PAIRS["edit_plus"],
    "qwen_edit_2511": qwen_image_edit_lora.PAIRS["edit_2511"],
    "flux2_klein": flux2_klein_lora.PAIRS,
}


@pytest.mark.parametrize("family", sorted(RULES))
@pytest.mark.parametrize("control_size", ["model", "target", "keep"])
@pytest.mark.parametrize(("buckets", "cap"), [("auto", None), ("exact", None), ("auto", 96 * 96)])
def test_training_and_predict_size_a_control_alike(family, control_size, buckets, cap, tmp_path: Path) -> None:
    """A 150×210 control beside a 200×150 target (another aspect, another area), at a training area of the
    target's: the size training gives the control is the size predict gives it beside an output of the
    target's training size."""
    root = _pair(tmp_path, (200, 150), (150, 210))
    rule: PairRule = RULES[family]
    data = DataConfig(dataset_path=str(root), max_pixels=200 * 150, buckets=buckets, control_size=control_size,
                      control_max_pixels=cap)  # fmt: skip
    (sample,) = samples_at(FluxKontextConfig(data=data), 16, attrs.evolve(rule, controls=(1, 1)))
    size, _ = rule.control.at_inference(data).at_output((150, 210), sample.target_size, 16)
    assert sample.control_sizes == (size,)
    if control_size == "target":
        assert size == fit_size(*sample.target_size, cap, 16)
    if control_size == "keep":
        assert size == fit_size(150, 210, cap, 16)


def test_qwen_sizes_controls_as_each_variants_pipeline() -> None:
    """Edit: the VAE and the vision-language input both at ``calculate_dimensions(1024², r)``; Edit-Plus and 2511
    (one pipeline): the VAE at ``VAE_IMAGE_SIZE``, the vision-language input at ``CONDITION_IMAGE_SIZE``."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from diffusers.image_processor import VaeImageProcessor

    assert (PLUS_VAE_AREA, PLUS_VL_AREA) == (plus.VAE_IMAGE_SIZE, plus.CONDITION_IMAGE_SIZE)
    image = Image.new("RGB", (1500, 1000))
    proc = VaeImageProcessor(vae_scale_factor=16)
    for variant in ("edit", "edit_plus", "edit_2511"):
        if variant == "edit":
            vae = vl = edit.calculate_dimensions(1024 * 1024, 1.5)[:2]
        else:
            vae, vl = (
                plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, 1.5),
                plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, 1.5),
            )
        # predict (the pipeline's defaults) and training's rule at the 1024² training area
        got_vl, _, got_vae, out = control_inputs([image], variant, proc)
        assert got_vae == [tuple(vae)] and got_vl[0].size == tuple(vl) and out == tuple(vae)
        assert control_rule(variant).resolve(DataConfig()).size((1500, 1000), (1024, 1024), 16, area=1 << 20) == vae
        assert vl_images([image], variant, (None,))[0].size == tuple(vl)  # training's vision-language input


def test_klein_sizes_references_as_its_pipeline() -> None:
    """A reference above 1024² px is shrunk to it (sides truncated), floored to 16, centre-cropped."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    image = Image.new("RGB", (1500, 1003))
    shrunk = Flux2ImageProcessor._resize_to_target_area(image, 1024 * 1024)
    want = (shrunk.width // 16 * 16, shrunk.height // 16 * 16)
    assert tuple(reference_tensor(image, 16).shape[-2:]) == want[::-1]
    assert CONTROLS.resolve(DataConfig()).size((1500, 1003), (1024, 1024), 16, area=2 << 20) == want
    assert CONTROLS.resolve(DataConfig()).size((300, 200), (1024, 1024), 16, area=2 << 20) == (288, 192)  # not enlarged


def test_check_warns_of_a_control_at_another_scale(tmp_path: Path) -> None:
    root = _pair(tmp_path, (200, 150), (400, 300))
    data = DataConfig(dataset_path=str(root), max_pixels=200 * 150)
    (kept,) = samples_at(FluxKontextConfig(data=attrs.evolve(data, control_size="keep")), 16, PairRule())
    (model,) = samples_at(FluxKontextConfig(data=data), 16, PairRule())
    (warning,) = size_warnings(kept)
    assert "a: its control trains at 400×288 px and its target at 192×144 px" in warning
    assert "data.control_size: target" in warning
    assert size_warnings(model) == []
    assert math.isclose(model.control_sizes[0][0] / model.control_sizes[0][1], 4 / 3)


def test_qwen_predict_sizes_controls_by_the_training_rule() -> None:
    from diffusers.image_processor import VaeImageProcessor

    proc, images = VaeImageProcessor(vae_scale_factor=16), [Image.new("RGB", (300, 200)), Image.new("RGB", (90, 160))]
    rule = control_rule("edit_plus")
    _, pixels, sizes, out = control_inputs(images, "edit_plus", proc, ControlSizes("target"), (160, 96))
    assert out == (160, 96) and sizes == [(160, 96)] * 2 and [p.shape[-2:] for p in pixels] == [(96, 160)] * 2
    _, _, sizes, out = control_inputs(images, "edit_plus", proc, ControlSizes("keep", 100 * 100))
    assert sizes == [fit_size(300, 200, 100 * 100, 16), fit_size(90, 160, 100 * 100, 16)]
    assert out == rule.resolve(DataConfig()).own_size((90, 160), None, 16)  # the output: the pipeline's default
    small = rule.at_inference(DataConfig(max_pixels=128 * 128))
    _, _, sizes, out = control_inputs(images, "edit_plus", proc, small)
    assert all(w * h <= 1.1 * 128 * 128 for w, h in sizes) and out == sizes[-1]


def test_exact_sizing_never_enlarges_a_control_past_its_targets_area(tmp_path: Path) -> None:
    """With buckets: exact and data.max_pixels far above the pair, Qwen's own-aspect control is at its target's area
    (as the buckets' area is at most the largest target's), not enlarged to max_pixels."""
    root = _pair(tmp_path, (200, 150), (150, 210))
    data = DataConfig(dataset_path=str(root), buckets="exact")  # max_pixels 1024²
    (sample,) = samples_at(FluxKontextConfig(data=data), 16, RULES["qwen_edit"])
    w, h = sample.control_sizes[0]
    assert w * h <= 1.2 * 200 * 150 and h > w  # calculate_dimensions at 200·150 px: rounded to 32, its own aspect
