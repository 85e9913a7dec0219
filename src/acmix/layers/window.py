"""Windowed ACmix (the Swin variant) and the window operations it needs.

Channels-last throughout: maps are ``(B, H, W, C)``, windows
``(B * nW, Wh * Ww, C)`` with the window index fastest
(``b * nW + window``), as in Swin.

The attention path is Swin's window attention (relative position bias,
shifted-window mask). The convolution path is the one of
:class:`~acmix.layers.acmix.ACmixBase` (shared with the spatial layer), run
on the whole ``H x W`` map; ``proj`` applies to the attention output only,
and the output is ``rate1 * proj(attention) + rate2 * conv``.
"""

from __future__ import annotations

import torch
from timm.layers import to_2tuple
from torch import nn

from acmix.layers.acmix import INITS, ACmixBase, fx_leaf_call, is_fx_tracing
from acmix.ops import BACKENDS, window_attention
from acmix.utils.checks import (
    check_channels,
    check_choice,
    check_float_tensor,
    check_heads,
    check_positive_int,
)

__all__ = [
    "WindowACmix",
    "relative_position_index",
    "shifted_window_mask",
    "window_partition",
    "window_reverse",
]

torch.fx.wrap("fx_leaf_call")  # a traced WindowACmix is one node, as in acmix.py


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    a, b = to_2tuple(v)
    return (int(a), int(b))


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B * nW, Wh * Ww, C)``; H, W must be multiples of the window."""
    B, H, W, C = x.shape
    wh, ww = window
    if H % wh or W % ww:
        raise ValueError(f"map {H}x{W} is not a multiple of the window {wh}x{ww}")
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], H: int, W: int) -> torch.Tensor:
    """``(B * nW, Wh * Ww, C)`` -> ``(B, H, W, C)`` (inverse of :func:`window_partition`)."""
    wh, ww = window
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Swin's index into the ``((2Wh-1)(2Ww-1), N)`` bias table, ``(Wh*Ww, Wh*Ww)`` int64."""
    wh, ww = window
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = coords.flatten(1)  # (2, Wh*Ww)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)


def shifted_window_mask(
    H: int, W: int, window: tuple[int, int] | int, shift: tuple[int, int] | int
) -> torch.Tensor:
    """Swin's additive mask for shifted windows: 0 within a region, -100 across.

    Args:
        H, W: map size (multiples of the window).
        window: window size.
        shift: cyclic shift of the map.

    Returns:
        ``(nW, Wh*Ww, Wh*Ww)`` float32.
    """
    wh, ww = _pair(window)
    sh, sw = _pair(shift)
    img = torch.zeros(1, H, W, 1)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = window_partition(img, (wh, ww)).squeeze(-1)  # (nW, N)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


