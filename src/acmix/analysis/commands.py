"""CLI commands of the cost analysis: ``acmix flops``, ``acmix analyze cost``, ``acmix inspect``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from acmix.cli import command

# ---------------------------------------------------------------- acmix flops


def _configure_flops(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="registered model name, e.g. acmix_resnet50")
    p.add_argument("--img-size", type=int, default=224, help="square input size (default 224)")
    p.add_argument("--per-layer", action="store_true", help="also list MACs per stage / layer")
    p.add_argument("--depth", type=int, default=2, help="module depth of --per-layer (default 2)")
    p.add_argument(
        "--paper-table",
        action="store_true",
        help="all registered backbones against the paper's table and the authors' code",
    )
    p.add_argument(
        "--recount",
        action="store_true",
        help="with --paper-table: count every model now instead of reading the recorded stats",
    )


def _count_model(name: str, img_size: int):
    import timm
    import torch

    from acmix.analysis import count_macs, count_params

    model = timm.create_model(name).eval()
    report = count_macs(model, torch.randn(1, 3, img_size, img_size))
    return model, count_params(model), report


def paper_table(recount: bool = False) -> str:
    """Markdown: every backbone with recorded stats vs the paper (and the authors' code)."""
    import acmix.models  # noqa: F401  (registers the models)
    from acmix.models import MODEL_STATS

    lines = [
        "| model | params (ours) | params (authors' code) | params (paper) | Δ params "
        "| GMACs (ours) | GFLOPs (paper) | Δ MACs | top-1 (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in MODEL_STATS.items():
        params, macs = st.params, st.macs
        if recount:
            _, params, report = _count_model(name, st.img_size)
            macs = report.total
        dp = f"{100 * (params / st.paper_params - 1):+.1f}%" if st.paper_params else "—"
        dm = f"{100 * (macs / st.paper_macs - 1):+.1f}%" if st.paper_macs else "—"
        official = f"{st.official_params:,}" if st.official_params else "—"
        paper_p = f"{st.paper_params / 1e6:.1f}M" if st.paper_params else "—"
        paper_m = f"{st.paper_macs / 1e9:.1f}" if st.paper_macs else "—"
        top1 = f"{st.paper_top1:.1f}" if st.paper_top1 else "—"
        lines.append(
            f"| {name} | {params:,} | {official} | {paper_p} | {dp} | {macs / 1e9:.2f} "
            f"| {paper_m} | {dm} | {top1} |"
        )
    return "\n".join(lines)


@command("flops", "parameters and multiply-adds of a model, or the paper's table")(_configure_flops)
def flops(args: argparse.Namespace) -> int:
    import timm

    import acmix.models  # noqa: F401
    from acmix.models import MODEL_STATS

    if args.paper_table:
        print(paper_table(args.recount))
        return 0
    if not args.model:
        print("acmix flops: give a MODEL or --paper-table", file=sys.stderr)
        return 2
    if args.model not in timm.list_models("acmix_*") and args.model not in timm.list_models():
        print(
            f"acmix flops: unknown model {args.model!r}; see `acmix list-models`", file=sys.stderr
        )
        return 2
    _, params, report = _count_model(args.model, args.img_size)
    print(f"{args.model} at {args.img_size}×{args.img_size}:")
    print(f"  params  {params:,}")
    line = f"  MACs    {report.total / 1e9:.3f} G"
    st = MODEL_STATS.get(args.model)
    if st is not None and st.paper_macs and args.img_size == st.img_size:
        delta = 100 * (report.total / st.paper_macs - 1)
        line += f"   (paper {st.paper_macs / 1e9:.1f} G, {delta:+.1f}%)"
    print(line)
    if args.per_layer:
        print("\n| module | GMACs | share |\n|---|---|---|")
        for name, macs in report.by_module.items():
            if name and name.count(".") < args.depth and macs:
                print(f"| {name} | {macs / 1e9:.4f} | {100 * macs / report.total:.1f}% |")
    return 0


# --------------------------------------------------------- acmix analyze cost


def _configure_analyze(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    c = sub.add_parser(
        "cost",
        help="the paper's Table 1: stage I vs stage II, analytic and counted",
        description="The paper's Table 1 (stage I vs stage II params / MACs, analytic next to "
        "counted) for C = 64..512 at 56²..7², as markdown, CSV and a PNG plot; or, with "
        "--in/--out, ACmix vs the k×k conv it replaces.",
    )
    c.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256, 512])
    c.add_argument("--sizes", type=int, nargs="+", default=[56, 28, 14, 7])
    c.add_argument("--heads", type=int, default=4)
    c.add_argument("--kernel-att", type=int, default=7)
    c.add_argument("--kernel-conv", type=int, default=3)
    c.add_argument("--time", action="store_true", help="also time each stage on this machine")
    c.add_argument("--out-dir", type=Path, default=None, help="write cost.md, cost.csv, cost.png")
    c.add_argument("--in", dest="in_planes", type=int, default=None, help="compare: C_in")
    c.add_argument("--out", dest="out_planes", type=int, default=None, help="compare: C_out")
    c.add_argument("--kernel", type=int, default=3, help="compare: conv kernel")
    c.add_argument("--size", type=int, default=56, help="compare: map size")
    c.add_argument("--stride", type=int, default=1, help="compare: stride")


@command("analyze", "cost analysis tables and plots (see `acmix analyze cost --help`)")(
    _configure_analyze
)
def analyze(args: argparse.Namespace) -> int:
    from acmix.analysis.cost import (
        compare_with_conv,
        cost_table,
        format_cost_csv,
        format_cost_markdown,
        plot_cost,
    )

    if args.in_planes is not None or args.out_planes is not None:
        if args.in_planes is None or args.out_planes is None:
            print("acmix analyze cost: give both --in and --out", file=sys.stderr)
            return 2
        print(
            compare_with_conv(
                args.in_planes,
                args.out_planes,
                args.kernel,
                args.size,
                heads=args.heads,
                kernel_att=args.kernel_att,
                stride=args.stride,
            )
        )
        return 0
    rows = cost_table(
        tuple(args.channels),
        tuple(args.sizes),
        heads=args.heads,
        kernel_att=args.kernel_att,
        kernel_conv=args.kernel_conv,
        measure_time=args.time,
    )
    table = format_cost_markdown(rows)
    print(table)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "cost.md").write_text(table + "\n")
        (args.out_dir / "cost.csv").write_text(format_cost_csv(rows))
        png = plot_cost(rows, args.out_dir / "cost.png")
        print(f"\nwrote {args.out_dir / 'cost.md'}, {args.out_dir / 'cost.csv'}, {png}")
    return 0


