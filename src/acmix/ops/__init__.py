"""acmix.ops: ACmix's tensor ops, tensors in and tensors out (no ``nn.Module``).

One function per op, each validating its arguments once and then asking
:func:`choose_backend` which implementation runs:

=========================  ==========================================  ============================
op                         computes                                    backends (``"auto"`` order)
=========================  ==========================================  ============================
:func:`local_attention`    windowed softmax attention (authors')       cpp, triton, shift, reference
:func:`conv_path`          fc over head groups + grouped k x k conv    cpp, reference
:func:`acmix_stage2`       ``rate1 * attention + rate2 * conv path``   cpp (one node), composed
:func:`window_attention`   Swin's window attention with a bias         sdpa, reference
:func:`patchwise_aggregate`  SAN's patchwise aggregation               shift, reference
:func:`shift_sum`          shift-and-sum of position maps              shift, reference
=========================  ==========================================  ============================

Backends live in one module each (:mod:`.reference`, the truth; :mod:`.shift`;
:mod:`.sdpa`; :mod:`.cpp`, whose kernels are registered ``torch.library`` ops;
:mod:`.triton_backend`, the local attention's Triton kernels on CUDA, also
registered ops).
Layering: :mod:`acmix.utils` -> ``acmix.ops`` -> :mod:`acmix.layers`.
"""

from acmix.ops.api import (
    ATTN_WEIGHTS,
    SHIFT_MODES,
    acmix_stage2,
    conv_path,
    local_attention,
    local_attention_qkv,
    patchwise_aggregate,
    shift_sum,
    window_attention,
)
from acmix.ops.backends import BACKENDS, OP_BACKENDS, BackendError, choose_backend, explain_backend
from acmix.ops.common import kernel_offsets, out_size, window_view
from acmix.ops.counting import count_elementwise, note_macs
from acmix.ops.functional import acmix_mix, conv2d_as_shift_sum, position_grid, shift2d
from acmix.ops.reference import (
    conv_path_features,
    conv_path_reference,
    local_attention_reference,
    patchwise_aggregate_reference,
    shift_kernel,
    shift_sum_group_conv,
    window_attention_reference,
)

__all__ = [
    "ATTN_WEIGHTS",
    "BACKENDS",
    "OP_BACKENDS",
    "SHIFT_MODES",
    "BackendError",
    "acmix_mix",
    "acmix_stage2",
    "choose_backend",
    "conv2d_as_shift_sum",
    "conv_path",
    "conv_path_features",
    "conv_path_reference",
    "count_elementwise",
    "explain_backend",
    "kernel_offsets",
    "local_attention",
    "local_attention_qkv",
    "local_attention_reference",
    "note_macs",
    "out_size",
    "patchwise_aggregate",
    "patchwise_aggregate_reference",
    "position_grid",
    "shift2d",
    "shift_kernel",
    "shift_sum",
    "shift_sum_group_conv",
    "window_attention",
    "window_attention_reference",
    "window_view",
]
