"""The plots read honestly: axes from 0, legends clear of the data, layers named (issue 13)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from acmix.analysis import cost, inspect
from acmix.analysis.inspect import LayerRates
from acmix.engine import metrics

RESNET50 = [f"layer{s}.{b}.conv2" for s, n in enumerate((3, 4, 6, 3), 1) for b in range(n)]


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions save (kept open to inspect)."""
    saved: list = []

    def keep(fig, path, dpi=100):
        saved.append(fig)
        return Path(path)

    for module in (metrics, inspect, cost):
        monkeypatch.setattr(module, "save_figure", keep)
    return saved


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, header)
        w.writeheader()
        w.writerows(rows)


def test_accuracy_bars_start_at_zero(tmp_path, figures) -> None:
    runs = {}
    for name, top1 in (("acmix", 88.0), ("conv", 89.0)):
        run = tmp_path / name
        run.mkdir()
        _write_csv(run / "metrics.csv", ["epoch", "val_top1"], [{"epoch": 1, "val_top1": top1}])
        runs[name] = run
    metrics.plot_curves(runs, tmp_path / "comparison.png")
    assert figures[0].axes[1].get_ylim() == (0.0, 100.0)


def test_alpha_beta_is_labelled_by_stage_and_scales_to_resnet50(tmp_path, figures) -> None:
    rows = [
        {"step": s, "epoch": s / 10, "layer": k, "alpha": 0.5 + s * 0.01 * i, "beta": 0.5}
        for s in (0, 10)
        for i, k in enumerate(RESNET50)
    ]
    _write_csv(tmp_path / "ab.csv", ["step", "epoch", "layer", "alpha", "beta"], rows)
    metrics.plot_alpha_beta(tmp_path / "ab.csv", tmp_path / "ab.png")
    bars, course = figures[0].axes
    assert len(bars.get_xticks()) == 16
    labels = [t.get_text() for t in course.get_legend().get_texts()]
    assert labels == ["layer1", "layer2", "layer3", "layer4"]  # one entry per stage
    assert bars.get_ylim()[1] > 1.25 * max(r["alpha"] for r in rows)  # room for the legend
    assert metrics._stage_of("stages.1.blocks.0.attn") == "stages.1"


def test_inspect_plot_names_each_layer_at_an_integer_tick(tmp_path, figures) -> None:
    rows = [LayerRates(k, 0.5 + 0.1 * math.sin(i), 0.5) for i, k in enumerate(RESNET50)]
    inspect.plot_rates(rows, tmp_path / "rates.png")
    ax = figures[0].axes[0]
    assert list(ax.get_xticks()) == list(range(16))
    assert [t.get_text() for t in ax.get_xticklabels()] == RESNET50


def test_cost_legend_sits_below_the_panels_and_every_curve_is_marked(tmp_path, figures) -> None:
    rows = cost.cost_table((64, 128), (14, 7))
    cost.plot_cost(rows, tmp_path / "cost.png")
    fig = figures[0]
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    stage2 = [line for line in fig.axes[-1].get_lines() if line.get_linestyle() == "-"]
    assert len({line.get_marker() for line in stage2}) == len(stage2)  # coinciding curves show