# -------------------------------------------------------------- acmix inspect


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help="weights (.safetensors / .pt / .pth)")
    p.add_argument("--model", help="registered model name: also measure |α·F_att| vs |β·F_conv|")
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="architecture kwarg for --model (Python literal), repeatable",
    )
    p.add_argument("--images", type=Path, nargs="*", default=[], help="image files or folders")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--plot", type=Path, default=None, help="write the α/β-by-depth PNG here")


def _load_images(paths: list[Path], size: int, in_chans: int):
    import torch
    from PIL import Image, UnidentifiedImageError

    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(
                f for f in p.rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"}
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no image or folder at {p}")
    if not files:
        raise ValueError(f"no images found in {[str(p) for p in paths]}")
    batch = []
    for f in files[:64]:
        try:
            img = Image.open(f).convert("L" if in_chans == 1 else "RGB").resize((size, size))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {f}: {exc}") from exc
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).float() / 255.0
        t = t.view(size, size, -1).permute(2, 0, 1)
        batch.append((t - 0.45) / 0.225)
    return torch.stack(batch)


@command("inspect", "α / β of every ACmix layer in a checkpoint (table + plot by depth)")(
    _configure_inspect
)
def inspect_cmd(args: argparse.Namespace) -> int:

    from acmix.analysis.inspect import (
        format_rates,
        load_state_dict_file,
        path_contributions,
        plot_rates,
        rates_from_state_dict,
    )

    try:
        sd = load_state_dict_file(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        print(f"acmix inspect: error: {exc}", file=sys.stderr)
        return 1
    rows = rates_from_state_dict(sd)
    if not rows:
        print(f"acmix inspect: {args.checkpoint} has no ACmix layers (no rate1/rate2 keys)")
        return 1
    if args.model:
        import timm

        import acmix.models  # noqa: F401
        from acmix.cli import parse_model_args

        kwargs = parse_model_args(args.model_arg, "inspect")
        if kwargs is None:
            return 2
        model = timm.create_model(args.model, **kwargs)
        model.load_state_dict(sd)
        in_chans = (
            model.pretrained_cfg.get("input_size", (3,))[0]
            if kwargs.get("in_chans") is None
            else kwargs["in_chans"]
        )
        try:
            if args.images:
                images = _load_images(args.images, args.img_size, in_chans)
            else:
                print("acmix inspect: --model given without --images; nothing to measure")
                images = None
        except (FileNotFoundError, ValueError) as exc:
            print(f"acmix inspect: error: {exc}", file=sys.stderr)
            return 1
        if images is not None:
            rows = path_contributions(model, images)
    print(format_rates(rows))
    if args.plot:
        print(f"\nwrote {plot_rates(rows, args.plot, title=str(args.checkpoint.name))}")
    return 0
