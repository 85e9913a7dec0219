"""ACmix ResNets (paper Sec. 4.1): a ResNet v1.5 whose bottleneck 3x3 conv is a token mixer.

One configurable :class:`ResNet`; the variants registered with timm only state
their depths:

==================  ============  ===========  ============  ==========  =====
timm name           ``layers``    params       paper         MACs @224   paper
                                  (ours)       params/FLOPs  (ours)      top-1
==================  ============  ===========  ============  ==========  =====
``acmix_resnet26``  (1, 2, 4, 1)  10,487,816   10.6M / 2.3G  2.22G       76.1
``acmix_resnet38``  (2, 3, 5, 2)  14,410,896   14.6M / 2.9G  2.86G       77.4
``acmix_resnet50``  (3, 4, 6, 3)  18,333,976   18.6M / 3.6G  3.50G       77.8
==================  ============  ===========  ============  ==========  =====

The 26/38 depths are the Stand-Alone Self-Attention layouts that the authors'
training script documents; our parameter counts equal the authors' code
exactly (the paper's table rounds them up by 1-1.4%). MACs are multiply-adds
at 224x224 with the attention counted (:func:`acmix.analysis.count_macs`).

The state-dict keys are the authors' (``conv1``, ``bn1``,
``layer{1..4}.{j}.conv1/bn1/conv2/bn2/conv3/bn3/downsample.{0,1}``, ``fc``;
the ACmix layer is ``conv2``), so their checkpoints load through
:func:`checkpoint_filter_fn`::

    model = timm.create_model(
        "acmix_resnet50", pretrained=True, pretrained_cfg_overlay=dict(file="acmix_r50.pth")
    )

No ImageNet weights were released by the authors for the ResNets; ``pretrained=True``
without a file raises timm's "no pretrained weights" error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath, create_classifier
from timm.models import generate_default_cfgs, register_model
from torch import nn

from acmix.layers import (
    INITS,
    ACmix,
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
from acmix.utils.io import check_shapes, unwrap_state_dict

__all__ = ["Bottleneck", "ResNet", "checkpoint_filter_fn"]

#: Channel expansion of the bottleneck's last 1x1 conv.
EXPANSION = 4


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck with an injected spatial mixer in place of the 3x3 conv.

    ``conv1`` (1x1, ``in_chs -> width``) -> BN -> ReLU -> ``conv2`` (the mixer,
    ``width -> width``, carries the stride) -> BN -> ReLU -> ``conv3`` (1x1,
    ``width -> 4 width``) -> BN, plus the (projected) shortcut, then ReLU.

    Args:
        in_chs: input channels.
        width: bottleneck width (the mixer's channels).
        stride: stride of the mixer (and of the projection shortcut).
        downsample: projection shortcut (1x1 conv + BN) or ``None`` for identity.
        mixer: a name of :data:`acmix.layers.MIXERS` or a callable
            ``mixer(width, width, stride=stride)`` (see :func:`acmix.layers.create_mixer`).
        kernel_att: attention window of the mixer.
        num_heads: attention heads of the mixer.
        conv_path: the mixer's convolution options (:class:`acmix.layers.ConvPathConfig`).
        padding_mode: attention border mode of the mixer (:class:`acmix.layers.ACmix`).
        backend: attention backend of the mixer.
        attn_weight: attention weighting of the mixer (``"dot"`` or ``"mlp"``).
        drop_path: stochastic-depth probability of the residual branch.

    Shape:
        ``(B, in_chs, H, W)`` -> ``(B, 4 width, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_chs: int,
        width: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        mixer: MixerSpec = "acmix",
        kernel_att: int = 7,
        num_heads: int = 4,
        conv_path: ConvPathLike = None,
        padding_mode: str = "auto",
        backend: str = "auto",
        attn_weight: str = "dot",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        out_chs = width * EXPANSION
        self.conv1 = nn.Conv2d(in_chs, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = create_mixer(
            mixer,
            width,
            width,
            stride,
            num_heads=num_heads,
            kernel_att=kernel_att,
            conv_path=conv_path,
            padding_mode=padding_mode,
            backend=backend,
            attn_weight=attn_weight,
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chs, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chs, H, W)`` -> ``(B, 4 width, H', W')``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = self.act(self.bn2(self.conv2(out)))  # (B, width, H', W')
        out = self.bn3(self.conv3(out))  # (B, 4 width, H', W')
        return self.act(self.drop_path(out) + shortcut)


class ResNet(nn.Module):
    """ResNet v1.5 with a configurable token mixer: ACmix ResNets and their baselines.

    torchvision-style layout: 7x7/2 stem conv, BN, ReLU, 3x3/2 max-pool, four
    stages of :class:`Bottleneck` blocks (stride on the mixer, i.e. the 3x3
    position, in the first block of stages 2-4), global average pool, ``fc``.

    The same code builds the paper's models and their baselines (``mixer=``,
    the vocabulary of :mod:`acmix.layers.factory`):

    * ``"acmix"`` (default): ACmix(width, width, ``kernel_att``, ``num_heads``,
      ``conv_path.kernel_conv``, stride), the paper's ACmix ResNet;
    * ``"attn"``: the same network with ACmix's attention path only (local
      self-attention, positional encoding, no conv path): the SASA-style
      attention baseline;
    * ``"acmix_conv"``: ACmix's convolution path only (the ablation);
    * ``"conv"``: a plain ``k x k`` conv, ``k = conv_path.kernel_conv``: the
      convolutional ResNet baseline (torchvision's ResNet-50 for
      ``layers=(3, 4, 6, 3)``);
    * a callable ``mixer(width, width, stride=stride)`` returning an NCHW module.

    **Any input size >= 32.** Mixers are built with ``padding_mode="auto"``: the
    attention window is reflection-padded like the authors' code wherever the
    map allows it (side > ``kernel_att // 2``) and switches to zero padding with
    out-of-image keys masked out of the softmax on smaller maps (e.g. the 2x2 /
    1x1 maps of stages 3-4 at 32x32 input, where the authors' code crashes).
    Strided layers give ``ceil(H / 2)`` outputs, so odd sizes work too; a
    stage-``i`` feature map is ``ceil(H / 2**(i + 2)) x ceil(W / 2**(i + 2))``.
    Pass ``padding_mode="reflect"`` for the authors' strict behaviour.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns
            pooled features).
        in_chans: input image channels.
        mixer: ``"acmix"``, ``"attn"``, ``"acmix_conv"``, ``"conv"`` or a
            callable (see above).
        kernel_att: attention window of the mixers (the paper: 7).
        num_heads: attention heads of the mixers (the paper: 4; ACmix's ``head``).
        conv_path: convolution options of the mixers, a
            :class:`acmix.layers.ConvPathConfig` or a dict of its fields
            (``kernel_conv``, the paper: 3; ``shift_mode``).
        widths: bottleneck widths of the four stages (outputs are 4x these);
            the stem has ``widths[0]`` channels. Default ``(64, 128, 256, 512)``.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linearly increasing over the blocks
            up to this value.
        global_pool: timm pooling type of the head (``"avg"``, ``"max"``, ...).
        init: ``"paper"`` (default): every conv Kaiming-normal (fan-out) and BN
            at 1 / 0 as in the authors' ResNet, but ACmix's convolution path
            keeps its shift initialisation (``dep_conv`` at the one-hot shift
            kernels, so ACmix starts as a true convolution, as the paper
            describes); ``"official"``: the authors' global init exactly, whose
            Kaiming-normal pass also overwrites ``dep_conv``. The two differ only
            in the ``dep_conv`` weights (same seed -> all else equal).
        padding_mode: attention border mode of the mixers (default ``"auto"``,
            see above; :class:`acmix.layers.ACmix`).
        backend: attention backend of the mixers (:class:`acmix.layers.ACmix`).
        attn_weight: ``"dot"`` (default) or ``"mlp"`` attention weights.
            ``padding_mode``, ``backend`` and ``attn_weight`` are unused by
            ``mixer="conv"`` and by a callable (bind its options with
            ``functools.partial``).

    Shape:
        ``(B, in_chans, H, W)`` -> ``(B, num_classes)``; ``forward_features``
        gives ``(B, 4 widths[3], ceil(H / 32), ceil(W / 32))``.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        in_chans: int = 3,
        *,
        mixer: MixerSpec = "acmix",
        kernel_att: int = 7,
        num_heads: int = 4,
        conv_path: ConvPathLike = None,
        widths: Sequence[int] = (64, 128, 256, 512),
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        init: str = "paper",
        padding_mode: str = "auto",
        backend: str = "auto",
        attn_weight: str = "dot",
    ) -> None:
        super().__init__()
        layers = tuple(int(n) for n in layers)
        widths = tuple(int(w) for w in widths)
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive block counts, got {layers}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be 4 positive channel counts, got {widths}")
        mixer = resolve_mixer(mixer, "ResNet")
        conv_cfg = ConvPathConfig.from_value(conv_path)
        check_choice("init", init, INITS)
        check_positive_int("in_chans", in_chans)
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.mixer = mixer
        self.conv_path = conv_cfg
        self.init = init
        self.grad_checkpointing = False
        # The mixers start from ACmix's own ("paper") init; init_weights() applies `init`.
        block_kwargs: dict[str, Any] = dict(
            mixer=mixer,
            kernel_att=kernel_att,
            num_heads=num_heads,
            conv_path=conv_cfg,
            padding_mode=padding_mode,
            backend=backend,
            attn_weight=attn_weight,
        )

        # Stem: (B, in_chans, H, W) -> (B, widths[0], H/4, W/4).
        stem_chs = widths[0]
        self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        dpr = drop_path_rates(drop_path_rate, layers)
        in_chs = stem_chs
        reduction = 4
        self.feature_info: list[dict[str, Any]] = []
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks: list[nn.Module] = []
            for j in range(depth):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or in_chs != width * EXPANSION:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_chs, width * EXPANSION, kernel_size=1, stride=s, bias=False),
                        nn.BatchNorm2d(width * EXPANSION),
                    )
                blocks.append(
                    Bottleneck(in_chs, width, s, downsample, drop_path=dpr[i][j], **block_kwargs)
                )
                in_chs = width * EXPANSION
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=name))

        self.num_features = self.head_hidden_size = in_chs
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=global_pool)
        self.head_drop = nn.Dropout(drop_rate)
        self.init_weights()

    # -- init -------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise as ``self.init`` says (see the class docstring).

        Every ``Conv2d`` (the mixers' included) gets Kaiming-normal fan-out
        weights and every BatchNorm weight 1 / bias 0, as the authors' ResNet
        does; with ``init="paper"`` the ACmix layers then restore their shift
        kernels and alpha = beta = 0.5. The random draws are the same for both
        modes, so a seeded model differs between them only in ``dep_conv``.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ACmixBase):
                if self.init == "paper":
                    m.reset_conv_path()
                if isinstance(m, ACmix):
                    # Keep the layer's own record truthful: its reset_parameters()
                    # reproduces the same scheme.
                    m.init_mode = self.init

    # -- timm surface -----------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of ACmix's mix weights alpha / beta (``rate1``, ``rate2``): no weight decay."""
        return no_decay_names(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay (timm convention)."""
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (saves memory)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """Replace the head with a fresh one of ``num_classes`` outputs (0: no classifier).

        ``global_pool=""`` removes the pooling too: ``forward`` then returns the
        unpooled ``(B, num_features, h, w)`` map (timm's convention).
        """
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )

    def _stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, widths[0], ceil(H / 4), ceil(W / 4))``."""
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``(B, num_features, ceil(H / 32), ceil(W / 32))``."""
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self._stages(), x, flatten=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, num_features, h, w)`` -> logits ``(B, num_classes)``.

        With ``pre_logits=True`` the pooled features ``(B, num_features)``.
        """
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
        """Stage outputs for dense prediction (timm's ``forward_intermediates`` contract).

        Args:
            x: ``(B, in_chans, H, W)``.
            indices: stages to return (0-3): last ``n`` if an int, all if ``None``;
                negative indices count from the end.
            norm: unused (ResNets have no final norm); accepted for the timm API.
            stop_early: stop after the last requested stage (the returned final
                map is then that stage's output).
            output_fmt: ``"NCHW"`` only.
            intermediates_only: return only the list of stage outputs.

        Returns:
            The stage outputs ``(B, C_i, ceil(H / r_i), ceil(W / r_i))``, or
            ``(final, outputs)`` with ``final`` what ``forward_features`` returns.
        """
        check_choice("output_fmt", output_fmt, ("NCHW",))
        return stage_intermediates(
            self.forward_stem,
            self._stages(),
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
        """Drop what the requested stages do not need (timm's contract).

        The stages after the last requested one become empty ``nn.Sequential``
        (identities; their ``feature_info`` entries stay, so indices keep their meaning).

        Args:
            indices: the stages that will be requested (as in :meth:`forward_intermediates`).
            prune_norm: unused (no final norm).
            prune_head: remove the classifier and the pooling (``reset_classifier(0, "")``).

        Returns:
            The absolute stage indices.
        """
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, len(self.feature_info)):
            setattr(self, f"layer{i + 1}", nn.Sequential())
        if prune_head:
            self.reset_classifier(0, "")
        return take


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Convert the authors' ACmix ResNet checkpoint to this model's state dict.

    The authors' keys are ours, so the conversion only cleans the container:
    it unwraps ``{'state_dict': ...}`` / ``{'model': ...}``, strips the
    ``module.`` prefix of (Distributed)DataParallel training, drops a stray
    ``dep_conv.bias`` (their layers create it and then delete it, so it is
    absent from their files; a checkpoint saved before that deletion would
    have it), and checks every shape against ``model``.

    The classifier is exempt from the shape check when timm is about to drop it
    (``model.pretrained_cfg["num_classes"]`` differs from the model's, i.e. a
    fine-tuning load with a new head).

    Args:
        state_dict: a state dict or training checkpoint (tensors as loaded).
        model: the target :class:`ResNet`.

    Returns:
        ``{key: tensor}`` ready for ``model.load_state_dict(strict=True)``.

    Raises:
        ValueError: not a state dict, or shapes that do not fit ``model``
            (the message names each key with the shape found and expected).
    """
    sd = unwrap_state_dict(state_dict)
    target = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.endswith("dep_conv.bias") and k not in target)}
    head_dropped = False
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    fc_w = sd.get("fc.weight")
    if fc_w is not None and "num_classes" in pcfg:
        n_cfg, n_model = pcfg["num_classes"], getattr(model, "num_classes", None)
        head_dropped = n_cfg != n_model and fc_w.shape[0] == n_cfg
    check_shapes(sd, target, skip=lambda k: head_dropped and k.startswith("fc."))
    return sd


# -- registration -----------------------------------------------------------------------------


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """Pretrained config: evaluation as in the authors' ResNet ``main.py``.

    torchvision ``Resize(256)`` (bilinear) + ``CenterCrop(224)``, i.e. crop_pct
    0.875, and the ImageNet mean / std.
    """
    return model_cfg(
        first_conv="conv1",
        classifier="fc",
        notes=(
            "The authors released no ImageNet weights for the ACmix ResNets; load your own or "
            "theirs with pretrained_cfg_overlay=dict(file=...).",
        ),
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "acmix_resnet26": _cfg(),
        "acmix_resnet38": _cfg(),
        "acmix_resnet50": _cfg(),
    }
)


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Build ``variant`` through timm (pretrained loading, ``features_only``).

    A local checkpoint given as ``pretrained_cfg_overlay=dict(file=...)`` is taken
    to have the head of the model being built (``num_classes``); to load a
    checkpoint with another head and re-initialise it, state its class count,
    e.g. ``pretrained_cfg_overlay=dict(file=..., num_classes=1000)``.
    """
    overlay = kwargs.get("pretrained_cfg_overlay")
    if pretrained and overlay and ("file" in overlay or "state_dict" in overlay):
        kwargs["pretrained_cfg_overlay"] = {
            "num_classes": kwargs.get("num_classes", 1000),
            **overlay,
        }
    return build_model(
        ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
    )


@register_model
def acmix_resnet26(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ACmix ResNet-26: depths (1, 2, 4, 1), 10.49M params, 2.22G MACs (paper: 76.1% top-1)."""
    return _create_resnet("acmix_resnet26", pretrained, **{"layers": (1, 2, 4, 1), **kwargs})


@register_model
def acmix_resnet38(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ACmix ResNet-38: depths (2, 3, 5, 2), 14.41M params, 2.86G MACs (paper: 77.4% top-1)."""
    return _create_resnet("acmix_resnet38", pretrained, **{"layers": (2, 3, 5, 2), **kwargs})


@register_model
def acmix_resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ACmix ResNet-50: depths (3, 4, 6, 3), 18.33M params, 3.50G MACs (paper: 77.8% top-1)."""
    return _create_resnet("acmix_resnet50", pretrained, **{"layers": (3, 4, 6, 3), **kwargs})


# Our counts (1000 classes, 224x224, count_macs: attention included) beside the
# authors' code and the paper's table (DESIGN.md sections 3 and 7).
_STATS = {
    "acmix_resnet26": ModelStats(
        params=10_487_816,
        macs=2_216_515_584,
        paper_params=10.6e6,
        paper_macs=2.3e9,
        official_params=10_487_816,
        paper_top1=76.1,
    ),
    "acmix_resnet38": ModelStats(
        params=14_410_896,
        macs=2_859_408_128,
        paper_params=14.6e6,
        paper_macs=2.9e9,
        official_params=14_410_896,
        paper_top1=77.4,
    ),
    "acmix_resnet50": ModelStats(
        params=18_333_976,
        macs=3_502_300_672,
        paper_params=18.6e6,
        paper_macs=3.6e9,
        official_params=18_333_976,
        paper_top1=77.8,
    ),
}
for _name, _stats in _STATS.items():
    register_stats(_name, _stats)
    # Tiny: 8/16/32/64 wide bottlenecks (head dim 2-16); two blocks in stage 3 run on
    # 2x2 maps at 32x32 input (the masked-padding case) with an identity shortcut.
    register_test_config(
        _name,
        TestConfig(
            kwargs=dict(layers=(1, 1, 2, 1), widths=(8, 16, 32, 64), num_classes=10),
            input_size=(3, 32, 32),
        ),
    )
