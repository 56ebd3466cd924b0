"""Sweep specs: YAML -> SweepSpec -> Tune param space; every invalid spec exits 2 naming the key.

No test here starts Ray: the CLI's `run_sweep` is replaced by a function that fails the test.
"""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dcmtune.config import ExperimentConfig
from dcmtune.data.synthetic import make_synthetic
from dcmtune.sweep import commands as sweep
from dcmtune.sweep.experiment_store import write_spec_record
from dcmtune.sweep.spec import SWEEP_METRICS, Distribution, SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parent.parent


def _write_npz(path: Path, mono: bool = True) -> Path:
    d = make_synthetic(num_molecules=10, conformers=2, max_atoms=5, num_grid=24, seed=1)
    arrays = {
        "R": d.R,
        "Z": d.Z,
        "N": d.N,
        "esp": d.esp,
        "vdw_surface": d.grid,
        "n_grid": d.n_grid,
        "Dxyz": d.dipole,
        "com": d.com,
        "Q": d.Q,
        "mol_id": d.mol_id,
    }
    if mono:
        arrays["mono"] = d.mono
    np.savez(path, **arrays)
    return path


BASE = {
    "name": "t",
    "data": {"data_files": ["data/syn.npz"], "valid_fraction": 0.2, "test_fraction": 0.2},
    "model": {"features": 4, "max_degree": 1, "num_iterations": 1, "n_dcm": 1},
    "training": {"num_epochs": 4, "batch_size": 2, "warmup_epochs": 0},
    "search": {
        "training.learning_rate": {"loguniform": [1e-4, 1e-2]},
        "training.chg_w": {"uniform": [0.5, 2.0]},
        "model.num_basis_functions": {"randint": [4, 8]},
    },
    "searcher": {"seed": 0},
    "scheduler": {"grace_period": 1, "reduction_factor": 2},
    "run": {"num_samples": 4, "resources": {"cpu": 1, "gpu": "auto"}, "storage_path": "results"},
}


@pytest.fixture
def spec_dir(tmp_path):
    (tmp_path / "data").mkdir()
    _write_npz(tmp_path / "data" / "syn.npz")
    _write_npz(tmp_path / "data" / "nomono.npz", mono=False)
    return tmp_path


def _write_spec(directory: Path, raw, name="spec.yaml") -> Path:
    path = directory / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return path


def _set(raw: dict, dotted: str, value):
    """Sets raw[a][b]... from "a/b/..." ("/" because search keys contain dots)."""
    *heads, last = dotted.split("/")
    d = raw
    for h in heads:
        d = d.setdefault(h, {})
    if value is _DELETE:
        d.pop(last)
    else:
        d[last] = value


_DELETE = object()


# --------------------------------------------------------------------------- valid specs


def test_valid_spec_resolves_paths_defaults_and_space(spec_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)  # the working directory does not matter
    spec = load_spec(_write_spec(spec_dir, BASE))
    assert spec.base.data.data_files == [str((spec_dir / "data" / "syn.npz").resolve())]
    assert spec.run.storage_path == str((spec_dir / "results").resolve())
    assert spec.run.jax_cache_dir == str((spec_dir / "results" / ".jax_cache").resolve())
    assert spec.run.metric == "valid_esp_rmse" and spec.run.mode == "min"
    assert spec.base.training.save_every_n_epochs == 0  # sweeps keep trial dirs lean
    assert spec.num_epochs == 4
    space = spec.param_space()
    assert set(space) == set(BASE["search"])
    cfg = spec.config_for(
        {
            "training.learning_rate": 3e-3,
            "training.chg_w": 1.5,
            "model.num_basis_functions": np.int64(6),
        }
    )
    assert cfg.training.learning_rate == 3e-3 and cfg.model.num_basis_functions == 6
    assert type(cfg.model.num_basis_functions) is int
    assert cfg.model.features == 4 and cfg.training.num_epochs == 4


def test_default_storage_is_cwd_ray_results(spec_dir, monkeypatch, tmp_path):
    raw = copy.deepcopy(BASE)
    del raw["run"]["storage_path"]
    monkeypatch.chdir(tmp_path)
    spec = load_spec(_write_spec(spec_dir, raw))
    assert spec.run.storage_path == str(tmp_path.resolve() / "ray_results")
    assert load_spec(spec.path, storage_path="elsewhere").run.storage_path == str(
        tmp_path.resolve() / "elsewhere"
    )


