"""Images in and out: decoding (EXIF orientation, 8-bit RGB), cropping and resizing into tensors, the
``--image`` argument of predict, and writing results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from qflux.config.errors import QfluxError
from qflux.data.buckets import Box

_EXIF_ORIENTATION = 0x0112


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied; reads the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer greyscale (modes I;16*, I) scaled to 8-bit L; other modes unchanged."""
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype("uint8"), mode="L")
    if im.mode == "F":
        return im.convert("L")
    return im


def load_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Decode an image as 8-bit RGB: EXIF rotation applied, transparency composited on white,
    CMYK, palette and 16-bit images converted. ``draft``: a JPEG may decode at a reduced scale whose
    sides stay at least this many pixels (faster; for checks, not training)."""
    with Image.open(path) as raw:
        if draft is not None:
            raw.draft("RGB", (draft, draft))
        im: Image.Image = to_8bit(ImageOps.exif_transpose(raw))
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        return im.convert("RGB")


def crop(image: Image.Image, box: Box | None) -> Image.Image:
    """``image`` cropped to ``box`` (rounded to whole pixels); ``image`` itself when None."""
    return image if box is None else image.crop(tuple(round(x) for x in box))  # type: ignore[arg-type]


def load_sized(path: Path, size: tuple[int, int], box: Box | None = None) -> torch.Tensor:
    """An image file decoded and sized for the VAE (:func:`image_to_tensor`): [1, 3, h, w] in [−1, 1]."""
    return image_to_tensor(load_rgb(path), size, box)


def image_to_tensor(image: Image.Image, size: tuple[int, int], box: Box | None = None) -> torch.Tensor:
    """Resize (Lanczos) to ``size`` = (w, h), the region ``box`` of it when given (a bucket's crop),
    and map to [−1, 1] exactly as FluxKontextPipeline does.

    ``size`` is already a multiple of the model's factor (:func:`fit_size`); the processor rounds
    nothing more (its ``vae_scale_factor`` only floors sizes).

    Returns:
        [1, 3, h, w] float32.
    """
    # deferred: diffusers is a heavy import
    from diffusers.image_processor import VaeImageProcessor

    w, h = size
    proc = VaeImageProcessor(vae_scale_factor=1)
    if box is not None:
        image = image.resize((w, h), resample=Image.Resampling.LANCZOS, box=box)
    tensor: torch.Tensor = proc.preprocess(proc.resize(image, h, w), h, w)
    # contiguous: the processor returns a channels-last view, and convolutions pick other kernels
    # (with other rounding) for it, which would make cached and freshly encoded latents differ
    return tensor.contiguous()


def image_arg(image: str | list[str] | tuple[str, ...] | None, counts: tuple[int, int], want: str) -> list[Image.Image]:
    """The images of a ``--image`` option: none, one path, or a comma-separated list (or a list), their
    number within ``counts`` = (least, most).

    Raises:
        QfluxError: another number of images (``want`` says how many) or a path that does not exist.
    """

    if image is None or image == "":
        paths: list[str] = []
    elif isinstance(image, str):
        paths = [p.strip() for p in image.split(",") if p.strip()]
    else:
        paths = [str(p) for p in image]
    if not counts[0] <= len(paths) <= counts[1]:
        raise QfluxError(f"{want} in --image; got {len(paths)}")
    for p in paths:
        if not Path(p).is_file():
            raise QfluxError(f"input image '{p}' does not exist; pass --image=PATH")
    return [load_rgb(Path(p)) for p in paths]


def to_image(decoded: torch.Tensor) -> Any:
    """A VAE output [1, 3, H, W] in [-1, 1] as the pipelines' ``output_type='np'`` image [H, W, 3]
    float32 in [0, 1] (the inverse of :func:`image_to_tensor`)."""
    # deferred: diffusers is a heavy import
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=1).postprocess(decoded, output_type="np")[0]


def to_pil(image: Any) -> Image.Image:
    """[H, W, 3] float in [0, 1] → 8-bit PIL image (rounded as diffusers' ``numpy_to_pil``)."""

    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype("uint8"))


def save_image(image: Any, out: str | Path) -> Path:
    """Write an image [H, W, 3] in [0, 1] to ``out`` (folders made as needed) and say so."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)
    print(f"wrote {path}")
    return path
