"""The compiled step: one graph without breaks (fullgraph), no recompiles when the lr changes,
and the same results as the eager step. Marked ``compile`` (a cold graph takes ~80 s here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qflux.config import LoraConfig
from qflux.flow import sigmas_from_u
from qflux.flux_kontext.loaders import load_flux_kontext_transformer
from qflux.flux_kontext.step import FluxKontextBatch, make_loss_fn
from qflux.lora import inject_lora
from qflux.train_state import StepHParams, init_train_state, make_train_step


def _batch(seed: int) -> FluxKontextBatch:
    g = torch.Generator().manual_seed(seed)
    return FluxKontextBatch(
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
    tr = load_flux_kontext_transformer(tiny_flux_dir, torch.float32)
    lora = inject_lora(tr, LoraConfig(r=4), seed=0)
    loss_fn = make_loss_fn(tr, guidance_scale=2.5, weighting_scheme="none")
    hp = StepHParams()
    eager = make_train_step(loss_fn, hp)
    compiled = make_train_step(loss_fn, hp, compile=True)  # fullgraph=True: a graph break raises
    se = sc = init_train_state(lora, seed=0)
    for i in range(5):
        lr = torch.tensor(1e-3 * (i + 1), dtype=torch.float64)  # a new lr every step
        micro = [_batch(10 + i), _batch(20 + i)]  # two accumulated micro-batches
        se, me = eager(se, micro, lr)
        sc, mc = compiled(sc, micro, lr)
        torch.testing.assert_close(mc["loss"], me["loss"], rtol=1e-5, atol=1e-6)
        for k in se.lora:
            torch.testing.assert_close(sc.lora[k], se.lora[k], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for five steps with five learning rates
    assert sc.step == 5 and torch.equal(sc.opt.updates, se.opt.updates)


def test_compile_refuses_the_autograd_engine(tiny_flux_dir: Path) -> None:
    tr = load_flux_kontext_transformer(tiny_flux_dir, torch.float32)
    loss_fn = make_loss_fn(tr, guidance_scale=2.5, weighting_scheme="none")
    with pytest.raises(ValueError, match="compile needs engine='func'"):
        make_train_step(loss_fn, StepHParams(engine="autograd"), module=tr, compile=True)
