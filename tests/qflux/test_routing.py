"""Token routing (``train.route: tread``) on the three diffusers transformers: calls without routing (predict,
validation) and routing that skips nothing equal the plain transformer bit for bit; a routed FLUX.1 equals its
blocks run by hand on the kept tokens; skipped tokens never reach the routed blocks (FLUX.2 across its double
and single blocks, Qwen-Image-Edit-2511 with its per-token modulation); checkpointing recomputes the same
rows; the draws keep the changed region and do not depend on the rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.diffusion.latents import latent_image_ids
from qflux.diffusion.routing import (
    draw_scores,
    install_routing,
    kept_tokens,
    remove_routing,
    route_kwargs,
    routed_blocks,
)
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.train.batch import Conditioning, Draws, prepare
from qflux.weights.block_swap import transformer_blocks

N, NC, S, B = 16, 16, 5, 2  # target tokens (4×4), control tokens, text tokens, batch
Call = Callable[[torch.Tensor, dict[str, Any] | None], torch.Tensor]


def _flux() -> tuple[torch.nn.Module, Call]:
    m, call, _ = _flux_parts()
    return m, call


def _flux_parts() -> tuple[torch.nn.Module, Call, dict[str, torch.Tensor]]:
    """A tiny FLUX.1 transformer, its call on [target ; control] tokens x [B, N + Nc, 16], and that call's inputs."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=True, axes_dims_rope=(4, 6, 6))  # fmt: skip
    text, pooled, t = torch.randn(B, S, 32), torch.randn(B, 32), torch.rand(B)
    ids = torch.cat([latent_image_ids(8, 8, 0), latent_image_ids(8, 8, 1)])

    def call(x: torch.Tensor, kwargs: dict[str, Any] | None) -> torch.Tensor:
        return m(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t,
                 guidance=torch.full((B,), 3.5), img_ids=ids, txt_ids=torch.zeros(S, 3), joint_attention_kwargs=kwargs,
                 return_dict=False)[0]  # fmt: skip

    return m, call, {"text": text, "pooled": pooled, "t": t, "ids": ids}


def _flux2() -> tuple[torch.nn.Module, Call]:
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    m = Flux2Transformer2DModel(patch_size=1, in_channels=16, joint_attention_dim=24, guidance_embeds=False,
                                num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                axes_dims_rope=(4, 4, 4, 4), timestep_guidance_channels=32, mlp_ratio=3.0)  # fmt: skip
    text, t = torch.randn(B, S, 24), torch.rand(B)
    grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.cat([torch.cat([torch.full((N, 1), k * 10), torch.zeros(N, 1), grid], 1) for k in (0, 1)])

    def call(x: torch.Tensor, kwargs: dict[str, Any] | None) -> torch.Tensor:
        txt_ids = torch.zeros(S, 4)
        txt_ids[:, 3] = torch.arange(S)
        return m(hidden_states=x, encoder_hidden_states=text, timestep=t, img_ids=ids.float(), txt_ids=txt_ids,
                 joint_attention_kwargs=kwargs, return_dict=False)[0]  # fmt: skip

    return m, call


def _qwen_2511() -> tuple[torch.nn.Module, Call]:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    m = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, joint_attention_dim=16,
                                    guidance_embeds=False, zero_cond_t=True, num_layers=3, attention_head_dim=16,
                                    num_attention_heads=3, axes_dims_rope=(8, 4, 4))  # fmt: skip
    text, t = torch.randn(B, S, 16), torch.rand(B)
    shapes = [[(1, 4, 4), (1, 4, 4)]] * B

    def call(x: torch.Tensor, kwargs: dict[str, Any] | None) -> torch.Tensor:
        return m(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(B, S), timestep=t,
                 img_shapes=shapes, attention_kwargs=kwargs, return_dict=False)[0]  # fmt: skip

    return m, call


MODELS = {"flux": _flux, "flux2": _flux2, "qwen_2511": _qwen_2511}


