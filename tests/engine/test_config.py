"""Recipes: every YAML in configs/ loads, the paper's recipes match the paper, errors name keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm

from acmix.engine.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))


def test_there_are_recipes() -> None:
    names = {p.stem for p in RECIPES}
    assert {"fmnist_tiny", "imagenet_resnet", "imagenet_swin_tiny", "imagenet_swin_small"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_names_a_registered_model(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.name in timm.list_models("acmix_*")
    # Round trip through plain values (what a checkpoint manifest stores).
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_bare_recipe_name_is_found_in_configs(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # not the checkout: falls back to the source tree's configs/
    assert load_config("fmnist_tiny") == load_config(CONFIGS / "fmnist_tiny.yaml")
    with pytest.raises(FileNotFoundError, match="no_such_recipe"):
        load_config("no_such_recipe")


def test_resnet_recipe_is_the_papers() -> None:
    cfg = load_config(CONFIGS / "imagenet_resnet.yaml")
    o, s, a = cfg.optim, cfg.sched, cfg.aug
    assert (o.name, o.lr, o.lr_base_batch, o.momentum, o.weight_decay) == (
        "sgd",
        0.1,
        256,
        0.9,
        1e-4,
    )
    assert (s.name, s.warmup_epochs) == ("cosine", 5.0)
    assert a.label_smoothing == 0.1 and cfg.data.batch_size == 256


@pytest.mark.parametrize(("name", "drop_path"), [("tiny", 0.2), ("small", 0.3)])
def test_swin_recipes_are_the_papers(name: str, drop_path: float) -> None:
    cfg = load_config(CONFIGS / f"imagenet_swin_{name}.yaml")
    o, s, a = cfg.optim, cfg.sched, cfg.aug
    assert cfg.model.name == f"acmix_swin_{name}_patch4_window7_224"
    assert (o.name, o.lr, o.lr_base_batch, o.weight_decay) == ("adamw", 1e-3, 1024, 0.05)
    assert o.decay_1d is False and o.grad_clip == 5.0
    assert (cfg.train.epochs, s.warmup_epochs, s.name) == (300, 20.0, "cosine")
    assert a.auto_augment.startswith("rand-m9")
    assert (a.mixup, a.cutmix, a.re_prob, a.label_smoothing) == (0.8, 1.0, 0.25, 0.1)
    assert cfg.model.drop_path_rate == drop_path


def test_unknown_keys_are_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'.*'lr'"):
        config_from_dict({"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match="unknown config section 'optimizer'"):
        config_from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epoch'"):
        load_config(None, ["train.epoch=3"])


def test_unknown_key_in_a_recipe_file_is_named(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  batch_sise: 32\n")
    with pytest.raises(ConfigError, match=r"data\.batch_sise"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.epochs=two", r"train\.epochs: expected an integer"),
        ("train.epochs=1.5", r"train\.epochs: expected an integer"),
        ("train.amp=fp8", r"train\.amp must be one of"),
        ("optim.lr=-1", r"optim\.lr must be >= 0"),
        ("aug.scale=[0.5]", r"aug\.scale: expected a list of 2 values"),
        ("train.tensorboard=maybe", r"train\.tensorboard: expected true/false"),
        ("model.kwargs.num_classes=3", "set from the data"),
        ("lr=0.1", "expected SECTION.KEY=VALUE"),
    ],
)
def test_bad_values_are_named(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_overrides_are_typed() -> None:
    cfg = load_config(
        CONFIGS / "fmnist_tiny.yaml",
        [
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; a float field accepts it
            "aug.scale=[0.5, 1]",
            "model.kwargs.mixer=conv",
            "train.ema_decay=null",
            ("data.data_dir", "2024"),  # typed pairs are not YAML-parsed (a numeric dir name)
        ],
    )
    assert cfg.optim.lr == 1e-3 and cfg.aug.scale == (0.5, 1.0)
    assert cfg.model.kwargs == {"stem_stride": 2, "mixer": "conv"}
    assert cfg.train.ema_decay is None and cfg.data.data_dir == "2024"


def test_apply_overrides_does_not_mutate_its_input() -> None:
    base = {"train": {"epochs": 3}}
    out = apply_overrides(base, ["train.epochs=4"])
    assert base == {"train": {"epochs": 3}} and out["train"]["epochs"] == 4


# -- every float field: non-finite and out-of-range values are refused ---------------------------


#: The list each float-tuple field is tested with (the default where it has none).
_TUPLE_VALUES = {
    "optim.betas": [0.9, 0.999],
    "sched.decay_milestones": [30.0, 60.0],
}


def _float_fields() -> list[tuple[str, int | None]]:
    """``(dotted key, tuple index or None)`` of every float in every section, found by type."""
    import dataclasses
    import typing

    out = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            key = f"{section.name}.{f.name}"
            tup = next((a for a in [tp, *args] if typing.get_origin(a) is tuple), None)
            if tup is not None and float in typing.get_args(tup):
                n = len(typing.get_args(tup))
                if Ellipsis in typing.get_args(tup):  # any length: the tested list's
                    n = len(_TUPLE_VALUES[key])
                out += [(key, i) for i in range(n)]
            elif float in args:
                out.append((key, None))
    return out


FLOAT_FIELDS = _float_fields()

#: An out-of-range value of each float field (every float field must be listed).
OUT_OF_RANGE = {
    "model.drop_path_rate": [-0.1, 1.0],
    "model.drop_rate": [-0.1, 1.0],
    "optim.lr": [-1.0],
    "optim.momentum": [-0.1, 1.0],
    "optim.betas[0]": [-0.1, 1.0],
    "optim.betas[1]": [-0.1, 1.0],
    "optim.eps": [0.0, -1e-8],
    "optim.weight_decay": [-1e-4],
    "optim.grad_clip": [0.0, -1.0],
    "sched.warmup_epochs": [-1.0],
    "sched.warmup_lr": [-1e-6],
    "sched.min_lr": [-1.0],
    "optim.layer_decay": [0.0, 1.5],
    "sched.decay_epochs": [0.0, -1.0],
    "sched.decay_milestones[0]": [-1.0],
    "sched.decay_milestones[1]": [-30.0],
    "sched.decay_rate": [0.0, -0.1],
    "train.ema_decay": [-0.1, 1.5],
    "aug.scale[0]": [0.0, -0.5],
    "aug.scale[1]": [1.5, 0.01],  # above 1, or below scale[0]
    "aug.ratio[0]": [0.0, -1.0],
    "aug.ratio[1]": [0.5],  # below ratio[0]
    "aug.hflip": [-0.1, 1.1],
    "aug.color_jitter": [-0.4],
    "aug.crop_pct": [0.0, 1.5],
    "aug.re_prob": [-0.1, 1.1],
    "aug.mixup": [-0.8],
    "aug.cutmix": [-1.0],
    "aug.mixup_prob": [-0.1, 1.1],
    "aug.mixup_switch_prob": [-0.1, 1.1],
    "aug.label_smoothing": [-0.1, 1.0],
}


def _name(key: str, index: int | None) -> str:
    return key if index is None else f"{key}[{index}]"


def _set(key: str, index: int | None, value: float) -> dict:
    section, field = key.split(".")
    values = config_to_dict(Config())
    if index is None:
        values[section][field] = value
    else:
        values[section][field] = list(_TUPLE_VALUES.get(key, values[section][field]))
        values[section][field][index] = value
    return values


def test_every_float_field_has_a_range_test() -> None:
    assert {_name(k, i) for k, i in FLOAT_FIELDS} == set(OUT_OF_RANGE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize(("key", "index"), FLOAT_FIELDS, ids=lambda v: str(v))
def test_non_finite_floats_are_refused(key: str, index: int | None, bad: float) -> None:
    with pytest.raises(ConfigError, match=re.escape(key) + ".*finite"):
        config_from_dict(_set(key, index, bad))


@pytest.mark.parametrize(("key", "index"), FLOAT_FIELDS, ids=lambda v: str(v))
def test_out_of_range_floats_are_refused(key: str, index: int | None) -> None:
    name = _name(key, index)
    for bad in OUT_OF_RANGE[name]:
        with pytest.raises(ConfigError, match=re.escape(name)):
            config_from_dict(_set(key, index, bad))


@pytest.mark.parametrize("text", ["nan", ".nan", "NaN", "inf", "-.inf", "1e400"])
def test_non_finite_overrides_are_refused(text: str) -> None:
    """What a user types: YAML's .nan / .inf, or a string float() reads as NaN / inf."""
    for key in ("optim.lr", "optim.weight_decay", "sched.warmup_lr", "train.ema_decay"):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, [f"{key}={text}"])
