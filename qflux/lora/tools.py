"""The maths of the LoRA toolbox (``python -m qflux.lora``): pure functions of tensors.

A LoRA layer is (A [r, in], B [out, r]) with its update ΔW = B·A [out, in] (the file's scale already folded
into B). Every result here is again such a pair, or a number about one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Pair = tuple[torch.Tensor, torch.Tensor]
"""(A [r, in], B [out, r]) with ΔW = B·A, float32."""


def singular_values(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ΔW = B·A without forming ΔW: B = Q_b·R_b, Aᵀ = Q_a·R_a, so ΔW = Q_b·(R_b·R_aᵀ)·Q_aᵀ and the
    SVD of the r×r core M = R_b·R_aᵀ = U·S·Vᵀ gives ΔW = (Q_b·U)·S·(Q_a·V)ᵀ.

    Returns:
        (U' [out, r], S [r] descending, V' [in, r]) with ΔW = U'·diag(S)·V'ᵀ, float64.
    """
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, qa @ vh.T


def resize(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[Pair, float]:
    """The best rank-``rank`` approximation of ΔW = B·A (Eckart–Young: the leading singular triplets); a rank
    above the layer's pads with zeros (ΔW unchanged).

    Returns:
        ((A' [rank, in], B' [out, rank]) float32, the energy kept: :func:`split`).
    """
    return split(*singular_values(a, b), rank)


def extract(base: torch.Tensor, tuned: torch.Tensor, rank: int) -> tuple[Pair, float]:
    """A rank-``rank`` LoRA of a weight's change D = W_tuned − W_base [out, in] (the exact change when its rank is
    at most ``rank``).

    Returns:
        ((A [rank, in], B [out, rank]) float32, the energy kept: :func:`split`).
    """
    u, s, vh = torch.linalg.svd(tuned.double() - base.double(), full_matrices=False)
    return split(u, s, vh.T, rank)


def split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, rank: int) -> tuple[Pair, float]:
    """ΔW = U·diag(S)·Vᵀ (S descending) truncated to ``rank`` and split evenly: A = S_k^½·V_kᵀ, B = U_k·S_k^½,
    zero-padded to ``rank`` rows / columns where S is shorter.

    Returns:
        ((A [rank, in], B [out, rank]) float32, the energy kept Σ_{i<rank} S_i² / Σ S_i², 1 for ΔW = 0).
    """
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, v.shape[0], dtype=torch.float64)
    b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
    a[:k], b[:, :k] = root[:, None] * v[:, :k].T, u[:, :k] * root
    total = float((s.double() ** 2).sum())
    kept = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    return (a.float(), b.float()), kept


def delta_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖B·A‖_F without forming it: ‖B·A‖_F² = tr((BᵀB)(AAᵀ))."""
    a64, b64 = a.double(), b.double()
    return float(torch.trace((b64.T @ b64) @ (a64 @ a64.T)).clamp_min(0).sqrt())


def post_hoc_ema(
    steps: Sequence[int], snapshots: Sequence[Mapping[str, torch.Tensor]], decay: float
) -> dict[str, torch.Tensor]:
    """The moving average of a run's tensors from snapshots saved at ``steps`` (ascending), each held from the
    step before it since the previous snapshot: over a gap of g steps e ← d^g·e + (1 − d^g)·θ, which is g steps
    of the in-run e ← d·e + (1 − d)·θ with θ constant; e starts at the first snapshot.

    With a snapshot at every step, this is the in-run average started at the first
    snapshot's tensors instead of the run's initial ones (which differ by d^N·(θ_0 − θ_1) after N steps).

    Returns:
        {name: e} float32.
    """
    if not snapshots or len(steps) != len(snapshots) or list(steps) != sorted(set(steps)):
        raise ValueError("post_hoc_ema takes snapshots at strictly ascending steps, one per step")
    ema = {k: v.double() for k, v in snapshots[0].items()}
    previous = steps[0]
    for step, theta in zip(steps[1:], snapshots[1:], strict=True):
        keep = decay ** (step - previous)  # d^g
        ema = {k: keep * e + (1 - keep) * theta[k].double() for k, e in ema.items()}
        previous = step
    return {k: v.float() for k, v in ema.items()}