def test_yaml_exponent_without_dot_is_a_number(spec_dir):
    text = yaml.safe_dump(BASE, sort_keys=False).replace(
        "loguniform:\n    - 0.0001\n    - 0.01", "loguniform: [1e-4, 1e-2]"
    )
    assert "[1e-4, 1e-2]" in text
    spec = load_spec(_write_spec(spec_dir, text))
    assert spec.search["training.learning_rate"].args == (1e-4, 1e-2)


def test_randint_includes_hi():
    """{randint: [lo, hi]} draws lo..hi with hi included, in Tune and in Optuna."""
    from ray.tune.search.optuna import OptunaSearch

    d = Distribution("model.n_dcm", "randint", (1, 3), integer=True)
    rng = np.random.default_rng(0)
    draws = {d.to_tune().sample(random_state=rng) for _ in range(300)}
    assert draws == {1, 2, 3}
    ot = OptunaSearch.convert_search_space({"model.n_dcm": d.to_tune()})["model.n_dcm"]
    assert (ot.low, ot.high, ot.step) == (1, 3, 1)
    assert d.contains(3) and not d.contains(4) and not d.contains(2.0)


def test_quniform_on_integer_field_draws_integers_hi_included():
    from ray.tune.search.optuna import OptunaSearch

    d = Distribution("training.batch_size", "quniform", (4, 16, 4), integer=True)
    rng = np.random.default_rng(0)
    draws = {d.to_tune().sample(random_state=rng) for _ in range(300)}
    assert draws == {4, 8, 12, 16} and all(type(v) is int for v in draws)
    ot = OptunaSearch.convert_search_space({"b": d.to_tune()})["b"]
    assert (ot.low, ot.high, ot.step) == (4, 16, 4)


def test_loguniform_maps_to_log_distribution_in_optuna():
    from ray.tune.search.optuna import OptunaSearch

    d = Distribution("training.learning_rate", "loguniform", (1e-4, 1e-2))
    ot = OptunaSearch.convert_search_space({"lr": d.to_tune()})["lr"]
    assert ot.log and (ot.low, ot.high) == (1e-4, 1e-2)


def test_debug_point_is_the_centre_plus_overrides(spec_dir):
    raw = copy.deepcopy(BASE)
    raw["search"]["model.features"] = {"choice": [8, 4]}
    del raw["model"]["features"]
    raw["debug"] = {"training.num_epochs": 2, "training.chg_w": 0.75}
    spec = load_spec(_write_spec(spec_dir, raw))
    p = spec.debug_point()
    assert p["training.learning_rate"] == pytest.approx(1e-3)  # geometric middle
    assert p["model.num_basis_functions"] == 6 and p["model.features"] == 8
    assert p["training.chg_w"] == 0.75 and p["training.num_epochs"] == 2


def test_points_to_evaluate_are_validated_and_kept(spec_dir):
    raw = copy.deepcopy(BASE)
    point = {"training.learning_rate": 1e-4, "training.chg_w": 1.0, "model.num_basis_functions": 8}
    raw["searcher"]["points_to_evaluate"] = [point]
    spec = load_spec(_write_spec(spec_dir, raw))
    assert spec.searcher.points_to_evaluate == (point,)


REAL_SPECS = ["cosine", "exponential", "step", "accurate", "pareto"]


