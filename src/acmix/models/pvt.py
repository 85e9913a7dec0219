"""PVT v1 (Pyramid Vision Transformer) with ACmix: **our reconstruction**.

The ACmix authors released code for their ResNet and Swin models only. The
paper's PVT rows (Table 2: ACmix PVT-T 13M / 2.0G, PVT-S 25M / 3.9G) start
from PVT v1 (Wang et al., ICCV 2021), so this module rebuilds PVT v1 after
its authors' classification code and adds ACmix as DESIGN.md section 6
describes. **No pretrained weights exist** for the ACmix PVT models; the
baseline (``mixer="attn"``) is plain PVT v1, and :func:`checkpoint_filter_fn`
maps the PVT authors' checkpoints onto it.

PVT v1: four stages, each a patch embedding (conv with kernel = stride =
patch size 4, then 2; LayerNorm), an absolute position embedding (a table per
stage for ``img_size``, bilinearly interpolated for other input sizes), and
transformer blocks ``x + attn(LN(x)); x + mlp(LN(x))`` with spatial-reduction
attention (SRA): ``q = Linear(x)`` at full resolution, keys and values from
``Linear(LN(Conv2d(dim, dim, sr, stride sr)(x)))``, standard multi-head
softmax attention (``F.scaled_dot_product_attention``), output ``proj``.
Embed dims (64, 128, 320, 512), heads (1, 2, 5, 8), MLP ratios (8, 8, 4, 4),
SR ratios (8, 4, 2, 1), qkv bias; depths PVT-T (2, 2, 2, 2), PVT-S (3, 4, 6, 3).
A class token is prepended in the last stage only; the head reads it after a
final LayerNorm. LayerNorm eps is 1e-6 in the blocks and the final norm and
PyTorch's default 1e-5 in the patch embeddings and the SR branch, as in the
PVT authors' code.

**Where ACmix enters** (our reading of the paper, for inference from its
Table 2): every block's attention gets ACmix's convolution path at full
resolution, sharing SRA's projections. ``q`` is ``H x W``; the spatially
reduced keys and values (``H/sr x W/sr``) are brought back to ``H x W`` by
nearest-neighbour upsampling; ``[q; k; v]`` as ``3N`` head groups of ``d``
channels go through the shared :class:`~acmix.layers.ACmixBase` convolution
path (``fc`` 3N -> 9 with bias, as in the authors' Swin layer; grouped 3x3
``dep_conv`` initialised at the shift), and the block's attention output is
``rate1 * proj(SRA) + rate2 * conv`` (both 0.5 at init). The class token is
not on the grid: its convolution-path term is zero. This adds
``81 C + 27 N + 9`` parameters and ``108 C H W`` MACs per block: 13.40M /
2.03G (PVT-T) and 24.83M / 3.99G (PVT-S), against the paper's 13M / 2.0G and
25M / 3.9G; the baselines are 13.23M / 1.94G and 24.49M / 3.83G.
(MACs by :func:`acmix.analysis.count_macs`: linear layers, convolutions and
the attention matmuls; not normalisation, activations or biases.)

Input sizes. Any ``H, W >= 32`` works: position embeddings are interpolated,
and a map smaller than its SR kernel (only possible in custom configurations:
at ``>= 32`` every stage's map is at least its SR ratio) is zero-padded at the
bottom / right up to the kernel, so the reduction yields one key / value
token. Maps that are not multiples of ``sr`` are reduced as PVT does
(``floor(H / sr)``; the last rows / columns are dropped by the strided conv).

Feature pyramid (``features_only=True``): the four stage outputs as NCHW
maps, strides 4, 8, 16, 32 (the class token dropped from the last stage;
``norm=True`` applies the final LayerNorm to the last level).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn

from acmix.layers import (
    MIXER_PATHS,
    ACmixBase,
    ConvPathConfig,
    ConvPathLike,
    MixerSpec,
    call_mixer,
    resolve_mixer,
)
from acmix.layers.acmix import fx_leaf_call, is_fx_tracing
from acmix.models._checkpoint import checkpoint
from acmix.models._common import (
    build_model,
    check_image_input,
    drop_path_rates,
    feature_take_indices,
    model_cfg,
    no_decay_names,
)
from acmix.models._stats import ModelStats, TestConfig, register_stats, register_test_config
from acmix.ops import BACKENDS, window_attention
from acmix.utils.checks import check_choice, check_heads, check_positive_int

__all__ = [
    "PVT_ATTN_BACKENDS",
    "PVT_MIXERS",
    "PVTBlock",
    "PVTStage",
    "PyramidVisionTransformer",
    "SRAttention",
    "checkpoint_filter_fn",
]

torch.fx.wrap("fx_leaf_call")  # a traced SRAttention is one node, as every ACmix layer

#: The mixer names PVT offers (:mod:`acmix.layers.factory`); ``"conv"`` and
#: ``"acmix_conv"`` are not among them (:data:`PVT_NO_CONV_MIXER`).
PVT_MIXERS: tuple[str, ...] = ("acmix", "attn")
#: Why PVT has no convolution-only mixer.
PVT_NO_CONV_MIXER = (
    "PVT's classifier reads its class token, which is not on the image grid, so a "
    "convolution-only token mixer would never let it see the image"
)
PVT_ATTN_BACKENDS: tuple[str, ...] = BACKENDS


class SRAttention(ACmixBase):
    """PVT's spatial-reduction attention, optionally with ACmix's convolution path.

    Parameter names follow PVT (``q``, ``kv``, ``proj``, ``sr``, ``norm``) and
    the ACmix authors (``fc``, ``dep_conv``, ``rate1``, ``rate2``).

    Args:
        dim: channels ``C``.
        num_heads: heads ``N`` (divides ``dim``).
        sr_ratio: spatial reduction of keys / values (1: none).
        qkv_bias: bias of ``q`` and ``kv``.
        qk_scale: query scale (default ``d ** -0.5``).
        attn_drop: attention dropout.
        proj_drop: output dropout.
        num_prefix_tokens: tokens before the ``H*W`` grid tokens (1 for the class
            token of PVT's last stage; needs ``sr_ratio == 1``).
        paths: ``"both"`` (ACmix) or ``"attn"`` (plain SRA).
        kernel_conv: ACmix convolution-path kernel.
        shift_mode: ACmix shift form (see :class:`~acmix.layers.ACmixBase`).
        backend: ``"auto"`` / ``"sdpa"`` (``F.scaled_dot_product_attention``)
            or ``"reference"`` (explicit softmax).

    Shape:
        ``forward(x, H, W)``: ``x`` ``(B, P + H*W, C)`` -> ``(B, P + H*W, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        num_prefix_tokens: int = 0,
        *,
        paths: str = "both",
        kernel_conv: int = 3,
        shift_mode: str = "learnable",
        backend: str = "auto",
    ) -> None:
        head_dim = check_heads(dim, num_heads)
        check_choice("paths", paths, ("both", "attn"))
        super().__init__(num_heads, head_dim, dim, kernel_conv, 1, shift_mode, True, paths)
        self.dim = dim
        self.num_heads = num_heads
        self.sr_ratio = check_positive_int("sr_ratio", sr_ratio)
        if num_prefix_tokens and sr_ratio > 1:
            raise ValueError(
                f"prefix (class) tokens need sr_ratio=1 (PVT puts its class token in the last "
                f"stage, whose SR ratio is 1), got sr_ratio={sr_ratio}"
            )
        self.num_prefix_tokens = num_prefix_tokens
        self.scale = qk_scale or head_dim**-0.5
        self.backend = check_choice("backend", backend, PVT_ATTN_BACKENDS)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None
        self.reset_conv_path()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, "
            f"paths={self.paths!r}, kernel_conv={self.kernel_conv}"
        )

    def _reduce(self, x_nchw: torch.Tensor) -> torch.Tensor:
        """SR conv ``(B, C, H, W)`` -> ``(B, C, H // sr, W // sr)``.

        A map smaller than ``sr`` is zero-padded (bottom / right) up to ``sr`` first.
        """
        assert self.sr is not None
        height, width = x_nchw.shape[-2:]
        s = self.sr_ratio
        if min(height, width) < s:
            x_nchw = F.pad(x_nchw, (0, max(s - width, 0), 0, max(s - height, 0)))
        return self.sr(x_nchw)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Softmax attention ``(B, N, T, d)`` x ``(B, N, Tk, d)`` -> ``(B, N, T, d)``."""
        drop = self.attn_drop if self.training else 0.0
        return window_attention(q, k, v, None, self.scale, drop, self.backend)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """Apply SRA (+ the ACmix convolution path).

        Args:
            x: ``(B, P + H*W, C)`` tokens, the ``P`` prefix tokens first, then the
                grid row-major.
            H, W: grid size.

        Returns:
            ``(B, P + H*W, C)``.
        """
        if is_fx_tracing():
            return fx_leaf_call(self, x, H, W)  # one node under torch.fx, as every ACmix layer
        B, T, C = x.shape
        P = self.num_prefix_tokens
        if x.shape[1:] != (P + H * W, self.dim):
            raise ValueError(
                f"expected x of shape (B, {P} + {H}*{W}, {self.dim}), got {tuple(x.shape)}"
            )
        N, d = self.num_heads, self.head_dim
        q = self.q(x)  # (B, T, C), channel head*d + j
        if self.sr is not None:
            red = self._reduce(x.transpose(1, 2).reshape(B, C, H, W))  # (B, C, Hr, Wr)
            Hr, Wr = red.shape[-2:]
            assert self.norm is not None
            kv = self.kv(self.norm(red.flatten(2).transpose(1, 2)))  # (B, Hr*Wr, 2C)
        else:
            Hr, Wr = H, W
            kv = self.kv(x)  # (B, T, 2C), channel which*C + head*d + j
        Tk = kv.shape[1]
        q_h = q.view(B, T, N, d).transpose(1, 2)  # (B, N, T, d)
        k_h, v_h = kv.view(B, Tk, 2, N, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, Tk, d)
        att = self.attention(q_h, k_h, v_h).transpose(1, 2).reshape(B, T, C)
        att = self.proj(att)

        conv = None
        if self.use_conv:
            q_grid = q[:, P:].transpose(1, 2).reshape(B, C, H, W)
            kv_grid = kv[:, P:] if self.sr is None else kv
            kv_grid = kv_grid.transpose(1, 2).reshape(B, 2 * C, Hr, Wr)
            if (Hr, Wr) != (H, W):
                kv_grid = F.interpolate(kv_grid, size=(H, W), mode="nearest")
            # [q; k; v] -> head groups (B, 3N, d, H, W), group which*N + head.
            heads = torch.cat((q_grid, kv_grid), 1).view(B, 3 * N, d, H, W)
            conv = self.forward_conv_path(heads).flatten(2).transpose(1, 2)  # (B, H*W, C)
            if P:
                conv = F.pad(conv, (0, 0, P, 0))  # prefix tokens: no convolution term
        return self.proj_drop(self.mix(att, conv))


class PVTBlock(nn.Module):
    """Transformer block ``x + attn(LN(x)); x + mlp(LN(x))`` (LayerNorm eps 1e-6).

    Args:
        mixer: ``"acmix"``, ``"attn"`` or a callable ``mixer(dim, dim, stride=1)``
            returning a module ``forward(x, H, W)`` on tokens (see :class:`SRAttention`).
        conv_path: convolution options (:class:`acmix.layers.ConvPathConfig`).
        backend: attention backend of :class:`SRAttention`.

    Shape:
        ``forward(x, H, W)``: ``(B, P + H*W, C)`` -> same.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        num_prefix_tokens: int = 0,
        mixer: MixerSpec = "acmix",
        *,
        conv_path: ConvPathLike = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        mixer = resolve_mixer(mixer, "PVT", PVT_MIXERS, PVT_NO_CONV_MIXER)
        cfg = ConvPathConfig.from_value(conv_path)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn: nn.Module
        if not isinstance(mixer, str):
            self.attn = call_mixer(mixer, dim, dim, 1)
        else:
            self.attn = SRAttention(
                dim,
                num_heads,
                sr_ratio,
                qkv_bias,
                qk_scale,
                attn_drop,
                proj_drop,
                num_prefix_tokens,
                paths=MIXER_PATHS[mixer],
                kernel_conv=cfg.kernel_conv,
                shift_mode=cfg.shift_mode,
                backend=backend,
            )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PVTStage(nn.Module):
    """Patch embedding + position embedding (+ class token) + blocks.

    The patch embedding is timm's ``PatchEmbed`` (conv with kernel = stride =
    ``patch_size``, flattened to tokens, LayerNorm; keys ``patch_embed.proj`` /
    ``patch_embed.norm`` as in PVT), at any input size (``floor(H / patch_size)``).

    Args:
        grid_size: the ``(H, W)`` grid at ``img_size`` that the position table covers.
        cls_token: prepend a learnable class token (PVT: last stage only).

    Shape:
        ``(B, C_in, H, W)`` -> tokens ``(B, P + h*w, dim)`` and ``(h, w)``.
    """

    def __init__(
        self,
        in_chs: int,
        dim: int,
        depth: int,
        patch_size: int,
        grid_size: tuple[int, int],
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        cls_token: bool = False,
        pos_drop: float = 0.0,
        drop_path: Sequence[float] | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_prefix_tokens = 1 if cls_token else 0
        check_positive_int("patch_size", patch_size)
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chs,
            embed_dim=dim,
            norm_layer=nn.LayerNorm,
            strict_img_size=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls_token else None
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + grid_size[0] * grid_size[1], dim)
        )
        self.pos_drop = nn.Dropout(pos_drop)
        dp = list(drop_path) if drop_path is not None else [0.0] * depth
        self.blocks = nn.ModuleList(
            [
                PVTBlock(
                    dim,
                    num_heads,
                    mlp_ratio,
                    sr_ratio,
                    drop_path=dp[i],
                    num_prefix_tokens=self.num_prefix_tokens,
                    **block_kwargs,
                )
                for i in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def position_embedding(self, H: int, W: int) -> torch.Tensor:
        """The table for an ``H x W`` grid ``(1, P + H*W, dim)`` (bilinear if resized)."""
        P = self.num_prefix_tokens
        h0, w0 = self.grid_size
        if (h0, w0) == (H, W):
            return self.pos_embed
        grid = self.pos_embed[:, P:].reshape(1, h0, w0, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)
        return torch.cat((self.pos_embed[:, :P], grid.flatten(2).transpose(1, 2)), 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        H, W = self.patch_embed.dynamic_feat_size(x.shape[-2:])
        x = self.patch_embed(x)  # (B, H*W, dim)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), 1)
        # The table is resized only for another grid size: one opaque call when traced.
        pos = _traced_pos_embed(self, H, W) if is_fx_tracing() else self.position_embedding(H, W)
        x = self.pos_drop(x + pos)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, H, W)
            else:
                x = blk(x, H, W)
        return x, (H, W)


@torch.fx.wrap
def _traced_pos_embed(stage: PVTStage, H: int, W: int) -> torch.Tensor:
    """``stage.position_embedding(H, W)``, recorded by a ``torch.fx`` trace as one call."""
    return stage.position_embedding(H, W)


class PyramidVisionTransformer(nn.Module):
    """PVT v1 with an injected token mixer (ACmix by default).

    The same code builds the ACmix model and its baseline (``mixer=``, the
    vocabulary of :mod:`acmix.layers.factory`):

    * ``"acmix"`` (default): every SRA gets ACmix's convolution path
      (see the module docstring: our reconstruction of the paper's ACmix PVT).
    * ``"attn"``: plain PVT v1 (the PVT authors' parameter names within
      each block), the paper's baseline.
    * a callable ``mixer(dim, dim, stride=1)`` returning a token mixer
      ``forward(x, H, W)`` (``x`` ``(B, P + H*W, dim)``).

    ``"conv"`` and ``"acmix_conv"`` are rejected: the classifier reads the
    class token, which is not on the image grid, so a convolution-only mixer
    would never let it see the image.

    Args:
        img_size: input size the position tables are made for (int or ``(H, W)``);
            other sizes are served by interpolation.
        patch_size: first patch embedding's patch (4); later stages use 2.
        in_chans: input channels.
        num_classes: classifier outputs (0: none).
        embed_dims: stage widths (64, 128, 320, 512).
        num_heads: stage heads (1, 2, 5, 8).
        mlp_ratios: stage MLP ratios (8, 8, 4, 4).
        depths: blocks per stage (PVT-T (2, 2, 2, 2)).
        sr_ratios: spatial-reduction ratios (8, 4, 2, 1).
        qkv_bias: bias of ``q`` / ``kv`` (True).
        qk_scale: query scale override.
        mixer: ``"acmix"``, ``"attn"`` or a callable.
        conv_path: ACmix convolution-path options, a
            :class:`acmix.layers.ConvPathConfig` or a dict of its fields
            (``kernel_conv`` (3), ``shift_mode`` (``"learnable"``)).
        backend: attention backend, ``"auto"``/``"sdpa"`` or ``"reference"``.
        global_pool: ``"token"`` (class token, PVT) or ``"avg"`` (mean of grid tokens).
        drop_rate: dropout before the classifier.
        pos_drop_rate: dropout after adding the position embedding.
        proj_drop_rate: dropout after the attention output and in the MLP.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linearly increasing over the blocks
            (PVT's recipe uses 0.1 for T and S; default 0).

    Shape:
        ``forward``: ``(B, in_chans, H, W)``, ``H, W >= 32`` -> ``(B, num_classes)``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (2, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        mixer: MixerSpec = "acmix",
        conv_path: ConvPathLike = None,
        backend: str = "auto",
        global_pool: str = "token",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mixer = resolve_mixer(mixer, "PVT", PVT_MIXERS, PVT_NO_CONV_MIXER)
        conv_cfg = ConvPathConfig.from_value(conv_path)
        check_choice("global_pool", global_pool, ("token", "avg", ""))
        embed_dims, num_heads, depths = tuple(embed_dims), tuple(num_heads), tuple(depths)
        mlp_ratios, sr_ratios = tuple(mlp_ratios), tuple(sr_ratios)
        n = len(depths)
        if not all(len(t) == n for t in (embed_dims, num_heads, mlp_ratios, sr_ratios)):
            raise ValueError(
                f"embed_dims, num_heads, mlp_ratios, depths and sr_ratios need one entry per "
                f"stage, got embed_dims={embed_dims}, num_heads={num_heads}, "
                f"mlp_ratios={mlp_ratios}, depths={depths}, sr_ratios={sr_ratios}"
            )
        for d in depths:
            check_positive_int("depths[i]", d)
        self.mixer = mixer
        self.conv_path = conv_cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_stages = n
        self.num_prefix_tokens = 1
        #: ``forward_features`` / ``forward_head(global_pool="")`` give tokens (B, 1 + h*w, C).
        self.output_fmt = "NLC"
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        self.patch_size = patch_size
        img_hw = to_2tuple(img_size)
        if len(img_hw) != 2:
            raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")
        self.img_size = (int(img_hw[0]), int(img_hw[1]))

        dpr = drop_path_rates(drop_path_rate, depths)
        grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        stages, prev = [], in_chans
        self.feature_info = []
        for i in range(n):
            if i > 0:
                grid = (grid[0] // 2, grid[1] // 2)
            stages.append(
                PVTStage(
                    prev,
                    embed_dims[i],
                    depths[i],
                    patch_size if i == 0 else 2,
                    grid,
                    num_heads[i],
                    mlp_ratios[i],
                    sr_ratios[i],
                    cls_token=i == n - 1,
                    pos_drop=pos_drop_rate,
                    drop_path=dpr[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    mixer=mixer,
                    conv_path=conv_cfg,
                    backend=backend,
                )
            )
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
            )
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(self.num_features, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """PVT's init: truncated normal (std 0.02) for linear layers, position tables and
        the class token, zero biases, unit LayerNorms; convolutions keep PyTorch's init
        (so ACmix's ``dep_conv`` stays at the shift and alpha = beta = 0.5)."""
        for s in self.stages:
            trunc_normal_(s.pos_embed, std=0.02)
            if s.cls_token is not None:
                trunc_normal_(s.cls_token, std=0.02)
        self.apply(_init_module)

    # ---- timm surface ------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Position tables, the class token and ACmix's alpha / beta."""
        return no_decay_names(self, ("pos_embed", "cls_token"))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)"
        return dict(
            stem=r"^stages\.0\.(patch_embed|pos_embed)",
            blocks=[(blocks, None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it).

        Args:
            num_classes: outputs of the new classifier (0: none).
            global_pool: ``"token"`` (class token), ``"avg"`` (mean of the grid
                tokens), ``""`` (no pooling: ``forward`` then returns the normalised
                token sequence ``(B, 1 + h*w, C)``, as timm's class-token ViTs do) or
                ``None`` (keep the current one).
        """
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = check_choice("global_pool", global_pool, ("token", "avg", ""))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        min_size = self.patch_size * 2 ** (self.num_stages - 1)
        check_image_input(x, self.in_chans, min_size, f"the stages reduce it by {min_size}")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the stage outputs (grid tokens, the class token dropped).

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: stages to return (``None``: all; an int ``n``: the last ``n``;
                negative indices count from the end).
            norm: apply the final LayerNorm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: ``"NCHW"`` (maps ``(B, C_i, h_i, w_i)``) or ``"NLC"`` (grid
                tokens ``(B, h_i * w_i, C_i)``).
            intermediates_only: return only the list of maps.

        Returns:
            The list of stage outputs, or ``(tokens, list)`` with ``tokens`` what
            ``forward_features`` returns (the normalised ``(B, 1 + h*w, C)``
            sequence; with ``stop_early`` before the last stage, the tokens of the
            last stage run).
        """
        check_choice("output_fmt", output_fmt, ("NCHW", "NLC"))
        self._check_input(x)
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        last = max_index if stop_early else len(self.stages) - 1
        intermediates = []
        B = x.shape[0]
        for i, stage in enumerate(self.stages):
            if i > last:
                break
            tokens, (H, W) = stage(x)
            grid = tokens[:, stage.num_prefix_tokens :]
            if i == self.num_stages - 1 and norm:
                grid = self.norm(grid)
            x = grid.transpose(1, 2).reshape(B, -1, H, W)
            if i in take:
                intermediates.append(x if output_fmt == "NCHW" else grid)
        if intermediates_only:
            return intermediates
        if last < self.num_stages - 1:
            return tokens, intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested one (timm's contract).

        Args:
            indices: the stages that will be requested (as in :meth:`forward_intermediates`).
            prune_norm: remove the final LayerNorm (it is removed anyway when the
                last stage is pruned).
            prune_head: remove the classifier and the pooling (``reset_classifier(0, "")``).

        Returns:
            The absolute stage indices.
        """
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm or max_index < self.num_stages - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> normalised last-stage tokens ``(B, 1 + h*w, C)``."""
        self._check_input(x)
        B = x.shape[0]
        for i, stage in enumerate(self.stages):
            x, (H, W) = stage(x)
            if i < len(self.stages) - 1:
                x = x.transpose(1, 2).reshape(B, -1, H, W)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens ``(B, 1 + h*w, C)`` -> class token (or grid mean) -> classifier."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------
# Checkpoints, registration
# --------------------------------------------------------------------------------------


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: PyramidVisionTransformer
) -> dict[str, torch.Tensor]:
    """Map a PVT v1 authors' checkpoint onto :class:`PyramidVisionTransformer`.

    Accepts ``{'model': ...}`` wrappers; renames ``patch_embed{i}``,
    ``pos_embed{i}``, ``block{i}.{j}`` (1-based) to ``stages.{i-1}.*`` and
    ``cls_token`` to the last stage; position tables of another grid size
    are resampled bilinearly to the model's. Keys already in our layout pass
    through unchanged.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    last = len(model.stages) - 1
    own = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^patch_embed(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed.", k)
        k = re.sub(r"^pos_embed(\d+)$", lambda m: f"stages.{int(m[1]) - 1}.pos_embed", k)
        k = re.sub(r"^block(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.", k)
        if k == "cls_token":
            k = f"stages.{last}.cls_token"
        if k.endswith("pos_embed") and k in own and v.shape != own[k].shape:
            v = _resample_pos_embed(v, own[k].shape[1], 1 if k.startswith(f"stages.{last}") else 0)
        out[k] = v
    return out


def _resample_pos_embed(pe: torch.Tensor, new_len: int, prefix: int) -> torch.Tensor:
    """Bilinearly resample a square ``(1, P + n*n, C)`` table to ``P + m*m = new_len`` tokens.

    timm's ``resample_abs_pos_embed`` (in float32, no antialiasing), after checking
    that both grids are square (a checkpoint's table does not say its grid's shape).
    """
    old, new = math.isqrt(pe.shape[1] - prefix), math.isqrt(new_len - prefix)
    if old * old != pe.shape[1] - prefix or new * new != new_len - prefix:
        raise ValueError(
            f"cannot resample a position table of {pe.shape[1]} tokens to {new_len}: only "
            f"square grids are resampled"
        )
    return resample_abs_pos_embed(
        pe,
        [new, new],
        [old, old],
        num_prefix_tokens=prefix,
        interpolation="bilinear",
        antialias=False,
    )


def _create_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    return build_model(
        PyramidVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # The output is a token sequence (class token + grid, model.output_fmt "NLC"):
    # pool_size None, as timm's class-token models (ViT, DeiT, CaiT, ...) declare it.
    return model_cfg(
        first_conv="stages.0.patch_embed.proj",
        classifier="head",
        pool_size=None,
        crop_pct=0.9,
        interpolation="bicubic",
        notes=("No weights exist for the ACmix PVT models (our reconstruction).",),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({"acmix_pvt_tiny": _cfg(), "acmix_pvt_small": _cfg()})


@register_model
def acmix_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """ACmix PVT-Tiny (PVT v1 Tiny + ACmix conv path; ``mixer="attn"``: PVT-Tiny)."""
    args = dict(depths=(2, 2, 2, 2))
    return _create_pvt("acmix_pvt_tiny", pretrained, **dict(args, **kwargs))


@register_model
def acmix_pvt_small(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """ACmix PVT-Small (PVT v1 Small + ACmix conv path; ``mixer="attn"``: PVT-Small)."""
    args = dict(depths=(3, 4, 6, 3))
    return _create_pvt("acmix_pvt_small", pretrained, **dict(args, **kwargs))


# Params and MACs of our code (1000 classes, 224x224; acmix.analysis.count_macs), next to
# the paper's Table 2. Baselines (mixer="attn"): 13,229,288 / 24,485,864 params,
# 1.933G / 3.816G MACs (LayerNorms not counted; fvcore, which counts them, gives 1.94G / 3.83G).
register_stats(
    "acmix_pvt_tiny",
    ModelStats(
        params=13_396_128,
        macs=2_016_906_240,
        paper_params=13e6,
        paper_macs=2.0e9,
        paper_top1=78.0,
    ),
)
register_stats(
    "acmix_pvt_small",
    ModelStats(
        params=24_824_755,
        macs=3_972_852_736,
        paper_params=25e6,
        paper_macs=3.9e9,
        paper_top1=81.7,
    ),
)

_TINY = dict(
    embed_dims=(16, 32, 48, 64),
    num_heads=(1, 2, 2, 4),
    mlp_ratios=(2, 2, 2, 2),
    depths=(1, 1, 1, 1),
    img_size=64,
    num_classes=10,
)
for _name in ("acmix_pvt_tiny", "acmix_pvt_small"):
    register_test_config(_name, TestConfig(kwargs=dict(_TINY), input_size=(3, 64, 64)))
