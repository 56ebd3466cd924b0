"""Shared fixtures: one small model and one synthetic dataset for the whole session."""

import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcmtune.config import TrainingConfig
from dcmtune.data import make_batch
from dcmtune.data.synthetic import make_synthetic
from dcmtune.model.dcmnet import DCMNet, init_params
from dcmtune.train.hparams import Hparams

SMALL = dict(
    n_dcm=2,
    features=8,
    max_degree=2,
    num_iterations=2,
    num_basis_functions=8,
    cutoff=4.0,
    max_atomic_number=36,
    d_max=0.5,
)


@pytest.fixture(scope="session")
def synthetic():
    """Eight small random molecules, two conformers each, exact ESP."""
    return make_synthetic(num_molecules=8, conformers=2, max_atoms=8, num_grid=64, seed=0)


# The prediction tests' model: knows H..Ne (max_atomic_number 10), so chlorine is refused.
TINY_PREDICT = dict(
    n_dcm=2, features=8, max_degree=1, num_iterations=1, num_basis_functions=8, max_atomic_number=10
)


@pytest.fixture(scope="session")
def tiny_predict_run(synthetic, tmp_path_factory):
    """The run directory of one epoch of a tiny model on the synthetic set (EMA evaluation
    parameters), shared by the prediction tests."""
    from dcmtune.config import ExperimentConfig, ModelConfig, TrainingConfig
    from dcmtune.train.loop import fit

    cfg = ExperimentConfig(
        name="tiny",
        random_seed=0,
        model=ModelConfig(**TINY_PREDICT),
        training=TrainingConfig(
            num_epochs=1, batch_size=4, learning_rate=1e-2, warmup_epochs=0, save_every_n_epochs=0
        ),
    )
    result = fit(cfg, synthetic, run_dir=tmp_path_factory.mktemp("predict") / "tiny")
    assert result.status == "completed"
    return result.run_dir


@pytest.fixture(scope="session")
def small_model():
    """(model, params) of a small DCMNet, built once."""
    model = DCMNet(**SMALL)
    params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0))
    return model, params


@pytest.fixture(scope="session")
def apply_fn(small_model):
    model, _ = small_model
    return jax.jit(lambda p, b: model.apply({"params": p}, b["Z"], b["R"], b["atom_mask"], b["Q"]))


def loss_weights(
    esp_w=TrainingConfig.esp_w, chg_w=TrainingConfig.chg_w, dip_w=TrainingConfig.dip_w
) -> Hparams:
    """The traced hyper-parameters with these loss weights (the defaults elsewhere)."""
    return Hparams.of(TrainingConfig(esp_w=esp_w, chg_w=chg_w, dip_w=dip_w))


def to_device(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}


def batch_of(data, idx=None, batch_size=None):
    idx = np.arange(data.num_conformers) if idx is None else np.asarray(idx)
    return to_device(make_batch(data, idx, batch_size))


def espdata_of(mol_id: str, Z, R, grids, esps):
    """ESPData of one molecule's conformers: atomic numbers Z (A,), positions R (M of (A, 3)),
    each conformer's grid (G_i, 3) and ESP (G_i,), Hartree/e; neutral, no reference charges."""
    from dcmtune.data import ESPData

    M, A, G = len(R), len(Z), max(len(g) for g in grids)
    return ESPData(
        R=np.stack(R).astype(np.float32),
        Z=np.tile(Z, (M, 1)),
        N=np.full(M, A),
        esp=np.stack([np.pad(e, (0, G - len(e))) for e in esps]).astype(np.float32),
        grid=np.stack([np.pad(g, [(0, G - len(g)), (0, 0)]) for g in grids]).astype(np.float32),
        n_grid=np.array([len(g) for g in grids]),
        mono=None,
        dipole=None,
        com=np.zeros((M, 3), np.float32),
        Q=np.zeros(M, np.float32),
        mol_id=np.array([mol_id] * M),
    )