@pytest.mark.parametrize("name", ["quick", *REAL_SPECS])
def test_shipped_specs_are_valid_from_any_directory(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    path = sweep.find_spec(f"search_spaces/{name}.yaml")
    assert path == REPO / "search_spaces" / f"{name}.yaml"
    spec = load_spec(path)
    prep = sweep.prepare(spec)  # the bundled data; batch sizes fit the training split
    assert prep.num_train > 0 and spec.run.metric in SWEEP_METRICS
    # quick: the bundled demo set; the real specs: the bundled organic set, by name
    assert spec.base.data.data_files == ([] if name == "quick" else ["organic"])
    spec.config_for(spec.debug_point())
    assert set(spec.param_space()) == set(spec.search)


@pytest.mark.parametrize("name", REAL_SPECS)
def test_real_specs_are_centred_on_the_defaults(name):
    spec = load_spec(REPO / "search_spaces" / f"{name}.yaml")
    plain = ExperimentConfig()

    def default(key):
        section, _, field = key.partition(".")
        return getattr(getattr(plain, section), field)

    # Log-scale ranges of the learning rate and chg_w: at most 10x either side of the default.
    for key in ("training.learning_rate", "training.chg_w"):
        (lo, hi), d = spec.search[key].args, default(key)
        assert spec.search[key].kind == "loguniform", key
        assert d / 10 <= lo <= d <= hi <= 10 * d, (key, lo, hi)
    # Choices include the default width and charges per atom (or leave them at the default).
    for key in ("model.features", "model.n_dcm"):
        if key in spec.search:
            assert spec.search[key].kind == "choice" and default(key) in spec.search[key].args
        else:
            assert getattr(spec.base.model, key.partition(".")[2]) == default(key), key
    # The first trial is the defaults: every searched key at its default.
    first = spec.searcher.points_to_evaluate[0]
    assert set(first) == set(spec.search)
    assert all(first[k] == default(k) for k in first), first


def test_quick_spec_is_cpu_sized():
    spec = load_spec(REPO / "search_spaces" / "quick.yaml")
    assert spec.run.resources.gpu == "auto" and spec.run.max_concurrent_trials == 2
    assert spec.num_epochs <= 15 and spec.run.num_samples <= 12


# --------------------------------------------------------------------------- invalid specs

NOMONO = "data/nomono.npz"
INVALID = [
    # (id, path in raw ("/"-separated) or raw text, value, expected start of the message)
    ("unknown top-level key", "serach", {}, "serach: unknown key"),
    ("unknown section key", "model/featurs", 8, "model.featurs: unknown key"),
    (
        "unknown search key",
        "search/model.featurs",
        {"choice": [8]},
        "search.model.featurs: unknown config field",
    ),
    (
        "unknown search section",
        "search/optim.lr",
        {"uniform": [0.1, 0.2]},
        "search.optim.lr: unknown config section",
    ),
    (
        "unknown distribution",
        "search/training.chg_w",
        {"normal": [1, 2]},
        "search.training.chg_w: unknown distribution",
    ),
    (
        "lo >= hi",
        "search/training.chg_w",
        {"uniform": [2.0, 1.0]},
        "search.training.chg_w: uniform needs lo < hi",
    ),
    (
        "loguniform lo <= 0",
        "search/training.learning_rate",
        {"loguniform": [0, 1e-2]},
        "search.training.learning_rate: loguniform needs lo > 0",
    ),
    (
        "empty choice",
        "search/model.features",
        {"choice": []},
        "search.model.features: choice needs at least one option",
    ),
    (
        "float distribution for an integer field",
        "search/model.n_dcm",
        {"uniform": [1, 3]},
        "search.model.n_dcm: uniform draws floats but the field is an integer",
    ),
    (
        "float choice for an integer field",
        "search/model.n_dcm",
        {"choice": [1, 2.5]},
        "search.model.n_dcm: choice option 2.5",
    ),
    (
        "randint on a float field",
        "search/training.esp_w",
        {"randint": [500, 2000]},
        "search.training.esp_w: randint draws integers",
    ),
    (
        "quniform step not dividing",
        "search/training.esp_w",
        {"quniform": [500, 2000, 400]},
        "search.training.esp_w: quniform needs hi - lo to be a multiple of q",
    ),
    (
        "range endpoint invalid for the field",
        "search/training.learning_rate",
        {"loguniform": [1e-3, 2.0]},
        "search.training.learning_rate: hi = 2.0 is not a valid",
    ),
    (
        "data cannot be searched",
        "search/data.split_seed",
        {"choice": [0, 1]},
        "search.data.split_seed: data settings cannot be searched",
    ),
    (
        "num_epochs cannot be searched",
        "search/training.num_epochs",
        {"choice": [4, 8]},
        "search.training.num_epochs: cannot be searched",
    ),
    ("fixed and searched", "training/chg_w", 1.0, "search.training.chg_w: is both fixed"),
    (
        "fixed value out of range",
        "training/learning_rate",
        2,
        "training.learning_rate: expected a value in (0, 1)",
    ),
    ("negative cpu", "run/resources/cpu", -1, "run.resources.cpu: expected a number > 0"),
    ("negative gpu", "run/resources/gpu", -0.5, "run.resources.gpu: expected auto or a number"),
    (
        "more than one gpu per trial",
        "run/resources/gpu",
        2,
        "run.resources.gpu: 2 GPUs per trial, but the trainer uses one device",
    ),
    (
        "explicit gpu without gpus",
        "run/resources/gpu",
        1,
        "run.resources.gpu: 1 GPU per trial requested, but the cluster has no GPUs",
    ),
    (
        "more cpus than the machine",
        "run/resources/cpu",
        4096,
        "run.resources.cpu: 4096 CPUs per trial requested",
    ),
    (
        "missing data file",
        "data/data_files",
        ["data/nothere.npz"],
        "data.data_files[0]: file not found",
    ),
    (
        "valid_loss with searched weights",
        "run/metric",
        "valid_loss",
        "run.metric: valid_loss changes scale with the searched loss weight training.chg_w",
    ),
    ("unknown metric", "run/metric", "valid_rmse", "run.metric: unknown metric 'valid_rmse'"),
    (
        "test metric",
        "run/metric",
        "test_esp_rmse",
        "run.metric: unknown metric 'test_esp_rmse' (the test split never chooses",
    ),
    ("mono metric without mono data", "data/data_files", [NOMONO], None),  # + metric below
    ("bad mode", "run/mode", "minimize", "run.mode: expected min, got"),
    ("zero samples", "run/num_samples", 0, "run.num_samples: expected an integer >= 1"),
    (
        "grace period beyond num_epochs",
        "scheduler/grace_period",
        9,
        "scheduler.grace_period: 9 exceeds training.num_epochs = 4",
    ),
    (
        "reduction factor 1",
        "scheduler/reduction_factor",
        1,
        "scheduler.reduction_factor: expected a number > 1",
    ),
    (
        "max_t differs from num_epochs",
        "scheduler/max_t",
        10,
        "scheduler.max_t: is training.num_epochs",
    ),
    ("unknown sampler", "searcher/sampler", "bayes", "searcher.sampler: expected tpe or random"),
    (
        "point outside the space",
        "searcher/points_to_evaluate",
        [{"training.learning_rate": 0.5, "training.chg_w": 1.0, "model.num_basis_functions": 4}],
        "searcher.points_to_evaluate[0].training.learning_rate: 0.5 is outside",
    ),
    (
        "point missing a key",
        "searcher/points_to_evaluate",
        [{"training.chg_w": 1.0}],
        "searcher.points_to_evaluate[0]: missing a value for",
    ),
    (
        "batch larger than the training split",
        "search/training.batch_size",
        {"choice": [2, 64]},
        "search.training.batch_size: batch_size x gradient_accumulation_steps",
    ),
    ("bad experiment name", "name", "a/b", "name: expected letters"),
    ("unknown debug key", "debug/training.epochs", 2, "debug.training.epochs: unknown config"),
    (
        "bool choice for a string field",
        "search/training.lr_schedule_type",
        {"choice": [True]},
        "search.training.lr_schedule_type: choice option True",
    ),
]


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the CLI gets as far as running a sweep (which starts Ray)."""

    def refuse(*a, **k):
        raise AssertionError("run_sweep reached: the spec was accepted")

    monkeypatch.setattr(sweep, "run_sweep", refuse)
    monkeypatch.setattr("dcmtune.sweep.driver._connect", refuse)
    # The machine running the tests may have GPUs; the spec check must see none here.
    monkeypatch.setattr("dcmtune.sweep.driver.detect_local_gpus", lambda *a, **k: 0)


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_exits_2_with_one_line_naming_the_key(case, spec_dir, no_ray, capsys):
    name, where, value, expected = case
    raw = copy.deepcopy(BASE)
    _set(raw, where, value)
    if where.startswith("search/") and "." in where:
        section, field = where.split("/")[1].split(".")
        raw.get(section, {}).pop(field, None)  # searched here, so not fixed as well
    if name == "mono metric without mono data":
        raw["run"]["metric"] = "valid_mono_mae"
        expected = "run.metric: valid_mono_mae needs reference charges"
    path = _write_spec(spec_dir, raw)
    rc = sweep.main([str(path)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {expected}"), lines[0]
    assert not (spec_dir / "results").exists()  # nothing written


def test_invalid_yaml_syntax_and_duplicate_keys(spec_dir, no_ray, capsys):
    path = _write_spec(spec_dir, "name: t\nrun: {num_samples: [1\n")
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not valid YAML at line" in err and "\n" not in err
    path = _write_spec(spec_dir, "name: t\nrun: {num_samples: 2}\nrun: {num_samples: 3}\n")
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.strip() == "error: run: duplicated key (line 3)"


def test_missing_spec_and_bad_flags(spec_dir, no_ray, capsys):
    assert sweep.main([str(spec_dir / "nope.yaml")]) == 2
    assert "nope.yaml: spec file not found (shipped specs:" in capsys.readouterr().err
    path = _write_spec(spec_dir, BASE)
    assert sweep.main([str(path), "--num-samples", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --num-samples: expected at least 1")
    assert sweep.main([str(path), "--resume"]) == 2
    assert capsys.readouterr().err.startswith("error: --resume: no experiment to resume")
    assert sweep.main([str(path), "--name", "../x"]) == 2
    assert capsys.readouterr().err.startswith("error: --name: expected letters")
    assert not (spec_dir / "results").exists()


def test_existing_experiment_needs_resume(spec_dir, no_ray, capsys):
    path = _write_spec(spec_dir, BASE)
    exp = spec_dir / "results" / "t"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")
    assert sweep.main([str(path)]) == 2
    assert "already exists; continue it with --resume" in capsys.readouterr().err


def test_spec_errors_import_no_ray(spec_dir):
    """A bad spec is refused before Ray is even imported."""
    raw = copy.deepcopy(BASE)
    raw["run"]["metric"] = "valid_loss"
    path = _write_spec(spec_dir, raw)
    code = (
        "import sys; from dcmtune.sweep.commands import main; rc = main([sys.argv[1]]); "
        "print('RAY' if 'ray' in sys.modules else 'NORAY', rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["NORAY", "2"], out.stderr
    assert out.stderr.strip().startswith("error: run.metric: valid_loss changes scale")


def test_spec_from_dict_reports_the_key():
    with pytest.raises(SpecError, match=r"^run\.resources\.gpu_share: only used with gpu: auto"):
        spec_from_dict({"name": "x", "run": {"resources": {"gpu": 1, "gpu_share": 0.5}}})
    with pytest.raises(SpecError, match=r"^searcher\.storage: expected an Optuna storage URL"):
        spec_from_dict({"name": "x", "searcher": {"storage": "study.db"}})


def test_resume_refuses_a_changed_spec(spec_dir, no_ray, capsys):
    spec = load_spec(_write_spec(spec_dir, BASE))
    write_spec_record(spec)  # as a fresh sweep leaves it
    (spec.experiment_dir / "tuner.pkl").write_bytes(b"")
    raw = copy.deepcopy(BASE)
    raw["search"]["training.learning_rate"] = {"loguniform": [1e-4, 2e-2]}
    path = _write_spec(spec_dir, raw, name="changed.yaml")
    assert sweep.main([str(path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "error: search.training.learning_rate.loguniform: differs from the experiment being resumed"
    ), err
    assert sweep.main([str(spec.path), "--resume", "--num-samples", "9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --set: the experiment being resumed was started with overrides none, not "
        "run.num_samples=9; resume with the same --set/--data/--num-samples flags"
    )
    # The original spec passes the checks (and would then resume).
    with pytest.raises(AssertionError, match="run_sweep reached"):
        sweep.main([str(spec.path), "--resume"])


def test_fresh_sweep_refuses_an_existing_optuna_study(spec_dir, no_ray, capsys):
    import optuna

    raw = copy.deepcopy(BASE)
    url = f"sqlite:///{spec_dir.resolve() / 'study.db'}"  # outside the experiment directory
    raw["searcher"]["storage"] = url
    path = _write_spec(spec_dir, raw)
    assert load_spec(path).study_storage == url
    study = optuna.create_study(study_name="t", storage=url)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    assert sweep.main([str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: searcher.storage: {url} already holds a study 't' with 1 trials; use "
        "--resume, another name (--name) or another storage"
    )
