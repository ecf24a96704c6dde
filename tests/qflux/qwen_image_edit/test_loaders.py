"""Each Qwen-Image-Edit loader gives the pipeline's own component (names, shapes, dtypes, values),
and the errors name the folder and the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config.errors import QfluxError
from qflux.models.qwen_image_edit.loaders import QWEN_IMAGE_EDIT, load_qwen_image_edit
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.weights.loading import load_part


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_image_edit(tmp_path_factory.mktemp("tiny-qwen"), seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_qwen: Path):
    from diffusers import QwenImageEditPipeline

    from qflux.models.qwen_image_edit.processor import load_qwen_processor

    return QwenImageEditPipeline.from_pretrained(
        tiny_qwen, processor=load_qwen_processor(tiny_qwen / "processor"), torch_dtype=torch.float32
    )


def _same_module(a: torch.nn.Module, b: torch.nn.Module) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


@pytest.mark.parametrize("name", ["text_encoder", "vae", "transformer"])
def test_module_loaders_equal_the_pipeline(name: str, tiny_qwen: Path, pipe) -> None:
    _same_module(load_part(QWEN_IMAGE_EDIT, tiny_qwen, name, torch.float32), getattr(pipe, name))


def test_tokenizer_processor_and_scheduler_equal_the_pipeline(tiny_qwen: Path, pipe) -> None:
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>make the cat blue<|im_end|>"
    tok = load_part(QWEN_IMAGE_EDIT, tiny_qwen, "tokenizer")
    assert tok(text).input_ids == pipe.tokenizer(text).input_ids
    proc = load_part(QWEN_IMAGE_EDIT, tiny_qwen, "processor")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    ours, theirs = (p(text=[text], images=[image], return_tensors="pt") for p in (proc, pipe.processor))
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert dict(load_part(QWEN_IMAGE_EDIT, tiny_qwen, "scheduler").config) == dict(pipe.scheduler.config)


def test_load_all_and_errors(tiny_qwen: Path, tmp_path: Path) -> None:
    models = load_qwen_image_edit(tiny_qwen, torch.float32, include=("transformer",))
    assert models.transformer is not None and models.vae is None and models.text_encoder is None
    assert models.processor is not None and models.tokenizer is not None
    with pytest.raises(QfluxError, match="does not exist; expected a Qwen-Image-Edit model"):
        load_qwen_image_edit(tmp_path / "missing", torch.float32)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(QfluxError, match=r"missing transformer/config\.json"):
        load_qwen_image_edit(tmp_path / "half", torch.float32)
