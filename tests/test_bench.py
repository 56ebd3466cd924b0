"""Every bench of bench/ at its smallest size (`--smoke`), all in this one process, and a check
that the benches use only public names of dcmtune.

The smoke runs share one persistent JAX compilation cache (the session's `jax_cache_dir`): the
in-process benches first (one tiny model on the demo set's default split, so most of them reuse
the programs the first one compiled), then the trial processes of bench/compiles.py and the
sweeps of the Ray benches, which read those programs back from the cache. Everything they write
goes under tmp_path (working directory, tempfile's directory, output directories).
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dcmtune.models import model_dir

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str, monkeypatch):
    """bench/<name>.py as the module bench_<name> (bench/ is not a package), in sys.modules for
    the test only."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _runs(tmp: Path, cache: Path, demo: Path) -> list[tuple[str, list[str], tuple[str, ...]]]:
    """(bench, argv, figure lines its output must contain), in the order they run."""
    return [
        ("baselines", ["--smoke"], ("over molecules", "shared ")),
        ("pareto_front", ["--smoke"], ("front of (valid ESP RMSE, charges per atom)", "knee")),
        ("cluster_traffic", ["--smoke"], ("epoch 1: state.msgpack", "organic set in the object")),
        (
            "accuracy",
            ["generalise", "--smoke", "--data-files", str(demo)]
            + ["--output-dir", str(tmp / "accuracy")],
            ("test ESP RMSE", "median"),
        ),
        (
            "breakdown",
            [str(model_dir("organic-v1")), "--split", "test"],
            ("LSQ per molecule (bound)", "| all | 63000 | 18 |"),
        ),
        (
            "large_baselines",
            [str(model_dir("organic-v1"))],
            ("train 138 mol, all (18 mol): model 1.173  mmff94 2.441", "lsq 1.174  resp 1.263"),
        ),
        ("espaloma_check", ["--smoke"], ("| mean of 2 |", "| 0 | 18 |")),
        ("density_fit", ["--smoke"], ("ratio", "ESP difference on")),
        (
            "finetune",
            ["--smoke", "--output-dir", str(tmp / "finetune")],
            ("pretrained only (no heterocycles seen)", "ratio of medians"),
        ),
        (
            "epoch_bookkeeping",
            ["--smoke", "--output-dir", str(tmp / "bookkeeping")],
            ("2 epochs: wall", "save_checkpoint", "TensorBoard events"),
        ),
        ("throughput", ["--smoke"], ("bucketed / padded:", "streaming: epoch time streamed")),
        ("padding", ["--smoke"], ("ratio mmml layout / compact (median of 1):",)),
        (
            "scaling",
            ["--smoke", "--only", "conformers", "--output-dir", str(tmp / "scaling")],
            ("1x demo",),
        ),
        ("train_step", ["--smoke"], ("ms/update",)),
        ("edges", ["--smoke"], ("time per computed edge", "predict one 63-atom molecule")),
        ("predict", ["--smoke"], ("charges + dipole", "+ ESP on data grid")),
        ("driver_sync", ["--smoke"], ("best of 1: driver sync",)),
        ("compiles", ["--smoke", "--cache-dir", str(cache)], ("process 2 ",)),
        (
            "sweep_overhead",
            ["--smoke", "--output-dir", str(tmp / "overhead"), "--jax-cache-dir", str(cache)],
            ("median", "ratio_sched"),
        ),
        (
            "search_efficiency",
            ["--smoke", "--output-dir", str(tmp / "search"), "--jax-cache-dir", str(cache)],
            ("ratio tpe_asha/random epochs",),
        ),
        (
            "learning_curves",
            ["record", "--smoke", "--out", str(tmp / "lc.csv"), "--split-seed", "0"]
            + ["--storage", str(tmp / "lc"), "--quiet"],
            ("2 configurations x 2 epochs",),
        ),
        (
            "search_efficiency",
            ["--smoke", "--table", str(tmp / "lc.csv"), "--json", str(tmp / "replay.json")]
            + ["--held-out", str(tmp / "lc.csv")],
            ("random+fifo", "chosen on", "robust on both"),
        ),
        (
            "sweep_value",
            ["--smoke", "--storage", str(tmp / "value"), "--json", str(tmp / "value.json")],
            ("winner / median of the defaults",),
        ),
        (
            "sweep_ensemble",
            [str(tmp / "value.json"), "--top-k", "1", "2", "--json", str(tmp / "ens.json")],
            ("/ defaults median", "ensemble of 1:"),
        ),
        (
            "ensemble_uncertainty",
            ["--smoke", "--storage", str(tmp / "ensemble")],
            ("Spearman with the ensemble's per-molecule ESP RMSE", "pooled: "),
        ),
    ]