@pytest.mark.parametrize("name", list(MODELS))
def test_calls_without_routing_and_routing_that_skips_nothing_equal_the_plain_transformer(name: str) -> None:
    m, call = MODELS[name]()
    x = torch.randn(B, N + NC, 16)
    with torch.no_grad():
        plain = call(x, None)
        install_routing(transformer_blocks(m), (0, -1), 0.5)
        assert torch.equal(call(x, None), plain)  # predict and validation pass no routing
        remove_routing(transformer_blocks(m))
        install_routing(transformer_blocks(m), (0, -1), 0.01)  # round(0.01·16) = 0 tokens skip
        assert torch.equal(call(x, route_kwargs(torch.rand(N))), plain)


@pytest.mark.parametrize("name", list(MODELS))
def test_skipped_tokens_never_reach_the_routed_blocks(name: str) -> None:
    """Every block routed: a skipped token's output does not depend on any other token, and no kept token's
    output depends on a skipped one; a kept token's input reaches the other kept tokens."""
    m, call = MODELS[name]()
    install_routing(transformer_blocks(m), (0, -1), 0.5)
    scores = torch.rand(N)
    kept = kept_tokens(scores, 0.5)
    skipped = torch.tensor([i for i in range(N) if i not in kept])
    assert len(kept) == len(skipped) == N // 2
    x = torch.randn(B, N + NC, 16)
    with torch.no_grad():
        out = call(x, route_kwargs(scores))
        moved = x.clone()
        moved[:, skipped[0]] += 1.0
        other = call(moved, route_kwargs(scores))
        rest = torch.tensor([i for i in range(N) if i != skipped[0]])
        assert torch.equal(other[:, rest], out[:, rest]) and not torch.equal(other[:, skipped[0]], out[:, skipped[0]])
        moved = x.clone()
        moved[:, kept[0]] += 1.0
        other = call(moved, route_kwargs(scores))
        assert torch.equal(other[:, skipped], out[:, skipped])
        assert not torch.allclose(other[:, kept[1:]], out[:, kept[1:]])


def test_a_routed_flux_equals_its_blocks_run_on_the_kept_tokens() -> None:
    """Blocks 1..3 of 5 routed: the blocks run by hand, the kept tokens' rotary table computed from their own
    positions, the skipped rows put back after block 3; with checkpointing, the same outputs and gradients."""
    m, call, parts = _flux_parts()
    x = torch.randn(B, N + NC, 16)
    scores = torch.rand(N)
    install_routing(transformer_blocks(m), (1, 3), 0.5)
    with torch.no_grad():
        routed = call(x, route_kwargs(scores))
    index = torch.cat([kept_tokens(scores, 0.5), torch.arange(N, N + NC)])
    remove_routing(transformer_blocks(m))
    with torch.no_grad():  # FluxTransformer2DModel.forward's steps, the routed blocks on the rows `index`
        hidden, text = m.x_embedder(x), m.context_embedder(parts["text"])
        temb = m.time_text_embed(parts["t"] * 1000, torch.full((B,), 3500.0), parts["pooled"])
        txt_ids = torch.zeros(S, 3)
        every = m.pos_embed(torch.cat([txt_ids, parts["ids"]]))
        kept = m.pos_embed(torch.cat([txt_ids, parts["ids"][index]]))  # from the kept tokens' own positions
        for i, block in enumerate(transformer_blocks(m)):
            if i == 1:
                full, hidden = hidden, hidden[:, index]
            text, hidden = block(hidden, text, temb, kept if 1 <= i <= 3 else every)
            if i == 3:
                hidden = full.index_copy(1, index, hidden)
        by_hand = m.proj_out(m.norm_out(hidden, temb))
    torch.testing.assert_close(routed, by_hand, rtol=0, atol=1e-6)

    install_routing(transformer_blocks(m), (1, 3), 0.5)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            m.enable_gradient_checkpointing()
        xg = x.clone().requires_grad_()
        out = call(xg, route_kwargs(scores))
        out.square().sum().backward()
        grads.append((out.detach(), xg.grad, m.transformer_blocks[1].attn.to_q.weight.grad.clone()))
        m.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_blocks_of_one_class_and_role_share_a_forward_and_others_do_not() -> None:
    """torch.compile keeps graphs, and its recompile limit, per code object: one per (block class, role), shared by
    those blocks, so a regionally compiled class holds per role what it held without routing (one shared wrapper
    reached the limit of 8 graphs in a 6-step tiny run)."""
    m, _ = _flux()  # 2 double blocks, then 3 single ones
    install_routing(transformer_blocks(m), (1, 3), 0.5)
    codes = [b.forward.__func__.__code__ for b in transformer_blocks(m)]
    assert [c.co_name.removeprefix("_routed_forward_") for c in codes] == [
        "FluxTransformerBlock_outside", "FluxTransformerBlock_first", "FluxSingleTransformerBlock_middle",
        "FluxSingleTransformerBlock_last", "FluxSingleTransformerBlock_outside"]  # fmt: skip
    again, _ = _flux()
    install_routing(transformer_blocks(again), (1, 3), 0.5)
    assert [b.forward.__func__.__code__ for b in transformer_blocks(again)] == codes  # reused, not new each time


