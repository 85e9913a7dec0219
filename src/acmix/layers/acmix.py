"""ACmix modules: thin owners of parameters over :mod:`acmix.ops`.

* :class:`ACmixBase` owns what every ACmix variant shares: the convolution
  path (``fc`` + shift-aggregation ``dep_conv``) and the mix weights
  ``rate1`` (alpha, attention) and ``rate2`` (beta, convolution).
* :class:`ACmix` is the spatial (NCHW) layer of the authors' ResNets:
  three 1x1 projections, local window attention with a positional encoding,
  and the convolution path on the same projections.
* :class:`ACmixConv2d` is the same layer behind an ``nn.Conv2d``-like
  signature, to drop into any network in place of a k x k convolution.

Parameter names follow the authors' code (``conv1/conv2/conv3`` = q/k/v,
``conv_p``, ``fc``, ``dep_conv``, ``rate1``, ``rate2``), so their state dicts
load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from acmix.ops import (
    ATTN_WEIGHTS,
    BACKENDS,
    SHIFT_MODES,
    acmix_mix,
    acmix_stage2,
    conv_path,
    local_attention_qkv,
    position_grid,
    shift_kernel,
)
from acmix.utils.checks import (
    check_channels,
    check_choice,
    check_float_tensor,
    check_heads,
    check_odd_kernel,
    check_padding_mode,
    check_positive_int,
    resolve_padding,
)

INITS: tuple[str, ...] = ("paper", "official")
PATHS: tuple[str, ...] = ("both", "attn", "conv")


@torch.fx.wrap
def fx_leaf_call(layer: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
    """Run ``layer(*args)``: under a symbolic (FX) trace, one opaque node per ACmix layer.

    An ACmix layer's forward checks its input and branches on tensor shapes,
    which a ``torch.fx`` trace cannot follow; its ``forward`` hands a traced
    call to this wrapped function instead, so ``torch.fx.symbolic_trace``,
    torchvision's ``create_feature_extractor`` and timm's ``feature_cls="fx"``
    record the layer as a single call (and run its real forward).
    """
    return layer(*args)


def is_fx_tracing() -> bool:
    """Whether a ``torch.fx`` symbolic trace is running (not TorchDynamo / export)."""
    trace = torch.fx._symbolic_trace
    return getattr(trace, "is_fx_symbolic_tracing", trace.is_fx_tracing)()


__all__ = ["INITS", "PATHS", "ACmix", "ACmixBase", "ACmixConv2d"]


@register_notrace_module  # timm's FX feature extraction keeps every ACmix layer whole
class ACmixBase(nn.Module):
    """The parts shared by every ACmix layer: convolution path and alpha/beta mix.

    Subclasses compute ``q, k, v`` and the attention path; they call
    :meth:`forward_conv_path` on the head features and :meth:`mix` at the end.

    Args:
        head: number of heads ``N``.
        head_dim: head dimension ``d``.
        out_planes: output channels (a multiple of ``d``).
        kernel_conv: odd kernel ``k_c`` of the convolution path.
        stride: output stride of the convolution path.
        shift_mode: ``"learnable"`` (grouped conv initialised at the shift, the
            authors' default), ``"fixed"`` (grouped conv with frozen one-hot
            kernels) or ``"tensor"`` (explicit shifts, no kernels).
        fc_bias: whether ``fc`` has a bias (the authors' ResNet layer: no;
            their Swin layer: yes).
        paths: ``"both"`` (ACmix), ``"attn"`` (attention path only: a plain
            local / window self-attention layer, no conv-path parameters and no
            alpha/beta) or ``"conv"`` (convolution path only, no alpha/beta).
            The single-path forms are the ablations and baselines of the paper.
    """

    #: Let layers run stage II as one op (:func:`acmix.ops.acmix_stage2`, one fused
    #: node where the kernels apply; the result is the same). False runs the two
    #: paths and :meth:`mix` separately, e.g. so that a hook on ``mix`` sees both.
    fuse_stage2: bool = True
    #: Backend of every op the layer runs (one of :data:`acmix.ops.BACKENDS`).
    backend: str = "auto"

    def __init__(
        self,
        head: int,
        head_dim: int,
        out_planes: int,
        kernel_conv: int,
        stride: int,
        shift_mode: str,
        fc_bias: bool,
        paths: str = "both",
    ) -> None:
        super().__init__()
        self.paths = check_choice("paths", paths, PATHS)
        self.use_att = paths in ("both", "attn")
        self.use_conv = paths in ("both", "conv")
        self.head = head
        self.head_dim = head_dim
        self.out_planes = out_planes
        self.kernel_conv = check_odd_kernel("kernel_conv", kernel_conv)
        self.stride = check_positive_int("stride", stride)
        self.shift_mode = check_choice("shift_mode", shift_mode, SHIFT_MODES)
        K2 = kernel_conv * kernel_conv
        self.fc: nn.Conv2d | None = None
        self.dep_conv: nn.Conv2d | None = None
        self.rate1: nn.Parameter | None = None
        self.rate2: nn.Parameter | None = None
        if not self.use_conv:
            return
        # fc: 3N head groups -> K2 maps (a 1x1 conv, as the authors store it).
        self.fc = nn.Conv2d(3 * head, K2, kernel_size=1, bias=fc_bias)
        if shift_mode == "learnable":
            self.dep_conv = nn.Conv2d(
                K2 * head_dim,
                out_planes,
                kernel_size=kernel_conv,
                stride=stride,
                padding=kernel_conv // 2,
                groups=head_dim,
                bias=False,
            )
        elif shift_mode == "fixed":
            self.register_buffer(
                "shift_weight", shift_kernel(out_planes, kernel_conv), persistent=False
            )
        if paths == "both":
            self.rate1 = nn.Parameter(torch.empty(1))
            self.rate2 = nn.Parameter(torch.empty(1))

    def reset_conv_path(self) -> None:
        """Paper init: alpha = beta = 0.5 and the grouped conv at the pure shift."""
        if self.rate1 is not None and self.rate2 is not None:
            nn.init.constant_(self.rate1, 0.5)
            nn.init.constant_(self.rate2, 0.5)
        if self.dep_conv is not None:
            with torch.no_grad():
                self.dep_conv.weight.copy_(shift_kernel(self.out_planes, self.kernel_conv))

    def _shift_weight(self) -> torch.Tensor | None:
        if self.dep_conv is not None:
            return self.dep_conv.weight
        return getattr(self, "shift_weight", None)

    def forward_conv_path(self, qkv: torch.Tensor) -> torch.Tensor | None:
        """Convolution path on head features.

        Args:
            qkv: ``(B, 3N, d, H, W)`` (group ``which * N + head``; any strides).

        Returns:
            ``(B, out_planes, ceil(H / stride), ceil(W / stride))``, or
            ``None`` when the layer has no convolution path.
        """
        if self.fc is None:
            return None
        return conv_path(
            qkv,
            self.fc.weight,
            self.fc.bias,
            self._shift_weight(),
            self.kernel_conv,
            self.out_planes,
            self.stride,
            self.shift_mode,
            self.backend,
        )

    def mix(self, att: torch.Tensor | None, conv: torch.Tensor | None) -> torch.Tensor:
        """``rate1 * att + rate2 * conv``; a single-path layer returns its one path."""
        if att is None or conv is None:
            out = att if conv is None else conv
            assert out is not None, "a layer has at least one path"
            return out
        assert self.rate1 is not None and self.rate2 is not None
        return acmix_mix(att, conv, self.rate1, self.rate2)


class ACmix(ACmixBase):
    """Spatial ACmix (NCHW), the layer of the authors' ResNets.

    ``q, k, v`` come from one fused 1x1 projection (stage I, computed once);
    the attention path runs ``head`` heads of local attention over a
    ``kernel_att x kernel_att`` window, the convolution path mixes the ``3N``
    head features into ``kernel_conv**2`` maps and shift-aggregates them with
    a grouped convolution; the output is ``rate1 * att + rate2 * conv``.

    Args:
        in_planes: input channels ``C_in``.
        out_planes: output channels ``C_out`` (divisible by ``head``).
        kernel_att: odd attention window size.
        head: number of heads ``N``; head dimension ``d = out_planes / head``.
        kernel_conv: odd convolution-path kernel size (padding ``kernel_conv // 2``).
        stride: output stride; the output is ``ceil(H / stride) x ceil(W / stride)``.
        dilation: only 1 is supported (the authors' code accepts it but
            cannot run with any other value).
        shift_mode: ``"learnable"`` (default), ``"fixed"`` or ``"tensor"``,
            see :class:`ACmixBase`.
        attn_weight: ``"dot"`` (default) or ``"mlp"`` (Sec. 4.5: an MLP on
            ``[q, k]``, hidden width ``mlp_hidden``).
        padding_mode: border semantics of the attention window: ``"reflect"``
            (the authors', default), ``"zeros"`` (out-of-image keys masked out
            of the softmax) or ``"auto"`` (reflect where the map is large
            enough, masked on maps of at most ``kernel_att // 2`` pixels).
        init: ``"paper"`` (default; alpha = beta = 0.5, grouped conv at the
            shift, so the conv path starts as a true convolution) or
            ``"official"`` (what the authors' ResNet ends up with: its global
            Kaiming-normal fan-out init overwrites every conv of the layer,
            the shift kernels included).
        backend: the backend of every op the layer runs, one of
            :data:`acmix.ops.BACKENDS` (see :func:`acmix.ops.choose_backend`).
        mlp_hidden: hidden width of the MLP weighting, an int >= 1 (``None``: ``d``).
        paths: ``"both"`` (ACmix, default), ``"attn"`` (local self-attention
            only: the SASA-style baseline) or ``"conv"`` (convolution path only).

    Shape:
        input ``(B, in_planes, H, W)`` -> output
        ``(B, out_planes, ceil(H / stride), ceil(W / stride))``.

    Example:
        >>> layer = ACmix(64, 64, kernel_att=7, head=4, kernel_conv=3)
        >>> layer(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 56, 56])
    """

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        kernel_att: int = 7,
        head: int = 4,
        kernel_conv: int = 3,
        stride: int = 1,
        dilation: int = 1,
        *,
        shift_mode: str = "learnable",
        attn_weight: str = "dot",
        padding_mode: str = "reflect",
        init: str = "paper",
        backend: str = "auto",
        mlp_hidden: int | None = None,
        paths: str = "both",
    ) -> None:
        check_positive_int("in_planes", in_planes)
        head_dim = check_heads(out_planes, head)
        check_odd_kernel("kernel_att", kernel_att)
        check_positive_int("dilation", dilation)
        if dilation != 1:
            raise ValueError(
                f"dilation={dilation} is not supported; ACmix windows are dense (dilation=1). "
                "The argument exists for compatibility with the authors' signature only."
            )
        super().__init__(head, head_dim, out_planes, kernel_conv, stride, shift_mode, False, paths)
        self.in_planes = in_planes
        self.kernel_att = kernel_att
        self.dilation = dilation
        self.attn_weight = check_choice("attn_weight", attn_weight, ATTN_WEIGHTS)
        self.padding_mode = check_padding_mode(padding_mode)
        self.init_mode = check_choice("init", init, INITS)
        self.backend = check_choice("backend", backend, BACKENDS)

        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)  # queries
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)  # keys
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)  # values
        self.conv_p = nn.Conv2d(2, head_dim, kernel_size=1) if self.use_att else None
        if attn_weight == "mlp" and self.use_att:
            hidden = (
                head_dim if mlp_hidden is None else check_positive_int("mlp_hidden", mlp_hidden)
            )
            self.attn_mlp = nn.Sequential(
                nn.Linear(2 * head_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1, bias=False)
            )
        else:
            self.attn_mlp = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise according to ``init`` (see the class docstring)."""
        self.reset_conv_path()
        if self.init_mode == "official":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return (
            f"{self.in_planes}, {self.out_planes}, kernel_att={self.kernel_att}, head={self.head}, "
            f"kernel_conv={self.kernel_conv}, stride={self.stride}, "
            f"shift_mode={self.shift_mode!r}, "
            f"attn_weight={self.attn_weight!r}, padding_mode={self.padding_mode!r}"
        )

    def qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused stage-I projection: weight ``(3 C_out, C_in, 1, 1)``, bias ``(3 C_out,)``."""
        w = torch.cat((self.conv1.weight, self.conv2.weight, self.conv3.weight), dim=0)
        b = torch.cat((self.conv1.bias, self.conv2.bias, self.conv3.bias), dim=0)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ACmix.

        Args:
            x: ``(B, in_planes, H, W)`` floating point.

        Returns:
            ``(B, out_planes, ceil(H / stride), ceil(W / stride))``.
        """
        if is_fx_tracing():
            return fx_leaf_call(self, x)
        check_float_tensor("input", x, 4, "(B, C, H, W)")
        check_channels("input", x.shape[1], self.in_planes, "(B, C, H, W)")
        B, _, H, W = x.shape
        N, d = self.head, self.head_dim

        # Stage I: one GEMM for q, k, v -> (B, 3 C_out, H, W), channel which*C + head*d + j.
        w, b = self.qkv_weight()
        qkv = F.conv2d(x, w, b)
        heads = qkv.view(B, 3 * N, d, H, W)  # group which*N + head

        # Stage II: both paths read the same projections.
        if self.fuse_stage2 and self.paths == "both":
            return self._stage2(qkv)
        att = self._attention(qkv) if self.use_att else None  # (B, C_out, H', W')
        conv = self.forward_conv_path(heads)  # (B, C_out, H', W') or None
        return self.mix(att, conv)

    def _mlp(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The MLP weighting's ``(w1, b1, w2)`` in ``dtype``, or ``None`` for the dot product."""
        if self.attn_mlp is None:
            return None
        fc1, _, fc2 = self.attn_mlp
        return fc1.weight.to(dtype), fc1.bias.to(dtype), fc2.weight[0].to(dtype)

    def _stage2(self, qkv: torch.Tensor) -> torch.Tensor:
        """Both paths and the mix as one op (:func:`acmix.ops.acmix_stage2`)."""
        assert self.fc is not None and self.rate1 is not None and self.rate2 is not None
        padding, pe = self._attention_inputs(qkv)
        return acmix_stage2(
            qkv,
            self.head,
            self.kernel_att,
            padding,
            pe,
            self.fc.weight,
            self.fc.bias,
            self._shift_weight(),
            self.kernel_conv,
            self.rate1,
            self.rate2,
            self.stride,
            self.shift_mode,
            self._mlp(qkv.dtype),
            self.backend,
        )

    def _attention_inputs(self, qkv: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The resolved padding and the positional encoding ``(1, d, H, W)`` in qkv's dtype."""
        assert self.conv_p is not None
        H, W = qkv.shape[-2:]
        padding = resolve_padding(self.padding_mode, self.kernel_att, H, W)
        grid = position_grid(H, W, dtype=qkv.dtype, device=qkv.device)
        pe = F.conv2d(grid, self.conv_p.weight.to(qkv.dtype), self.conv_p.bias.to(qkv.dtype))
        return padding, pe

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention path: fused projection ``(B, 3 C_out, H, W)`` -> ``(B, C_out, H', W')``."""
        padding, pe = self._attention_inputs(qkv)
        return local_attention_qkv(
            qkv,
            self.head,
            self.kernel_att,
            self.stride,
            padding,
            pe,
            mlp=self._mlp(qkv.dtype),
            backend=self.backend,
        )


class ACmixConv2d(ACmix):
    """ACmix behind an ``nn.Conv2d``-like signature: a drop-in for a k x k convolution.

    ``kernel_size`` is the convolution path's kernel; ACmix is always
    "same"-padded, so ``padding`` must be ``kernel_size // 2`` or ``"same"``.
    Heads (``num_heads``) default to the largest of 4, 2, 1 dividing ``out_channels``.

    Example:
        Replace the 3x3 convolutions of a network::

            >>> import torchvision
            >>> net = torchvision.models.resnet18()
            >>> old = net.layer1[0].conv2
            >>> net.layer1[0].conv2 = ACmixConv2d.from_conv2d(old)
            >>> net(torch.randn(1, 3, 64, 64)).shape
            torch.Size([1, 1000])

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd convolution-path kernel (default 3).
        stride: output stride.
        padding: ``kernel_size // 2`` or ``"same"`` (other values are rejected).
        dilation: 1 only.
        groups: 1 only.
        bias: accepted for signature compatibility; ACmix has its own biases.
        num_heads: attention heads (default: largest of 4, 2, 1 dividing ``out_channels``).
        kernel_att: attention window (default 7).
        padding_mode: attention border mode; default ``"auto"`` so any map size works.
        **kwargs: other keyword options of :class:`ACmix`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | str | None = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        num_heads: int | None = None,
        kernel_att: int = 7,
        padding_mode: str = "auto",
        **kwargs: object,
    ) -> None:
        check_odd_kernel("kernel_size", kernel_size)
        if padding not in (None, "same", kernel_size // 2):
            raise ValueError(
                f"ACmixConv2d is always 'same'-padded: padding must be {kernel_size // 2} "
                f"or 'same' for kernel_size={kernel_size}, got {padding!r}"
            )
        if groups != 1:
            raise ValueError(f"ACmixConv2d supports groups=1 only, got groups={groups}")
        if num_heads is None:
            check_positive_int("out_channels", out_channels)
            num_heads = next(h for h in (4, 2, 1) if out_channels % h == 0)
        super().__init__(
            in_channels,
            out_channels,
            kernel_att,
            num_heads,
            kernel_size,
            stride,
            dilation,
            padding_mode=padding_mode,
            **kwargs,  # type: ignore[arg-type]
        )

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, **kwargs: object) -> ACmixConv2d:
        """Build an ACmix layer shaped like ``conv`` (channels, kernel, stride, device, dtype).

        The replacement must map the same inputs to the same output shape, so
        what ACmix cannot reproduce is refused with the reason: a non-square
        kernel or stride, an even kernel, padding other than ``kernel // 2``
        (or ``"same"``), dilation other than 1, ``groups`` other than 1, a
        ``padding_mode`` other than ``"zeros"``. The convolution's weights are
        not transferred (the two layers parametrise different functions).

        Raises:
            TypeError: ``conv`` is not an ``nn.Conv2d``.
            ValueError: ``conv`` has a property ACmix cannot reproduce (named).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        what = (
            f"cannot replace Conv2d({conv.in_channels}, {conv.out_channels}, "
            f"kernel_size={conv.kernel_size}, stride={conv.stride}, padding={conv.padding}, "
            f"dilation={conv.dilation}, groups={conv.groups}) by ACmix"
        )
        if kh != kw or sh != sw:
            raise ValueError(f"{what}: only square kernels and strides are supported")
        if kh % 2 == 0:
            raise ValueError(f"{what}: the kernel must be odd (a window centred on its pixel)")
        if conv.dilation != (1, 1):
            raise ValueError(f"{what}: ACmix windows are dense (dilation 1)")
        if conv.groups != 1:
            raise ValueError(f"{what}: ACmix mixes all channels (groups 1)")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{what}: padding_mode={conv.padding_mode!r}; its convolution path pads with zeros"
            )
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        if padding not in ("same", (kh // 2, kh // 2)):
            raise ValueError(
                f"{what}: ACmix keeps the map size (padding {kh // 2} = kernel_size // 2), "
                f"padding={conv.padding!r} would not"
            )
        layer = cls(conv.in_channels, conv.out_channels, kh, sh, **kwargs)
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
