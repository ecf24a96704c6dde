"""The compiled step: one graph without breaks (fullgraph), no recompiles when the lr changes,
and the same results as the eager step, with the whole objective (change mask, huber, the base model's
preservation forward, a preserve prompt). Marked ``compile`` (a cold graph takes ~80 s here)."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import torch

from qflux.config.schema import LoraConfig
from qflux.diffusion.flow import Objective, sigmas_from_u
from qflux.lora.adapter import inject_lora
from qflux.models.flux_kontext.loaders import FLUX_KONTEXT
from qflux.models.flux_kontext.loss import FluxKontextBatch, make_loss_fn
from qflux.optim.transform import make_optimizer
from qflux.train.state import StepHParams, init_train_state, make_train_step, resolve_compile
from qflux.weights.frozen_linear import FrozenLinear, use_fast_frozen_linear
from qflux.weights.loading import load_part


def _batch(seed: int, masked: bool = False) -> FluxKontextBatch:
    g = torch.Generator().manual_seed(seed)
    kept = {"pooled": torch.randn(2, 32, generator=g), "tokens": torch.randn(2, 16, 32, generator=g)}
    return FluxKontextBatch(
        change=torch.rand(2, 1, 8, 8, generator=g) if masked else None,
        preserve=kept if masked else None,
        latents=torch.randn(2, 4, 8, 8, generator=g),
        control_latents=torch.randn(2, 4, 6, 8, generator=g),
        pooled=torch.randn(2, 32, generator=g),
        prompt_embeds=torch.randn(2, 16, 32, generator=g),
        noise=torch.randn(2, 4, 8, 8, generator=g),
        sigmas=sigmas_from_u(torch.rand(2, generator=g)),
    )


@pytest.mark.compile
def test_compiled_step_one_graph_no_recompiles_equals_eager(tiny_flux_dir: Path) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = inject_lora(tr, LoraConfig(r=4), seed=0)
    objective = Objective(loss="huber", huber_c=0.5, unmasked_weight=0.25, preserve="base")
    loss_fn = make_loss_fn(tr, objective, guidance_scale=2.5)
    hp = StepHParams()
    eager = make_train_step(loss_fn, hp)
    compiled = make_train_step(loss_fn, hp, compile=True)  # fullgraph=True: a graph break raises
    se = sc = init_train_state(lora, seed=0)
    for i in range(5):
        lr = torch.tensor(1e-3 * (i + 1), dtype=torch.float64)  # a new lr every step
        micro = [_batch(10 + i, True), _batch(20 + i, True)]  # two accumulated micro-batches
        se, me = eager(se, micro, lr)
        sc, mc = compiled(sc, micro, lr)
        torch.testing.assert_close(mc["loss"], me["loss"], rtol=1e-5, atol=1e-6)
        for k in se.lora:  # Adam divides by √v: a weight whose steps are tiny carries the rounding (≤ 2% of lr)
            torch.testing.assert_close(sc.lora[k], se.lora[k], rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for five steps with five learning rates
    assert sc.step == 5 and torch.equal(sc.opt.updates, se.opt.updates)


@pytest.mark.compile
def test_regional_compile_with_checkpointing_equals_the_eager_func_step(tiny_flux_dir: Path) -> None:
    """train.compile: regional + gradient_checkpointing (autograd engine, compiled blocks recomputed
    in backward) takes the same steps as the eager torch.func engine, without recompiling."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    lora = inject_lora(eager_tr, LoraConfig(r=4), seed=0)
    reg_tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    inject_lora(reg_tr, LoraConfig(r=4), seed=0)
    reg_tr.enable_gradient_checkpointing()
    for m in reg_tr.modules():  # the fast frozen linear (a custom autograd.Function) compiles too
        if type(m) is torch.nn.Linear and not m.weight.requires_grad:
            m.__class__ = FrozenLinear
    eager = make_train_step(make_loss_fn(eager_tr, guidance_scale=2.5), StepHParams())
    regional = make_train_step(
        make_loss_fn(reg_tr, guidance_scale=2.5),
        StepHParams(engine="autograd"),
        module=reg_tr,
        compile="regional",
    )
    se = sr = init_train_state(lora, seed=0)
    for i in range(3):
        lr = torch.tensor(1e-3 * (i + 1), dtype=torch.float64)
        micro = [_batch(30 + i)]
        se, me = eager(se, micro, lr)
        sr, mr = regional(sr, micro, lr)
        torch.testing.assert_close(mr["loss"], me["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mr["grad_norm"], me["grad_norm"], rtol=1e-4, atol=1e-6)
        for k in se.lora:
            torch.testing.assert_close(sr.lora[k], se.lora[k], rtol=1e-4, atol=1e-5)
    # one graph per repeated block class (double, single); the same graphs serve every step
    assert counters["stats"]["unique_graphs"] <= 4


def test_compile_modes_need_their_engine(tiny_flux_dir: Path) -> None:
    tr = load_part(FLUX_KONTEXT, tiny_flux_dir, "transformer", torch.float32)
    loss_fn = make_loss_fn(tr, guidance_scale=2.5)
    with pytest.raises(ValueError, match="compile='full' needs engine='func'"):
        make_train_step(loss_fn, StepHParams(engine="autograd"), module=tr, compile=True)
    with pytest.raises(ValueError, match="compile='regional' needs engine='autograd'"):
        make_train_step(loss_fn, StepHParams(engine="func"), module=tr, compile="regional")
    use_fast_frozen_linear(tr, force=True)
    with pytest.raises(ValueError, match="FrozenLinear"):
        make_train_step(loss_fn, StepHParams(), module=tr, compile="full")


def test_resolve_compile() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_compile(s, cpu) for s in ("auto", True, False, "regional")] == ["none", "full", "none", "regional"]
    assert resolve_compile("auto", cuda) == "regional"


@pytest.mark.compile
def test_an_adapter_outside_the_loss_compiles_with_a_zero_gradient() -> None:
    """A two-stream block whose second output is dropped (as Qwen-Image's last block drops its text
    stream): the compiled whole step (torch.func) and both eager engines train the used adapter alike
    and leave the unused one exactly as it was; unreached_adapters names it."""
    from torch import nn

    from qflux.lora.adapter import call_with_lora
    from qflux.train.state import unreached_adapters

    class TwoStreams(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.img, self.txt = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _dropped = self.txt(x)  # computed, never used: a None gradient for its adapter
            return self.img(x)

    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    torch.manual_seed(0)
    module = inject_adapter_in_model(PeftLoraConfig(r=2, target_modules=["img", "txt"], init_lora_weights=False),
                                     TwoStreams()).requires_grad_(False)  # fmt: skip
    lora = {k: v.detach().clone() for k, v in module.named_parameters() if ".lora_" in k}

    def loss_fn(params, batch):  # type: ignore[no-untyped-def]
        return (call_with_lora(module, params, {"x": batch}) ** 2).mean()

    batch = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    assert unreached_adapters(loss_fn, lora, batch, module) == ["txt"]
    lr, hp = (
        torch.tensor(1e-2, dtype=torch.float64),
        StepHParams(make_optimizer(weight_decay=0.0)),
    )  # no decay: unused = unchanged
    steps = {
        "compiled": make_train_step(loss_fn, hp, compile=True),
        "func": make_train_step(loss_fn, hp),
        "autograd": make_train_step(loss_fn, attrs.evolve(hp, engine="autograd"), module=module),
    }
    states = {name: step(init_train_state(lora, seed=0), [batch], lr)[0] for name, step in steps.items()}
    for name, state in states.items():
        for k, v in state.lora.items():
            assert torch.equal(v, lora[k]) == k.startswith("txt."), (name, k)
            torch.testing.assert_close(v, states["func"].lora[k], rtol=1e-5, atol=1e-6)
