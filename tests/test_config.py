from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, apply_overrides, flatten, from_dict, load_config, load_params, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1
    name: Literal["sgd", "adamw"] = "sgd"


@dataclass(frozen=True)
class Outer:
    steps: int = 10
    sizes: tuple[int, ...] = (1, 2)
    path: str | None = None
    opt: Inner = field(default_factory=Inner)


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"steps": 3, "sizes": [4, 5], "opt": {"lr": 1, "name": "adamw"}})
    assert cfg == Outer(steps=3, sizes=(4, 5), opt=Inner(lr=1.0, name="adamw"))
    assert isinstance(cfg.opt.lr, float)
    with pytest.raises(Exception):
        cfg.steps = 4  # frozen
    assert to_dict(cfg)["sizes"] == [4, 5]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": 3}, "train.stepz: unknown key; valid keys are: opt, path, sizes, steps"),
        ({"steps": "3"}, "train.steps: expected an integer, got '3'"),
        ({"steps": True}, "train.steps: expected an integer"),
        ({"opt": {"name": "adam"}}, "train.opt.name: expected one of 'sgd', 'adamw'"),
        ({"opt": {"momentum": 0.9}}, "train.opt.momentum: unknown key; valid keys are: lr, name"),
        ({"sizes": 3}, "train.sizes: expected a list"),
        ({"path": 3}, "train.path: expected"),
        # A section set to null (`--set opt=null`, or every line under `opt:` commented out) is
        # not "the defaults": for data.augment the defaults are the full SSD augmentation.
        ({"opt": None}, "train.opt: null; give its keys"),
        # Past 64 bits: an OverflowError deep inside torch (or an islice ValueError) otherwise.
        ({"steps": 10**20}, "train.steps: 100000000000000000000 is out of range (a 64-bit integer)"),
        ({"opt": {"lr": "1e-3x"}}, "train.opt.lr: expected a number, got '1e-3x'"),
    ],
)
def test_bad_values_are_one_line_errors(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data, "train")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_are_parsed_as_yaml_and_checked(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  steps: 5\n  opt:\n    lr: 0.5\n")
    params = load_params(p)
    cfg = load_config(Outer, params, "train", ["opt.lr=0.01", "sizes=[3, 4]"])
    assert cfg.opt.lr == 0.01 and cfg.sizes == (3, 4) and cfg.steps == 5
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Outer, params, "train", ["bogus=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["novalue"])


def test_a_number_in_exponent_notation_is_a_number(tmp_path):
    """PyYAML reads `lr: 1e-3` (no decimal point) as the string '1e-3', which was refused, while
    DVC, whose parser follows YAML 1.2, reads it as the number it is."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  opt:\n    lr: 1e-3\n")
    assert load_config(Outer, load_params(p), "train", []).opt.lr == 0.001
    assert load_config(Outer, load_params(p), "train", ["opt.lr=5E-4"]).opt.lr == 0.0005
    assert load_config(Outer, load_params(p), "train", ["opt.lr=-.5e+1"]).opt.lr == -5.0


def test_a_key_given_twice_in_the_params_file_is_an_error(tmp_path):
    """PyYAML keeps the last of two equal keys; DVC's own parser refuses the file: a direct run
    would train 1,200 steps where `dvc repro` stops."""
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  steps: 600\n  opt:\n    lr: 0.5\n  steps: 1200\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    assert str(e.value) == f"{p}: line 5: key 'steps' given twice (first on line 2)"


def test_params_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_params(bad)


def test_flatten_for_trackers():
    flat = flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "d": "None"}


def test_a_dataclass_own_check_is_a_config_error_naming_the_section():
    @dataclass(frozen=True)
    class Checked:
        steps: int = 1

        def __post_init__(self):
            if self.steps < 1:
                raise ValueError(f"steps must be at least 1, got {self.steps}")

    with pytest.raises(ConfigError, match=r"^train: steps must be at least 1, got 0$"):
        from_dict(Checked, {"steps": 0}, "train")


@dataclass(frozen=True)
class Other:
    seed: int = 0


def test_a_missing_section_is_an_error_not_the_defaults():
    params = {"train_a": {"steps": 3}, "sample": {"seed": 1}}
    with pytest.raises(ConfigError, match=r"^params.yaml: no section 'train_b' \(sections this stage can run: train_a\)$"):
        load_config(Outer, params, "train_b", source="params.yaml")
    # `evaluate:` with every line under it commented out: it ran with the defaults.
    with pytest.raises(ConfigError, match=r"^params.yaml: train_a: null; give its keys \(\{\} for the defaults\)$"):
        load_config(Outer, {"train_a": None}, "train_a", source="params.yaml")
    assert load_config(Outer, {"train_a": {}}, "train_a") == Outer()


def test_choose_section():
    from pipeline.config import choose_section, sections_of

    params = {"train_a": {"steps": 3}, "train_b": {"opt": {"lr": 1}}, "other": {"seed": 1}, "scalar": 3}
    assert sections_of(Outer, params) == ["train_a", "train_b"]
    assert sections_of(Other, params) == ["other"]
    assert choose_section(Other, params, None, "other") == "other"  # the only one: no --section needed
    assert choose_section(Outer, params, "train_b", "train") == "train_b"
    with pytest.raises(ConfigError, match=r"^p.yaml: --section is required: 2 train sections \(train_a, train_b\)$"):
        choose_section(Outer, params, None, "train", "p.yaml")


@pytest.mark.parametrize("written", ["no", "No", "off", "false", False])
def test_yaml_11_booleans_are_the_choice_they_spell(tmp_path, written):
    """`mixed_precision: no` is False to PyYAML; it means the choice "no" (also from --set)."""

    @dataclass(frozen=True)
    class Precision:
        mixed_precision: Literal["no", "fp16", "bf16"] | None = None

    p = tmp_path / "params.yaml"
    p.write_text(f"train:\n  mixed_precision: {written}\n")
    assert load_config(Precision, load_params(p), "train").mixed_precision == "no"
    assert load_config(Precision, {"train": {}}, "train", [f"mixed_precision={written}"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="expected one of"):
        load_config(Precision, {"train": {}}, "train", ["mixed_precision=yes"])  # no choice spelt "yes"
