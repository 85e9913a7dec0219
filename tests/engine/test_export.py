"""ONNX export checked with onnxruntime against PyTorch: dynamic batch, and dynamic H x W."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from acmix.engine.inference import export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

#: Each export plus onnxruntime check takes 15-35 s here: CI runs them, the quick subset does not.
pytestmark = pytest.mark.slow

TINY = dict(widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_classes=10, in_chans=1)


@pytest.mark.parametrize("mixer", ["acmix", "conv", "attn"])
def test_export_dynamic_batch_and_hw(tmp_path, mixer: str) -> None:
    model = timm.create_model("acmix_tiny", mixer=mixer, stem_stride=2, **TINY).eval()
    report = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28), dynamic_hw=True)
    assert [s for s, _ in report.checks] == [(2, 1, 28, 28), (3, 1, 28, 28), (2, 1, 36, 44)]
    assert all(err < 1e-4 for _, err in report.checks)
    graph = onnx.load(str(report.path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "height", "width"]
    # An independent check with a batch and size the export never saw. (Not smaller than
    # the trace: padding_mode="auto" picks each map's border padding by its size, and the
    # trace keeps the choices made at 28x28, where every map reflects.)
    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 80, 96)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], ref, rtol=1e-4, atol=1e-5)


def test_export_static_hw_and_error_when_onnx_disagrees(tmp_path, monkeypatch) -> None:
    model = timm.create_model("acmix_tiny", stem_stride=4, **TINY).eval()
    report = export_onnx(model, tmp_path / "s.onnx", (1, 32, 32))
    assert not report.dynamic_hw and len(report.checks) == 2

    # A model whose eval output changes after export: the check must catch it.
    exported = timm.create_model("acmix_tiny", stem_stride=4, **TINY).eval()
    original_forward = exported.forward

    def exported_then_changed(x: torch.Tensor) -> torch.Tensor:
        return original_forward(x) + (0.0 if torch.jit.is_tracing() else 1.0)

    monkeypatch.setattr(exported, "forward", exported_then_changed)
    with pytest.raises(RuntimeError, match="ONNX and PyTorch differ"):
        export_onnx(exported, tmp_path / "bad.onnx", (1, 32, 32))


def test_dynamic_hw_from_a_size_where_padding_is_masked_is_refused(tmp_path) -> None:
    """At 16x16 the last mixer's 2x2 map is masked; from 25x25 on the model reflects it.

    The graph would be wrong at larger inputs (max |diff| 0.19 seen at 16x24 for an 8x8
    trace), so the export names the smallest traced size valid at every larger size.
    """
    model = timm.create_model("acmix_tiny", stem_stride=2, **TINY).eval()
    with pytest.raises(ValueError, match=r"16x16.*smallest 2x2, window 7x7.*Trace at 25x25"):
        export_onnx(model, tmp_path / "m.onnx", (1, 16, 16), dynamic_hw=True)
    report = export_onnx(model, tmp_path / "m.onnx", (1, 25, 25), dynamic_hw=True)
    assert all(err < 1e-4 for _, err in report.checks)
    assert export_onnx(model, tmp_path / "s.onnx", (1, 16, 16)).checks  # static: fine


def test_one_pixel_maps_export_without_nan(tmp_path) -> None:
    """torch.linspace(-1, 1, 1) exported to ONNX divides by zero: the grid avoids it."""
    model = timm.create_model("acmix_tiny", stem_stride=4, **TINY).eval()
    report = export_onnx(model, tmp_path / "m.onnx", (1, 8, 8))  # maps down to 1x1
    assert all(np.isfinite(err) and err < 1e-4 for _, err in report.checks)


def test_a_nan_from_onnxruntime_never_passes_the_check(tmp_path, monkeypatch) -> None:
    model = timm.create_model("acmix_tiny", stem_stride=4, **TINY).eval()
    real = ort.InferenceSession

    class NaNSession:
        def __init__(self, *args, **kwargs):
            self.sess = real(*args, **kwargs)

        def run(self, *args, **kwargs):
            return [np.full_like(o, np.nan) for o in self.sess.run(*args, **kwargs)]

    monkeypatch.setattr(ort, "InferenceSession", NaNSession)
    with pytest.raises(RuntimeError, match="onnxruntime returned NaN / inf at input"):
        export_onnx(model, tmp_path / "n.onnx", (1, 32, 32))
