"""Triton kernels of the local attention (imported by :mod:`acmix.ops.triton_backend` only).

This module imports :mod:`triton` unconditionally; :mod:`~acmix.ops.triton_backend`
imports it only where Triton is installed. Launch them through that module's
registered ops, never directly.

Layouts (all contiguous, head dimension innermost; ``BN = B * N``):

* ``Q``: scaled queries ``(BN, H', W', d)``, query ``(y, x)`` sits at input pixel ``(s*y, s*x)``;
* ``K``, ``V``: padded keys (``k - pe``) and values ``(BN, Hp, Wp, d)``,
  ``Hp = H + kernel - 1``; the window of query ``(y, x)`` is the padded block
  ``[s*y, s*y + kernel) x [s*x, s*x + kernel)``;
* ``O``, ``dO``: ``(BN, H', W', d)``; ``LSE``, ``DELTA``: ``(BN, H', W')`` float32.

Every program owns a ``TH x TW`` tile of queries (forward, ``dq``) or of padded
keys (``dk``, ``dv``) of one (batch, head) and loops over the box of keys
(queries) that can see the tile, ``BLOCK`` of them at a time, flattened
row-major. Pairs outside each other's window, out-of-range rows and, with
``ZEROS``, keys outside the image are masked out of the softmax; the logits and
both weighted sums are ``tl.dot`` products accumulated in float32. The head
dimension is padded to ``BLOCK_D`` (a power of two >= 16) by masked loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["attention_bwd_dkdv", "attention_bwd_dq", "attention_fwd"]


@triton.jit
def _window_mask(
    ky,
    kx,
    qy,
    qx,
    H,
    W,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    ZEROS: tl.constexpr,
):
    """Whether padded key ``(ky, kx)`` is in the window of query ``(qy, qx)`` (broadcast)."""
    dy = ky - STRIDE * qy
    dx = kx - STRIDE * qx
    ok = (dy >= 0) & (dy < KERNEL) & (dx >= 0) & (dx < KERNEL)
    if ZEROS:  # keys of the padded border are outside the image
        ok = ok & (ky >= KERNEL // 2) & (ky < KERNEL // 2 + H)
        ok = ok & (kx >= KERNEL // 2) & (kx < KERNEL // 2 + W)
    return ok


@triton.jit
def _tile_origin(tiles, n_tx, TH: tl.constexpr, TW: tl.constexpr):
    """This program's ``(batch-head, first row, first column)``; tiles are numbered row-major."""
    pid = tl.program_id(0)
    bn = (pid // tiles).to(tl.int64)
    t = pid % tiles
    return bn, (t // n_tx) * TH, (t % n_tx) * TW


@triton.jit
def _block_pixels(bn, y0, x0, offs, block_w, map_h, map_w):
    """Pixels ``offs`` of a block ``block_w`` wide from ``(y0, x0)``, flattened row-major.

    Returns their rows, columns, whether they lie inside the ``map_h x map_w`` map,
    and their row index in the ``(BN, map_h, map_w, d)`` tensor of batch-head ``bn``.
    """
    y = y0 + offs // block_w
    x = x0 + offs % block_w
    ok = (y < map_h) & (x < map_w)
    return y, x, ok, (bn * map_h + y) * map_w + x


@triton.jit
def attention_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    H,
    W,
    Ho,
    Wo,
    Hp,
    Wp,
    d,
    n_tx,
    tiles,
    box_w,
    box_n,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    ZEROS: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Forward: ``O = softmax(Q K^T) V`` over each window, and its log-sum-exp."""
    bn, y0, x0 = _tile_origin(tiles, n_tx, TH, TW)
    qy, qx, q_ok, q_rows = _block_pixels(bn, y0, x0, tl.arange(0, TH * TW), TW, Ho, Wo)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_rows[:, None] * d + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full((TH * TW,), -1.0e30, tl.float32)
    l_i = tl.zeros((TH * TW,), tl.float32)
    acc = tl.zeros((TH * TW, BLOCK_D), tl.float32)
    for j0 in range(0, box_n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ky, kx, k_ok, k_rows = _block_pixels(bn, STRIDE * y0, STRIDE * x0, j, box_w, Hp, Wp)
        k_ok = k_ok & (j < box_n)
        k_mask = k_ok[:, None] & d_ok[None, :]
        k_ptrs = k_rows[:, None] * d + offs_d[None, :]
        kt = tl.load(K + k_ptrs, mask=k_mask, other=0.0)
        vt = tl.load(V + k_ptrs, mask=k_mask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
        ok = _window_mask(
            ky[None, :], kx[None, :], qy[:, None], qx[:, None], H, W, KERNEL, STRIDE, ZEROS
        )
        ok = ok & k_ok[None, :] & q_ok[:, None]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
        m_i = m_new

    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    tl.store(O + q_rows[:, None] * d + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + q_rows, m_i + tl.log(l_i), mask=q_ok)


@triton.jit
def attention_bwd_dq(
    Q,
    K,
    V,
    O,
    DO,
    LSE,
    DELTA,
    DQ,
    H,
    W,
    Ho,
    Wo,
    Hp,
    Wp,
    d,
    n_tx,
    tiles,
    box_w,
    box_n,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    ZEROS: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward, query-centric: ``DELTA = rowsum(dO * O)`` and ``dQ = dS K``.

    ``P = exp(Q K^T - LSE)`` is recomputed, ``dS = P * (dO V^T - DELTA)``.
    Same tiling as :func:`attention_fwd`; writes ``DELTA`` for :func:`attention_bwd_dkdv`.
    """
    bn, y0, x0 = _tile_origin(tiles, n_tx, TH, TW)
    qy, qx, q_ok, q_rows = _block_pixels(bn, y0, x0, tl.arange(0, TH * TW), TW, Ho, Wo)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    q_mask = q_ok[:, None] & d_ok[None, :]
    q_ptrs = q_rows[:, None] * d + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
    o = tl.load(O + q_ptrs, mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + q_rows, delta, mask=q_ok)
    lse = tl.load(LSE + q_rows, mask=q_ok, other=0.0)

    dq = tl.zeros((TH * TW, BLOCK_D), tl.float32)
    for j0 in range(0, box_n, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ky, kx, k_ok, k_rows = _block_pixels(bn, STRIDE * y0, STRIDE * x0, j, box_w, Hp, Wp)
        k_ok = k_ok & (j < box_n)
        k_mask = k_ok[:, None] & d_ok[None, :]
        k_ptrs = k_rows[:, None] * d + offs_d[None, :]
        kt = tl.load(K + k_ptrs, mask=k_mask, other=0.0)
        vt = tl.load(V + k_ptrs, mask=k_mask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION)
        ok = _window_mask(
            ky[None, :], kx[None, :], qy[:, None], qx[:, None], H, W, KERNEL, STRIDE, ZEROS
        )
        ok = ok & k_ok[None, :] & q_ok[:, None]
        p = tl.exp(tl.where(ok, s - lse[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PRECISION)

    tl.store(DQ + q_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def attention_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    H,
    W,
    Ho,
    Wo,
    Hp,
    Wp,
    d,
    n_tx,
    tiles,
    box_w,
    box_n,
    KERNEL: tl.constexpr,
    STRIDE: tl.constexpr,
    ZEROS: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward, key-centric: ``dV = P^T dO`` and ``dK = dS^T Q`` for a tile of padded keys.

    Gathers from the box of queries whose windows can reach the tile (rows
    ``ceil((y0 - kernel + 1) / s)`` on, ``box_n = box_h * box_w`` of them), so
    every gradient is written once: deterministic, no atomics.
    """
    bn, y0, x0 = _tile_origin(tiles, n_tx, TH, TW)
    ky, kx, k_ok, k_rows = _block_pixels(bn, y0, x0, tl.arange(0, TH * TW), TW, Hp, Wp)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    k_mask = k_ok[:, None] & d_ok[None, :]
    k_ptrs = k_rows[:, None] * d + offs_d[None, :]
    kt = tl.load(K + k_ptrs, mask=k_mask, other=0.0)
    vt = tl.load(V + k_ptrs, mask=k_mask, other=0.0)
    # first query row / column whose window reaches y0 / x0 (clamped at 0)
    qy0 = tl.maximum(y0 - KERNEL + STRIDE, 0) // STRIDE
    qx0 = tl.maximum(x0 - KERNEL + STRIDE, 0) // STRIDE

    dk = tl.zeros((TH * TW, BLOCK_D), tl.float32)
    dv = tl.zeros((TH * TW, BLOCK_D), tl.float32)
    for i0 in range(0, box_n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        qy, qx, q_ok, q_rows = _block_pixels(bn, qy0, qx0, i, box_w, Ho, Wo)
        q_ok = q_ok & (i < box_n)
        q_mask = q_ok[:, None] & d_ok[None, :]
        q_ptrs = q_rows[:, None] * d + offs_d[None, :]
        q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(DO + q_ptrs, mask=q_mask, other=0.0)
        lse = tl.load(LSE + q_rows, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + q_rows, mask=q_ok, other=0.0)
        st = tl.dot(kt, tl.trans(q), input_precision=PRECISION)
        ok = _window_mask(
            ky[:, None], kx[:, None], qy[None, :], qx[None, :], H, W, KERNEL, STRIDE, ZEROS
        )
        ok = ok & k_ok[:, None] & q_ok[None, :]
        pt = tl.exp(tl.where(ok, st - lse[None, :], float("-inf")))
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    tl.store(DK + k_ptrs, dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + k_ptrs, dv.to(DV.dtype.element_ty), mask=k_mask)
