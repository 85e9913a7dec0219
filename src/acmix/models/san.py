"""SAN (patchwise self-attention networks) with ACmix: **our reconstruction**.

The ACmix authors released code for their ResNet and Swin models only. The
paper's SAN rows (Table 2: ACmix SAN-10/15/19, 12.1M/16.6M/21.2M params,
1.9G/2.7G/3.4G FLOPs) start from *patchwise* SAN (Zhao et al., "Exploring
Self-attention for Image Recognition", CVPR 2020), so this module rebuilds
that network from the SAN paper and its authors' configuration, and adds
ACmix the way DESIGN.md section 6 describes. **No pretrained weights exist**
for the ACmix SAN models (the ACmix authors never released any); the
baseline (``mixer="attn"``) has the SAN authors' layout and parameter names,
and :func:`checkpoint_filter_fn` maps their published SAN checkpoints onto it.

Architecture (input 224x224, resolutions 224 -> 112, 56, 28, 14, 7)::

    stem:    1x1 conv 3 -> 64 (no bias) + BN + ReLU at full resolution
    stage i: MaxPool(2) -> 1x1 transition conv (-> C_i, no bias) -> blocks -> BN + ReLU
             C = (64, 256, 512, 1024, 2048), kernels (3, 7, 7, 7, 7)
    head:    global average pool + FC

Block (pre-activation, ``rel = C/16``, ``mid = C/4``, ``share_planes = 8``)::

    x + Conv1x1(mid -> C, bias)(ReLU(BN(SAM(ReLU(BN(x))))))

Patchwise SAM (:class:`PatchwiseSAM`): ``x1 = conv(C -> rel)``, ``x2 = conv(C -> rel)``,
``x3 = conv(C -> mid)`` (1x1, bias). Per pixel, an MLP
``BN-ReLU-Conv(rel*(k^2+1) -> mid/8, no bias)-BN-ReLU-Conv(mid/8 -> k^2*mid/8)``
over ``[x1, the k x k reflect-padded neighbourhood of x2]`` gives ``mid/8``
weight maps per window position (no softmax); value channel ``c`` of the
reflect-padded ``k x k`` window of ``x3`` is aggregated with weight channel
``c mod (mid/8)``.

**Where ACmix enters** (our reading of the paper, for inference from its
Table 2 and Sec. 4): the patchwise SAM is the attention path, and ACmix's
convolution path is added on the SAM's own stage-I projections, at the
SAM's (mid) width. The stage-I features ``[x1; x2; x3]`` (``rel + rel + 4 rel``
channels) are viewed as ``3N = 6`` groups of ``d = rel`` channels (1 query,
1 key and 4 value groups); the shared :class:`~acmix.layers.ACmixBase`
convolution path mixes them with ``fc`` (6 -> ``k_c^2``, no bias, as in the
authors' spatial ACmix) and shift-aggregates with the learnable grouped
convolution ``dep_conv`` (``k_c^2 d -> mid``, groups ``d``, initialised at the
shift); the SAM output is ``rate1 * SAM + rate2 * conv`` (both 0.5 at init).
This adds ``81 mid + 54`` parameters and ``(81 + 13.5) mid HW`` MACs per block
(``k_c = 3``), giving 11.99M / 16.41M / 20.83M parameters (paper: 12.1M /
16.6M / 21.2M, within 1.8%).

FLOPs convention. :func:`acmix.analysis.count_macs` counts multiply-adds
of convolutions, linear layers and the attention (the patchwise aggregation,
``k^2 mid HW`` per block, which :func:`acmix.ops.patchwise_aggregate` reports), not
normalisation, activations, pooling or biases (fvcore's convention, as the
rest of this library). That gives 1.888G / 2.630G / 3.317G for ACmix
SAN-10/15/19 (paper 1.9G / 2.7G / 3.4G) and 1.791G / 2.478G / 3.130G for the
baselines. The SAN authors' own counter also counts BatchNorm (2 per
element), ReLU, pooling and conv biases; in that convention the baselines are
the 1.865G / 2.583G / 3.259G of DESIGN.md section 6.

Small inputs. Reflection padding needs ``k // 2 <`` the map size; the default
``padding_mode="auto"`` reflects wherever the map is large enough (always at
224x224, so the network is exactly SAN there) and zero-pads the windows of
smaller maps (out-of-image neighbours then carry zero values and contribute
nothing). Any input of at least 32x32 works (five 2x2 max-pools).

Memory. SAN's own formulation unfolds the ``k x k`` neighbourhoods of ``x2``
(for the weight MLP) and ``x3`` (for the aggregation), ``k^2`` copies each,
and autograd keeps them. The default ``backend="auto"`` (= ``"shift"``) never
keeps a window copy: the aggregation is a shift-and-accumulate with a
hand-written backward (it saves only the padded values and the weights), and
the weight MLP's first layer runs over chunks of window rows that are
recomputed in backward. ``backend="reference"`` is SAN's ``unfold`` form, kept
as the truth for tests. Measured on one H200 (training step, batch 32, 224x224,
fp32): ACmix SAN-10 4.8 GiB peak activations with ``"shift"`` vs 11.0 GiB with
``"reference"`` (SAN-19: 7.7 vs 20.5 GiB); the many small kernels make
``"shift"`` slower at this batch (143 vs 86 ms per step; at batch 64 in bf16,
178 vs 147 ms).

Feature pyramid (``features_only=True``): the outputs of the last four
stages, strides 4, 8, 16, 32 (channels 256, 512, 1024, 2048); the first
stage (stride 2, 64 channels) is not a feature level.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, create_classifier
from timm.models import generate_default_cfgs, register_model
from torch import nn

from acmix.layers import (
    MIXER_PATHS,
    MIXERS,
    PATHS,
    ACmixBase,
    ConvPathConfig,
    ConvPathLike,
    MixerSpec,
    call_mixer,
    plain_conv,
    resolve_mixer,
    resolve_padding,
)
from acmix.layers.acmix import fx_leaf_call, is_fx_tracing
from acmix.models._checkpoint import checkpoint, checkpoint_seq
from acmix.models._common import (
    build_model,
    check_image_input,
    drop_path_rates,
    feature_take_indices,
    model_cfg,
    no_decay_names,
)
from acmix.models._stats import ModelStats, TestConfig, register_stats, register_test_config
from acmix.ops import BACKENDS, patchwise_aggregate
from acmix.ops.common import acc_dtype, pad_map
from acmix.utils.checks import check_choice, check_odd_kernel, check_positive_int

__all__ = [
    "SAN",
    "SAN_MIXERS",
    "PatchwiseSAM",
    "SANBlock",
    "SANStage",
    "checkpoint_filter_fn",
]

torch.fx.wrap("fx_leaf_call")  # a traced PatchwiseSAM is one node, as every ACmix layer

#: SAN offers the whole mixer vocabulary (:mod:`acmix.layers.factory`).
SAN_MIXERS: tuple[str, ...] = MIXERS


# --------------------------------------------------------------------------------------
# The weight network's first layer, a chunk of window rows at a time (the aggregation
# itself is acmix.ops.patchwise_aggregate)
# --------------------------------------------------------------------------------------


def _window_rows(x_pad: torch.Tensor, row0: int, rows: int, kernel: int) -> torch.Tensor:
    """Window positions ``row0 * k .. (row0 + rows) * k - 1`` of a padded map, stacked.

    Args:
        x_pad: ``(B, C, H + k - 1, W + k - 1)``.

    Returns:
        ``(B, C * rows * k, H, W)``, channel ``c * rows * k + q`` = window position
        ``row0 * k + q`` of channel ``c``.
    """
    B, C, Hp, Wp = x_pad.shape
    H, W = Hp - kernel + 1, Wp - kernel + 1
    win = x_pad.unfold(2, H, 1).unfold(3, W, 1)  # (B, C, k, k, H, W) view: [.., i, j, y, x]
    return win[:, :, row0 : row0 + rows].reshape(B, C * rows * kernel, H, W)


def _rows_chunk(
    x_pad: torch.Tensor,
    row0: int,
    rows: int,
    kernel: int,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    weight: torch.Tensor,
    use_batch_stats: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """BN -> ReLU -> 1x1 conv of some rows of window positions (no side effects).

    Pure, so that it can be recomputed in backward (activation checkpointing).

    Returns:
        The conv output ``(B, G, H, W)`` and, with batch statistics, the
        detached batch mean and biased variance of the ``C * rows * k`` channels.
    """
    cols = _window_rows(x_pad, row0, rows, kernel)
    y = F.batch_norm(cols, running_mean, running_var, gamma, beta, use_batch_stats, 0.0, eps)
    mean = var = None
    if use_batch_stats:
        with torch.no_grad():
            var, mean = _batch_stats(cols)
    return F.conv2d(F.relu(y), weight), mean, var


def _batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean per channel of ``(B, C, H, W)``, in float32 for half types."""
    return torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3), correction=0)


