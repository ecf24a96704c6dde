"""A Q4_K quantizer for the tests (the gguf package dequantizes Q4_K but quantizes no K-quant): ggml's block layout
(``block_q4_K`` in ggml-common.h; ``quantize_row_q4_K_ref`` in ggml-quants.c), with the plain min/max fit per
32-value sub-block instead of ggml's iterative search, so its error is at most ggml's rounding plus that fit's.

    a super-block of 256 values = 8 sub-blocks of 32:  x ≈ d·sc_j·q − dmin·m_j,  q ∈ [0, 15]
    bytes: d (f16) | dmin (f16) | 12 bytes of 6-bit sc_j, m_j | 128 bytes of 4-bit q (two per byte)
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = 144


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """[rows, n] float32, n a multiple of 256 → [rows, n / 256 · 144] uint8 (gguf's byte layout for ``add_tensor``)."""
    rows, n = x.shape
    blocks = x.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(blocks.min(axis=2), 0.0)  # x ≈ scale·q + lo, lo ≤ 0 (m = −lo)
    scale = (blocks.max(axis=2) - lo) / 15.0
    mins = -lo
    max_scale, max_min = scale.max(axis=1, keepdims=True), mins.max(axis=1, keepdims=True)
    inv_s = np.where(max_scale > 0, 63.0 / np.maximum(max_scale, 1e-30), 0.0)
    inv_m = np.where(max_min > 0, 63.0 / np.maximum(max_min, 1e-30), 0.0)
    ls = np.clip(np.round(inv_s * scale), 0, 63).astype(np.uint8)
    lm = np.clip(np.round(inv_m * mins), 0, 63).astype(np.uint8)
    d = (max_scale / 63.0).astype(np.float16)
    dmin = (max_min / 63.0).astype(np.float16)
    packed = np.zeros((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    step = d.astype(np.float32) * ls  # the scale each sub-block decodes with
    offset = dmin.astype(np.float32) * lm
    safe = np.where(step > 0, step, 1.0)
    q = np.clip(np.round((blocks + offset[:, :, None]) / safe[:, :, None]), 0, 15).astype(np.uint8)
    q = np.where(step[:, :, None] > 0, q, 0).reshape(-1, 4, 64)  # 4 groups of 64: low nibble l, high l + 32
    qs = (q[:, :, :32] | (q[:, :, 32:] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return out.reshape(rows, n // QK_K * BLOCK_BYTES)
