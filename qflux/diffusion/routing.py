"""Token routing (TREAD, ``train.route: tread``): during training a random subset of the target image's tokens
skips a range of transformer blocks and rejoins after them.

With routed blocks a..b, N target tokens, step scores s [N] and route ratio r, the kept target tokens K are
the (N − round(r·N)) highest scores (sorted), and every control (reference) token and text token goes through:

    I   = K ∪ {N, …, L − 1}                  the image rows that enter block a (L image tokens in all)
    h'  = blocks a..b([h_txt ; h_img[:, I]])  (rotary rows and per-token modulation gathered by I alike)
    out = h_img with rows I replaced by h'    (a skipped row leaves block b as it entered block a)

The scores come from the step's keyed generator (:func:`draw_scores`, drawn in ``prepare``): U[0, 1) per token,
plus 2 where the change mask is set (``train.route_keep_changed``), so the changed region is kept in while it
covers at most 1 − r of the image. One subset serves the micro-batch (rotary tables are shared by its rows),
and it depends on the step's keys only, so 2 ranks draw what 1 process draws.

The routing travels with each transformer call, in its attention kwargs under :data:`ROUTE_KEY` (a fresh
:class:`RouteCall` per call), so a checkpointed block recomputes with the same rows, and predict and
validation, which pass none, run every token. :func:`install_routing` wraps each block's ``forward``: it takes
the key out of the attention kwargs (the attention processors never see it) and, in routed blocks, gathers
and restores. Shared by every diffusers flow transformer: the blocks' own parameter names say where the
streams, rotary tables and per-token tensors are (FLUX.1, FLUX.2 and Qwen-Image blocks).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qflux.diffusion.latents import pack_latents

ROUTE_KEY = "qflux_route"
"""The attention-kwargs entry that carries a call's :class:`RouteCall`."""
TOKEN_ARGS = ("modulate_index",)
"""Block inputs indexed per image token [B, L] (Qwen-Image-Edit-2511's zero-σ control modulation)."""
CHANGED = 2.0
"""Added to a changed token's score: above every U[0, 1) draw."""


class RouteCall:
    """One transformer call's routing: the target tokens' scores and what its blocks hand on.

    A plain class (not attrs): it is built and updated inside the compiled step.
    """

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores
        """[N] per target token; the highest (1 − ratio)·N are kept."""
        self.index: torch.Tensor | None = None
        """I: the image rows that go through the routed blocks [|K| + L − N] (set at the first one)."""
        self.full: torch.Tensor | None = None
        """The image stream as it entered the first routed block [B, L, D]."""
        self.n_text = 0
        """Text tokens in front of the image rows (a block fed one joined stream reads it here)."""


def route_kwargs(scores: torch.Tensor | None) -> dict[str, Any] | None:
    """The attention kwargs that carry one transformer call's routing (a fresh :class:`RouteCall`), or None."""
    return None if scores is None else {ROUTE_KEY: RouteCall(scores)}


