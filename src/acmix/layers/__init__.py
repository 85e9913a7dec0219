"""ACmix layers: the functional core and thin modules over it (flat re-exports)."""

from acmix.layers.acmix import INITS, PATHS, ACmix, ACmixBase, ACmixConv2d
from acmix.layers.attention import (
    ATTN_WEIGHTS,
    BACKENDS,
    local_attention,
    local_attention_reference,
)
from acmix.layers.factory import MIXERS, create_mixer
from acmix.layers.functional import (
    SHIFT_MODES,
    acmix_mix,
    conv2d_as_shift_sum,
    conv_path,
    conv_path_features,
    kernel_offsets,
    position_grid,
    shift2d,
    shift_kernel,
    shift_sum,
    shift_sum_group_conv,
)
from acmix.layers.window import (
    WINDOW_BACKENDS,
    WindowACmix,
    relative_position_index,
    shifted_window_mask,
    window_attention,
    window_partition,
    window_reverse,
)
from acmix.utils.checks import PADDING_MODES, resolve_padding

__all__ = [
    "ATTN_WEIGHTS",
    "BACKENDS",
    "INITS",
    "MIXERS",
    "PADDING_MODES",
    "PATHS",
    "SHIFT_MODES",
    "WINDOW_BACKENDS",
    "ACmix",
    "ACmixBase",
    "ACmixConv2d",
    "WindowACmix",
    "acmix_mix",
    "conv2d_as_shift_sum",
    "conv_path",
    "conv_path_features",
    "create_mixer",
    "kernel_offsets",
    "local_attention",
    "local_attention_reference",
    "position_grid",
    "relative_position_index",
    "resolve_padding",
    "shift2d",
    "shift_kernel",
    "shift_sum",
    "shift_sum_group_conv",
    "shifted_window_mask",
    "window_attention",
    "window_partition",
    "window_reverse",
]
