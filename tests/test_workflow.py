"""A researcher's workflow (issue 13): packaged recipes, overrides anywhere, a built wheel."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import acmix.engine
from acmix.cli import build_parser, main, parse_model_args
from acmix.engine import load_config
from acmix.utils.recipes import copy_recipe, find_recipe, list_recipes, packaged_recipe_dir
from tests.data_util import make_fake_fmnist

ROOT = Path(__file__).resolve().parents[1]


# -- recipes are package data ------------------------------------------------------------------


def test_recipes_are_package_data() -> None:
    src = packaged_recipe_dir()
    assert src == ROOT / "src" / "acmix" / "configs"
    assert {"fmnist_tiny", "fmnist_tiny_quick", "imagenet_resnet"} <= set(list_recipes())
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"configs/*.yaml"' in pyproject  # shipped in the wheel
    # The checkout's configs/ is the same folder.
    assert (ROOT / "configs").resolve() == src


def test_configs_list_and_cp(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["configs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("fmnist_tiny_quick ") for line in lines)
    assert main(["configs", "cp", "fmnist_tiny_quick"]) == 0
    copied = tmp_path / "configs" / "fmnist_tiny_quick.yaml"
    assert copied.read_text() == (packaged_recipe_dir() / "fmnist_tiny_quick.yaml").read_text()
    # The local copy is found first by the bare name, so editing it changes the run.
    copied.write_text(copied.read_text().replace("epochs: 1", "epochs: 7"))
    assert find_recipe("fmnist_tiny_quick") == copied
    assert load_config("fmnist_tiny_quick").train.epochs == 7
    # No overwrite without --force; unknown names list the known ones.
    assert main(["configs", "cp", "fmnist_tiny_quick"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main(["configs", "cp", "fmnist_tiny_quick", "--force"]) == 0
    assert main(["configs", "cp", "nope"]) == 1
    assert "fmnist_tiny" in capsys.readouterr().err
    out = copy_recipe("digits_tiny", tmp_path)  # a folder as the destination
    assert out == tmp_path / "digits_tiny.yaml"


def test_missing_recipe_names_the_packaged_ones(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="packaged recipes: .*fmnist_tiny"):
        load_config("no_such_recipe")


def test_print_config(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["train", "-c", "fmnist_tiny_quick", "--seed", "3", "train.epochs=2", "--print-config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["seed"] == 3 and printed["train"]["epochs"] == 2
    assert printed["model"]["kwargs"] == {"stem_stride": 2, "mixer": "acmix"}
    assert not (tmp_path / "runs").exists()  # nothing trained


# -- overrides anywhere, --model-arg as YAML ---------------------------------------------------


def test_overrides_anywhere_on_the_line(monkeypatch) -> None:
    seen = {}

    def fake_train(cfg, resume=None):
        seen["cfg"] = cfg
        return SimpleNamespace(stopped=None, checkpoint=None)

    monkeypatch.setattr(acmix.engine, "train", fake_train)
    argv = ["train", "--config", "fmnist_tiny", "train.epochs=1", "--seed", "1"]
    assert main([*argv, "data.batch_size=64", "--lr", "0.2", "train.epochs=4"]) == 0
    cfg = seen["cfg"]
    assert (cfg.train.epochs, cfg.train.seed, cfg.data.batch_size, cfg.optim.lr) == (4, 1, 64, 0.2)
    with pytest.raises(SystemExit):
        main([*argv, "--no-such-flag"])
    with pytest.raises(SystemExit):
        main(["list-models", "train.epochs=1", "--bogus"])


def test_model_arg_is_yaml(capsys) -> None:
    got = parse_model_args(
        ["mixer=conv", "num_classes=10", "layers=[1, 1, 2, 1]", "drop=null", "lr=1e-3"], "t"
    )
    want = {"mixer": "conv", "num_classes": 10, "layers": [1, 1, 2, 1], "drop": None, "lr": 1e-3}
    assert got == want
    assert parse_model_args(["layers=(1,1,1,1)"], "t") == {"layers": (1, 1, 1, 1)}  # as before
    assert parse_model_args(["flag=true"], "t") == {"flag": True}
    assert parse_model_args(["x=[1,"], "t") is None
    assert "not valid YAML" in capsys.readouterr().err


# -- the README's first command from a built wheel, outside the checkout ----------------------


@pytest.mark.slow
def test_wheel_trains_a_packaged_recipe_outside_the_checkout(tmp_path) -> None:
    """Build the wheel, install it (no deps) in a fresh venv that sees this one's packages."""
    src = tmp_path / "src"  # a copy: the build leaves the checkout untouched
    shutil.copytree(
        ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)]
    subprocess.run(build, check=True, cwd=tmp_path, timeout=300)
    (wheel,) = wheels.glob("acmix-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    vpy = bin_dir / "python"
    site = subprocess.run(
        [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # torch, timm, ... from this environment (appended to sys.path: the wheel comes first).
    Path(site, "_project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [*pip, "--python", str(vpy), "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(install, check=True, timeout=300)

    work = tmp_path / "elsewhere"
    data = make_fake_fmnist(work / "fmnist", n_train=64, n_test=20)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [vpy, "-c", "import acmix, _acmix_launcher as l; print(acmix.__file__, l.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert all(Path(f).is_relative_to(venv) for f in where.split()), where  # + the launcher
    cmd = [
        str(bin_dir / "acmix"), "train", "--config", "fmnist_tiny_quick",
        "train.stop_after_steps=2", "--data-dir", str(data), "data.train_subset=null",
        "data.batch_size=16", "train.threads=1", "train.progress=false", "train.plots=false",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (work / "runs" / "fmnist_tiny_quick" / "checkpoints").is_dir()
    assert "recipe not found" not in run.stderr


# -- the smaller items: list-models, flops order, help texts ----------------------------------


def test_list_models_pattern_lists_only_acmix_models(capsys) -> None:
    assert main(["list-models", "*swin*"]) == 0
    names = capsys.readouterr().out.split()
    assert names and all(n.startswith("acmix_") for n in names)
    assert main(["list-models", "*swin*", "--all"]) == 0
    assert "swin_tiny_patch4_window7_224" in capsys.readouterr().out.split()


def test_flops_per_layer_lists_a_parent_before_its_children(capsys) -> None:
    argv = ["flops", "acmix_resnet26", "--img-size", "32", "--per-layer"]
    assert main(argv) == 0
    rows = [line.split(" | ")[0].strip("| ") for line in capsys.readouterr().out.splitlines()]
    rows = [r for r in rows if r.startswith("layer")]
    assert rows.index("layer2") < rows.index("layer2.0") < rows.index("layer3")


def _actions(parser: argparse.ArgumentParser, prog: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prog} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield prog, action


def test_every_option_has_help_text_and_eval_help_names_no_training_keys(capsys) -> None:
    missing = [
        f"{prog} {'/'.join(a.option_strings) or a.dest}"
        for prog, a in _actions(build_parser(), "acmix")
        if not a.help
    ]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "optim.lr=" not in text and "data.eval_batch_size=" in text


def test_demo_on_sigterm_exits_cleanly_without_a_resume_hint(tmp_path, monkeypatch, capsys) -> None:
    from acmix import demo_train

    def stopped_train(cfg, log=print):
        log("stopped (SIGTERM) at step 3; resume with --resume somewhere/checkpoints")
        return SimpleNamespace(stopped="SIGTERM", val={}, checkpoint=None)

    monkeypatch.setattr(demo_train, "train", stopped_train)
    data = make_fake_fmnist(tmp_path / "d", n_train=16, n_test=10)
    argv = ["--data-dir", str(data), "--train-images", "16", "-o", str(tmp_path / "out")]
    assert demo_train.main([*argv, "--threads", "1", "--quiet"]) == 128 + 15
    captured = capsys.readouterr()
    assert "stopped (SIGTERM) at step 3" in captured.out
    assert "resume with" not in captured.out
    assert "has no --resume: run it again" in captured.err


def test_no_progress_bar_redraws_in_a_non_tty_log(tmp_path, capsys) -> None:
    data = make_fake_fmnist(tmp_path / "d", n_train=32, n_test=10)
    argv = ["train", "-c", "fmnist_tiny", "--data-dir", str(data), "-o", str(tmp_path / "run")]
    tiny = ["model.kwargs={stem_stride: 2, widths: [8, 8, 8, 8], depths: [1, 1, 1, 1]}"]
    flags = ["data.batch_size=16", "train.threads=1", "train.tensorboard=false"]
    assert main([*argv, *tiny, *flags, "train.plots=false", "train.log_every=1"]) == 0
    captured = capsys.readouterr()  # pytest's capture is not a terminal
    assert "\r" not in captured.err + captured.out
    assert "epoch 1 step 1/2" in captured.out


def test_imagenet_recipes_size_their_loader_workers_to_the_machine(monkeypatch) -> None:
    from acmix.data.loader import auto_workers

    for name in ("imagenet_resnet", "imagenet_swin_tiny", "imagenet_swin_small"):
        assert load_config(name).data.workers is None  # no machine-specific count
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert auto_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_workers() == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert auto_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert auto_workers() == 0
