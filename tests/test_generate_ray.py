"""Kept molecules and generation on Ray (issue 22 item 2).

(a) Without Ray: a generation stopped after its first molecule keeps that molecule; the rerun
computes only the others, reuses the kept one bit for bit and ends with the arrays of an
uninterrupted run. Kept molecules of other settings are refused (one line) unless --force
discards them; an existing output is never replaced without --force.

(b) On a local 2-CPU Ray head (`ray start --block`, cluster_kit): `python -m dcmtune.data
generate --address` as a subprocess. One Ray worker process running a task is killed by pid
(Ray retries its molecule); the run completes with every molecule exactly once. The driver is
killed mid-run; the rerun keeps the finished molecules bit for bit and recomputes the others
within 1e-8 Hartree/e of an in-process run.

(c) An unreachable --address exits 2 with one line; nothing is written.

Tiny molecules, STO-3G, 60 grid points (as tests/test_qm.py). Every wait is bounded by progress.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import psutil
import pytest
from cluster_kit import (
    PYTHON,
    CpuMeter,
    exited,
    file_size,
    files_state,
    free_port,
    processes,
    ray_workers,
    run,
    start_node,
    stop,
    wait_for,
)

from dcmtune import qm
from dcmtune.data.__main__ import main
from dcmtune.qm.parts import PartStore, parts_dir
from dcmtune.sweep.ray_generate import TASK_PREFIX

SMALL = dict(conformers=2, basis="sto-3g", max_grid=60, seed=0)
NAMES = ["H2", "H2O", "NH3"]
# On Ray: three tiny molecules and one that takes several times longer (naphthalene, 18
# atoms), so that small ones are kept while it still runs.
BIG = "c1ccc2ccccc2c1"
RAY_SETTINGS = dict(conformers=3, basis="sto-3g", max_grid=60, seed=0)
RAY_ARGS = ["--molecules", *NAMES, "--smiles", BIG, "--conformers", "3", "--basis", "sto-3g"]
RAY_ARGS += ["--max-grid", "60"]


pytestmark = pytest.mark.usefixtures("one_pyscf_thread")  # conftest.py


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _close(a: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Within 1e-8 (Hartree/e, Hartree, ...) beyond the float32 rounding of the stored file."""
    spacing = np.spacing(np.abs(ref).astype(ref.dtype)) if ref.dtype == np.float32 else 0.0
    dev = np.abs(a.astype(np.float64) - ref.astype(np.float64)) - spacing
    assert dev.max() <= 1e-8, f"{what}: off by {dev.max():.2e} beyond float32 rounding"


def _assert_matches(path: Path, ref: dict[str, np.ndarray]) -> None:
    a = _arrays(path)
    assert sorted(a) == sorted(ref)
    assert a["mol_id"].tolist() == ref["mol_id"].tolist()  # every molecule once, spec order
    for k in ("Z", "N", "n_grid", "R", "vdw_surface"):
        assert np.array_equal(a[k], ref[k]), k  # geometry and grid: seeded, exact
    for k in ("esp", "mono", "mulliken", "Dxyz", "com", "scf_energy"):
        _close(a[k], ref[k], k)


def _kept(out: Path, specs, settings) -> dict[str, dict]:
    """{mol_id: kept result} of the molecules kept for `out`."""
    return {specs[i].name: r for i, r in PartStore(out, settings).kept(specs).items()}


def _rows_equal(path: Path, spec, result: dict, settings) -> None:
    """The file's rows of `spec` are its kept part's, bit for bit."""
    name, rows = spec.name, qm.generated_arrays([spec], [result], settings)
    a = _arrays(path)
    sel = a["mol_id"] == name
    for k, v in rows.items():
        if k == "mol_id":
            continue
        got = a[k][sel]
        if got.ndim > 1:  # padded to the file's atoms / grid points
            got = got[tuple([slice(None)] + [slice(0, s) for s in v.shape[1:]])]
        assert np.array_equal(got, v), f"{name} {k} differs from its kept part"


# --------------------------------------------------------------------------- (a) no Ray


class _Stop(Exception):
    pass