@pytest.mark.ray
def test_every_bench_smoke(ray_session, jax_cache_dir, tmp_path, monkeypatch, capsys):
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    from dcmtune.data import bundled_dataset_path
    from dcmtune.train.environment import use_compilation_cache

    monkeypatch.syspath_prepend(str(BENCH))  # the sweep benches import bench/_sweeps.py
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # driver_sync's moto server
        monkeypatch.setenv(key, "testing")
    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {key: getattr(jax.config, key) for key in keys}
    jax.config.update("jax_compilation_cache_dir", None)
    use_compilation_cache(jax_cache_dir)
    compilation_cache.reset_cache()  # this process may have decided on "no cache" already
    seconds = {}
    try:
        for name, argv, figures in _runs(tmp_path, jax_cache_dir, bundled_dataset_path()):
            module = _load(name, monkeypatch)
            t0, cpu0 = time.perf_counter(), time.process_time()
            assert module.main(argv) == 0, name
            key = name if name not in seconds else f"{name} ({argv[1]})"
            seconds[key] = (time.perf_counter() - t0, time.process_time() - cpu0)
            out = capsys.readouterr().out
            (tmp_path / f"{key}.out").write_text(out)
            for figure in figures:
                assert figure in out, f"{name}: no {figure!r} in its output:\n{out}"
    finally:
        for key, value in saved.items():
            jax.config.update(key, value)
        compilation_cache.reset_cache()
        with capsys.disabled():
            print(
                "\nbench smoke seconds (wall/CPU of this process): "
                + ", ".join(f"{k} {w:.1f}/{c:.1f}" for k, (w, c) in seconds.items())
            )
    assert ray_session.is_initialized()  # the sweeps used the session's Ray and left it running


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _root(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _private_uses(path: Path) -> list[str]:
    """Imports of `_`-prefixed dcmtune names (modules included) and attribute accesses of
    `_`-prefixed names on anything imported from dcmtune, as 'file:line: what'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, bound = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "dcmtune":
                    if any(_private(p) for p in alias.name.split(".")):
                        found.append(f"{path.name}:{node.lineno}: import {alias.name}")
                    bound.add(alias.asname or "dcmtune")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "dcmtune":
                continue
            if any(_private(p) for p in parts):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                if _private(alias.name):
                    found.append(
                        f"{path.name}:{node.lineno}: from {node.module} import {alias.name}"
                    )
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and _root(node) in bound:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_benches_use_public_dcmtune_names_only():
    files = sorted(BENCH.glob("*.py"))
    assert files
    found = [use for path in files for use in _private_uses(path)]
    assert not found, "private dcmtune names in bench/:\n" + "\n".join(found)


def test_private_name_check_finds_them(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import dcmtune.train.step as st\n"
        "from dcmtune.train.step import _update, train_step\n"
        "from dcmtune._yaml import read_yaml\n"
        "import dcmtune\n"
        "st._update(1)\n"
        "dcmtune.train.step._eval_sums\n"
        "print(dcmtune.__file__, train_step.__name__)\n"
    )
    assert sorted(u.split(": ", 1)[1] for u in _private_uses(bad)) == [
        "dcmtune.train.step._eval_sums",
        "from dcmtune._yaml import ...",
        "from dcmtune.train.step import _update",
        "st._update",
    ]