class WindowACmix(ACmixBase):
    """Windowed ACmix for Swin: window attention + the shared ACmix conv path.

    Args:
        dim: channels ``C``.
        window_size: window ``(Wh, Ww)`` or an int.
        num_heads: heads ``N`` (must divide ``dim``).
        qkv_bias: bias of the fused ``qkv`` projection.
        qk_scale: query scale (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        kernel_conv: odd conv-path kernel (the authors use 3).
        shift_mode: conv-path shift form, see :class:`ACmixBase`.
        init: ``"paper"`` / ``"official"`` (identical here: the authors' Swin
            keeps the shift init).
        backend: the backend of every op the layer runs, one of
            :data:`acmix.ops.BACKENDS`: the window attention has ``"sdpa"`` and
            ``"reference"``, the conv path ``"cpp"`` and ``"reference"``; an op
            without the named backend chooses as under ``"auto"``.
        paths: ``"both"`` (ACmix, default), ``"attn"`` (plain Swin window
            attention, the baseline: same keys as Swin) or ``"conv"``.

    Shape:
        ``forward(x, mask)``: ``x`` ``(B, H, W, C)`` with H, W multiples of the
        window (already cyclically shifted by the caller when the block
        shifts), ``mask`` ``(nW, Wh*Ww, Wh*Ww)`` or ``None``; output ``(B, H, W, C)``.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | tuple[int, int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        kernel_conv: int = 3,
        shift_mode: str = "learnable",
        init: str = "paper",
        backend: str = "auto",
        paths: str = "both",
    ) -> None:
        head_dim = check_heads(dim, num_heads)
        super().__init__(num_heads, head_dim, dim, kernel_conv, 1, shift_mode, True, paths)
        self.dim = dim
        self.window_size = _pair(window_size)
        for v in self.window_size:
            check_positive_int("window_size", v)
        self.num_heads = num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.init_mode = check_choice("init", init, INITS)
        self.backend = check_choice("backend", backend, BACKENDS)
        wh, ww = self.window_size
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        # Attention-path parameters exist only where there is an attention path.
        self.relative_position_bias_table: nn.Parameter | None = None
        self.proj: nn.Linear | None = None
        if self.use_att:
            self.relative_position_bias_table = nn.Parameter(
                torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads)
            )
            self.register_buffer(
                "relative_position_index", relative_position_index(self.window_size)
            )
            self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Swin's truncated-normal bias table, the paper init of the conv path."""
        if self.relative_position_bias_table is not None:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.reset_conv_path()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, "
            f"kernel_conv={self.kernel_conv}, shift_mode={self.shift_mode!r}"
        )

    def position_bias(self) -> torch.Tensor:
        """Relative position bias ``(N, Wh*Ww, Wh*Ww)``."""
        assert self.relative_position_bias_table is not None, "no attention path"
        L = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(L, L, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply windowed ACmix.

        Args:
            x: ``(B, H, W, C)`` channels-last map.
            mask: ``(nW, Wh*Ww, Wh*Ww)`` additive shifted-window mask or ``None``.

        Returns:
            ``(B, H, W, C)``.
        """
        if is_fx_tracing():
            return fx_leaf_call(self, x, mask)
        check_float_tensor("input", x, 4, "(B, H, W, C)")
        check_channels("input", x.shape[-1], self.dim, "(B, H, W, C)")
        B, H, W, C = x.shape
        N, d = self.num_heads, self.head_dim
        qkv = self.qkv(x)  # (B, H, W, 3C), channel which*C + head*d + j

        # Convolution path on the whole map: head features (B, 3N, d, H, W) as a view.
        conv = None
        if self.use_conv:
            heads = qkv.view(B, H, W, 3 * N, d).permute(0, 3, 4, 1, 2)
            conv = self.forward_conv_path(heads).permute(0, 2, 3, 1)  # (B, H, W, C)
        att = self._window_attention(qkv, mask) if self.use_att else None
        return self.proj_drop(self.mix(att, conv))

    def _window_attention(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention path: ``qkv (B, H, W, 3C)`` -> ``proj(attention) (B, H, W, C)``."""
        B, H, W, C3 = qkv.shape
        C, N, d = C3 // 3, self.num_heads, self.head_dim
        wh, ww = self.window_size
        L = wh * ww
        # Attention path in windows.
        windows = window_partition(qkv, self.window_size)  # (B*nW, L, 3C)
        Bw = windows.shape[0]
        q, k, v = windows.view(Bw, L, 3, N, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, N, L, d)
        bias = self.position_bias().unsqueeze(0).to(q.dtype)  # (1, N, L, L)
        if mask is not None:
            nW = (H // wh) * (W // ww)  # windows per image
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (nW, L, L):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"mask must be (windows per image, Wh*Ww, Wh*Ww) = ({nW}, {L}, {L}) for this "
                    f"{H}x{W} map and {wh}x{ww} window, got {got}"
                )
            bias = (bias.unsqueeze(0) + mask.to(q.dtype).view(1, nW, 1, L, L)).expand(
                Bw // nW, nW, N, L, L
            )
            bias = bias.reshape(Bw, N, L, L)
        drop = self.attn_drop if self.training else 0.0
        att = window_attention(q, k, v, bias, self.scale, drop, self.backend)
        att = att.transpose(1, 2).reshape(Bw, L, C)
        assert self.proj is not None
        return window_reverse(self.proj(att), self.window_size, H, W)  # (B, H, W, C)
