"""Shared batching: dropout picks per sample between the prompt and the empty instruction, padding
keeps every real token and marks the rest, and the same sample draws the same randomness however a
batch is split."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from qflux.config.schema import DataConfig, TrainConfig
from qflux.models.qwen_image_edit.batch import stack_tokens
from qflux.train.batch import Conditioning, Draws, pad_tokens, prepare, where_dropped


class _Sched:
    num_train_timesteps = 1000


@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 6), st.data())
def test_where_dropped_pads_and_picks_per_sample(lengths: list[int], empty_len: int, data) -> None:
    g = torch.Generator().manual_seed(sum(lengths))
    rows = [torch.randn(n, 3, generator=g) for n in lengths]
    embeds, mask = stack_tokens(rows)
    assert embeds.shape == (len(rows), max(lengths), 3)
    assert mask.sum(1).tolist() == lengths
    empty_rows = [torch.randn(empty_len, 3, generator=g) for _ in rows]
    e_embeds, e_mask = stack_tokens(empty_rows)
    drop = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows))))
    out = where_dropped(drop, {"embeds": embeds, "mask": mask}, {"embeds": e_embeds, "mask": e_mask})
    length = max(max(lengths), empty_len)
    for i, dropped in enumerate(drop.tolist()):
        row = empty_rows[i] if dropped else rows[i]
        n = row.shape[0]
        assert torch.equal(out["embeds"][i, :n], row) and bool((out["embeds"][i, n:] == 0).all())
        assert out["mask"][i].tolist() == [1] * n + [0] * (length - n)


def test_pad_tokens_is_a_no_op_at_the_length() -> None:
    x = torch.ones(2, 3, 4)
    assert pad_tokens(x, 3) is x and pad_tokens(x, 5).shape == (2, 5, 4)


def test_draws_follow_the_sample_not_the_split() -> None:
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(
        latents=torch.randn(4, 2, 4, 4, generator=g),
        controls=(torch.randn(4, 2, 4, 4, generator=g),),
        text={"tokens": torch.randn(4, 5, 3, generator=g)},
    )
    empty = {"tokens": torch.zeros(1, 5, 3)}
    draws = Draws.from_config(DataConfig(caption_dropout_rate=0.5, prompt_image_dropout_rate=0.5), TrainConfig())
    whole = prepare(draws, _Sched(), cond, empty, (0, 3, 0))
    halves = [
        prepare(
            draws,
            _Sched(),
            Conditioning(
                cond.latents[i : i + 2], (cond.controls[0][i : i + 2],), {"tokens": cond.text["tokens"][i : i + 2]}
            ),
            empty,
            (0, 3, 0),
            first_index=i,
        )
        for i in (0, 2)
    ]
    assert torch.equal(whole.noise, torch.cat([h.noise for h in halves]))
    assert torch.equal(whole.sigmas, torch.cat([h.sigmas for h in halves]))
    assert torch.equal(whole.text["tokens"], torch.cat([h.text["tokens"] for h in halves]))
    assert torch.equal(whole.controls[0], torch.cat([h.controls[0] for h in halves]))
