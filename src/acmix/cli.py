"""The ``acmix`` command line: every command front end lives here.

One function per subcommand; each registers itself with :func:`command`.
Run ``acmix --help`` for the list. The commands only parse arguments, call
the library (:mod:`acmix.engine`, :mod:`acmix.analysis`, :mod:`acmix.models`,
:mod:`acmix.benchmark`) and print; nothing below imports this module.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def command(name: str, help: str):
    """Register ``func(args) -> int`` as subcommand ``name``; ``configure(parser)`` adds options."""

    def wrap(configure: Callable[[argparse.ArgumentParser], None]):
        def inner(run: Callable) -> Callable:
            _COMMANDS[name] = (configure, run, help)
            return run

        return inner

    return wrap


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="acmix",
        description="ACmix: integration of self-attention and convolution (Pan et al., CVPR 2022).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (configure, _, help_text) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
    return parser


# -- options several commands share ---------------------------------------------------------------


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (``--img-size 0`` is an error, not ignored)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _finite_float(text: str, allow_zero: bool) -> float:
    import math

    bound = ">= 0" if allow_zero else "> 0"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {bound}, got {text!r}") from None
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type: a finite number > 0."""
    return _finite_float(text, allow_zero=False)


def nonnegative_float(text: str) -> float:
    """An ``argparse`` type: a finite number >= 0."""
    return _finite_float(text, allow_zero=True)


def add_model_arg(p: argparse.ArgumentParser, what: str) -> None:
    """Add the repeatable ``--model-arg KEY=VALUE`` option (read by :func:`parse_model_args`).

    Args:
        p: the subcommand's parser.
        what: the end of the help text: which model the kwargs are for, examples.
    """
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"architecture kwarg (VALUE parsed as YAML, like the overrides), repeatable; {what}",
    )