def test_interrupted_generation_resumes_and_equals_one_shot(tmp_path):
    specs = qm.load_molecules(NAMES)
    settings = qm.GenerationSettings(**SMALL)
    qm.generate_dataset(tmp_path / "ref.npz", specs, settings, workers=0)
    ref = _arrays(tmp_path / "ref.npz")

    out = tmp_path / "x.npz"

    def stop_after_first(name: str, n: int) -> None:
        raise _Stop(name)

    with pytest.raises(_Stop) as first:  # the process pool path, stopped after one molecule
        qm.generate_dataset(out, specs, settings, workers=1, progress=stop_after_first)
    kept_name = str(first.value)
    work = parts_dir(out)
    kept_files = {p.name: p.read_bytes() for p in work.glob("*.npz")}
    assert len(kept_files) == 1 and not out.exists()
    kept = _kept(out, specs, settings)
    assert list(kept) == [kept_name]

    # Other settings: refused with one line, the kept molecule untouched.
    with pytest.raises(qm.QMError, match="other settings.*seed 0 \\(now 1\\).*--force") as e:
        qm.generate_dataset(out, specs, qm.GenerationSettings(**dict(SMALL, seed=1)), workers=0)
    assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in work.glob("*.npz")} == kept_files

    seen: list[str] = []
    prov = qm.generate_dataset(
        out, specs, settings, workers=0, progress=lambda m, n: seen.append(m)
    )
    assert sorted(seen) == sorted(NAMES) and seen[0] == kept_name  # kept first, each once
    assert prov["resumed"]["kept_molecules"] == [kept_name]
    assert prov["timing"]["conformers_computed"] == 2 * (len(NAMES) - 1)
    assert not work.exists()
    spec = next(s for s in specs if s.name == kept_name)
    _rows_equal(out, spec, kept[kept_name], settings)
    recorded = {m["mol_id"]: m["seconds"] for m in prov["molecules"]}
    assert recorded[kept_name] == round(kept[kept_name]["seconds"], 3)  # its first run's time
    _assert_matches(out, ref)


def test_existing_output_needs_force_and_force_discards_stale_parts(tmp_path, capsys):
    specs = qm.load_molecules(NAMES[:2])
    settings = qm.GenerationSettings(**SMALL)
    out = tmp_path / "y.npz"
    other = qm.GenerationSettings(**dict(SMALL, seed=1))
    with pytest.raises(_Stop):
        qm.generate_dataset(out, specs, other, workers=0, progress=lambda m, n: _raise())
    assert len(list(parts_dir(out).glob("*.npz"))) == 1
    prov = qm.generate_dataset(out, specs, settings, workers=0, force=True)
    assert prov["resumed"]["kept_molecules"] == [] and not parts_dir(out).exists()
    with pytest.raises(qm.QMError, match="already exists; pass --force"):
        qm.generate_dataset(out, specs, settings, workers=0)
    before, before_arrays = out.read_bytes(), _arrays(out)
    args = ["generate", "--molecules", *NAMES[:2], "--conformers", "2", "--basis", "sto-3g"]
    args += ["--max-grid", "60", "--workers", "0", "--out", str(out)]
    assert main(args) == 2 and out.read_bytes() == before
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --force" in err
    assert main([*args, "--force"]) == 0  # replaced by the same numbers
    _assert_matches(out, before_arrays)
    # A work directory of other settings that keeps no molecule is simply replaced.
    fresh = tmp_path / "fresh.npz"
    parts_dir(fresh).mkdir()
    (parts_dir(fresh) / "settings.json").write_text(json.dumps({"settings_key": "other"}))
    qm.generate_dataset(fresh, specs, settings, workers=0)
    assert not parts_dir(fresh).exists()
    _assert_matches(fresh, before_arrays)


def _raise() -> None:
    raise _Stop()


# --------------------------------------------------------------------------- (c) bad address