def shipped_set(name: str):
    """A bundled set read as its files say: (molecule-list rows, {name: RDKit molecule},
    {key: array}) from dcmtune/datasets/<name>_smiles.csv and <name>_esp.npz."""
    from dcmtune.qm import conformers as cf

    datasets = Path(__file__).resolve().parents[1] / "dcmtune" / "datasets"
    rows = cf.read_smiles_file(datasets / f"{name}_smiles.csv")
    mols = {r["name"]: cf.parse_smiles(r["smiles"], r["name"]) for r in rows}
    with np.load(datasets / f"{name}_esp.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return rows, mols, arrays


@pytest.fixture(scope="module")
def one_pyscf_thread():
    """Tiny SCFs run several times faster on one OpenMP thread (no spin-waiting); restored
    after the module. Use with `pytestmark = pytest.mark.usefixtures("one_pyscf_thread")`."""
    from pyscf import lib

    before = lib.num_threads()
    lib.num_threads(1)
    yield
    lib.num_threads(before)


# --------------------------------------------------------------------------- Ray and sweeps
# One local Ray for every test that needs it (2 CPUs, no dashboard, a short RAY_TMPDIR: Ray's
# AF_UNIX socket paths must stay under 107 bytes), one JAX compilation cache shared by all
# trials, and one tiny sweep that several test modules inspect.


TINY_MODEL = dict(features=4, max_degree=1, num_iterations=1, n_dcm=1, num_basis_functions=4)
# The deliberately bad point of the tiny sweep: a learning rate so small that the model has
# hardly moved after one epoch, so ASHA's first rung stops it.
TINY_GOOD_LR, TINY_BAD_LR = 1e-2, 1e-5


@pytest.fixture(scope="session")
def ray_session():
    """The shared local Ray session."""
    import logging
    import os
    import shutil
    import tempfile

    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"  # tests only; users keep Ray's token auth
    tmp = tempfile.mkdtemp(prefix="r")
    os.environ["RAY_TMPDIR"] = tmp
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def jax_cache_dir(tmp_path_factory):
    """The persistent compilation cache shared by all trials of all test sweeps."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def tiny_data_file(tmp_path_factory):
    """A small synthetic ESP file (12 molecules x 3 conformers) in its own directory."""
    d = make_synthetic(num_molecules=12, conformers=3, max_atoms=6, num_grid=48, seed=0)
    path = tmp_path_factory.mktemp("tiny_data") / "tiny.npz"
    np.savez(
        path,
        R=d.R,
        Z=d.Z,
        N=d.N,
        esp=d.esp,
        vdw_surface=d.grid,
        n_grid=d.n_grid,
        mono=d.mono,
        Dxyz=d.dipole,
        com=d.com,
        Q=d.Q,
        mol_id=d.mol_id,
    )
    return path


@pytest.fixture(scope="session")
def tiny_spec(tiny_data_file, jax_cache_dir):
    """tiny_spec(name, directory, **run) writes directory/spec.yaml for the tiny model on the
    tiny data (4 epochs, learning rate and chg_w searched, ASHA) and returns its path.
    `run` overrides run:; other sections can be changed with `edit=lambda raw: ...`."""
    import yaml

    def make(name, directory, edit=None, **run):
        raw = {
            "name": name,
            "description": "tiny test sweep",
            "data": {"data_files": [str(tiny_data_file)], "num_valid": 6, "num_test": 6},
            "model": dict(TINY_MODEL),
            "training": {"num_epochs": 4, "batch_size": 4, "warmup_epochs": 0},
            "search": {
                "training.learning_rate": {"loguniform": [TINY_BAD_LR, 3e-2]},
                "training.chg_w": {"uniform": [0.5, 2.0]},
            },
            "searcher": {"seed": 0, "n_startup_trials": 3},
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "run": {
                "num_samples": 5,
                "max_concurrent_trials": 1,
                "checkpoint_every": 2,
                "num_to_keep": 2,
                "resources": {"cpu": 1, "gpu": "auto"},
                "storage_path": "results",
                "jax_cache_dir": str(jax_cache_dir),
                **run,
            },
        }
        if edit is not None:
            edit(raw)
        path = directory / "spec.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return make


class TinySweep(typing.NamedTuple):
    """The shared tiny sweep; unpacks as (spec, outcome, seconds)."""

    spec: typing.Any  # SweepSpec
    outcome: typing.Any  # SweepOutcome
    seconds: float  # wall time of run_sweep
    good_lr = TINY_GOOD_LR  # the two points_to_evaluate, in this order
    bad_lr = TINY_BAD_LR


@pytest.fixture(scope="session")
def tiny_sweep(ray_session, tiny_spec, tmp_path_factory):
    """One tiny sweep for the whole session: 5 trials of 4 epochs, one at a time (reused
    actor), the first two from points_to_evaluate (a good one, then a bad one), the Optuna study
    in sqlite in the experiment directory.

    Returns:
      A TinySweep: spec, outcome (SweepOutcome), seconds; also good_lr, bad_lr.
    """
    import time

    from dcmtune.sweep.driver import run_sweep
    from dcmtune.sweep.spec import load_spec

    def edit(raw):
        raw["searcher"]["storage"] = "sqlite:///study.db"  # in the experiment directory
        raw["searcher"]["points_to_evaluate"] = [
            {"training.learning_rate": TINY_GOOD_LR, "training.chg_w": 1.0},
            {"training.learning_rate": TINY_BAD_LR, "training.chg_w": 1.0},
        ]

    spec = load_spec(tiny_spec("tiny", tmp_path_factory.mktemp("tiny_sweep"), edit=edit))
    t0 = time.perf_counter()
    outcome = run_sweep(spec, verbose=0)
    return TinySweep(spec, outcome, time.perf_counter() - t0)
