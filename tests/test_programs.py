"""Jitted programs kept across processes (dcmtune.train.programs): traced once, then read back.

A "new process" is a new `cached_jit` wrapper of the same function: its in-process memory
and its jax.jit cache are empty, so a call either traces `fun` or reads the kept program.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcmtune.config import ExperimentConfig, ModelConfig
from dcmtune.data import make_batch
from dcmtune.data.synthetic import make_synthetic
from dcmtune.train import programs
from dcmtune.train import step as train
from dcmtune.train.hparams import Hparams

TINY = dict(n_dcm=1, features=4, max_degree=1, num_iterations=1, num_basis_functions=4)


@pytest.fixture
def kept(tmp_path, monkeypatch):
    """Programs are kept in tmp_path (as under a configured compilation cache dir)."""
    monkeypatch.setattr(programs, "program_dir", lambda: tmp_path)
    return tmp_path


TRACES = []


def _fresh():
    """A new process's view: a new function object (JAX keeps traces per function object)
    with the same name, wrapped anew."""

    def scaled(x, w: Hparams, power: int):
        TRACES.append(x.shape)  # runs only while tracing
        return {"y": (w.esp_w * x) ** power + w.chg_w, "w": w}

    return programs.cached_jit(scaled, static_argnames=("power",))


def test_a_program_is_traced_once_across_processes(kept):
    TRACES.clear()
    w = Hparams.for_schedule("constant", 0, 1, esp_w=2.0, chg_w=1.0, dip_w=0.5)
    x = jnp.arange(4.0)
    first = _fresh()(x, w, power=2)
    assert TRACES == [(4,)] and len(list(kept.glob("scaled-*.bin"))) == 1
    again = _fresh()(x, w, power=2)  # a new process: reads the program, does not trace
    assert TRACES == [(4,)]
    np.testing.assert_array_equal(again["y"], first["y"])
    np.testing.assert_array_equal(again["y"], (2.0 * np.arange(4.0)) ** 2 + 1.0)
    assert isinstance(again["w"], Hparams)  # the result's pytree comes back
    # Other values of the traced arguments: the same program.
    f = _fresh()
    out = f(x + 1, w.replace(esp_w=np.float32(3.0), chg_w=np.float32(0.0)), power=2)
    np.testing.assert_array_equal(out["y"], (3.0 * (np.arange(4.0) + 1)) ** 2)
    assert TRACES == [(4,)] and f._cache_size() == 1
    # Another shape or another static value: another program, traced and kept.
    f(jnp.arange(6.0), w, power=2)
    f(x, w, power=3)
    assert TRACES == [(4,), (6,), (4,)] and len(list(kept.glob("scaled-*.bin"))) == 3
    assert f._cache_size() == 3


def test_a_damaged_program_is_traced_again_and_replaced(kept, caplog):
    TRACES.clear()
    w = Hparams.for_schedule("constant", 0, 1, esp_w=2.0, chg_w=1.0, dip_w=0.5)
    _fresh()(jnp.arange(3.0), w, power=1)
    (path,) = kept.glob("scaled-*.bin")
    path.write_bytes(b"not a program")
    with caplog.at_level(logging.WARNING, logger="dcmtune.train.programs"):
        out = _fresh()(jnp.arange(3.0), w, power=1)
    assert "unreadable program" in caplog.text and str(path) in caplog.text
    np.testing.assert_array_equal(out["y"], 2.0 * np.arange(3.0) + 1.0)
    assert len(TRACES) == 2 and path.read_bytes() != b"not a program"
    _fresh()(jnp.arange(3.0), w, power=1)  # the replacement reads back
    assert len(TRACES) == 2


def test_without_a_cache_dir_it_is_plain_jit(tmp_path, monkeypatch):
    monkeypatch.setattr(programs, "program_dir", lambda: None)
    TRACES.clear()
    f = _fresh()
    w = Hparams.for_schedule("constant", 0, 1, esp_w=2.0, chg_w=1.0, dip_w=0.5)
    f(jnp.arange(3.0), w, power=1)
    f(jnp.arange(3.0) + 1, w, power=1)
    assert TRACES == [(3,)] and f._cache_size() == 1 and not list(tmp_path.iterdir())


def test_trainer_programs_read_back_give_bit_identical_updates(kept):
    # The trainer's own programs (TrainState, optax states, Hparams in their trees):
    # init and one update through kept programs equal plain jit, bit for bit.
    cfg = ExperimentConfig(random_seed=5, model=ModelConfig(**TINY))
    data = make_synthetic(
        num_molecules=4, conformers=2, min_atoms=3, max_atoms=5, num_grid=16, seed=2
    )
    batch = {k: jnp.asarray(v) for k, v in make_batch(data, np.arange(8)).items()}
    idx = np.arange(8, dtype=np.int32).reshape(2, 4)
    hp, static = train.hparams_of(cfg.training, 3), train.StepConfig(cfg.model, True, True)
    seed = np.int32(cfg.random_seed)

    def run(init, update):
        state = init(
            seed, train.hparams_of(cfg.training, 1), model_config=cfg.model, use_grad_clip=True
        )
        return update(state, batch, idx, hp, static)

    plain = run(train._init_state._jit, train._update._jit)
    for _ in range(2):  # the first traces and keeps, the second reads back
        init = programs.cached_jit(
            train._init_state.__wrapped__, static_argnames=("model_config", "use_grad_clip")
        )
        update = programs.cached_jit(train._update.__wrapped__, static_argnames=("static",))
        got = run(init, update)
        assert jax.tree.structure(got) == jax.tree.structure(plain)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain), strict=True):
            np.testing.assert_array_equal(a, b)
    names = sorted(p.name.split("-")[0] for p in kept.glob("*.bin"))
    assert names == ["_init_state", "_update"]
