"""Block swap: the swapped weights stay on the host, the run trains the LoRA of the run without
swap (bit for bit on CPU: fp32, bf16, checkpointed, fp8-stored, cached, Qwen), no copy is left
behind, and the combinations it cannot serve are refused before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.weights.block_swap import SwappedLinear, swap_blocks, transformer_blocks
from recipes.flux_kontext_lora import train as flux_train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_pairs(tmp_path_factory.mktemp("data"), 4, seed=0)


def _flux(model: Path, data: Path, out: Path, **more: object) -> FluxKontextConfig:
    return load_config(
        FluxKontextConfig,
        None,
        {"model.pretrained_model_name_or_path": str(model), "model.dtype": "float32", "model.max_sequence_length": 8,
         "data.dataset_path": str(data), "train.max_train_steps": 3, "logging.output_dir": str(out),
         "logging.write_sample": False, "logging.report_to": "none", "cache.cache_dir": str(out.parent / "cache"),
         **more},
    )  # fmt: skip


def _same(a: Any, b: Any) -> None:
    assert a.losses == b.losses
    assert all(torch.equal(a.state.lora[k], b.state.lora[k]) for k in a.state.lora)


@pytest.mark.parametrize(
    "more",
    [
        {},
        {"model.dtype": "bfloat16", "train.gradient_checkpointing": True},
        {"model.quantize": "fp8"},
        # the tiny model's 32-wide layers stay bf16 under nf4 (bitsandbytes needs 64): the run's other layers, swapped
        # beside 4-bit storage; a 4-bit layer itself: test_a_swapped_4bit_layer_computes_what_the_layer_does
        {"model.quantize": "nf4", "model.dtype": "bfloat16", "train.gradient_checkpointing": True},
        {"cache.use_cache": True},
    ],
    ids=["fp32", "bf16-checkpointed", "fp8-stored", "nf4-stored", "cached"],
)
def test_swapping_trains_the_same_lora(
    more: dict[str, Any], tiny_flux_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = flux_train(_flux(tiny_flux_dir, data, tmp_path / "plain", **more))
    swapped = flux_train(_flux(tiny_flux_dir, data, tmp_path / "swap", **more, **{"train.blocks_to_swap": 2}))
    _same(plain, swapped)
    assert "block swap: the frozen weights of 2 of 3 blocks" in capsys.readouterr().out
    layers = [m for m in swapped.models.transformer.modules() if isinstance(m, SwappedLinear)]
    assert layers and not any(isinstance(m, SwappedLinear) for m in plain.models.transformer.modules())
    swapper = layers[0].swapper
    assert not swapper.ready  # every prefetched or recomputed copy was used and released
    # three steps and the unreached-adapter probe before the first (one more forward and backward): every
    # layer's forward, and the backward of those whose input takes a gradient (the modulation layers of single
    # blocks read the timestep embedding only); once more when recomputing
    recompute = more.get("train.gradient_checkpointing", False)
    assert 4 * len(layers) < swapper.copies <= 4 * (3 if recompute else 2) * len(layers)


def test_qwen_swaps_its_blocks_too(tmp_path: Path, data: Path) -> None:
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
    from recipes.qwen_image_edit_lora import train as qwen_train

    model = build_qwen_image_edit(tmp_path / "model", seed=0)

    def cfg(out: str, **more: object) -> QwenImageEditConfig:
        return load_config(
            QwenImageEditConfig,
            None,
            {"model.pretrained_model_name_or_path": str(model), "model.dtype": "float32",
             "data.dataset_path": str(data), "train.max_train_steps": 2, "logging.output_dir": str(tmp_path / out),
             "logging.write_sample": False, "logging.report_to": "none", **more},
        )  # fmt: skip

    _same(qwen_train(cfg("plain")), qwen_train(cfg("swap", **{"train.blocks_to_swap": 1})))


def test_swapped_weights_stay_on_the_host_and_the_rest_moves(tiny_flux_dir: Path) -> None:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer").requires_grad_(False)
    names = set(model.state_dict())
    swapper = swap_blocks(model, 2, torch.device("meta"))  # meta: a device that is not the host
    assert set(model.state_dict()) == names  # the state dict keeps its names
    swapped = {id(t) for t in swapper.host_tensors()}
    blocks = transformer_blocks(model)
    assert len(swapper.blocks) == 2 and all(swapper.blocks)
    for block in blocks[-2:]:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                assert isinstance(m, SwappedLinear) and m.weight.device.type == "cpu" and id(m.weight) in swapped
    for p in model.parameters():
        assert (p.device.type == "cpu") == (id(p) in swapped)
    assert all(not isinstance(m, SwappedLinear) for m in blocks[0].modules())


@pytest.mark.parametrize(
    ("more", "message"),
    [
        ({"train.blocks_to_swap": 9}, r"more than the transformer's 3 blocks"),
        ({"train.compile": "regional"}, r"torch.compile cannot trace; set train.compile: false"),
        ({"train.compile": True}, r"torch.compile cannot trace"),
    ],
)
def test_what_it_cannot_serve_is_refused_before_loading(
    more: dict[str, Any], message: str, tiny_flux_dir: Path, data: Path, tmp_path: Path
) -> None:
    cfg = _flux(tiny_flux_dir, data, tmp_path / "out", **{"train.blocks_to_swap": 1, **more})
    with pytest.raises(QfluxError, match=message):
        flux_train(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_swapped_4bit_layer_computes_what_the_layer_does(quant_type: str) -> None:
    """A bitsandbytes 4-bit layer (64 wide, as bitsandbytes' kernels need) swapped to the host: its packed weight
    and statistics travel, and the output and the input's gradient are the layer's own, bit for bit."""
    from qflux.weights.block_swap import Swapper
    from qflux.weights.quantize import keep_trainable_layout, linear_4bit

    torch.manual_seed(0)
    layer = linear_4bit(torch.nn.Linear(128, 64).to(torch.bfloat16), quant_type, torch.bfloat16).requires_grad_(False)
    keep_trainable_layout(layer)  # as training holds 4-bit layers
    swapper = Swapper(torch.device("cpu"))
    swapped = SwappedLinear.from_layer(layer, swapper, 0, torch.device("cpu"))
    assert len(swapped.host_tensors()) > 2 and swapped.weight.dtype == torch.uint8  # packed, with its statistics
    x = torch.randn(3, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    want = layer(x)
    (gx,) = torch.autograd.grad(want.sum(), x)
    got = swapped(x)
    (sx,) = torch.autograd.grad(got.sum(), x)
    assert torch.equal(got, want) and torch.equal(sx, gx)
    assert swapper.copies == 2  # fetched for forward and again for backward
