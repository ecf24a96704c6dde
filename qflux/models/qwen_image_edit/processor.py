"""The Qwen2-VL processor without torchvision.

transformers 5 checks a processor's video processor against ``transformers.VideoProcessorMixin``,
which it only exports when torchvision is installed (otherwise the name is a placeholder that fails
on use), and its default video processor needs torchvision too. Qwen-Image-Edit never processes
video, so qflux hands the processor transformers' own ``BaseVideoProcessor`` and points the class
check at it. Nothing else of transformers is changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def allow_video_processor_without_torchvision() -> None:
    """Make ``transformers.VideoProcessorMixin`` the real ``BaseVideoProcessor`` (idempotent)."""
    # deferred: transformers is a heavy import
    import transformers

    # deferred: transformers is a heavy import
    from transformers.video_processing_utils import BaseVideoProcessor

    transformers.VideoProcessorMixin = BaseVideoProcessor


def qwen_processor(tokenizer: Any, **image_kwargs: Any) -> Any:
    """A ``Qwen2VLProcessor`` over ``tokenizer`` with the PIL image processor (no torchvision).

    Args:
        image_kwargs: ``Qwen2VLImageProcessorPil`` settings (pixel bounds, patch size, ...).
    """
    # deferred: transformers is a heavy import
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    # deferred: transformers is a heavy import
    from transformers.video_processing_utils import BaseVideoProcessor

    allow_video_processor_without_torchvision()
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=BaseVideoProcessor(),
    )


def load_qwen_processor(folder: str | Path) -> Any:
    """The processor saved in ``folder`` (a pipeline's ``processor/``), read without torchvision:
    its tokenizer and image-processor settings, rebuilt with :func:`qwen_processor`."""

    # deferred: transformers is a heavy import
    from transformers import Qwen2Tokenizer

    p = Path(folder)
    settings = json.loads((p / "processor_config.json").read_text(encoding="utf-8"))
    image = settings.get("image_processor", {})
    keep = ("size", "resample", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    return qwen_processor(Qwen2Tokenizer.from_pretrained(p), **{k: image[k] for k in keep if k in image})
