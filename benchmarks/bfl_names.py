"""FLUX.1's weights in BFL names read back by diffusers' own converter at the full model's width.

diffusers' FLUX.1 single-file converter (``convert_flux_transformer_checkpoint_to_diffusers``) splits a single
block's ``linear1`` at inner_dim = 3072, so the tiny models cannot go through it (the tests check FLUX.1's BFL file
against ComfyUI's own table instead). This builds FLUX.1's transformer at its real width with one double and one
single block (random bf16 weights, about 1 GB), writes it in BFL names with
:func:`qflux.lora.original_names.to_original_names`, loads the file with ``FluxTransformer2DModel.from_single_file``
and compares every tensor.

    python benchmarks/bfl_names.py [--double=1] [--single=1]

Ends with ``RESULT name=bfl_names tensors=N mismatched=M seconds=S``.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import qflux.models  # noqa: F401  (registers every family's names)
from qflux.lora.original_names import to_original_names

FLUX1 = {
    "_class_name": "FluxTransformer2DModel",
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
"""FLUX.1-Kontext-dev's transformer config (its published shapes), the depth set by the arguments."""


def main(double: int = 1, single: int = 1) -> None:
    """Build, write in BFL names, read back through diffusers' converter, compare; print the RESULT line."""
    from diffusers import FluxTransformer2DModel

    started = time.perf_counter()
    torch.manual_seed(0)
    config = FLUX1 | {"num_layers": double, "num_single_layers": single}
    model = FluxTransformer2DModel.from_config(config).to(torch.bfloat16)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(prefix="qflux-bfl-") as tmp:
        folder = Path(tmp) / "model"
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "config.json").write_text(json.dumps(config), encoding="utf-8")
        file = Path(tmp) / "flux1-kontext-1+1-blocks.safetensors"
        save_file(to_original_names(weights, "flux"), str(file))
        back = FluxTransformer2DModel.from_single_file(str(file), config=str(folder), subfolder="transformer",
                                                       torch_dtype=torch.bfloat16).state_dict()  # fmt: skip
    mismatched = [k for k, v in weights.items() if k not in back or not torch.equal(back[k], v)]
    print(f"{len(weights)} tensors, {sum(v.numel() for v in weights.values()) / 1e6:.0f} M parameters; "
          f"mismatched: {mismatched[:5]}")  # fmt: skip
    print(f"RESULT name=bfl_names tensors={len(weights)} mismatched={len(mismatched)} "
          f"seconds={time.perf_counter() - started:.1f}")  # fmt: skip


if __name__ == "__main__":
    import fire

    fire.Fire(main)
