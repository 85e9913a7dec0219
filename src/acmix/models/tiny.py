"""A small four-stage network for CPU experiments: the demo's ACmix / conv / attention nets.

:class:`TinyNet` is a compact residual network (widths 32-128, five blocks)
whose every spatial mixing layer comes from :func:`acmix.layers.create_mixer`,
so ``mixer="acmix" | "conv" | "attn"`` build the three networks of the demo
(``python -m acmix.demo_train``) from one code path (``"acmix_conv"`` and a
callable work too, see :mod:`acmix.layers.factory`):

==================  ==========================================  =============
timm name           layout                                      params (1000
                                                                classes)
==================  ==========================================  =============
``acmix_tiny``      stem 3x3, widths (32, 64, 96, 128),         see
                    depths (1, 1, 2, 1), ACmix(k_att 7, 4       ``MODEL_STATS``
                    heads, k_conv 3)
==================  ==========================================  =============

No paper figures exist for it (``paper_*`` are ``None`` in its stats).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath, create_classifier
from timm.models import generate_default_cfgs, register_model
from torch import nn

from acmix.layers import (
    ACmixBase,
    ConvPathConfig,
    ConvPathLike,
    MixerSpec,
    create_mixer,
    resolve_mixer,
)
from acmix.models._checkpoint import checkpoint_seq
from acmix.models._common import (
    build_model,
    drop_path_rates,
    feature_take_indices,
    model_cfg,
    no_decay_names,
    stage_intermediates,
)
from acmix.models._stats import ModelStats, TestConfig, register_stats, register_test_config
from acmix.utils.checks import check_choice, check_positive_int

__all__ = ["NORMS", "TinyBlock", "TinyNet"]

#: Normalisation layers of :class:`TinyNet`.
NORMS: tuple[str, ...] = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with groups of 8 channels (batch-independent)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(max(1, channels // 8), channels)


class TinyBlock(nn.Module):
    """Residual block: 1x1 conv -> norm -> ReLU -> mixer (stride) -> norm -> ReLU -> 1x1 -> norm.

    The shortcut is the identity, or (when the stride or width changes) a 2x2
    average pool (``ceil_mode``) plus a 1x1 conv and norm. The sum passes a ReLU.

    Args:
        in_chs: input channels.
        out_chs: output channels (also the mixer's width).
        stride: stride of the mixer (1 or 2).
        mixer: a name of :data:`acmix.layers.MIXERS` or a callable
            ``mixer(out_chs, out_chs, stride=stride)`` (:func:`acmix.layers.create_mixer`).
        kernel_att: attention window.
        num_heads: attention heads (must divide ``out_chs``).
        conv_path: convolution options (:class:`acmix.layers.ConvPathConfig`).
        padding_mode: attention border mode (:class:`acmix.layers.ACmix`).
        backend: attention backend.
        attn_weight: ``"dot"`` or ``"mlp"`` attention weights.
        norm: ``"batch"`` or ``"group"``.
        drop_path: stochastic-depth probability of the residual branch.

    Shape:
        ``(B, in_chs, H, W)`` -> ``(B, out_chs, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        *,
        mixer: MixerSpec = "acmix",
        kernel_att: int = 7,
        num_heads: int = 4,
        conv_path: ConvPathLike = None,
        padding_mode: str = "auto",
        backend: str = "auto",
        attn_weight: str = "dot",
        norm: str = "batch",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.norm1 = _norm(norm, out_chs)
        self.mixer = create_mixer(
            mixer,
            out_chs,
            out_chs,
            stride,
            num_heads=num_heads,
            kernel_att=kernel_att,
            conv_path=conv_path,
            padding_mode=padding_mode,
            backend=backend,
            attn_weight=attn_weight,
        )
        self.norm2 = _norm(norm, out_chs)
        self.conv3 = nn.Conv2d(out_chs, out_chs, 1, bias=False)
        self.norm3 = _norm(norm, out_chs)
        self.act = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity()
            self.shortcut = nn.Sequential(
                pool, nn.Conv2d(in_chs, out_chs, 1, bias=False), _norm(norm, out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chs, H, W)`` -> ``(B, out_chs, H', W')``."""
        out = self.act(self.norm1(self.conv1(x)))  # (B, C, H, W)
        out = self.act(self.norm2(self.mixer(out)))  # (B, C, H', W')
        out = self.norm3(self.conv3(out))  # (B, C, H', W')
        return self.act(self.drop_path(out) + self.shortcut(x))


class TinyNet(nn.Module):
    """A small four-stage residual network with an injected token mixer.

    Stem: ``log2(stem_stride)`` strided 3x3 conv-norm-ReLU layers (one
    unstrided layer for ``stem_stride=1``), then four stages of
    :class:`TinyBlock` (stride 2 in the first block of stages 2-4), global
    average pool and a linear classifier. The stage-``i`` map is
    ``ceil(H / (stem_stride * 2**i))``: reductions 4, 8, 16, 32 by default;
    ``stem_stride=2`` gives 2, 4, 8, 16, the setting used for 28x28
    Fashion-MNIST (maps 14, 7, 4, 2).

    The same code builds every network of the mixer vocabulary (``mixer=``,
    :mod:`acmix.layers.factory`):

    * ``"acmix"`` (default): every block's spatial layer is ACmix;
    * ``"conv"``: a plain ``k x k`` convolution, ``k = conv_path.kernel_conv``
      (the convolutional baseline);
    * ``"attn"``: ACmix's attention path only (local self-attention with
      positional encoding; the attention baseline);
    * ``"acmix_conv"``: ACmix's convolution path only;
    * a callable ``mixer(in_chs, out_chs, stride=stride)`` returning an NCHW module.

    Mixers use ``padding_mode="auto"`` (reflection where the map allows it,
    masked zero padding on maps of ``<= kernel_att // 2`` pixels), so any
    input size works.

    Args:
        num_classes: classifier outputs (0: ``forward`` returns pooled features).
        in_chans: input channels (1 for Fashion-MNIST).
        mixer: ``"acmix"``, ``"conv"``, ``"attn"``, ``"acmix_conv"`` or a callable.
        widths: channels of the four stages (the stem has ``widths[0]``).
        depths: blocks per stage.
        stem_stride: 1, 2, 4 or 8.
        kernel_att: attention window of the mixers.
        num_heads: attention heads of the mixers (divides every width).
        conv_path: convolution options of the mixers, a
            :class:`acmix.layers.ConvPathConfig` or a dict of its fields.
        norm: ``"batch"`` (default) or ``"group"`` (batch-independent; a
            distributed run then equals a one-process run of the same global
            batch up to float round-off).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly over the blocks.
        global_pool: timm pooling type of the head.
        padding_mode: attention border mode of the mixers (default ``"auto"``).
        backend: attention backend of the mixers.
        attn_weight: ``"dot"`` (default) or ``"mlp"`` attention weights.
            ``padding_mode``, ``backend`` and ``attn_weight`` are unused by
            ``"conv"`` and by a callable.

    Shape:
        ``(B, in_chans, H, W)`` -> ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        mixer: MixerSpec = "acmix",
        widths: Sequence[int] = (32, 64, 96, 128),
        depths: Sequence[int] = (1, 1, 2, 1),
        stem_stride: int = 4,
        kernel_att: int = 7,
        num_heads: int = 4,
        conv_path: ConvPathLike = None,
        norm: str = "batch",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        padding_mode: str = "auto",
        backend: str = "auto",
        attn_weight: str = "dot",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        depths = tuple(int(d) for d in depths)
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive channel counts, got {widths}")
        if len(depths) != 4 or any(d < 1 for d in depths):
            raise ValueError(f"depths must be 4 positive block counts, got {depths}")
        if stem_stride not in (1, 2, 4, 8):
            raise ValueError(f"stem_stride must be 1, 2, 4 or 8, got {stem_stride}")
        mixer = resolve_mixer(mixer, "TinyNet")
        conv_cfg = ConvPathConfig.from_value(conv_path)
        check_choice("norm", norm, NORMS)
        check_positive_int("in_chans", in_chans)
        if mixer in ("acmix", "attn", "acmix_conv") and any(w % num_heads for w in widths):
            raise ValueError(f"num_heads={num_heads} must divide every width, got widths {widths}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.mixer = mixer
        self.conv_path = conv_cfg
        self.grad_checkpointing = False

        # Stem: (B, in_chans, H, W) -> (B, widths[0], H / stem_stride, W / stem_stride).
        layers: list[tuple[str, nn.Module]] = []
        n_strided = max(stem_stride.bit_length() - 1, 0)
        chs = in_chans
        for i in range(max(n_strided, 1)):
            s = 2 if i < n_strided else 1
            layers += [
                (f"conv{i + 1}", nn.Conv2d(chs, widths[0], 3, stride=s, padding=1, bias=False)),
                (f"norm{i + 1}", _norm(norm, widths[0])),
                (f"act{i + 1}", nn.ReLU(inplace=True)),
            ]
            chs = widths[0]
        self.stem = nn.Sequential(OrderedDict(layers))

        dpr = drop_path_rates(drop_path_rate, depths)
        self.feature_info: list[dict[str, Any]] = []
        stages: list[nn.Module] = []
        reduction = stem_stride
        for i, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                blocks.append(
                    TinyBlock(
                        chs,
                        width,
                        stride if j == 0 else 1,
                        mixer=mixer,
                        kernel_att=kernel_att,
                        num_heads=num_heads,
                        conv_path=conv_cfg,
                        padding_mode=padding_mode,
                        backend=backend,
                        attn_weight=attn_weight,
                        norm=norm,
                        drop_path=dpr[i][j],
                    )
                )
                chs = width
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = chs
        self.global_pool, self.fc = create_classifier(chs, num_classes, pool_type=global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Kaiming-normal (fan-out) convs, norms at 1 / 0; ACmix keeps its shift init.

        ACmix's ``dep_conv`` is re-set to the one-hot shift kernels and α = β =
        0.5 after the global pass, so each ACmix layer starts as a true
        convolution plus attention (the paper's description).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ACmixBase):
                m.reset_conv_path()

    # -- timm surface -----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """ACmix's α / β (``rate1``, ``rate2``): excluded from weight decay."""
        return no_decay_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay (timm convention)."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace the head with a fresh one of ``num_classes`` outputs (0: none).

        ``global_pool=""`` removes the pooling too: ``forward`` then returns the
        unpooled ``(B, num_features, h, w)`` map (timm's convention).
        """
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, widths[3], ceil(H / 8 s), ceil(W / 8 s))``, s = stem."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x, flatten=True)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, h, w)`` -> logits ``(B, num_classes)`` (pooled ``(B, C)`` if ``pre_logits``)."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, num_classes)``."""
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
        """Stage outputs ``(B, C_i, ceil(H / r_i), ceil(W / r_i))`` (timm's contract).

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: stages to return (0-3): last ``n`` if an int, all if ``None``;
                negative indices count from the end.
            norm: unused (no final norm); accepted for the timm API.
            stop_early: stop after the last requested stage (the returned final map
                is then that stage's output).
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of stage outputs.

        Returns:
            The stage outputs, or ``(final, outputs)`` with ``final`` what
            ``forward_features`` returns.
        """
        check_choice("output_fmt", output_fmt, ("NCHW",))
        return stage_intermediates(
            self.stem,
            list(self.stages),
            x,
            len(self.feature_info),
            indices,
            stop_early=stop_early,
            intermediates_only=intermediates_only,
            grad_checkpointing=self.grad_checkpointing,
        )

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last requested one (timm's contract).

        Args:
            indices: the stages that will be requested (as in :meth:`forward_intermediates`).
            prune_norm: unused (no final norm).
            prune_head: remove the classifier and the pooling (``reset_classifier(0, "")``).

        Returns:
            The absolute stage indices.
        """
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take


default_cfgs = generate_default_cfgs(
    {
        "acmix_tiny": model_cfg(
            first_conv="stem.conv1",
            classifier="fc",
            paper_ids=None,
            paper_name=None,
            notes=("A small CPU network of this library (no paper counterpart, no weights).",),
        )
    }
)


@register_model
def acmix_tiny(pretrained: bool = False, **kwargs: Any) -> TinyNet:
    """Tiny ACmix net: widths (32, 64, 96, 128), depths (1, 1, 2, 1), ``mixer=`` any."""
    return build_model(TinyNet, "acmix_tiny", pretrained, **kwargs)


# Our counts at 224x224, 1000 classes (no paper figures: this network is ours).
register_stats("acmix_tiny", ModelStats(params=389_030, macs=204_040_128))
register_test_config(
    "acmix_tiny",
    TestConfig(
        kwargs=dict(widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_classes=10),
        input_size=(3, 32, 32),
    ),
)