def test_unreachable_address_exits_2_one_line_nothing_written(tmp_path, capsys):
    out = tmp_path / "z.npz"
    args = ["generate", "--molecules", "H2", "--conformers", "1", "--basis", "sto-3g"]
    args += ["--out", str(out)]
    assert main([*args, "--address", f"127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Ray cluster reachable" in err, err
    assert main([*args, "--cpus-per-task", "2"]) == 2
    assert "only with --address" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- (b) on Ray


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local 2-CPU Ray head (`ray start --head --block`), stopped with its processes."""
    workdir = tmp_path_factory.mktemp("ray_head")
    node = start_node(workdir, "head", 2)
    try:
        yield node
    finally:
        node.stop()
        node.remove()


@pytest.fixture(scope="module")
def ray_reference(tmp_path_factory):
    """(specs, settings, arrays) of the Ray tests' molecules made in this process."""
    specs = qm.load_molecules(NAMES, smiles=[BIG])
    settings = qm.GenerationSettings(**RAY_SETTINGS)
    out = tmp_path_factory.mktemp("ray_ref") / "ref.npz"
    qm.generate_dataset(out, specs, settings, workers=0)
    return specs, settings, _arrays(out)


def _driver(head, workdir: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{out.stem}.log"
    cmd = [PYTHON, "-m", "dcmtune.data", "generate", *RAY_ARGS]
    cmd += ["--address", head.address, "--out", str(out)]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=head.env, cwd=workdir, stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def _big_task_worker(head) -> psutil.Process | None:
    """The Ray worker process (under our `ray start`) running the big molecule's task."""
    for p in ray_workers(head.proc.pid):
        try:
            if " ".join(p.cmdline()).startswith(f"ray::{TASK_PREFIX}{BIG}"):
                return p
        except psutil.Error:
            continue
    return None


def _kept_while_big_runs(head, proc, log: Path, out: Path):
    """Waits (bounded by progress) until a molecule is kept and the big one runs; returns the
    worker process running the big one."""
    cpu = CpuMeter(lambda: processes(proc.pid) + ray_workers(head.proc.pid))

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}): {log.read_text()}")
        if not list(parts_dir(out).glob("*.npz")):
            return None
        return _big_task_worker(head)

    return wait_for(
        ready,
        f"a kept molecule while {BIG} runs (log {log})",
        lambda: (file_size(log), files_state(parts_dir(out)), cpu()),
    )


def test_a_lost_worker_molecule_is_retried_and_every_molecule_kept_once(
    ray_head, ray_reference, tmp_path
):
    specs, settings, ref = ray_reference
    out = tmp_path / "lost.npz"
    proc, log = _driver(ray_head, tmp_path, out)
    cpu = CpuMeter(lambda: processes(proc.pid) + ray_workers(ray_head.proc.pid))
    try:
        victim = _kept_while_big_runs(ray_head, proc, log, out)
        victim.kill()  # by pid: a worker of the `ray start` this test started
        wait_for(lambda: exited(victim), f"worker {victim.pid} to exit on SIGKILL")
        wait_for(
            lambda: proc.poll() is not None,
            f"the driver to finish after the lost worker (log {log})",
            lambda: (file_size(log), files_state(parts_dir(out)), cpu()),
        )
    finally:
        stop(proc, "the generate driver")
    assert proc.returncode == 0, log.read_text()
    _assert_matches(out, ref)  # every molecule once, the retried one recomputed
    prov = json.loads(qm.provenance_path(out).read_text())
    assert prov["timing"]["ray"]["address"] == ray_head.address
    assert prov["timing"]["ray"]["cpus_per_task"] == 1 and prov["timing"]["ray"]["tasks"] == 4
    assert not parts_dir(out).exists()


def test_a_killed_driver_resumes_kept_molecules_bit_identical(ray_head, ray_reference, tmp_path):
    specs, settings, ref = ray_reference
    out = tmp_path / "driver.npz"
    proc, log = _driver(ray_head, tmp_path, out)
    try:
        _kept_while_big_runs(ray_head, proc, log, out)
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
    finally:
        stop(proc, "the generate driver")
    assert not out.exists()
    kept = _kept(out, specs, settings)
    assert kept and BIG not in kept
    rerun = run(
        [PYTHON, "-m", "dcmtune.data", "generate", *RAY_ARGS, "--address", ray_head.address]
        + ["--out", str(out)],
        "the rerun of the killed generation",
        cwd=tmp_path,
        env=ray_head.env,
        progress=lambda: files_state(parts_dir(out)),
    )
    assert rerun.returncode == 0, rerun.stderr
    prov = json.loads(qm.provenance_path(out).read_text())
    assert sorted(prov["resumed"]["kept_molecules"]) == sorted(kept)
    by_name = {s.name: s for s in specs}
    for name, result in kept.items():
        _rows_equal(out, by_name[name], result, settings)  # kept: bit for bit
    _assert_matches(out, ref)  # recomputed: within 1e-8
    assert not parts_dir(out).exists()
