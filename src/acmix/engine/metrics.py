"""Run outputs: ``metrics.csv``, ``alpha_beta.csv``, TensorBoard events and PNG plots.

Only rank 0 writes. TensorBoard and matplotlib are optional: without them
the run goes on and says once what it skipped.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from acmix.analysis.inspect import mix_weights
from acmix.analysis.plotting import pyplot, save_figure

__all__ = ["MetricsLogger", "alpha_beta", "plot_alpha_beta", "plot_curves", "read_csv"]


def alpha_beta(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer name: (α, β)}`` of every ACmix layer (``rate1``, ``rate2``) in ``model``.

    Args:
        model: any module.

    Returns:
        :func:`acmix.analysis.inspect.mix_weights` as a mapping.
    """
    return {r.layer: (r.alpha, r.beta) for r in mix_weights(model)}


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV file written by :class:`MetricsLogger`."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class MetricsLogger:
    """Run logs (rank 0 only), each also mirrored to TensorBoard.

    * ``metrics.csv``: one row per epoch (:attr:`FIELDS`);
    * ``steps.csv``: every ``log_every`` steps: loss and top-1 over the last
      interval, learning rate, images/s;
    * ``alpha_beta.csv``: α and β of every ACmix layer at step 0, at each
      logged step and at each epoch end.

    Args:
        out_dir: the run directory.
        tensorboard: write TensorBoard events to ``out_dir/tb`` if the package is installed.
        enabled: ``False`` on ranks other than 0 (everything is a no-op).
    """

    FIELDS = (
        "epoch",
        "step",
        "lr",
        "train_loss",
        "train_top1",
        "val_loss",
        "val_top1",
        "val_top5",
        "ema_val_top1",
        "images_per_s",
        "epoch_time_s",
    )
    STEP_FIELDS = ("step", "epoch", "loss", "top1", "lr", "images_per_s")
    AB_FIELDS = ("step", "epoch", "layer", "alpha", "beta")

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = True, enabled: bool = True):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        self.metrics_path = self.out_dir / "metrics.csv"
        self.steps_path = self.out_dir / "steps.csv"
        self.alpha_beta_path = self.out_dir / "alpha_beta.csv"
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:
                print("tensorboard is not installed: no TensorBoard events", file=sys.stderr)

    def _append(self, path: Path, fields: Sequence[str], rows: list[Mapping[str, Any]]) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
            if new:
                w.writeheader()
            for row in rows:
                w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after global ``step`` (a resumed run writes them again)."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.steps_path, self.alpha_beta_path):
            if path.exists():
                rows = read_csv(path)
                keep = [r for r in rows if int(r["step"]) <= step]
                if len(keep) != len(rows):
                    fields = list(rows[0].keys())
                    path.unlink()
                    self._append(path, fields, keep)

    def _log_alpha_beta(self, step: int, epoch: float, model: nn.Module) -> None:
        ab = alpha_beta(model)
        self._append(
            self.alpha_beta_path,
            self.AB_FIELDS,
            [
                {"step": step, "epoch": epoch, "layer": k, "alpha": a, "beta": b}
                for k, (a, b) in ab.items()
            ],
        )
        if self.tb is not None:
            for k, (a, b) in ab.items():
                self.tb.add_scalar(f"alpha/{k}", a, step)
                self.tb.add_scalar(f"beta/{k}", b, step)

    def log_start(self, model: nn.Module) -> None:
        """α, β at initialisation (step 0)."""
        if self.enabled:
            self._log_alpha_beta(0, 0.0, model)

    def log_step(
        self, step: int, epoch: float, values: Mapping[str, float], model: nn.Module
    ) -> None:
        """A ``steps.csv`` row (``loss``, ``top1``, ``lr``, ``images_per_s``) and α, β."""
        if not self.enabled:
            return
        self._append(self.steps_path, self.STEP_FIELDS, [{"step": step, "epoch": epoch, **values}])
        self._log_alpha_beta(step, epoch, model)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"step/{k}", v, step)

    def log_epoch(self, row: Mapping[str, Any], model: nn.Module) -> None:
        """One ``metrics.csv`` row plus the current α, β of each ACmix layer."""
        if not self.enabled:
            return
        self._append(self.metrics_path, self.FIELDS, [row])
        self._log_alpha_beta(int(row["step"]), float(row["epoch"]), model)
        if self.tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _pyplot():
    try:
        return pyplot()
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return None