def parse_model_args(items: list[str], prog: str) -> dict | None:
    """``KEY=VALUE`` strings -> kwargs, VALUE parsed as YAML (as ``SECTION.KEY=VALUE`` is).

    ``mixer=conv`` is a string, ``num_classes=10`` an int, ``layers=[1,1,1,1]`` a
    list, ``drop=null`` ``None``. A parenthesised tuple (``layers=(1,1,1,1)``,
    the Python literal this option took before) is still read as a tuple.

    Args:
        items: the ``--model-arg`` values.
        prog: the subcommand, for the error message.

    Returns:
        The kwargs, or ``None`` after printing an error for a malformed item.
    """
    import ast
    import contextlib

    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            print(f"acmix {prog}: --model-arg expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return None
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            print(f"acmix {prog}: --model-arg {item!r}: not valid YAML ({e})", file=sys.stderr)
            return None
        if isinstance(parsed, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", parsed):
            parsed = float(parsed)  # YAML 1.1 reads 1e-3 (no dot) as a string
        elif isinstance(parsed, str) and parsed.startswith("(") and parsed.endswith(")"):
            with contextlib.suppress(ValueError, SyntaxError):
                parsed = ast.literal_eval(parsed)
        out[key] = parsed
    return out


_OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")  # SECTION.KEY[.KEY...]=VALUE


def _is_override(token: str) -> bool:
    """Whether ``token`` is a ``SECTION.KEY[.KEY...]=VALUE`` config override."""
    return _OVERRIDE.match(token) is not None


# -- model commands (acmix.models) ----------------------------------------------------------------


def _configure_list_models(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "pattern", nargs="?", default="*", help="glob over model names, e.g. '*swin*' (default *)"
    )
    p.add_argument(
        "--all", action="store_true", help="match every timm model, not only the ACmix ones"
    )


@command("list-models", "list the registered ACmix models")(_configure_list_models)
def list_models(args: argparse.Namespace) -> int:
    import timm

    ours = set(timm.list_models("acmix_*"))
    for name in timm.list_models(args.pattern):
        if args.all or name in ours:
            print(name)
    return 0


#: The help of every checkpoint argument (one resolver: acmix.engine.checkpoint.resolve_checkpoint).
CHECKPOINT_HELP = (
    "run dir, its checkpoints/ dir, a manifest or tag (.json), a .safetensors file, a "
    "config.json + model.safetensors folder, or a timm .pth.tar / .pth"
)


def _say_found(prog: str, loaded) -> None:
    """One stderr line naming what was loaded (stdout stays the command's output)."""
    if loaded.found:
        print(f"acmix {prog}: loaded {loaded.found}", file=sys.stderr)


def _configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="the authors' checkpoint (.pth / .pt / .safetensors; needs --model), or any "
        f"checkpoint that describes itself: {CHECKPOINT_HELP}",
    )
    p.add_argument(
        "dst",
        help="output .safetensors file (and DST-stem.config.json beside it), or a folder: "
        "DST/model.safetensors + DST/config.json, the layout timm's 'local-dir:DST' loads",
    )
    p.add_argument(
        "--model",
        help="registered model name, e.g. acmix_resnet50 (needed for the authors' files; "
        "must match a checkpoint that names its architecture)",
    )
    add_model_arg(p, "of the checkpoint's model, e.g. --model-arg 'layers=(1,1,1,1)'")
    p.add_argument("--ema", action="store_true", help="convert the EMA weights")


@command(
    "convert",
    "convert a checkpoint (the authors', timm's, a run's) to a self-describing safetensors file",
)(_configure_convert)
def convert(args: argparse.Namespace) -> int:
    from acmix.engine import load_checkpoint, load_model
    from acmix.engine.inference import save_described_weights
    from acmix.models.convert import CheckpointError, convert_checkpoint

    kwargs = parse_model_args(args.model_arg, "convert")
    if kwargs is None:
        return 2
    dst = Path(args.dst)
    weights_dst = dst if dst.suffix == ".safetensors" else dst / "model.safetensors"
    try:
        ck = load_checkpoint(args.src, weights_only=True, ema=args.ema)
        if ck.description is None and not args.ema:
            # The authors' checkpoints: their key names, the family's filter, --model.
            if not args.model:
                raise ValueError(
                    f"{ck.path} does not say which architecture it holds; pass --model NAME "
                    "(and --model-arg KEY=VALUE for its kwargs)"
                )
            tensors = convert_checkpoint(ck.path, weights_dst, args.model, **kwargs)
            loaded = load_model(None, args.model, kwargs)  # describes it: timm's defaults
        else:
            loaded = load_model(ck, args.model, kwargs, ema=args.ema)  # checks the fit
            _say_found("convert", loaded)
            tensors = ck.ema if args.ema and not ck.weights_are_ema else ck.weights
        step = ck.manifest.get("step")
        written = save_described_weights(
            loaded, dst, step=step if isinstance(step, int) else None, tensors=tensors
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"acmix convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written[0]} ({len(tensors)} tensors for {loaded.name}) and {written[1]}")
    return 0


# -- training / evaluation commands (acmix.engine) ------------------------------------------------

_TRAIN_EPILOG = """\
examples:
  acmix train --config fmnist_tiny                      # a packaged recipe (acmix configs list)
  acmix train --config fmnist_tiny --print-config       # the resolved recipe, as YAML
  acmix train --config fmnist_tiny model.kwargs.mixer=conv train.epochs=3
  acmix train --config imagenet_resnet --data-dir /data/imagenet model.name=acmix_resnet26
  acmix train --config fmnist_tiny --resume runs/fmnist_tiny     # continue bit-exactly
  torchrun --nproc_per_node 2 -m acmix train --config fmnist_tiny   # DDP (gloo on CPU)

Overrides are SECTION.KEY=VALUE (values parsed as YAML); sections: model, data,
aug, optim, sched, train. Unknown keys are an error naming the key. SIGINT / SIGTERM
save a checkpoint and exit with status 128 + signal number.
"""


def _flag_overrides(args: argparse.Namespace) -> list[str | tuple[str, object]]:
    """The convenience flags of ``train`` / ``eval`` as config overrides."""
    flags = {
        "model": "model.name",
        "dataset": "data.dataset",
        "data_dir": "data.data_dir",
        "epochs": "train.epochs",
        "batch_size": "data.batch_size",
        "lr": "optim.lr",
        "output": "train.output",
        "device": "train.device",
        "amp": "train.amp",
        "threads": "train.threads",
        "seed": "train.seed",
    }
    out: list[str | tuple[str, object]] = []
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.append((key, value))
    return out


def _add_common_train_flags(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--model", help="timm model name (model.name), see `acmix list-models`")
    p.add_argument(
        "--dataset",
        choices=("fashion-mnist", "digits", "folder"),
        help="data.dataset: the embedded Fashion-MNIST, scikit-learn digits, or image folders",
    )
    p.add_argument(
        "--data-dir",
        help="data.data_dir: Fashion-MNIST IDX directory, or an image-folder root with "
        "train/<class>/*.jpg and val/<class>/*.jpg",
    )
    p.add_argument("--batch-size", type=int, help="data.batch_size (global, all processes)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="train.device")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), help="train.amp")
    p.add_argument("--threads", type=int, help="train.threads: CPU threads per process")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="SECTION.KEY=VALUE",
        help=f"config overrides, anywhere on the line, e.g. {example}",
    )


def _configure_train(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _TRAIN_EPILOG
    p.add_argument(
        "--config",
        "-c",
        help="YAML recipe: a path, or a recipe name (fmnist_tiny, imagenet_resnet, ...: "
        "`acmix configs list`; ./configs/NAME.yaml first)",
    )
    p.add_argument(
        "--resume",
        help="continue from a checkpoint: run dir, checkpoints dir or manifest; "
        "'auto' resumes from OUTPUT/checkpoints when there is one",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved recipe (after the flags and overrides) as YAML and exit",
    )
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--output", "-o", help="train.output: the run directory")
    _add_common_train_flags(p, "optim.lr=0.05 model.kwargs.mixer=conv")


def _report_error(prog: str, e: BaseException) -> int:
    """Print ``e`` as the command's error; status 2 for a bad configuration, else 1."""
    print(f"acmix {prog}: error: {e}", file=sys.stderr)
    return 2 if type(e).__name__ == "ConfigError" else 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions any command reports as ``acmix CMD: error: ...`` instead of a traceback.

    Environment failures (``OSError``: a full disk, a missing or unreadable
    file) and the library's own error types, whose messages name the value,
    key or file at fault. Anything else is a bug and keeps its traceback.
    """
    from acmix.utils.config import ConfigError
    from acmix.utils.io import CheckpointError, LockError

    errors: list[type[BaseException]] = [OSError, ConfigError, CheckpointError, LockError]
    # Raised only by modules a command has imported already (importing them costs seconds).
    for module, name in (("acmix.data", "DataError"), ("acmix.engine.trainer", "NonFiniteError")):
        found = getattr(sys.modules.get(module), name, None)
        if isinstance(found, type):
            errors.append(found)
    return tuple(errors)


@command("train", "train a model from a YAML recipe (one process or torchrun / DDP)")(
    _configure_train
)
def train_cmd(args: argparse.Namespace) -> int:
    import signal

    from acmix.data import DataError
    from acmix.engine import CheckpointError, ConfigError, load_config, train

    try:
        cfg = load_config(args.config, _flag_overrides(args) + list(args.overrides))
        if args.print_config:
            import yaml

            from acmix.engine import config_to_dict

            print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            return 0
        result = train(cfg, resume=args.resume)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        return _report_error("train", e)
    if result.stopped in ("SIGINT", "SIGTERM"):
        return 128 + int(getattr(signal, result.stopped))
    if result.checkpoint is not None:
        print(f"checkpoint: {result.checkpoint}")
        if result.val:
            v = result.val
            print(
                f"final: top-1 {v['top1']:.2f}%  top-5 {v['top5']:.2f}%  loss {v['loss']:.4f}  "
                f"({v['count']} images); {result.images_per_s:.0f} train images/s"
            )
        for plot in result.plots:
            print(f"plot: {plot}")
    return 0


def _configure_configs(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="the packaged recipes, with their first comment line")
    cp = sub.add_parser(
        "cp",
        help="copy a packaged recipe to edit it",
        description="Copy a packaged recipe. Without DEST it goes to ./configs/NAME.yaml, "
        "where `acmix train --config NAME` finds it before the packaged one.",
    )
    cp.add_argument("name", metavar="NAME", help="a recipe name from `acmix configs list`")
    cp.add_argument("dest", nargs="?", help="a file or folder (default: ./configs/NAME.yaml)")
    cp.add_argument("--force", "-f", action="store_true", help="overwrite an existing file")


@command("configs", "list the packaged training recipes, or copy one to edit it")(
    _configure_configs
)
def configs_cmd(args: argparse.Namespace) -> int:
    from acmix.utils.recipes import copy_recipe, list_recipes, recipe_description

    if args.action == "list":
        names = list_recipes()
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {recipe_description(name)}".rstrip())
        return 0
    try:
        out = copy_recipe(args.name, args.dest, force=args.force)
    except (FileNotFoundError, FileExistsError) as e:
        return _report_error("configs cp", e)
    print(f"wrote {out}")
    return 0


def _configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    add_model_arg(p, "over the checkpoint's (for a file that does not describe itself)")
    p.add_argument(
        "--config", "-c", help="recipe for the data (default: the one saved in the checkpoint)"
    )
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_common_train_flags(p, "data.eval_batch_size=256 data.val_subset=1000")


@command("eval", "evaluate a checkpoint on the validation / test split")(_configure_eval)
def eval_cmd(args: argparse.Namespace) -> int:
    import json

    import torch

    from acmix.data import DataError, build_data
    from acmix.engine import (
        CheckpointError,
        ConfigError,
        apply_overrides,
        config_from_dict,
        config_to_dict,
        evaluate,
        load_config,
        load_model,
    )
    from acmix.engine.distributed import cleanup_distributed, init_distributed
    from acmix.engine.inference import eval_data, preprocessing_overrides

    kwargs = parse_model_args(args.model_arg, "eval")
    if kwargs is None:
        return 2
    try:
        loaded = load_model(args.checkpoint, args.model, kwargs, ema=args.ema)
        _say_found("eval", loaded)
        recipe = loaded.manifest.get("config")
        if args.config:
            cfg = load_config(args.config, _flag_overrides(args) + list(args.overrides))
        else:
            # No recipe saved: the defaults, with the checkpoint's input size and resizing.
            base = recipe or config_to_dict(load_config(None))
            first = [] if recipe else preprocessing_overrides(loaded)
            values = apply_overrides(base, first + _flag_overrides(args) + list(args.overrides))
            cfg = config_from_dict(values)
        info = init_distributed(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        try:
            if recipe and not args.config:  # the run's own data pipeline, as it evaluated
                data = build_data(
                    cfg.data,
                    cfg.aug,
                    getattr(loaded.model, "pretrained_cfg", None),
                    in_chans=int(loaded.data.get("in_chans", 3)),  # a grayscale model reads "L"
                )
            else:  # the checkpoint's normalisation and crop on whichever data is given
                data = eval_data(loaded, cfg.data, cfg.aug)
            if data.num_classes != getattr(loaded.model, "num_classes", data.num_classes):
                where = f" in {cfg.data.data_dir}" if cfg.data.data_dir else ""
                raise ConfigError(
                    f"the data ({cfg.data.dataset}{where}) has {data.num_classes} classes, "
                    f"the model of {args.checkpoint} {loaded.model.num_classes}"
                )
            model = loaded.model.to(info.device)
            loader = data.val_loader(
                cfg.data.eval_batch_size, info.rank, info.world_size, cfg.data.workers, info.device
            )
            amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
            metrics = evaluate(model, loader, info, amp_dtype=amp)
        finally:
            cleanup_distributed()
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError) as e:
        return _report_error("eval", e)
    if info.is_main:
        if args.json:
            print(json.dumps(metrics))
        else:
            print(
                f"{loaded.name} on {cfg.data.dataset} ({metrics['count']} images): "
                f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
                f"loss {metrics['loss']:.4f}"
            )
    return 0


def _configure_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument(
        "--model",
        help="timm model name, for a file that does not describe itself (a plain state dict); "
        "must match the checkpoint's architecture otherwise",
    )
    add_model_arg(p, "over the checkpoint's (num_classes=10, in_chans=1, ...)")
    p.add_argument(
        "--topk", type=positive_int, default=5, help="classes shown per image (default 5)"
    )
    p.add_argument("--ema", action="store_true", help="use the EMA weights")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("predict", "classify image files with a trained checkpoint")(_configure_predict)
def predict_cmd(args: argparse.Namespace) -> int:
    import json

    from acmix.engine import CheckpointError, load_model, predict_images

    kwargs = parse_model_args(args.model_arg, "predict")
    if kwargs is None:
        return 2
    try:
        loaded = load_model(args.checkpoint, args.model, kwargs, ema=args.ema)
        _say_found("predict", loaded)
        results = predict_images(loaded, args.images, args.topk)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        return _report_error("predict", e)
    if args.json:
        print(
            json.dumps(
                [
                    {"image": str(img), "top": [{"class": c, "prob": p} for c, p in res]}
                    for img, res in zip(args.images, results, strict=True)
                ]
            )
        )
        return 0
    for img, res in zip(args.images, results, strict=True):
        print(img)
        for c, prob in res:
            print(f"  {prob * 100:6.2f}%  {c}")
    return 0


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", required=True, help="the .onnx file to write")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    p.add_argument(
        "--model",
        help="timm model name (without a checkpoint: fresh weights; with one: must match "
        "its architecture)",
    )
    add_model_arg(p, "(num_classes=10, in_chans=1, mixer=conv, ...)")
    p.add_argument(
        "--img-size", type=positive_int, help="trace size (default: the checkpoint's data)"
    )
    p.add_argument(
        "--dynamic-hw",
        action="store_true",
        help="also make height / width dynamic: valid for inputs not smaller than the "
        "traced size (checked at a second, larger size); refused, naming the size to "
        "use, where some attention map is too small to reflect at the traced size",
    )
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument(
        "--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch"
    )


@command("export", "export a model to ONNX (dynamic batch), checked with onnxruntime")(
    _configure_export
)
def export_cmd(args: argparse.Namespace) -> int:
    from acmix.engine import CheckpointError, export_onnx, load_model

    if args.checkpoint is None and args.model is None:
        print("acmix export: error: give --checkpoint or --model", file=sys.stderr)
        return 2
    kwargs = parse_model_args(args.model_arg, "export")
    if kwargs is None:
        return 2
    try:
        loaded = load_model(args.checkpoint, args.model, kwargs, ema=args.ema)
        _say_found("export", loaded)
        size = args.img_size if args.img_size is not None else int(loaded.data["img_size"])
        in_chans = int(loaded.data.get("in_chans", kwargs.get("in_chans", 3)))
        report = export_onnx(
            loaded.model,
            args.output,
            (in_chans, size, size),
            dynamic_hw=args.dynamic_hw,
            opset=args.opset,
            check=not args.no_check,
        )
    except (CheckpointError, FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        return _report_error("export", e)
    print(f"wrote {report.path} (dynamic batch{', height, width' if report.dynamic_hw else ''})")
    for shape, err in report.checks:
        print(f"  onnxruntime vs torch at {shape}: max |diff| = {err:.2e}")
    return 0


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="torch device to time on (default cpu)")
    p.add_argument(
        "--batch", type=positive_int, default=8, help="batch size of every measurement (default 8)"
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: all)"
    )
    p.add_argument("--no-reference", action="store_true", help="skip the slow reference path")
    p.add_argument(
        "--models", action="store_true", help="also time acmix_resnet50 and ACmix Swin-T (minutes)"
    )
    p.add_argument(
        "--min-time",
        type=nonnegative_float,
        default=0.5,
        help="seconds per layer measurement (0: the minimum repetitions)",
    )
    p.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned (default): keep freed memory in the process, see "
        "acmix.benchmark.tune_allocator; default: the C library's behaviour",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="write DIR/<machine>_{layer,models}.{md,json}"
    )


@command("bench", "ACmix vs nn.Conv2d (and the reference path) side by side, with targets")(
    _configure_bench
)
def bench(args: argparse.Namespace) -> int:
    import json

    import torch

    from acmix import benchmark as bm

    if args.malloc == "tuned":
        bm.tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = bm.environment_line()
    print(header, flush=True)
    layers = bm.bench_layers(
        bm.LAYER_SHAPES,
        batch=args.batch,
        device=args.device,
        include_reference=not args.no_reference,
        min_time=args.min_time,
    )
    layer_table = bm.format_layer_table(layers)
    print(layer_table, flush=True)
    models = None
    if args.models:
        models = bm.bench_models(batch=args.batch, device=args.device)
        print(bm.format_model_table(models))
    targets = bm.format_targets(bm.check_targets(layers, models))
    print(targets)
    if args.out:
        stem = args.out / bm.machine_name(args.device)
        args.out.mkdir(parents=True, exist_ok=True)
        _write_text(stem.with_name(stem.name + "_layer.md"), f"{header}\n\n{layer_table}\n")
        _write_text(stem.with_name(stem.name + "_layer.json"), bm.results_json(layers))
        if models is not None:
            body = f"{header}\n\n{bm.format_model_table(models)}\n\n{targets}\n"
            _write_text(stem.with_name(stem.name + "_models.md"), body)
            data = [{"ours": vars(o), "baseline": vars(b)} for o, b in models]
            _write_text(stem.with_name(stem.name + "_models.json"), json.dumps(data, indent=2))
        print(f"wrote {stem}_*")
    return 0


def _write_text(path: Path, text: str) -> None:
    from acmix.utils.io import atomic_write_text

    atomic_write_text(path, text)


# -- analysis commands (acmix.analysis): flops ----------------------------------------------------


def _configure_flops(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="registered model name, e.g. acmix_resnet50")
    p.add_argument(
        "--img-size", type=positive_int, default=224, help="square input size (default 224)"
    )
    p.add_argument("--per-layer", action="store_true", help="also list MACs per stage / layer")
    p.add_argument(
        "--depth", type=positive_int, default=2, help="module depth of --per-layer (default 2)"
    )
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


@command("flops", "parameters and multiply-adds of a model, or the paper's table")(_configure_flops)
def flops(args: argparse.Namespace) -> int:
    import timm

    from acmix.analysis.paper import count_model, paper_table
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
    model, params, report = count_model(args.model, args.img_size)
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
        order = [name for name, _ in model.named_modules()]  # a parent before its children
        rank = {name: i for i, name in enumerate(order)}
        rows = sorted(report.by_module.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        for name, macs in rows:
            if name and name.count(".") < args.depth and macs:
                print(f"| {name} | {macs / 1e9:.4f} | {100 * macs / report.total:.1f}% |")
    return 0


# -- analyze cost ---------------------------------------------------------------------------------


def _configure_analyze(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    c = sub.add_parser(
        "cost",
        help="the paper's Table 1: stage I vs stage II, analytic and counted",
        description="The paper's Table 1 (stage I vs stage II params / MACs, analytic next to "
        "counted) for C = 64..512 at 56²..7², as markdown, CSV and a PNG plot; or, with "
        "--in/--out, ACmix vs the k×k conv it replaces.",
    )
    c.add_argument(
        "--channels",
        type=positive_int,
        nargs="+",
        default=[64, 128, 256, 512],
        help="channel counts C, the table's rows (default 64 128 256 512)",
    )
    c.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=[56, 28, 14, 7],
        help="square map sizes H = W, the table's columns (default 56 28 14 7)",
    )
    c.add_argument("--num-heads", type=int, default=4, help="attention heads N")
    c.add_argument("--kernel-att", type=int, default=7, help="attention window k_att (default 7)")
    c.add_argument(
        "--kernel-conv", type=int, default=3, help="convolution kernel k_conv (default 3)"
    )
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
                num_heads=args.num_heads,
                kernel_att=args.kernel_att,
                stride=args.stride,
            )
        )
        return 0
    rows = cost_table(
        tuple(args.channels),
        tuple(args.sizes),
        num_heads=args.num_heads,
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


# -- inspect --------------------------------------------------------------------------------------


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", type=Path, help=f"weights: {CHECKPOINT_HELP}")
    p.add_argument(
        "--model",
        help="registered model name, for a file that does not describe itself: also measure "
        "|α·F_att| vs |β·F_conv| on --images",
    )
    add_model_arg(p, "over the checkpoint's (for --model)")
    p.add_argument("--ema", action="store_true", help="inspect the EMA weights")
    p.add_argument("--images", type=Path, nargs="*", default=[], help="image files or folders")
    p.add_argument(
        "--img-size",
        type=positive_int,
        default=None,
        help="side the --images are resized to (default: the checkpoint's input size)",
    )
    p.add_argument("--plot", type=Path, default=None, help="write the α/β-by-depth PNG here")


def _load_images(paths: list[Path], loaded, size: int | None):
    """The first 64 images under ``paths``, preprocessed as the checkpoint says."""
    from acmix.engine.inference import read_images

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
    return read_images(files[:64], loaded, size)


@command("inspect", "α / β of every ACmix layer in a checkpoint (table + plot by depth)")(
    _configure_inspect
)
def inspect_cmd(args: argparse.Namespace) -> int:
    from acmix.analysis.inspect import (
        format_rates,
        path_contributions,
        plot_rates,
        rates_from_state_dict,
    )
    from acmix.engine import CheckpointError, load_checkpoint, load_model

    kwargs = parse_model_args(args.model_arg, "inspect")
    if kwargs is None:
        return 2
    loaded = None
    try:
        ck = load_checkpoint(args.checkpoint, weights_only=True, ema=args.ema)
        if args.model or args.ema or (args.images and ck.description is not None):
            loaded = load_model(ck, args.model, kwargs, ema=args.ema)
            _say_found("inspect", loaded)
            sd = loaded.model.state_dict()
        else:
            about = f": {ck.description.summary()}" if ck.description is not None else ""
            print(f"acmix inspect: loaded {ck.summary()}{about}", file=sys.stderr)
            sd = ck.weights
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"acmix inspect: error: {exc}", file=sys.stderr)
        return 1
    rows = rates_from_state_dict(sd)
    if not rows:
        print(f"acmix inspect: {args.checkpoint} has no ACmix layers (no rate1/rate2 keys)")
        return 1
    if args.images and loaded is None:
        print(
            "acmix inspect: --images needs the model: pass --model NAME (the file does not "
            "describe itself); showing the stored α / β only"
        )
    elif loaded is not None:
        try:
            if args.images:
                images = _load_images(args.images, loaded, args.img_size)
            else:
                print("acmix inspect: no --images given; nothing to measure")
                images = None
        except (FileNotFoundError, ValueError) as exc:
            print(f"acmix inspect: error: {exc}", file=sys.stderr)
            return 1
        if images is not None:
            rows = path_contributions(loaded.model, images)
    print(format_rates(rows))
    if args.plot:
        print(f"\nwrote {plot_rates(rows, args.plot, title=str(args.checkpoint.name))}")
    return 0


# -- entry point ----------------------------------------------------------------------------------


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the ``acmix`` command line (default ``sys.argv[1:]``); imports nothing heavy.

    ``--help``, no command, and usage errors exit here (argparse's ``SystemExit``), so
    the console script (:mod:`_acmix_launcher`) answers them before torch is imported.
    """
    parser = build_parser()
    # SECTION.KEY=VALUE overrides may stand anywhere on the line, between options too
    # (`train -c r train.epochs=1 --seed 1 data.batch_size=64`): argparse leaves those after
    # the first option as unknown; they join the overrides in the order given.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        extra = [t for t in unknown if _is_override(t)]
        rest = [t for t in unknown if not _is_override(t)]
        if rest or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(rest or unknown)}")
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        parser.exit(0)
    return args


def run_command(args: argparse.Namespace) -> int:
    """Run the command :func:`parse_command_line` parsed; user errors become one line and 1."""
    _, run, _ = _COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except Exception as e:
        if isinstance(e, _user_errors()):
            return _report_error(args.command, e)
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m acmix``: :func:`parse_command_line`, then :func:`run_command`.

    Returns:
        The command's exit status (help and usage errors exit from argparse).
    """
    return run_command(parse_command_line(argv))


if __name__ == "__main__":
    sys.exit(main())
