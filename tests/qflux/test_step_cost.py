"""The default step does the reference's work with less overhead (timings live in benchmarks/): the
optimizer's arithmetic does not grow with the number of LoRA tensors, the eager step takes the
autograd engine, the frozen-layer backward layout follows what this CPU measures faster, the Qwen
step reads its compute dtype once, and control latents never leave the training device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qflux.optim.adamw import adamw_init
from qflux.optim.transform import make_optimizer

ARITHMETIC = {"mul", "add", "sub", "div", "sqrt", "lerp", "where", "pow", "clamp", "rsub", "addcdiv", "addcmul",
              "linalg_vector_norm", "isfinite", "bitwise_and", "logical_and"}  # fmt: skip


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _arithmetic_ops(n: int) -> int:
    params = {f"p{i}": torch.randn(4, 3) for i in range(n)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state, update = adamw_init(params), make_optimizer("adamw", max_grad_norm=1.0).update
    with _Count() as counter:
        update(grads, state, params, torch.tensor(1.0), torch.tensor(1e-3, dtype=torch.float64))
    return sum(op.removesuffix("_") in ARITHMETIC for op in counter.ops)


def test_optimizer_arithmetic_does_not_grow_with_the_tensors() -> None:
    assert _arithmetic_ops(40) == _arithmetic_ops(4) < 40


def test_the_eager_step_takes_the_autograd_engine() -> None:
    from qflux.train.state import grad_engine

    assert grad_engine("none") == grad_engine("regional") == "autograd" and grad_engine("full") == "func"


@pytest.mark.parametrize("faster", [True, False])
def test_frozen_layout_follows_the_measurement(monkeypatch: pytest.MonkeyPatch, faster: bool) -> None:
    from qflux.weights import frozen_linear

    measured = frozen_linear.column_major_is_faster.__wrapped__(torch.bfloat16, (64, 32, 64))  # uncached
    assert isinstance(measured, bool)
    monkeypatch.setattr(frozen_linear, "column_major_is_faster", lambda dtype: faster)
    assert frozen_linear.needs_fast_frozen_linear(torch.zeros(2, 2, dtype=torch.bfloat16)) is faster
    assert not frozen_linear.needs_fast_frozen_linear(torch.zeros(2, 2))  # float32: the layout does not matter


def test_qwen_loss_reads_the_compute_dtype_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qflux.models.qwen_image_edit import loss as step
    from qflux.models.qwen_image_edit.loaders import QWEN_IMAGE_EDIT
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
    from qflux.weights.loading import load_part

    tr = load_part(QWEN_IMAGE_EDIT, build_qwen_image_edit(tmp_path / "m"), "transformer", torch.float32)
    calls = []
    original = step.compute_dtype
    monkeypatch.setattr(step, "compute_dtype", lambda m: calls.append(1) or original(m))
    loss_fn = step.make_loss_fn(tr)
    g = torch.Generator().manual_seed(0)
    c = tr.config.out_channels
    batch = step.QwenImageEditBatch(
        latents=torch.randn(1, c, 4, 4, generator=g), controls=(torch.randn(1, c, 4, 4, generator=g),),
        embeds=torch.randn(1, 3, tr.config.joint_attention_dim, generator=g), mask=torch.ones(1, 3, dtype=torch.long),
        noise=torch.randn(1, c, 4, 4, generator=g), sigmas=torch.tensor([0.5]),
    )  # fmt: skip
    for _ in range(3):
        loss_fn({}, batch)
    assert len(calls) == 1


def test_control_latents_stay_on_the_training_device() -> None:
    """Dropout of the control image is applied where the latents are (a meta tensor cannot be copied
    to the host, so any round trip through it fails here)."""
    from qflux.config.schema import DataConfig, TrainConfig
    from qflux.train.batch import Conditioning, Draws, prepare

    class Sched:
        num_train_timesteps = 1000

    cond = Conditioning(
        latents=torch.zeros(2, 4, 4, 4, device="meta"),
        controls=(torch.zeros(2, 4, 4, 4, device="meta"),),
        text={"pooled": torch.zeros(2, 8, device="meta")},
    )
    out = prepare(Draws.from_config(DataConfig(prompt_image_dropout_rate=0.5), TrainConfig()), Sched(), cond,
                  {"pooled": torch.zeros(1, 8, device="meta")}, (0, 0, 0), "meta")  # fmt: skip
    assert out.controls[0].device.type == "meta" and out.controls[0].dtype == torch.float32