def plot_curves(runs: Mapping[str, str | os.PathLike], path: str | os.PathLike) -> Path | None:
    """Training loss over steps and validation top-1 of one or more runs.

    Args:
        runs: ``{label: run directory}`` (its ``steps.csv`` and ``metrics.csv``).
        path: output PNG.

    Returns:
        The PNG path, or ``None`` without matplotlib.

    The right panel shows validation top-1 per epoch, or a bar per run when
    every run has a single evaluation.
    """
    plt = _pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    finals: dict[str, float] = {}
    many = False
    for label, run in runs.items():
        run = Path(run)
        if (run / "steps.csv").exists():
            rows = read_csv(run / "steps.csv")
            ax1.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label=label)
        epochs = read_csv(run / "metrics.csv") if (run / "metrics.csv").exists() else []
        val = [(float(r["epoch"]), float(r["val_top1"])) for r in epochs if r["val_top1"]]
        if val:
            finals[label] = val[-1][1]
            if len(val) > 1:
                many = True
                ax2.plot(*zip(*val, strict=True), marker="o", label=label)
    ax1.set(xlabel="step", ylabel="training loss", title="training loss")
    ax1.grid(alpha=0.3)
    if ax1.get_lines():
        ax1.legend()
    if many:
        ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
        ax2.legend()
    elif finals:
        bars = ax2.bar(
            list(finals), list(finals.values()), color=["C0", "C1", "C2", "C3"][: len(finals)]
        )
        ax2.bar_label(bars, fmt="%.2f")
        ax2.set_ylim(0, 100)  # from 0: a cut axis exaggerates the gaps between runs
        ax2.set(ylabel="top-1 (%)", title="validation / test accuracy")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def plot_alpha_beta(csv_path: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """α and β of each ACmix layer: final values per layer, and their course over training.

    Args:
        csv_path: a run's ``alpha_beta.csv``.
        path: output PNG.

    Returns:
        The PNG path, or ``None`` without matplotlib or without ACmix layers.
    """
    rows = read_csv(csv_path) if Path(csv_path).exists() else []
    plt = _pyplot() if rows else None
    if plt is None:
        return None
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    last = max(int(r["step"]) for r in rows)
    final = {
        r["layer"]: (float(r["alpha"]), float(r["beta"])) for r in rows if int(r["step"]) == last
    }
    stages = [_stage_of(k) for k in layers]
    stage_names = list(dict.fromkeys(stages))
    colour = {st: f"C{i % 10}" for i, st in enumerate(stage_names)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(layers))
    alphas, betas = [final[k][0] for k in layers], [final[k][1] for k in layers]
    ax1.bar([i - 0.2 for i in x], alphas, 0.4, color="C0", label="α (attention)")
    ax1.bar([i + 0.2 for i in x], betas, 0.4, color="C1", label="β (convolution)")
    # One tick per layer (its index within the stage); the stage names below the ticks.
    within = [stages[:i].count(st) for i, st in enumerate(stages)]
    ax1.set_xticks(list(x), [str(w) for w in within], fontsize=7)
    for st in stage_names:
        idx = [i for i, s in enumerate(stages) if s == st]
        ax1.annotate(
            st,
            ((idx[0] + idx[-1]) / 2, 0),
            xytext=(0, -22),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
        if idx[0]:
            ax1.axvline(idx[0] - 0.5, color="grey", linewidth=0.6)
    ax1.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    top = max([*alphas, *betas, 0.5])
    ax1.set_ylim(min(0.0, *alphas, *betas), top * 1.3)  # headroom: the legend above the bars
    ax1.set(ylabel="value", title=f"α, β per ACmix layer by stage (step {last}; init 0.5)")
    ax1.legend(loc="upper center", ncol=2, fontsize=8)
    for k, st in zip(layers, stages, strict=True):
        pts = sorted(
            (int(r["step"]), float(r["alpha"]), float(r["beta"])) for r in rows if r["layer"] == k
        )
        steps, a, b = zip(*pts, strict=True)
        first = k == layers[stages.index(st)]
        ax2.plot(steps, a, color=colour[st], linewidth=1, label=st if first else None)
        ax2.plot(steps, b, linestyle="--", color=colour[st], linewidth=1)
    ax2.set(xlabel="step", ylabel="value", title="α (solid) and β (dashed) during training")
    ax2.grid(alpha=0.3)
    ax2.legend(
        fontsize=7, title="stage", title_fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5)
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def _stage_of(layer: str) -> str:
    """The stage of an ACmix layer's module name: ``layer2.0.conv2`` -> ``layer2``.

    ``stages.1.blocks.0.attn`` -> ``stages.1``; a name with neither a
    ``layer<k>`` nor a ``<name>.<k>`` prefix is its own stage.
    """
    parts = layer.split(".")
    if parts[0].startswith("layer") or len(parts) < 2 or not parts[1].isdigit():
        return parts[0]
    return ".".join(parts[:2])
