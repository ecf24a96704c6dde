"""The torch dataset over checked pairs: ``ds[i]`` decodes and sizes one pair (and its change mask), and
the collate function that stacks a same-size batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs
import numpy as np
import torch
from PIL import Image, ImageOps

from qflux.data.images import crop, image_to_tensor, load_rgb, load_sized, to_8bit
from qflux.data.masks import change_mask, to_latent_grid
from qflux.data.pairs import PairSample

MaskMode = Literal["none", "masks", "auto"]
"""``train.loss_mask``."""


@attrs.frozen
class PairDataset:
    """Map-style dataset over samples: ``ds[i]`` decodes and sizes one pair (and, with a
    ``mask_mode``, its change mask at the latent grid, :mod:`qflux.data.masks`)."""

    samples: Sequence[PairSample]
    mask_mode: MaskMode = "none"
    """``train.loss_mask``."""
    vae_factor: int = 8
    """Image pixels per latent pixel (the model's VAE factor), for the mask's grid."""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, [load_rgb(c) for c in self.samples[i].controls])

    def item(self, i: int, controls: Sequence[Image.Image]) -> dict[str, Any]:
        """Sample i with its control images already decoded (a caller that needs them too decodes once)."""
        s = self.samples[i]
        sized = [
            image_to_tensor(im, size, box)[0]
            for im, size, box in zip(controls, s.control_sizes, s.control_crops, strict=True)
        ]
        target = load_sized(s.target, s.target_size, s.target_box)[0]
        item: dict[str, Any] = {"index": i, "prompt": s.prompt, "controls": sized, "target": target}
        if self.mask_mode != "none":
            item["mask"] = self.mask(s, sized, target)
        return item

    def mask(self, s: PairSample, controls: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The change mask [1, h, w] of sample ``s`` on the latent grid: its mask file cropped and
        sized like its target (``masks``; all ones without a file), or derived from the target and
        its first control (``auto``; all ones without a control)."""
        w, h = s.target_size
        grid = (h // self.vae_factor, w // self.vae_factor)
        if self.mask_mode == "masks" and s.mask is not None:
            with Image.open(s.mask) as raw:
                grey = to_8bit(ImageOps.exif_transpose(raw)).convert("L")
            sized = crop(grey, s.target_box).resize(s.target_size, Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(sized, dtype=np.float32) / 255.0)
            return to_latent_grid(pixels[None, None], grid)[0]
        if self.mask_mode == "auto" and controls:
            control = controls[0][None]
            if control.shape[-2:] != target.shape[-2:]:  # a control at its own aspect: compared at the target's
                control = torch.nn.functional.interpolate(control, size=target.shape[-2:], mode="bilinear")
            return change_mask(control, target[None], grid)[0]
        return torch.ones(1, *grid)


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size items: controls (one [B, 3, hc_k, wc_k] per control image k), target
    [B, 3, h, w], prompts, indices, and the change masks [B, 1, h/f, w/f] when the items have them."""
    return {
        "index": [it["index"] for it in items],
        "prompt": [it["prompt"] for it in items],
        "controls": [torch.stack(group) for group in zip(*(it["controls"] for it in items), strict=True)],
        "target": torch.stack([it["target"] for it in items]),
        **({"mask": torch.stack([it["mask"] for it in items])} if "mask" in items[0] else {}),
    }
