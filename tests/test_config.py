"""Typed configs: defaults, JSON round trip, and one clear error per bad value."""

import json

import pytest

from dcmtune.config import ConfigError, ExperimentConfig


def test_defaults_match_the_documented_ones():
    c = ExperimentConfig()
    assert (c.model.n_dcm, c.model.features, c.model.max_degree, c.model.num_iterations) == (
        2,
        16,
        2,
        2,
    )
    assert (c.model.cutoff, c.model.max_atomic_number, c.model.d_max) == (4.0, 36, 0.5)
    t = c.training
    assert (t.num_epochs, t.batch_size, t.learning_rate, t.esp_w, t.chg_w) == (
        200,
        8,
        1e-2,
        1000.0,
        0.01,
    )  # docs/model.md: the ablation that chose them
    assert (t.grad_clip_norm, t.ema_decay, t.lr_schedule_type, t.warmup_epochs) == (
        2.0,
        0.999,
        "cosine",
        None,
    )
    assert t.effective_warmup_epochs == 5
    assert (c.data.split_by, c.data.valid_fraction, c.data.split_seed) == ("molecule", 0.1, 0)
    assert c.random_seed == 42 and c.output_dir == "experiments"


def test_json_round_trip_is_lossless(tmp_path):
    c = ExperimentConfig(name="x", notes="n").replace(
        **{
            "model.n_dcm": 3,
            "model.include_pseudotensors": True,
            "data.data_files": ["a.npz"],
            "data.num_train": 10,
            "training.learning_rate": 3e-4,
            "training.lr_schedule_type": "step",
        }
    )
    path = tmp_path / "c.json"
    c.save(path)
    c2 = ExperimentConfig.load(path)
    assert c2 == c
    assert json.loads(path.read_text())["model"]["n_dcm"] == 3


@pytest.mark.parametrize(
    "dotted,value,key",
    [
        ("model.n_dcm", 0, "model.n_dcm"),
        ("model.features", 2.5, "model.features"),
        ("model.max_degree", 0, "model.max_degree"),
        ("model.cutoff", -1.0, "model.cutoff"),
        ("model.include_pseudotensors", "yes", "model.include_pseudotensors"),
        ("model.d_max", 0.0, "model.d_max"),
        ("data.split_by", "atom", "data.split_by"),
        ("data.valid_fraction", 1.5, "data.valid_fraction"),
        ("data.data_files", "a.npz", "data.data_files"),
        ("data.num_train", 0, "data.num_train"),
        ("data.train_molecules", 0, "data.train_molecules"),
        ("data.train_molecules", "all", "data.train_molecules"),
        ("training.batch_size", 0, "training.batch_size"),
        ("training.learning_rate", 0.0, "training.learning_rate"),
        ("training.lr_schedule_type", "linear", "training.lr_schedule_type"),
        ("training.warmup_epochs", 200, "training.warmup_epochs"),
        ("training.ema_decay", 1.0, "training.ema_decay"),
        ("training.use_ema", 1, "training.use_ema"),
        ("training.num_epochs", True, "training.num_epochs"),
        ("training.esp_w", float("nan"), "training.esp_w"),
        ("random_seed", "42", "random_seed"),
        ("name", "a/b", "name"),
    ],
)
def test_invalid_values_name_the_key(dotted, value, key):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig().replace(**{dotted: value})
    assert str(e.value).startswith(key + ":"), str(e.value)


@pytest.mark.parametrize("num_epochs,warmup", [(1, 0), (3, 0), (10, 1), (49, 4), (200, 5)])
def test_default_warmup_adapts_to_any_number_of_epochs(num_epochs, warmup):
    t = ExperimentConfig().replace(**{"training.num_epochs": num_epochs}).training
    assert t.warmup_epochs is None and t.effective_warmup_epochs == warmup < num_epochs


def test_explicit_warmup_is_checked_against_num_epochs():
    base = ExperimentConfig().replace(**{"training.num_epochs": 3})
    assert base.replace(**{"training.warmup_epochs": 2}).training.effective_warmup_epochs == 2
    with pytest.raises(
        ConfigError,
        match=r"^training.warmup_epochs: expected an integer in "
        r"\[0, num_epochs=3\) or None \(automatic\), got 5",
    ):
        base.replace(**{"training.warmup_epochs": 5})


def test_exponential_needs_a_positive_floor():
    with pytest.raises(ConfigError, match="training.min_lr_factor"):
        ExperimentConfig().replace(
            **{"training.lr_schedule_type": "exponential", "training.min_lr_factor": 0.0}
        )


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.featurs: unknown key"):
        ExperimentConfig.from_dict({"model": {"featurs": 3}})
    with pytest.raises(ConfigError, match=r"^trainng: unknown key"):
        ExperimentConfig.from_dict({"trainng": {}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ExperimentConfig.load(bad)