def _update_running_stats(
    bn: nn.BatchNorm2d, idx: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """Update channels ``idx`` of ``bn``'s running statistics like ``nn.BatchNorm2d`` does."""
    if not (bn.training and bn.track_running_stats) or bn.running_mean is None:
        return
    assert bn.running_var is not None and bn.num_batches_tracked is not None
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    unbiased = var * (count / max(count - 1, 1))
    with torch.no_grad():
        rm, rv = bn.running_mean, bn.running_var
        rm[idx] = (1 - factor) * rm[idx] + factor * mean.to(rm.dtype)
        rv[idx] = (1 - factor) * rv[idx] + factor * unbiased.to(rv.dtype)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class PatchwiseSAM(ACmixBase):
    """SAN's patchwise self-attention module, optionally with ACmix's convolution path.

    Parameter names follow SAN (``conv1/conv2/conv3``, ``conv_w``); the ACmix
    parts follow the ACmix authors (``fc``, ``dep_conv``, ``rate1``, ``rate2``,
    from :class:`~acmix.layers.ACmixBase`).

    Args:
        in_planes: input channels ``C``.
        rel_planes: width ``rel`` of the query / key projections ``x1``, ``x2``.
        out_planes: width ``mid`` of the values ``x3`` and of the output.
        share_planes: channels sharing one weight map; ``mid / share_planes``
            weight channels are predicted per window position.
        kernel_size: odd attention window ``k``.
        paths: ``"both"`` (ACmix: SAM + convolution path, alpha/beta mix),
            ``"attn"`` (the plain patchwise SAM of SAN) or ``"conv"`` (ACmix's
            convolution path alone on the SAM's projections: no weight MLP).
        kernel_conv: odd kernel of the ACmix convolution path.
        shift_mode: convolution-path shift form (see :class:`~acmix.layers.ACmixBase`).
        padding_mode: ``"reflect"`` (SAN's), ``"zeros"`` or ``"auto"`` (reflect
            where the map is larger than ``k // 2``, zeros otherwise).
        backend: ``"auto"`` / ``"shift"`` (memory-frugal: no copy of the
            ``k*k`` neighbourhoods of ``x2`` and ``x3`` is kept for backward; the
            weight MLP's first layer runs over chunks of window rows, recomputed
            in backward, and the aggregation is a shift-and-accumulate with a
            hand-written backward) or ``"reference"`` (SAN's ``unfold`` form).

    Shape:
        ``(B, in_planes, H, W)`` -> ``(B, out_planes, H, W)``.
    """

    def __init__(
        self,
        in_planes: int,
        rel_planes: int,
        out_planes: int,
        share_planes: int = 8,
        kernel_size: int = 7,
        *,
        paths: str = "both",
        kernel_conv: int = 3,
        shift_mode: str = "learnable",
        padding_mode: str = "auto",
        backend: str = "auto",
    ) -> None:
        for name, v in (
            ("in_planes", in_planes),
            ("rel_planes", rel_planes),
            ("out_planes", out_planes),
            ("share_planes", share_planes),
        ):
            check_positive_int(name, v)
        check_choice("paths", paths, PATHS)
        if out_planes % share_planes:
            raise ValueError(
                f"out_planes ({out_planes}) must be a multiple of share_planes ({share_planes})"
            )
        if paths != "attn" and out_planes % rel_planes:
            raise ValueError(
                f"the ACmix convolution path views the value projection (out_planes="
                f"{out_planes}) as groups of rel_planes={rel_planes} channels: out_planes "
                f"must be a multiple of rel_planes"
            )
        # Conv path over [x1; x2; x3] as 2 + out/rel groups of d = rel channels (3N of them).
        groups = 2 + out_planes // rel_planes
        if paths != "attn" and groups % 3:
            raise ValueError(
                f"[x1; x2; x3] has {groups} groups of {rel_planes} channels; ACmix's fc "
                f"expects a multiple of 3 (use out_planes = 4 * rel_planes, as SAN does)"
            )
        super().__init__(
            max(groups // 3, 1),
            rel_planes,
            out_planes,
            kernel_conv,
            1,
            shift_mode,
            False,
            paths,
        )
        self.in_planes = in_planes
        self.rel_planes = rel_planes
        self.share_planes = share_planes
        self.kernel_size = check_odd_kernel("kernel_size", kernel_size)
        self.padding_mode = check_choice("padding_mode", padding_mode, ("reflect", "zeros", "auto"))
        self.backend = check_choice("backend", backend, BACKENDS)
        #: Chunks of window rows the memory-frugal weight MLP processes at a time.
        self.frugal_chunks = 2
        K2 = kernel_size * kernel_size
        G = out_planes // share_planes
        self.conv1 = nn.Conv2d(in_planes, rel_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        # The weight MLP exists only where there is an attention path.
        self.conv_w: nn.Sequential | None = None
        if self.use_att:
            self.conv_w = nn.Sequential(
                nn.BatchNorm2d(rel_planes * (K2 + 1)),
                nn.ReLU(),
                nn.Conv2d(rel_planes * (K2 + 1), G, kernel_size=1, bias=False),
                nn.BatchNorm2d(G),
                nn.ReLU(),
                nn.Conv2d(G, K2 * G, kernel_size=1),
            )
        self.reset_conv_path()

    def extra_repr(self) -> str:
        return (
            f"{self.in_planes}, rel={self.rel_planes}, out={self.out_planes}, "
            f"share_planes={self.share_planes}, kernel_size={self.kernel_size}, "
            f"paths={self.paths!r}, padding_mode={self.padding_mode!r}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the SAM (and the ACmix convolution path).

        Args:
            x: ``(B, in_planes, H, W)``.

        Returns:
            ``(B, out_planes, H, W)``.
        """
        if is_fx_tracing():
            return fx_leaf_call(self, x)  # one node under torch.fx, as every ACmix layer
        if x.dim() != 4 or x.shape[1] != self.in_planes:
            raise ValueError(
                f"expected input (B, {self.in_planes}, H, W), got shape {tuple(x.shape)}"
            )
        B, _, H, W = x.shape
        rel = self.rel_planes
        # Stage I: x1, x2, x3 in one GEMM -> (B, 2 rel + mid, H, W).
        w = torch.cat((self.conv1.weight, self.conv2.weight, self.conv3.weight), 0)
        b = torch.cat((self.conv1.bias, self.conv2.bias, self.conv3.bias), 0)
        proj = F.conv2d(x, w, b)
        x1, x2, x3 = proj[:, :rel], proj[:, rel : 2 * rel], proj[:, 2 * rel :]

        att = None
        if self.use_att:
            padding = resolve_padding(self.padding_mode, self.kernel_size, H, W)
            weights = self._weights(x1, x2, padding, self.backend)  # (B, G, K2, H, W)
            att = patchwise_aggregate(x3, weights, self.kernel_size, padding, self.backend)
        conv = None
        if self.use_conv:
            # [x1; x2; x3] as 3N groups of d = rel channels (a view, no copy).
            conv = self.forward_conv_path(proj.view(B, -1, rel, H, W))
        return self.mix(att, conv)

    def _weights(
        self, x1: torch.Tensor, x2: torch.Tensor, padding: str, backend: str
    ) -> torch.Tensor:
        """Per-pixel window weights ``(B, G, k*k, H, W)`` from ``x1``, ``x2`` ``(B, rel, H, W)``."""
        B, rel, H, W = x1.shape
        k, K2 = self.kernel_size, self.kernel_size**2
        assert self.conv_w is not None, "no attention path"
        x2_pad = pad_map(x2, k // 2, padding)
        if backend == "reference":
            # SAN's formulation: [x1, unfold(x2)] as (B, rel * (K2 + 1), 1, H * W).
            x2u = F.unfold(x2_pad, k).view(B, rel * K2, 1, H * W)  # channel c * K2 + p
            feats = torch.cat((x1.reshape(B, rel, 1, H * W), x2u), 1)
            w = self.conv_w(feats)  # (B, K2 * G, 1, H * W), channel g * K2 + p
        else:
            h = self._first_layer_frugal(x1, x2_pad)  # (B, G, H, W)
            w = self.conv_w[3:](h)  # (B, K2 * G, H, W)
        return w.view(B, -1, K2, H, W)

    def _first_layer_frugal(self, x1: torch.Tensor, x2_pad: torch.Tensor) -> torch.Tensor:
        """``Conv(ReLU(BN([x1, windows of x2])))`` without keeping the windows.

        The ``rel * k^2`` window channels are processed in ``frugal_chunks``
        chunks of whole window rows (default 2: at most ``ceil(k / 2) * k``
        positions in memory at once); each chunk is recomputed in backward
        (activation checkpointing), so only ``x2_pad`` is kept for it. Batch
        statistics and the running-statistics update equal ``conv_w[0]`` applied
        to the unfolded tensor.

        Args:
            x1: ``(B, rel, H, W)``.
            x2_pad: ``(B, rel, H + 2r, W + 2r)``.

        Returns:
            ``(B, mid / share_planes, H, W)`` (before ``conv_w[3:]``).
        """
        assert self.conv_w is not None, "no attention path"
        assert self.conv_w is not None, "no attention path"
        bn, conv = self.conv_w[0], self.conv_w[2]
        B, rel, H, W = x1.shape
        k, K2 = self.kernel_size, self.kernel_size**2
        use_batch = bn.training or bn.running_mean is None
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        weight = conv.weight  # (G, rel * (K2 + 1), 1, 1): [x1 | x2 channel c * K2 + p]

        def params(idx: torch.Tensor) -> tuple:
            rm = rv = None
            if not use_batch:
                rm, rv = bn.running_mean[idx], bn.running_var[idx]
            gamma = bn.weight[idx] if bn.weight is not None else None
            beta = bn.bias[idx] if bn.bias is not None else None
            return rm, rv, gamma, beta

        # x1: rel channels, at the pixel itself.
        idx = torch.arange(rel, device=x1.device)
        rm, rv, gamma, beta = params(idx)
        y = F.relu(F.batch_norm(x1, rm, rv, gamma, beta, use_batch, 0.0, bn.eps))
        h = F.conv2d(y, weight[:, idx])
        if use_batch:
            with torch.no_grad():
                var, mean = _batch_stats(x1)
            _update_running_stats(bn, idx, mean, var, B * H * W)
        # x2 windows, a chunk of window rows at a time: channel rel + c * K2 + p.
        within = torch.arange(rel, device=x1.device)[:, None] * K2
        recompute = torch.is_grad_enabled() and (
            x2_pad.requires_grad or any(p.requires_grad for p in (bn.weight, conv.weight))
        )
        step = -(-k // self.frugal_chunks)
        for row0 in range(0, k, step):
            rows = min(step, k - row0)
            positions = torch.arange(row0 * k, (row0 + rows) * k, device=x1.device)
            idx = (rel + within + positions).flatten()
            args = (x2_pad, row0, rows, k, *params(idx), weight[:, idx], use_batch, bn.eps)
            if recompute:
                part, mean, var = checkpoint(_rows_chunk, *args, use_reentrant=False)
            else:
                part, mean, var = _rows_chunk(*args)
            h = h + part
            if use_batch:
                _update_running_stats(bn, idx, mean, var, B * H * W)
        return h


class SANBlock(nn.Module):
    """Pre-activation SAN block: ``x + conv(ReLU(BN(SAM(ReLU(BN(x))))))``.

    Args:
        dim: block width ``C``.
        kernel_size: SAM window.
        rel_ratio: ``rel = C / rel_ratio`` (SAN: 16).
        mid_ratio: ``mid = C / mid_ratio`` (SAN: 4).
        share_planes: SAN's weight sharing (8).
        mixer: a name of :data:`acmix.layers.MIXERS` or a callable
            ``mixer(dim, mid, stride=1)`` returning an NCHW module (see :class:`SAN`).
        drop_path: stochastic-depth rate of the residual branch.
        conv_path: convolution options (:class:`acmix.layers.ConvPathConfig`).
        padding_mode: SAM border mode (:class:`PatchwiseSAM`).
        backend: SAM backend (:class:`PatchwiseSAM`).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 7,
        rel_ratio: int = 16,
        mid_ratio: int = 4,
        share_planes: int = 8,
        mixer: MixerSpec = "acmix",
        drop_path: float = 0.0,
        *,
        conv_path: ConvPathLike = None,
        padding_mode: str = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        mixer = resolve_mixer(mixer, "SAN", SAN_MIXERS)
        cfg = ConvPathConfig.from_value(conv_path)
        rel, mid = dim // rel_ratio, dim // mid_ratio
        if rel < 1 or mid < share_planes:
            raise ValueError(
                f"block width {dim} is too small: rel = {dim}/{rel_ratio} and mid = "
                f"{dim}/{mid_ratio} must give rel >= 1 and mid >= share_planes ({share_planes})"
            )
        self.bn1 = nn.BatchNorm2d(dim)
        self.sam: nn.Module
        if not isinstance(mixer, str):
            self.sam = call_mixer(mixer, dim, mid, 1)
        elif mixer == "conv":
            self.sam = plain_conv(dim, mid, kernel_size=cfg.kernel_conv)  # BN follows: no bias
        else:
            self.sam = PatchwiseSAM(
                dim,
                rel,
                mid,
                share_planes,
                kernel_size,
                paths=MIXER_PATHS[mixer],
                kernel_conv=cfg.kernel_conv,
                shift_mode=cfg.shift_mode,
                padding_mode=padding_mode,
                backend=backend,
            )
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv = nn.Conv2d(mid, dim, kernel_size=1)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        out = self.sam(F.relu(self.bn1(x)))
        out = self.conv(F.relu(self.bn2(out)))
        return x + self.drop_path(out)


class SANStage(nn.Module):
    """``MaxPool(2)`` -> 1x1 transition conv -> blocks -> BN + ReLU.

    Shape:
        ``(B, in_chs, H, W)`` -> ``(B, out_chs, H // 2, W // 2)``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        kernel_size: int,
        drop_path: Sequence[float] | None = None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False)
        dp = list(drop_path) if drop_path is not None else [0.0] * depth
        self.blocks = nn.Sequential(
            *[SANBlock(out_chs, kernel_size, drop_path=dp[i], **block_kwargs) for i in range(depth)]
        )
        self.norm = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chs, H, W)`` -> ``(B, out_chs, H // 2, W // 2)``."""
        x = self.conv(self.pool(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.act(self.norm(x))


class _Stem(nn.Module):
    """1x1 conv (no bias) + BN + ReLU at full resolution."""

    def __init__(self, in_chans: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chs, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SAN(nn.Module):
    """Patchwise SAN with an injected token mixer (ACmix by default).

    The same code builds the ACmix model and its baselines (``mixer=``, the
    vocabulary of :mod:`acmix.layers.factory`):

    * ``"acmix"`` (default): every SAM gets the ACmix convolution path
      (see the module docstring: our reconstruction of the paper's ACmix SAN).
    * ``"attn"``: the plain patchwise SAN of Zhao et al. (SAN authors'
      parameter names), the paper's baseline.
    * ``"acmix_conv"``: ACmix's convolution path alone on the SAM's projections.
    * ``"conv"``: a plain ``k x k`` convolution ``C -> mid`` (``k =
      conv_path.kernel_conv``, no bias) in place of the SAM: a pre-activation
      bottleneck network (not in the paper).
    * a callable ``mixer(C, mid, stride=1)`` returning an NCHW module.

    Args:
        depths: blocks per stage (SAN-10 ``(2, 1, 2, 4, 1)``).
        kernels: SAM window per stage (``(3, 7, 7, 7, 7)``).
        widths: stage widths (``(64, 256, 512, 1024, 2048)``).
        stem_width: stem width (64).
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        mixer: ``"acmix"``, ``"attn"``, ``"acmix_conv"``, ``"conv"`` or a callable.
        rel_ratio: ``rel = C / rel_ratio`` (16).
        mid_ratio: ``mid = C / mid_ratio`` (4).
        share_planes: SAN's weight sharing (8).
        conv_path: convolution options, a :class:`acmix.layers.ConvPathConfig`
            or a dict of its fields (``kernel_conv`` (3), ``shift_mode``
            (``"learnable"``)).
        padding_mode: SAM border mode (``"auto"``: reflect where the map allows).
        backend: SAM backend (``"auto"`` = memory-frugal ``"shift"``, or ``"reference"``).
        global_pool: ``"avg"`` (SAN), ``"max"``, ... or ``""`` (no pooling).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks
            (SAN trains without; default 0).

    Shape:
        ``forward``: ``(B, in_chans, H, W)`` with ``H, W >= 32`` -> ``(B, num_classes)``.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 1, 2, 4, 1),
        kernels: Sequence[int] = (3, 7, 7, 7, 7),
        widths: Sequence[int] = (64, 256, 512, 1024, 2048),
        stem_width: int = 64,
        num_classes: int = 1000,
        in_chans: int = 3,
        mixer: MixerSpec = "acmix",
        rel_ratio: int = 16,
        mid_ratio: int = 4,
        share_planes: int = 8,
        conv_path: ConvPathLike = None,
        padding_mode: str = "auto",
        backend: str = "auto",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mixer = resolve_mixer(mixer, "SAN", SAN_MIXERS)
        conv_cfg = ConvPathConfig.from_value(conv_path)
        depths, kernels, widths = tuple(depths), tuple(kernels), tuple(widths)
        if not (len(depths) == len(kernels) == len(widths)) or len(depths) < 4:
            raise ValueError(
                f"depths, kernels and widths need one entry per stage (at least 4 stages), got "
                f"depths={depths}, kernels={kernels}, widths={widths}"
            )
        for d in depths:
            check_positive_int("depths[i]", d)
        self.mixer = mixer
        self.conv_path = conv_cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.num_stages = len(depths)
        self.num_features = self.head_hidden_size = widths[-1]
        self.grad_checkpointing = False

        self.stem = _Stem(in_chans, stem_width)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, prev = [], stem_width
        for d, k, c, rates in zip(depths, kernels, widths, dpr, strict=True):
            stages.append(
                SANStage(
                    prev,
                    c,
                    d,
                    k,
                    drop_path=rates,
                    rel_ratio=rel_ratio,
                    mid_ratio=mid_ratio,
                    share_planes=share_planes,
                    mixer=mixer,
                    conv_path=conv_cfg,
                    padding_mode=padding_mode,
                    backend=backend,
                )
            )
            prev = c
        self.stages = nn.Sequential(*stages)
        # Four feature levels: the last four stages (strides 4, 8, 16, 32 for 5 stages).
        first = self.num_stages - 4
        self.feature_info = [
            dict(num_chs=widths[i], reduction=2 ** (i + 1), module=f"stages.{i}")
            for i in range(first, self.num_stages)
        ]
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )
        self.head_drop = nn.Dropout(drop_rate)

    # ---- timm surface ------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """ACmix's alpha / beta (``rate1``, ``rate2``) are excluded from weight decay."""
        return no_decay_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)"
        return dict(stem=r"^stem", blocks=[(blocks, None), (r"^stages\.(\d+)\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (``num_classes=0`` removes it).

        Args:
            num_classes: outputs of the new classifier (0: none).
            global_pool: new pooling type (``None``: keep the current one); ``""``
                removes the pooling, so that ``forward`` returns the unpooled
                ``(B, num_features, h, w)`` map (timm's convention).
        """
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )

    def _check_input(self, x: torch.Tensor) -> None:
        check_image_input(
            x, self.in_chans, 2**self.num_stages, f"SAN halves the map {self.num_stages} times"
        )

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the feature levels (the last four stages' outputs).

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: feature levels to return (``None``: all four; an int ``n``: the last
                ``n``; negative indices count from the end).
            norm: unused (each stage ends with its own BN + ReLU).
            stop_early: stop after the last requested level (the returned final map is
                then that level).
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of features.

        Returns:
            The list of ``(B, C_i, H / s_i, W / s_i)`` maps, or ``(final, list)`` with
            ``final`` what ``forward_features`` returns.
        """
        check_choice("output_fmt", output_fmt, ("NCHW",))
        self._check_input(x)
        levels = len(self.feature_info)
        first = self.num_stages - levels
        take, max_index = feature_take_indices(levels, indices)
        last_stage = first + max_index if stop_early else len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if i > last_stage:
                break
            x = stage(x)
            if i - first in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested feature level (timm's contract).

        Args:
            indices: the levels that will be requested (as in :meth:`forward_intermediates`).
            prune_norm: unused (no final norm: each stage ends with its own BN + ReLU).
            prune_head: remove the classifier and the pooling (``reset_classifier(0, "")``).

        Returns:
            The absolute level indices.
        """
        levels = len(self.feature_info)
        take, max_index = feature_take_indices(levels, indices)
        self.stages = self.stages[: self.num_stages - levels + max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> last stage map ``(B, widths[-1], H / 32, W / 32)``."""
        self._check_input(x)
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``(B, C, h, w)`` -> ``(B, C)``, then the classifier unless ``pre_logits``.

        With ``global_pool=""`` (no pooling) the map stays ``(B, C, h, w)``.
        """
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


# --------------------------------------------------------------------------------------
# Checkpoints, registration
# --------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: SAN) -> dict[str, Any]:
    """Map a SAN authors' patchwise checkpoint onto :class:`SAN` (``mixer="attn"``).

    Accepts ``{'state_dict': ...}`` wrappers and DataParallel ``module.`` prefixes;
    renames ``conv_in/bn_in`` -> ``stem.conv/bn``, ``conv{i}``/``bn{i}`` ->
    ``stages.{i}.conv``/``norm``, ``layer{i}.{j}`` -> ``stages.{i}.blocks.{j}``.
    Keys already in our layout pass through unchanged.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        k = re.sub(r"^conv_in\.", "stem.conv.", k)
        k = re.sub(r"^bn_in\.", "stem.bn.", k)
        k = re.sub(r"^conv(\d+)\.", r"stages.\1.conv.", k)
        k = re.sub(r"^bn(\d+)\.", r"stages.\1.norm.", k)
        k = re.sub(r"^layer(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        out[k] = v
    return out


def _create_san(variant: str, pretrained: bool = False, **kwargs: Any) -> SAN:
    return build_model(
        SAN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return model_cfg(
        first_conv="stem.conv",
        classifier="fc",
        notes=("No weights exist for the ACmix SAN models (our reconstruction).",),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {"acmix_san10": _cfg(), "acmix_san15": _cfg(), "acmix_san19": _cfg()}
)

_KERNELS = (3, 7, 7, 7, 7)


@register_model
def acmix_san10(pretrained: bool = False, **kwargs: Any) -> SAN:
    """ACmix SAN-10 (patchwise SAN-10 + ACmix conv path; ``mixer="attn"``: SAN-10)."""
    args = dict(depths=(2, 1, 2, 4, 1), kernels=_KERNELS)
    return _create_san("acmix_san10", pretrained, **dict(args, **kwargs))


@register_model
def acmix_san15(pretrained: bool = False, **kwargs: Any) -> SAN:
    """ACmix SAN-15 (patchwise SAN-15 + ACmix conv path; ``mixer="attn"``: SAN-15)."""
    args = dict(depths=(3, 2, 3, 5, 2), kernels=_KERNELS)
    return _create_san("acmix_san15", pretrained, **dict(args, **kwargs))


@register_model
def acmix_san19(pretrained: bool = False, **kwargs: Any) -> SAN:
    """ACmix SAN-19 (patchwise SAN-19 + ACmix conv path; ``mixer="attn"``: SAN-19)."""
    args = dict(depths=(3, 3, 4, 6, 3), kernels=_KERNELS)
    return _create_san("acmix_san19", pretrained, **dict(args, **kwargs))


# Params and MACs of our code (1000 classes, 224x224; acmix.analysis.count_macs), next to
# the paper's Table 2. Baselines (mixer="attn"): 11,841,124 / 16,181,310 / 20,518,470
# params; 1.791G / 2.478G / 3.130G MACs (SAN authors' counter: 1.865G / 2.583G / 3.259G).
register_stats(
    "acmix_san10",
    ModelStats(
        params=11_994_612,
        macs=1_888_251_648,
        paper_params=12.1e6,
        paper_macs=1.9e9,
        paper_top1=77.6,
    ),
)
register_stats(
    "acmix_san15",
    ModelStats(
        params=16_414_134,
        macs=2_630_016_000,
        paper_params=16.6e6,
        paper_macs=2.7e9,
        paper_top1=78.4,
    ),
)
register_stats(
    "acmix_san19",
    ModelStats(
        params=20_829_278,
        macs=3_317_439_744,
        paper_params=21.2e6,
        paper_macs=3.4e9,
        paper_top1=78.7,
    ),
)

_TINY = dict(
    depths=(1, 1, 1, 1, 1),
    kernels=(3, 3, 3, 3, 3),
    widths=(32, 32, 32, 64, 64),
    stem_width=16,
    num_classes=10,
)
for _name in ("acmix_san10", "acmix_san15", "acmix_san19"):
    register_test_config(_name, TestConfig(kwargs=dict(_TINY), input_size=(3, 32, 32)))
