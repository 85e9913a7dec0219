"""The side-by-side benchmark: measurements, ratios, targets and the ``acmix bench`` command.

Only structure and arithmetic are checked here; no timing threshold (machines are noisy).
"""

from __future__ import annotations

import json

import pytest

from acmix import benchmark as bm
from acmix.cli import main

TINY_SHAPES = ((8, 9, 1), (8, 10, 2))


def test_bench_layers_measures_every_layer_and_shape() -> None:
    results = bm.bench_layers(TINY_SHAPES, batch=2, min_time=0.0, progress=False)
    assert [(r.name, r.channels, r.size, r.stride) for r in results] == [
        (name, C, H, s) for C, H, s in TINY_SHAPES for name in ("conv2d", "acmix", "reference")
    ]
    for r in results:
        assert r.fwd_s > 0 and r.fwd_bwd_s > 0 and r.fwd_bwd_peak_bytes > 0
    table = bm.format_layer_table(results)
    assert table.count("\n") == 2 + len(results) - 1
    assert "| conv2d | 8 | 9 | 1 |" in table and "| 1.00 |" in table


def _result(name, fwd, fwd_bwd, mem, shape=(64, 56, 1)):
    return bm.LayerResult(name, *shape, fwd, fwd_bwd, mem, mem)


def test_check_targets_ratios_against_the_issue_limits() -> None:
    layers = [_result("conv2d", 1.0, 2.0, 100), _result("acmix", 1.6, 3.0, 350)]
    rows = {what: (ratio, limit, met) for what, ratio, limit, met in bm.check_targets(layers)}
    assert rows["layer fwd (C=64 H=56 s=1)"] == (pytest.approx(1.6), 1.5, False)
    assert rows["layer fwd+bwd (C=64 H=56 s=1)"] == (pytest.approx(1.5), 2.0, True)
    assert rows["layer peak memory (C=64 H=56 s=1)"] == (pytest.approx(3.5), 4.0, True)
    ours = bm.ModelResult("acmix_resnet50", 8, 224, 1.4, 0.5, 120)
    base = bm.ModelResult("torchvision resnet50", 8, 224, 1.0, 0.4, 100)
    rows = {w: (r, m) for w, r, _, m in bm.check_targets([], [(ours, base)])}
    assert rows == {
        "acmix_resnet50 train step": (pytest.approx(1.4), True),
        "acmix_resnet50 train peak memory": (pytest.approx(1.2), True),
    }  # no inference target for the ResNet
    assert "| acmix_resnet50 train step | 1.40 | 1.50 | yes |" in bm.format_targets(
        bm.check_targets([], [(ours, base)])
    )


def test_machine_name_is_a_file_slug() -> None:
    name = bm.machine_name("cpu")
    assert name.startswith("cpu_") and "thread" in name
    assert all(c.isalnum() or c == "_" for c in name)


def test_bench_command_prints_and_writes_results(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(bm, "LAYER_SHAPES", TINY_SHAPES)
    assert main(["bench", "--batch", "2", "--min-time", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "malloc=glibc mmap/trim threshold 1 GiB" in out or "malloc=default" in out
    assert "| target | measured × | must reach × | met |" in out
    stem = bm.machine_name("cpu")
    data = json.loads((tmp_path / f"{stem}_layer.json").read_text())
    assert len(data["results"]) == 3 * len(TINY_SHAPES)
    assert (tmp_path / f"{stem}_layer.md").read_text().startswith("environment: ")