def test_the_draws_keep_the_changed_region_and_do_not_depend_on_the_rank() -> None:
    g = torch.Generator().manual_seed(0)
    change = torch.zeros(2, 1, 8, 8)
    change[1, 0, :2, :4] = 1.0  # tokens (0, 0) and (0, 1) of the 4×4 grid, in the second sample only
    scores = draw_scores(g, (8, 8), change)
    assert scores.shape == (16,) and set(kept_tokens(scores, 0.875).tolist()) == {0, 1}
    assert kept_tokens(scores, 0.5).tolist() == sorted(kept_tokens(scores, 0.5).tolist())
    # prepare: one subset per micro-batch from the step's keys alone; none for evaluation
    cond = Conditioning(latents=torch.randn(2, 4, 8, 8), controls=(torch.randn(2, 4, 8, 8),),
                        text={"tokens": torch.randn(2, 3, 8)})  # fmt: skip
    empty = {"tokens": torch.zeros(1, 3, 8)}
    draws = Draws(route=True)

    class Sched:
        num_train_timesteps = 1000

    first = prepare(draws, Sched(), cond, empty, (0, 5, 0)).route
    second_rank = prepare(draws, Sched(), cond, empty, (0, 5, 0), first_index=1).route
    assert first is not None and torch.equal(first, second_rank)
    assert not torch.equal(first, prepare(draws, Sched(), cond, empty, (0, 6, 0)).route)  # type: ignore[arg-type]
    assert prepare(draws.without_dropout(), Sched(), cond, empty, (0, 5, 0)).route is None
    assert prepare(Draws(), Sched(), cond, empty, (0, 5, 0)).route is None


def test_route_settings_are_checked() -> None:
    assert routed_blocks((2, -2), 6) == range(2, 5) and routed_blocks((0, -1), 3) == range(0, 3)
    for span in ((3, 1), (0, 6), (-7, 2)):
        with pytest.raises(ValueError, match=r"train.route_blocks: .* is no range of this transformer's 6 blocks"):
            routed_blocks(span, 6)
    for settings, fix in (
        ({"train.route_ratio": 0.25}, "train.route_ratio is read only by train.route: tread"),
        ({"train.route": "tread", "train.route_ratio": 1.0}, "train.route_ratio"),
        ({"train.route": "tread", "train.route_blocks": [1]}, "train.route_blocks must be a list of 2 values"),
        ({"train.route": "tread", "train.loss_mask": "none", "train.route_keep_changed": False},
         "train.route_keep_changed is read only by train.route: tread with train.loss_mask"),
    ):  # fmt: skip
        with pytest.raises(QfluxError) as info:
            load_config(FluxKontextConfig, None, settings)
        assert fix in str(info.value)
