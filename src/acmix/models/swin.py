"""Swin Transformer with windowed ACmix (Swin-ACmix), registered with timm.

One configurable :class:`SwinTransformer` (Swin v1: 4x4 patch embedding,
stages of blocks with windowed attention, shifted windows on every second
block, patch merging between stages, final LayerNorm, average pool, linear
head) whose window attention is :class:`acmix.layers.WindowACmix`. The token
mixer is a config value:

* ``mixer="acmix"`` (default): window attention + the ACmix convolution path,
  mixed by ``rate1`` / ``rate2`` (the paper's Swin-ACmix);
* ``mixer="attn"``: window attention only, i.e. plain Swin (the baseline,
  same keys as Microsoft's Swin);
* ``mixer="acmix_conv"``: the ACmix convolution path only (an ablation);
* ``mixer="conv"``: a plain dense ``k x k`` convolution as the token mixer
  (:class:`ConvTokenMixer`, ``k = conv_path.kernel_conv``);
* a callable ``mixer(dim, dim, stride=1)`` returning a channels-last module
  ``forward(x, mask)`` (the vocabulary of :mod:`acmix.layers.factory`).

Parameter names follow the authors' / Microsoft's Swin layout
(``patch_embed.proj/norm``, ``layers.{i}.blocks.{j}.norm1/attn.*/norm2/mlp.fc1/fc2``,
``layers.{i}.downsample.reduction/norm`` at the *end* of stage ``i``, ``norm``,
``head``), so the authors' checkpoints load 1:1 through
:func:`checkpoint_filter_fn` (which only drops the ``attn_mask`` buffers,
strips ``module.`` and checks shapes).

**Input sizes.** Inside the network every map is channels-last
``(B, H, W, C)``. Any input size works: the patch embedding pads the image
(bottom / right, zeros) to a multiple of the patch size, each block pads its
normalised map to a multiple of its window, computes the shifted-window mask
for the padded size, and crops back, and patch merging pads odd maps to even
(as the detection versions of Swin do). Two decisions beyond those versions:

* padded tokens are masked out of the attention as keys (they form their own
  mask region), so the attention output of a real token does not depend on how
  much padding its window holds. The convolution path runs on the padded map:
  a padded token is a zero token after ``norm1`` (its q, k, v are the ``qkv``
  biases), as in the detection versions; only tokens next to the padding see
  it (``kernel_conv // 2`` pixels);
* the window of each stage is fixed when the model is built (it sizes the
  relative position bias table): as in the official code, a stage whose
  resolution at ``img_size`` is not larger than the window uses the
  resolution as its window and no shift. At run time a block also switches
  its shift off when the map is not larger than its window (one window then
  covers the map), never on.

For sizes that are multiples of ``patch_size * 2**(stages-1) * window`` (e.g.
224 with window 7) nothing is padded and the network computes exactly the
authors' Swin-ACmix (verified against their code on fixtures 06a/06b/08).
Masks are computed per input size on the fly and cached; they are never
state-dict buffers.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import adapt_input_conv, generate_default_cfgs, register_model
from torch import nn

from acmix.layers import (
    MIXER_PATHS,
    MIXERS,
    ConvPathConfig,
    ConvPathLike,
    MixerSpec,
    WindowACmix,
    call_mixer,
    relative_position_index,
    resolve_mixer,
    shifted_window_mask,
    window_partition,
)
from acmix.layers.acmix import is_fx_tracing
from acmix.layers.factory import mixer_label
from acmix.models._checkpoint import checkpoint_seq
from acmix.models._common import build_model, drop_path_rates, feature_take_indices, model_cfg
from acmix.models._stats import ModelStats, TestConfig, register_stats, register_test_config
from acmix.utils.checks import check_choice, check_positive_int
from acmix.utils.io import load_checkpoint_file, unwrap_checkpoint, unwrap_state_dict

__all__ = [
    "MIXER_PATHS",
    "SWIN_MIXERS",
    "ConvTokenMixer",
    "PatchMerging",
    "SwinACmixBlock",
    "SwinStage",
    "SwinTransformer",
    "checkpoint_filter_fn",
    "window_attention_mask",
]

_logger = logging.getLogger(__name__)

#: Swin offers the whole mixer vocabulary (:mod:`acmix.layers.factory`);
#: :data:`MIXER_PATHS` maps the ACmix names to ``WindowACmix(paths=...)``.
SWIN_MIXERS: tuple[str, ...] = MIXERS

#: Additive mask value of Swin (also used for padded keys).
_MASK_VALUE = -100.0


def _positive_pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """timm's ``to_2tuple`` of ``value``, checked to be two ints >= 1."""
    if not isinstance(value, int | Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {value!r}")
    pair = to_2tuple(value)
    if len(pair) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints (H, W), got {value!r}")
    return (check_positive_int(name, pair[0]), check_positive_int(name, pair[1]))


def window_attention_mask(
    H: int, W: int, window: int, shift: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """Additive attention mask of one block for an ``H x W`` map (before padding).

    The map is padded (bottom / right) to ``Hp x Wp``, multiples of ``window``,
    and cyclically rolled by ``-shift``. Tokens get a region id: Swin's nine
    shifted-window regions when ``shift > 0`` and one extra region for the
    padded tokens; a query attends only to keys of its own region (0),
    others get -100, as in Swin. Without shift and padding no mask is needed.
    The shifted-window part is :func:`acmix.layers.shifted_window_mask` of the
    padded map; the padded tokens' region is laid over it.

    Args:
        H, W: map size before padding.
        window: window size.
        shift: cyclic shift (``0 <= shift < window``).
        device: device of the mask.

    Returns:
        ``(nW, window**2, window**2)`` float32 (``nW = Hp * Wp / window**2``,
        windows in raster order of the rolled, padded map), or ``None``.
    """
    Hp, Wp = math.ceil(H / window) * window, math.ceil(W / window) * window
    if shift == 0 and Hp == H and Wp == W:
        return None
    mask = shifted_window_mask(Hp, Wp, window, shift)  # (nW, L, L); all 0 for shift 0
    if Hp != H or Wp != W:
        pad = torch.zeros(1, Hp, Wp, 1, dtype=torch.bool)
        pad[:, H:] = True
        pad[:, :, W:] = True
        if shift > 0:  # where the padded tokens sit after the roll
            pad = torch.roll(pad, shifts=(-shift, -shift), dims=(1, 2))
        win = window_partition(pad, (window, window)).squeeze(-1)  # (nW, L)
        q, k = win.unsqueeze(2), win.unsqueeze(1)  # (nW, L_query, 1), (nW, 1, L_key)
        # Padded tokens are one region of their own, whatever shifted window they sit in.
        mask = mask.masked_fill(q & k, 0.0).masked_fill(q != k, _MASK_VALUE)
    return mask.to(device)


class PatchMerging(nn.Module):
    """Swin's 2x2 patch merging: concatenate, LayerNorm, linear ``4C -> 2C``.

    The four neighbours are concatenated in the official order
    ``[(0, 0), (1, 0), (0, 1), (1, 1)]`` (``(row, col)`` offsets), so the
    authors' ``reduction`` / ``norm`` weights apply unchanged. Odd maps are
    zero-padded bottom / right to even.

    Shape:
        ``(B, H, W, C)`` -> ``(B, ceil(H / 2), ceil(W / 2), out_dim)``.
    """

    def __init__(
        self,
        dim: int,
        out_dim: int | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H/2, W/2, out_dim)``."""
        B, H, W, C = x.shape
        if is_fx_tracing() or H % 2 or W % 2:  # traced: pad unconditionally (0 for even sizes)
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, dh, W/2, dw, C) -> (B, H/2, W/2, dw, dh, C): channel (dw * 2 + dh) * C + c.
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class ConvTokenMixer(nn.Conv2d):
    """The ``"conv"`` token mixer of Swin: a dense ``k x k`` convolution on the channels-last map.

    ``nn.Conv2d(dim, dim, k, padding=k // 2)`` with a bias (its output goes
    straight into the residual sum, as attention's ``proj`` does). The block
    pads and rolls the map as for the attention, so the convolution sees
    what ACmix's convolution path sees.

    Args:
        dim: channels.
        kernel_size: odd kernel ``k``.

    Shape:
        ``forward(x, mask)``: ``(B, H, W, dim)`` -> ``(B, H, W, dim)``; ``mask``
        (the shifted-window mask) is ignored.
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SwinACmixBlock(nn.Module):
    """Swin block with windowed ACmix as its token mixer (the authors' block).

    ``x + DropPath(roll_back(WindowACmix(roll(norm1(x)), mask)))`` then
    ``x + DropPath(Mlp(norm2(x)))``. The roll is by ``-shift_size`` before the
    mixer, so the ACmix convolution path runs on the rolled map (with zero
    padding at its borders), exactly as in the authors' code. Maps that are
    not multiples of the window are padded and cropped back (see the module
    docstring).

    Args:
        dim: channels.
        num_heads: attention heads.
        window_size: window size (square).
        shift_size: cyclic shift (0 or, in Swin, ``window_size // 2``).
        mlp_ratio: MLP hidden width / ``dim``.
        qkv_bias: bias of the ``qkv`` projection.
        qk_scale: query scale (default ``head_dim ** -0.5``).
        proj_drop: dropout after the mixer's projection and in the MLP.
        attn_drop: attention dropout.
        drop_path: stochastic depth rate.
        act_layer: MLP activation.
        norm_layer: normalisation.
        mixer: ``"acmix"``, ``"attn"`` (plain Swin), ``"acmix_conv"``, ``"conv"``
            (:class:`ConvTokenMixer`) or a callable ``mixer(dim, dim, stride=1)``
            returning a channels-last module ``forward(x, mask)``.
        conv_path: convolution options (:class:`acmix.layers.ConvPathConfig`).
        backend: window attention backend of :class:`WindowACmix`.

    Shape:
        ``(B, H, W, dim)`` -> ``(B, H, W, dim)`` channels-last.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mixer: MixerSpec = "acmix",
        conv_path: ConvPathLike = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        mixer = resolve_mixer(mixer, "Swin", SWIN_MIXERS)
        cfg = ConvPathConfig.from_value(conv_path)
        self.window_size = check_positive_int("window_size", window_size)
        if not 0 <= shift_size < window_size:
            raise ValueError(
                f"shift_size must be in [0, window_size={window_size}), got {shift_size}"
            )
        self.shift_size = shift_size
        self.dim = dim
        self.num_heads = num_heads
        self.mixer = mixer
        self.norm1 = norm_layer(dim)
        self.attn: nn.Module
        if not isinstance(mixer, str):
            self.attn = call_mixer(mixer, dim, dim, 1)
        elif mixer == "conv":
            self.attn = ConvTokenMixer(dim, cfg.kernel_conv)
        else:
            self.attn = WindowACmix(
                dim,
                window_size,
                num_heads,
                qkv_bias,
                qk_scale,
                attn_drop,
                proj_drop,
                kernel_conv=cfg.kernel_conv,
                shift_mode=cfg.shift_mode,
                backend=backend,
                paths=MIXER_PATHS[mixer],
            )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self._masks: dict[tuple, torch.Tensor | None] = {}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift_size={self.shift_size}, mixer={mixer_label(self.mixer)!r}"
        )

    def _mask(self, H: int, W: int, shift: int, device: torch.device) -> torch.Tensor | None:
        key = (H, W, shift, str(device))
        if key not in self._masks:
            if len(self._masks) >= 8:  # a few sizes at a time (multi-scale training)
                self._masks.clear()
            self._masks[key] = window_attention_mask(H, W, self.window_size, shift, device)
        return self._masks[key]

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """Token mixer on the normalised map: pad, roll, WindowACmix, roll back, crop."""
        B, H, W, C = x.shape
        ws = self.window_size
        # One window covers a map that is not larger than it: no shift (as the official code).
        shift = self.shift_size if min(H, W) > ws else 0
        pad_h, pad_w = -H % ws, -W % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C)
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        x = self.attn(x, self._mask(H, W, shift, x.device))
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        if pad_h or pad_w:
            x = x[:, :H, :W, :]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        y = self.norm1(x)
        # The padding / shift / mask depend on H, W: one opaque call under a torch.fx trace.
        mixed = _traced_mix(self, y) if is_fx_tracing() else self._mix(y)
        x = x + self.drop_path1(mixed)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


@torch.fx.wrap
def _traced_mix(block: SwinACmixBlock, x: torch.Tensor) -> torch.Tensor:
    """``block._mix(x)``, recorded by a ``torch.fx`` trace as one call."""
    return block._mix(x)


class SwinStage(nn.Module):
    """One stage: ``depth`` blocks (shift on odd blocks), then optional patch merging.

    The downsample sits at the *end* of the stage, as in the official layout
    (``layers.{i}.downsample``).

    Shape:
        ``(B, H, W, dim)`` -> ``(B, H, W, dim)`` from :meth:`forward_blocks`;
        :meth:`forward` adds the downsample: ``(B, H/2, W/2, out_dim)``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        downsample: bool,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(
            *[
                SwinACmixBlock(
                    dim,
                    num_heads,
                    window_size=window_size,
                    shift_size=0 if j % 2 == 0 else shift_size,
                    drop_path=drop_path[j],
                    norm_layer=norm_layer,
                    **block_kwargs,
                )
                for j in range(depth)
            ]
        )
        self.downsample: nn.Module = (
            PatchMerging(dim, 2 * dim, norm_layer) if downsample else nn.Identity()
        )

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks only (the feature map of the stage), ``(B, H, W, C)``."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blocks then downsample."""
        return self.downsample(self.forward_blocks(x))


class SwinTransformer(nn.Module):
    """Swin Transformer (v1) whose window attention is windowed ACmix.

    The same code builds the baselines: ``mixer="attn"`` is plain Swin (the
    paper's Swin-T / Swin-S baseline, Microsoft's keys), ``mixer="acmix_conv"``
    ACmix's convolution path alone, ``mixer="conv"`` a plain ``k x k``
    convolution token mixer (see the module docstring). See the module
    docstring also for the padding and window decisions that let any input
    size run.

    Args:
        img_size: nominal input size ``H`` or ``(H, W)``; fixes each stage's
            window (a stage whose resolution is not larger than
            ``window_size`` uses its resolution and no shift). Other sizes
            run too (padded).
        patch_size: patch size of the embedding.
        in_chans: input channels.
        num_classes: classes of the head (0: no head, ``forward`` returns the
            pooled features).
        global_pool: ``"avg"`` or ``""`` (no pooling: the head runs on every
            token, ``(B, H, W, num_classes)``).
        embed_dim: channels of stage 0 (doubled at every stage).
        depths: blocks per stage.
        num_heads: heads per stage.
        window_size: attention window.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias of the ``qkv`` projections.
        qk_scale: query scale (default ``head_dim ** -0.5``).
        drop_rate: dropout after the patch embedding, after each mixer's
            projection and in the MLPs (the official ``drop_rate``).
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        norm_layer: normalisation layer.
        mixer: ``"acmix"`` (default), ``"attn"`` (plain Swin), ``"acmix_conv"``,
            ``"conv"`` or a callable (see the module docstring).
        conv_path: convolution options, a :class:`acmix.layers.ConvPathConfig`
            or a dict of its fields: ``kernel_conv`` (the authors use 3),
            ``shift_mode`` (``"learnable"`` (default), ``"fixed"`` or
            ``"tensor"``, see :class:`acmix.layers.ACmixBase`).
        backend: window attention backend (``"auto"``, ``"sdpa"``,
            ``"reference"``).

    Shape:
        ``forward``: ``(B, in_chans, H, W)`` -> ``(B, num_classes)``;
        ``forward_features``: -> ``(B, H/32, W/32, C)`` channels-last
        (normalised); ``forward_intermediates`` / ``features_only`` give
        NCHW maps at strides 4, 8, 16, 32.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        mixer: MixerSpec = "acmix",
        conv_path: ConvPathLike = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        mixer = resolve_mixer(mixer, "Swin", SWIN_MIXERS)
        conv_cfg = ConvPathConfig.from_value(conv_path)
        check_choice("global_pool", global_pool, ("avg", ""))
        depths, num_heads = tuple(depths), tuple(num_heads)
        if len(depths) != len(num_heads) or not depths:
            raise ValueError(
                f"depths and num_heads need one entry per stage, got depths={depths} "
                f"and num_heads={num_heads}"
            )
        for d in depths:
            check_positive_int("depths[i]", d)
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("window_size", window_size)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        img_hw = _positive_pair("img_size", img_size)
        check_positive_int("patch_size", patch_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.img_size = img_hw
        self.patch_size = patch_size
        self.mixer = mixer
        self.conv_path = conv_cfg
        self.output_fmt = "NHWC"
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (len(depths) - 1)

        # timm's PatchEmbed: conv (kernel = stride = patch) on the image zero-padded
        # bottom / right to a multiple of the patch, channels-last, then norm_layer
        # -> (B, ceil(H / p), ceil(W / p), embed_dim); keys patch_embed.proj / .norm.
        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            norm_layer=norm_layer,
            output_fmt="NHWC",
            strict_img_size=False,
            dynamic_img_pad=True,
        )
        self.pos_drop = nn.Dropout(drop_rate)

        # The official schedule: torch.linspace's float32 values.
        dpr = drop_path_rates(drop_path_rate, depths, linspace=True)
        block_kwargs = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            proj_drop=drop_rate,
            attn_drop=attn_drop_rate,
            mixer=mixer,
            conv_path=conv_cfg,
            backend=backend,
        )
        res = (math.ceil(img_hw[0] / patch_size), math.ceil(img_hw[1] / patch_size))
        self.feature_info: list[dict[str, Any]] = []
        stages = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2**i
            # The official rule: a stage not larger than the window is one window, unshifted.
            if min(res) <= window_size:
                win, shift = min(res), 0
            else:
                win, shift = window_size, window_size // 2
            stages.append(
                SwinStage(
                    dim,
                    depth,
                    num_heads[i],
                    window_size=win,
                    shift_size=shift,
                    downsample=i < len(depths) - 1,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    **block_kwargs,
                )
            )
            self.feature_info.append(
                dict(num_chs=dim, reduction=patch_size * 2**i, module=f"layers.{i}.blocks")
            )
            res = (math.ceil(res[0] / 2), math.ceil(res[1] / 2))
        self.layers = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head: nn.Module = (
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """The official init: truncated normal (std 0.02) linears, unit LayerNorms.

        Convolutions keep their own init (the ACmix ``dep_conv`` starts at the shift).
        """
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters without weight decay: bias tables, ``rate1``, ``rate2``."""
        keys = self.no_weight_decay_keywords()
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in keys}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter-name keywords without weight decay (the official trainer's form)."""
        return {"relative_position_bias_table", "rate1", "rate2"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a new ``num_classes`` head (0: none).

        Args:
            num_classes: outputs of the new head (0: none).
            global_pool: ``"avg"``, ``""`` (no pooling: ``forward`` then returns the
                unpooled channels-last map ``(B, h, w, num_features)``, as timm's
                Swin does) or ``None`` (keep the current one).
        """
        if global_pool is not None:
            self.global_pool = check_choice("global_pool", global_pool, ("avg", ""))
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight  # device / dtype of the new head
        self.head = (
            nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        if isinstance(self.head, nn.Linear):
            self._init_weights(self.head)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding (+ dropout): ``(B, C_in, H, W)`` -> ``(B, H/p, W/p, C)``."""
        if not is_fx_tracing() and x.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
        return self.pos_drop(self.patch_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> normalised last-stage map ``(B, H/32, W/32, C)``."""
        x = self._embed(x)
        x = self.layers(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, H, W, C)`` -> logits ``(B, num_classes)`` (or pooled features)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` -> ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward returning the stage feature maps (before each stage's downsample).

        Args:
            x: ``(B, C_in, H, W)``.
            indices: stages to return: last ``n`` if an int, all if ``None``;
                negative indices count from the end.
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            output_fmt: ``"NCHW"`` (default) or ``"NHWC"``.
            intermediates_only: return only the feature maps.

        Returns:
            The feature maps, stage ``i`` at stride ``patch_size * 2**i``
            (``(B, C_i, H_i, W_i)`` for NCHW), or ``(final, maps)`` with ``final``
            what ``forward_features`` returns, the normalised map ``(B, H/32, W/32,
            C)`` (with ``stop_early`` before the last stage: the last run stage's
            map, channels-last, not normalised).
        """
        check_choice("output_fmt", output_fmt, ("NCHW", "NHWC"))
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates: list[torch.Tensor] = []
        x = self._embed(x)
        last = self.num_layers - 1
        stop = max_index if stop_early else len(self.layers) - 1
        for i, stage in enumerate(self.layers):
            if i > stop:
                break
            x = stage.forward_blocks(x)
            if i in take:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
            if i < stop:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        if stop < last:
            return x, intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and head / norm) that the requested features do not need.

        Args:
            indices: the stages that will be requested (as in :meth:`forward_intermediates`).
            prune_norm: remove the final norm (it is removed anyway when the last
                stage is pruned).
            prune_head: remove the head and the pooling (``reset_classifier(0, "")``).

        Returns:
            The absolute stage indices.
        """
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self.layers = self.layers[: max_index + 1]
        self.layers[-1].downsample = nn.Identity()
        if prune_norm or max_index < self.num_layers - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    # ----------------------------------------------------------- checkpoints
    def load_pretrained(self, checkpoint_path: str | os.PathLike) -> None:
        """Load a checkpoint file (the authors' ``{'model': state_dict}``, ours, safetensors).

        Used by timm (``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``).
        The head is loaded when its shape matches ``num_classes`` and left at
        its initialisation otherwise (fine-tuning on another label set); an
        RGB patch embedding is adapted to ``in_chans`` as timm does. Every other
        key must be present with the right shape.
        """
        # acmix.utils.io: safe reading (no code from the file runs), unwrapping, prefixes.
        state_dict = unwrap_state_dict(load_checkpoint_file(checkpoint_path))
        w = state_dict.get("patch_embed.proj.weight")
        if w is not None and w.ndim == 4 and w.shape[1] != self.in_chans:
            state_dict["patch_embed.proj.weight"] = adapt_input_conv(self.in_chans, w)
        self.load_state_dict(checkpoint_filter_fn(state_dict, self, drop_mismatched_head=True))


def checkpoint_filter_fn(
    state_dict: dict[str, Any],
    model: nn.Module,
    *,
    drop_mismatched_head: bool = False,
) -> dict[str, torch.Tensor]:
    """Convert the authors' Swin-ACmix (or Microsoft Swin) state dict to ``model``'s.

    The official layout is ours key for key. This unwraps ``{'model': sd}``,
    strips ``module.``, drops the ``attn_mask`` buffers (masks are computed
    per input size), computes ``relative_position_index`` (a structural
    buffer: a checkpoint's copy must equal Swin's index), and checks that
    every other key exists in ``model`` with the same shape.

    Args:
        state_dict: the checkpoint (``{'model': sd}``, ``{'state_dict': sd}``
            or a plain state dict).
        model: the target :class:`SwinTransformer` (or block / any module with
            the official key names); may live on the meta device.
        drop_mismatched_head: leave ``head.*`` entries of the wrong shape out
            (and fill them from ``model``) instead of raising.

    Returns:
        A state dict with exactly ``model.state_dict()``'s keys, in its order.

    Raises:
        ValueError: naming the missing, unexpected and wrongly shaped keys.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict, got {type(state_dict).__name__}")
    state_dict = unwrap_checkpoint(state_dict)
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.endswith("attn_mask"):
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"entry {key!r} is not a tensor ({type(value).__name__})")
        if key not in own:
            unexpected.append(key)
            continue
        if value.shape != own[key].shape:
            if drop_mismatched_head and key.startswith("head."):
                _logger.info(
                    "not loading %s: shape %s vs model %s", key, value.shape, own[key].shape
                )
                continue
            mismatched.append(
                f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
            continue
        if key.endswith("relative_position_index"):
            window = model.get_submodule(key.rsplit(".", 1)[0]).window_size
            if not value.is_meta and not torch.equal(value.cpu(), relative_position_index(window)):
                raise ValueError(f"{key} is not Swin's relative position index for window {window}")
            continue
        out[key] = value
    for key in own:
        if key.endswith("relative_position_index"):
            # Structural: computed (on the CPU, so that meta-device models work too).
            window = model.get_submodule(key.rsplit(".", 1)[0]).window_size
            out[key] = relative_position_index(window)
        elif drop_mismatched_head and key.startswith("head.") and key not in out:
            out[key] = own[key]
    missing = [k for k in own if k not in out]
    if unexpected or missing or mismatched:
        lines = []
        if mismatched:
            lines.append(f"shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:10]))
        if missing:
            lines.append(f"missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        mixer = getattr(model, "mixer", None)
        hint = f" (the model was built with mixer={mixer!r})" if mixer is not None else ""
        raise ValueError(
            "checkpoint does not match the Swin-ACmix model" + hint + ":\n  " + "\n  ".join(lines)
        )
    return {k: out[k] for k in own}  # in the model's order


# --------------------------------------------------------------------- registry
def _create_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Build a registered variant through timm.

    With ``pretrained=True`` the weights come from ``pretrained_cfg_overlay``
    (``file=`` the authors' checkpoint, ours or a safetensors file;
    ``state_dict=`` a state dict). A file is loaded by
    :meth:`SwinTransformer.load_pretrained` (timm's ``custom_load``), which
    keeps a head whose shape matches ``num_classes`` (timm's generic loader
    would drop any head when ``num_classes != 1000``). For ``state_dict=`` the
    overlay's ``num_classes`` defaults to the model's for the same reason.
    """
    depths = kwargs.get("depths", (2, 2, 6, 2))
    if pretrained:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
        if overlay.get("file") or overlay.get("url"):
            overlay.setdefault("custom_load", True)
        if overlay.get("state_dict") is not None:
            overlay.setdefault("num_classes", kwargs.get("num_classes", 1000))
        kwargs["pretrained_cfg_overlay"] = overlay
    return build_model(
        SwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, drop_mismatched_head=True),
        feature_levels=len(depths),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return model_cfg(
        first_conv="patch_embed.proj",
        classifier="head",
        crop_pct=0.9,
        interpolation="bicubic",
        # The authors' checkpoints are local files: our loader keeps a head whose
        # shape matches and checks every other key (see SwinTransformer.load_pretrained).
        custom_load=True,
        origin_url="https://github.com/LeapLabTHU/ACmix",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "acmix_swin_tiny_patch4_window7_224": _cfg(),
        "acmix_swin_small_patch4_window7_224": _cfg(),
    }
)

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7)


@register_model
def acmix_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-T with windowed ACmix (paper: 30M / 4.6G / 81.9 top-1; ``mixer="attn"``: Swin-T)."""
    args = dict(patch_size=4, drop_path_rate=0.2, **_TINY)
    return _create_swin("acmix_swin_tiny_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def acmix_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> SwinTransformer:
    """Swin-S with windowed ACmix (paper: 51M / 9.0G / 83.5 top-1; ``mixer="attn"``: Swin-S)."""
    args = dict(patch_size=4, drop_path_rate=0.3, **_SMALL)
    return _create_swin("acmix_swin_small_patch4_window7_224", pretrained, **dict(args, **kwargs))


# Costs at 224x224, 1000 classes (tests/models/test_swin.py recounts them): params
# equal the authors' code exactly; MACs counted by acmix.analysis.count_macs
# (attention matmuls included; the authors' counting gives 4.65G / 9.00G). The
# mixer="attn" baselines (plain Swin-T / Swin-S) count 28,288,354 / 49,606,258
# params and 4,490,566,656 / 8,740,875,264 MACs.
register_stats(
    "acmix_swin_tiny_patch4_window7_224",
    ModelStats(
        params=28_649_908,
        macs=4_645_008_384,
        paper_params=30e6,
        paper_macs=4.6e9,
        official_params=28_649_908,
        paper_top1=81.9,
    ),
)
register_stats(
    "acmix_swin_small_patch4_window7_224",
    ModelStats(
        params=50_345_080,
        macs=8_992_859_136,
        paper_params=51e6,
        paper_macs=9.0e9,
        official_params=50_345_080,
        paper_top1=83.5,
    ),
)

# Tiny configuration for the registry-wide tests: four stages (strides 4..32),
# shifted windows in stages 0 and 1 (16x16 and 8x8 maps, window 4), one-window
# stages 2 and 3 (the official small-map rule). No stochastic depth, so that
# train-mode outputs are deterministic (tests/models/test_swin.py covers DropPath).
_TEST_KWARGS = dict(
    embed_dim=16,
    depths=(2, 2, 1, 1),
    num_heads=(1, 2, 2, 4),
    window_size=4,
    img_size=64,
    drop_path_rate=0.0,
)
for _name in ("acmix_swin_tiny_patch4_window7_224", "acmix_swin_small_patch4_window7_224"):
    register_test_config(_name, TestConfig(kwargs=dict(_TEST_KWARGS), input_size=(3, 64, 64)))