def draw_scores(generator: torch.Generator, latent_hw: tuple[int, int], change: torch.Tensor | None) -> torch.Tensor:
    """One micro-batch's token scores s [N], N = (h/2)·(w/2): U[0, 1) per 2×2 token, plus :data:`CHANGED`
    where any sample's change mask [B, 1, h, w] is set in the token's patch (None: no mask)."""
    h, w = latent_hw
    scores = torch.rand((h // 2) * (w // 2), generator=generator)
    if change is not None:
        # a token is changed where its 2×2 patch holds any changed latent pixel, in any sample of the batch
        changed = pack_latents(change.detach().float().cpu()).amax(dim=(0, 2)) > 0
        scores = scores + CHANGED * changed.float()
    return scores


def kept_tokens(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """K: the indices of the N − round(r·N) highest scores [N], ascending (at least one token is kept)."""
    n = scores.numel()
    k = max(1, n - round(ratio * n))
    return torch.topk(scores, k).indices.sort().values


def routed_blocks(span: Sequence[int], blocks: int) -> range:
    """The routed block indices of ``train.route_blocks: [first, last]`` (inclusive; negative counts from the
    end, as Python indexes) among a transformer's ``blocks`` repeated blocks."""
    first, last = (i + blocks if i < 0 else i for i in span)
    if not 0 <= first <= last < blocks:
        raise ValueError(
            f"train.route_blocks: {list(span)} is no range of this transformer's {blocks} blocks (0..{blocks - 1}, "
            "or negative from the end); set train.route_blocks to [first, last] inside it, e.g. [1, -2]"
        )
    return range(first, last + 1)


def _gather_rotary(rotary: Any, index: torch.Tensor, image: int, text: int) -> Any:
    """The rotary tables of the routed rows: a joined table [text + L, d] (FLUX.1, FLUX.2) keeps its text rows
    and gathers its image rows; a tuple's image table [L, d] (Qwen-Image: (image, text)) is gathered, its text
    table kept."""
    if isinstance(rotary, torch.Tensor):
        rows = rotary.shape[0]
        if rows == image:
            return rotary.index_select(0, index)
        if rows == text + image:
            return torch.cat([rotary[:text], rotary[text:].index_select(0, index)])
        return rotary
    if isinstance(rotary, (tuple, list)):
        first = rotary[0]
        if isinstance(first, torch.Tensor) and first.shape[0] == image and len(rotary) == 2:
            return (first.index_select(0, index), rotary[1])  # (image, text)
        return type(rotary)(_gather_rotary(r, index, image, text) for r in rotary)
    return rotary


def _routed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A block's forward with routing (installed as the instance's ``forward`` by :func:`install_routing`)."""
    names, role, ratio, forward = self.__dict__["_qflux_route"]
    bound = {**dict(zip(names[: len(args)], args, strict=True)), **kwargs}
    call = None
    for key, value in bound.items():
        if isinstance(value, dict) and ROUTE_KEY in value:
            call = value[ROUTE_KEY]
            bound[key] = {k: v for k, v in value.items() if k != ROUTE_KEY}
    if call is None:
        return forward(self, **bound)
    encoder = bound.get("encoder_hidden_states")
    if isinstance(encoder, torch.Tensor):
        call.n_text = encoder.shape[1]
    if role == "":
        return forward(self, **bound)
    joined = not isinstance(encoder, torch.Tensor)  # one stream [text ; image] (FLUX.2's single blocks)
    text = call.n_text if joined else 0
    if "first" in role:
        hidden = bound["hidden_states"]
        image = hidden[:, text:]
        kept = kept_tokens(call.scores, ratio).to(hidden.device)
        call.index = torch.cat([kept, torch.arange(call.scores.numel(), image.shape[1], device=hidden.device)])
        call.full = image
        bound["hidden_states"] = torch.cat([hidden[:, :text], image.index_select(1, call.index)], dim=1)
    assert call.index is not None and call.full is not None
    length = call.full.shape[1]
    if bound.get("image_rotary_emb") is not None:
        bound["image_rotary_emb"] = _gather_rotary(bound["image_rotary_emb"], call.index, length, call.n_text)
    for name in TOKEN_ARGS:
        if isinstance(bound.get(name), torch.Tensor):
            bound[name] = bound[name].index_select(1, call.index)
    out = forward(self, **bound)
    if "last" not in role:
        return out
    # out = h_img with the routed rows replaced (index_copy: the gradient reaches both)
    if isinstance(out, tuple):
        return (*out[:-1], call.full.index_copy(1, call.index, out[-1]))
    return torch.cat([out[:, :text], call.full.index_copy(1, call.index, out[:, text:])], dim=1)


_FORWARDS: dict[tuple[type, str], Any] = {}
"""One copy of :func:`_routed_forward` per (block class, role), each with its own code object: torch.compile keeps
its graphs (and its recompile limit) per code object, so a regionally compiled block class holds per role the
graphs it held without routing (one per grad mode and bucket)."""


def _forward_for(cls: type, role: str) -> Any:
    """:func:`_routed_forward` for blocks of class ``cls`` in ``role`` (a function of its own code object)."""
    if (cls, role) not in _FORWARDS:
        code = _routed_forward.__code__.replace(co_name=f"_routed_forward_{cls.__name__}_{role or 'outside'}")
        _FORWARDS[cls, role] = types.FunctionType(code, _routed_forward.__globals__, code.co_name)
    return _FORWARDS[cls, role]


def install_routing(blocks: Sequence[nn.Module], span: Sequence[int], ratio: float) -> None:
    """Wrap each block's ``forward`` (all of a transformer's repeated blocks, in forward order) so calls that
    carry a :class:`RouteCall` route blocks ``span`` (:func:`routed_blocks`) at ``ratio``.

    Every block takes the key out of its attention kwargs; calls without one run as before."""
    routed = routed_blocks(span, len(blocks))
    for i, block in enumerate(blocks):
        role = ("first" if i == routed.start else "") + ("last" if i == routed.stop - 1 else "")
        role = role or ("middle" if i in routed else "")
        names = tuple(inspect.signature(type(block).forward).parameters)[1:]
        block.__dict__["_qflux_route"] = (names, role, float(ratio), type(block).forward)
        block.forward = types.MethodType(_forward_for(type(block), role), block)


def remove_routing(blocks: Sequence[nn.Module]) -> None:
    """Undo :func:`install_routing`: each block's class forward again."""
    for block in blocks:
        if "_qflux_route" in block.__dict__:
            del block.forward, block.__dict__["_qflux_route"]
