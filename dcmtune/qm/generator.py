"""Quantum-chemical ESP data sets with PySCF: many molecules, worker processes, one file.

`generate_dataset` checks every input first (method, basis, electrons, the reserved set), then
computes every molecule in single-threaded worker processes (`generate`; two processes with one
thread each run about twice as fast as one with two threads, DESIGN.md 3b) or with another
`Runner` (the Ray tasks of `dcmtune.sweep.ray_generate`), keeps each finished molecule in a work
directory beside the output (`dcmtune.qm.parts`: a killed run resumes), and writes the `.npz`
layout of DESIGN.md section 2 plus a provenance JSON (settings, versions, timings, a command
that rebuilds it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import os
import shlex
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

from dcmtune import _io
from dcmtune.data.file_format import provenance_path
from dcmtune.data.grids import VDW_RADII
from dcmtune.data.load import load_npz
from dcmtune.provenance import versions
from dcmtune.qm.conformers import check_not_reserved
from dcmtune.qm.parts import PartStore, parts_dir
from dcmtune.qm.pyscf_esp import build_mol, check_auxbasis, check_method, compute_molecule
from dcmtune.qm.specs import G2_SOURCE, GenerationSettings, MoleculeSpec, QMError, check_electrons
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "Runner",
    "process_runner",
    "generate",
    "generated_arrays",
    "molecule_records",
    "rebuild_command",
    "check_output",
    "check_inputs",
    "generate_dataset",
]

# Environment of the worker processes: one thread for OpenMP (PySCF) and BLAS each. Two
# single-threaded processes beat one two-threaded process (DESIGN.md 3b).
_SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# What each key of a generated file holds (recorded in its provenance).
KEYS = {
    "R": "(M, A, 3) Angstrom",
    "Z": "(M, A) int",
    "N": "(M,)",
    "esp": "(M, G) Hartree/e: nuclei + SCF electron density (int1e_grids)",
    "vdw_surface": "(M, G, 3) Angstrom",
    "n_grid": "(M,)",
    "mono": "(M, A) e: ESP-fitted least-squares atom-centred charges per conformer, "
    "total charge constrained to Q (Lagrange multiplier); not Mulliken, not RESP",
    "Dxyz": "(M, 3) Debye: SCF dipole (nuclei + electron density) about com",
    "com": "(M, 3) Angstrom: centre of mass (standard atomic weights)",
    "Q": "(M,) e",
    "mol_id": "(M,) str: molecule name",
    "mulliken": "(M, A) e: Mulliken charges (extra key, for baselines)",
    "scf_energy": "(M,) Hartree: SCF total energy (extra key)",
}
# The packages whose versions shape the numbers of a generated file.
_VERSIONS = ("dcmtune", "numpy", "pyscf", "ase", "rdkit")


def _init_worker() -> None:
    os.environ.update(_SINGLE_THREAD_ENV)
    from pyscf import lib

    lib.num_threads(1)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Temporarily sets environment variables (inherited by processes started meanwhile)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


Runner = Callable[
    [Sequence[MoleculeSpec], Sequence[int], GenerationSettings, Callable[[int, dict], None]], dict
]
"""Computes molecules: runner(specs, indices, settings, done) calls done(i, compute_molecule
result of specs[i]) for every i in `indices`, as each finishes (in any order), and returns what
the provenance records about how they ran (e.g. {"workers": 2})."""


def process_runner(workers: int = 2) -> Runner:
    """The local runner: `workers` single-threaded processes (0: in this process)."""

    def run(specs, indices, settings, done) -> dict:
        _run_processes(specs, indices, settings, done, workers)
        return {"workers": workers}

    return run


def _run_processes(specs, indices, settings, done, workers: int) -> None:
    if workers == 0:
        for i in indices:
            done(i, compute_molecule(specs[i], settings))
        return
    # Largest molecules first keeps both workers busy until the end.
    order = sorted(indices, key=lambda i: -int(specs[i].numbers.sum()))
    if not order:
        return
    # Spawned workers inherit the single-thread environment before NumPy/PySCF load their
    # BLAS/OpenMP runtimes (setting it inside a worker would come too late for BLAS).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(workers, len(order)), mp_context=ctx, initializer=_init_worker
    ) as pool:
        with _environment(_SINGLE_THREAD_ENV):
            futures = {pool.submit(compute_molecule, specs[i], settings): i for i in order}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(futures[fut], fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def generate(
    specs: Sequence[MoleculeSpec],
    settings: GenerationSettings,
    workers: int = 2,
    progress: Callable[[str, int], None] | None = None,
) -> list[dict]:
    """Computes every molecule; returns `compute_molecule` results in the order of `specs`.

    Nothing is kept on disk (`generate_dataset` keeps finished molecules).

    Args:
      workers: processes, each single-threaded (OpenMP and BLAS); molecules are dealt out
        largest first. 0 runs in this process (for debugging; threads as configured).
      progress: called as progress(name, num_conformers) when a molecule finishes.

    Raises:
      QMError: bad settings/inputs (checked for every molecule before any SCF).
      SCFError: an SCF did not converge.
    """
    check_inputs(specs, settings, workers)  # fail fast, before any compute.
    results: list[dict | None] = [None] * len(specs)

    def done(i: int, result: dict) -> None:
        results[i] = result
        if progress:
            progress(specs[i].name, settings.conformers)

    process_runner(workers)(specs, range(len(specs)), settings, done)
    return results  # type: ignore[return-value]  # every slot filled by done()


# --------------------------------------------------------------------------- output


def generated_arrays(
    specs: Sequence[MoleculeSpec], results: Sequence[dict], settings: GenerationSettings
) -> dict[str, np.ndarray]:
    """The DESIGN.md section 2 arrays (padded, real atoms first, float32) plus the extra keys
    `shell` (M, G) vdW-radius factor of each grid point's sphere (0 on padding), `mulliken`
    (M, A) e and `scf_energy` (M,) Hartree."""
    M = sum(len(r["R"]) for r in results)
    A = max(len(s.numbers) for s in specs)
    G = max(len(g) for r in results for g in r["grid"])
    f32 = np.float32
    out = {
        "R": np.zeros((M, A, 3), f32),
        "Z": np.zeros((M, A), np.int32),
        "N": np.zeros(M, np.int32),
        "esp": np.zeros((M, G), f32),
        "vdw_surface": np.zeros((M, G, 3), f32),
        "shell": np.zeros((M, G), f32),
        "n_grid": np.zeros(M, np.int32),
        "mono": np.zeros((M, A), f32),
        "Dxyz": np.zeros((M, 3), f32),
        "com": np.zeros((M, 3), f32),
        "Q": np.full(M, settings.charge, f32),
        "mol_id": np.array([s.name for s, r in zip(specs, results, strict=True) for _ in r["R"]]),
        "mulliken": np.zeros((M, A), f32),
        "scf_energy": np.zeros(M, np.float64),
    }
    m = 0
    for spec, res in zip(specs, results, strict=True):
        n = len(spec.numbers)
        for c in range(len(res["R"])):
            g = len(res["grid"][c])
            out["R"][m, :n] = res["R"][c]
            out["Z"][m, :n] = spec.numbers
            out["N"][m] = n
            out["esp"][m, :g] = res["esp"][c]
            out["vdw_surface"][m, :g] = res["grid"][c]
            out["shell"][m, :g] = res["shell"][c]
            out["n_grid"][m] = g
            out["mono"][m, :n] = res["mono"][c]
            out["mulliken"][m, :n] = res["mulliken"][c]
            out["Dxyz"][m] = res["Dxyz"][c]
            out["com"][m] = res["com"][c]
            out["scf_energy"][m] = res["energy"][c]
            m += 1
    return out


def molecule_records(specs: Sequence[MoleculeSpec], results: Sequence[dict]) -> list[dict]:
    """Per-molecule provenance: source, formula, timings, conformer energies, grid sizes."""
    rows = []
    for spec, res in zip(specs, results, strict=True):
        e = np.asarray(res["energy"])
        above = (e[1:] - e[0]) * HARTREE_TO_KCAL if len(e) > 1 else np.zeros(0)
        rows.append(
            {
                "mol_id": spec.name,
                "source": spec.source,
                "formula": spec.formula,
                "atoms": int(len(spec.numbers)),
                "conformers": int(len(e)),
                "seconds": round(float(res["seconds"]), 3),
                "seconds_per_conformer": round(float(res["seconds"]) / len(e), 3),
                "scf_cycles": res["scf_cycles"],
                "energy_equilibrium_hartree": float(e[0]),
                "energy_above_equilibrium_kcal_mol": {
                    "mean": round(float(above.mean()), 3) if len(above) else 0.0,
                    "max": round(float(above.max()), 3) if len(above) else 0.0,
                },
                "grid_points": {
                    "min": int(min(len(g) for g in res["grid"])),
                    "max": int(max(len(g) for g in res["grid"])),
                },
                **({"smiles": spec.smiles, "geometry": spec.geometry} if spec.smiles else {}),
            }
        )
    return rows


def rebuild_command(
    names: Sequence[str],
    xyz_files: Sequence[str | Path],
    settings: GenerationSettings,
    out: str | Path,
    workers: int,
    smiles: Sequence[str] = (),
    smiles_files: Sequence[str | Path] = (),
) -> str | None:
    """The shell command that regenerates a dataset with these settings, or None when a
    setting the CLI does not expose (shells, min_distance, conv_tol) differs from its default.
    """
    default = GenerationSettings()
    if any(
        getattr(settings, k) != getattr(default, k) for k in ("shells", "min_distance", "conv_tol")
    ):
        return None
    args = ["python", "-m", "dcmtune.data", "generate"]
    if names:
        args += ["--molecules", *names]
    if xyz_files:
        args += ["--xyz", *map(str, xyz_files)]
    if smiles:
        args += ["--smiles", *smiles]
    if smiles_files:
        args += ["--smiles-file", *map(str, smiles_files)]
    args += [
        "--conformers",
        str(settings.conformers),
        "--method",
        settings.method,
        "--basis",
        settings.basis,
        "--sigma",
        repr(settings.sigma),
        "--density",
        repr(settings.density),
        "--max-grid",
        str(settings.max_grid),
        "--seed",
        str(settings.seed),
        "--charge",
        str(settings.charge),
    ]
    if settings.spin is not None:
        args += ["--spin", str(settings.spin)]
    if settings.density_fit:
        args += ["--density-fit", settings.density_fit]
    args += ["--workers", str(workers), "--out", str(out)]
    return shlex.join(args)


def check_output(out: str | Path, force: bool = True) -> Path:
    """Raises QMError unless `out` is a writable-looking .npz path, and (unless `force`) neither
    it nor its provenance exists."""
    out = Path(out)
    if out.suffix != ".npz":
        raise QMError(f"{out}: the output file name must end in .npz")
    if not out.parent.is_dir():
        raise QMError(f"{out}: directory {out.parent} does not exist")
    if not force:
        for p in (out, provenance_path(out)):
            if p.exists():
                raise QMError(f"{p}: already exists; pass --force to replace it")
    return out


def check_inputs(
    specs: Sequence[MoleculeSpec], settings: GenerationSettings, workers: int = 2
) -> None:
    """Every check that can fail before any SCF: method, basis, electrons, workers.

    Raises:
      QMError: naming the molecule and the problem.
    """
    if workers < 0:
        raise QMError(f"workers: expected >= 0, got {workers}")
    if not specs:
        raise QMError("no molecules given")
    check_method(settings.method)
    check_not_reserved(specs)
    for spec in specs:
        if spec.smiles is not None and (settings.charge or settings.spin):
            raise QMError(
                f"{spec.name}: SMILES inputs are neutral closed-shell molecules; "
                "drop --charge/--spin"
            )
        check_electrons(spec, settings.charge, settings.spin)
        mol = build_mol(
            spec.numbers, spec.positions, settings.basis, settings.charge, settings.spin
        )
        if settings.density_fit:
            check_auxbasis(settings.density_fit, mol)


def generate_dataset(
    out: str | Path,
    specs: Sequence[MoleculeSpec],
    settings: GenerationSettings | None = None,
    workers: int = 2,
    progress: Callable[[str, int], None] | None = None,
    *,
    force: bool = False,
    runner: Runner | None = None,
) -> dict:
    """Generates a dataset file `out` (.npz) and its provenance JSON; returns the provenance.

    All inputs are checked before any SCF runs. Each molecule is kept in `parts_dir(out)` as it
    finishes; a rerun with the same settings computes only the molecules not kept yet
    (`dcmtune.qm.parts`). The final file is assembled from all of them in the order of `specs`
    (the same arrays as a run without interruption), written to a temporary name and renamed;
    then the provenance, then the work directory is removed.

    Args:
      out: the .npz path; the provenance goes to `provenance_path(out)`.
      specs: from `load_molecules`.
      workers: see `generate` (used when no `runner` is given; recorded in the provenance).
      progress: progress(name, num_conformers) for each kept molecule, then as each finishes.
      force: replace an existing `out` (and its provenance), discard kept molecules of other
        settings; without it both are refused.
      runner: computes the molecules (default `process_runner(workers)`).

    Raises:
      QMError: bad inputs (charge/spin, basis, method, output path), an existing output, kept
        molecules of other settings.
      SCFError: an SCF did not converge (the finished molecules stay kept).
    """
    settings = GenerationSettings() if settings is None else settings
    out = check_output(out, force)
    check_inputs(specs, settings, workers)
    store = PartStore(out, settings, force)
    results: dict[int, dict] = store.kept(specs)
    kept = sorted(results)
    for i in kept:
        if progress:
            progress(specs[i].name, settings.conformers)

    def done(i: int, result: dict) -> None:
        store.keep(specs[i], result)
        results[i] = result
        if progress:
            progress(specs[i].name, settings.conformers)

    todo = [i for i in range(len(specs)) if i not in results]
    t0 = time.perf_counter()
    ran = (runner or process_runner(workers))(specs, todo, settings, done)
    run = {"wall": time.perf_counter() - t0, "ran": ran, "kept": kept, "computed": todo}
    ordered = [results[i] for i in range(len(specs))]
    arrays = generated_arrays(specs, ordered, settings)
    _io.atomic_write(out, lambda f: np.savez_compressed(f, **arrays))
    checksum = load_npz([out]).checksum()  # also proves the file loads.
    provenance = _provenance(out, specs, ordered, settings, workers, run, checksum)
    _io.write_text(provenance_path(out), json.dumps(provenance, indent=1) + "\n")
    store.remove()
    return provenance


def _method_records(settings: GenerationSettings) -> dict:
    """How the numbers were made: SCF, conformers and grid (provenance sections)."""
    scf = "RHF (UHF if spin > 0)" if settings.method.upper() == "HF" else "RKS (UKS if spin > 0)"
    return {
        "qm": {
            "code": "PySCF",
            "method": settings.method,
            "basis": settings.basis,
            "scf": f"{scf}, conv_tol {settings.conv_tol} Hartree; initial guess: PySCF's "
            "default for conformer 0, then the previous conformer's density",
            "integrals": (
                f"density fitting (RI-JK) with auxiliary basis {settings.density_fit}"
                if settings.density_fit
                else "exact four-centre"
            ),
        },
        "conformers": {
            "first": "the input (equilibrium) geometry; for SMILES inputs see molecules[].geometry",
            "others": f"Gaussian displacement, sigma {settings.sigma} Angstrom per "
            "coordinate, redrawn if any atom pair is closer than "
            f"{settings.min_distance} Angstrom",
            "seed": f"numpy SeedSequence([seed, crc32(mol_id)]), seed {settings.seed}",
        },
        "grid": {
            "kind": "Merz-Kollman shells (golden-spiral points on spheres)",
            "shells_vdw_factor": list(settings.shells),
            "density_points_per_A2": settings.density,
            "exclusion": f"points inside any atom's {min(settings.shells)} x vdW sphere dropped",
            "max_grid": settings.max_grid,
            "subsample": "uniform without replacement (seeded) when more points survive",
            "vdw_radii_angstrom": {str(k): v for k, v in sorted(VDW_RADII.items())},
        },
    }


def _provenance(
    out: Path, specs, results, settings: GenerationSettings, workers: int, run: dict, checksum: str
) -> dict:
    """The provenance record; `run` holds this run's wall time, what the runner reported and
    the indices of the kept and of the computed molecules."""
    names = [s.name for s in specs if s.source == G2_SOURCE]
    xyz_files = [s.source for s in specs if s.source != G2_SOURCE and s.smiles is None]
    smiles = [s.smiles for s in specs if s.smiles is not None and s.source == "smiles"]
    smiles_files = list(
        dict.fromkeys(s.source for s in specs if s.smiles is not None and s.source != "smiles")
    )
    M = sum(len(r["R"]) for r in results)
    computed = sum(len(results[i]["R"]) for i in run["computed"])
    wall = run["wall"]
    return {
        "file": out.name,
        "format": "dcmtune ESP .npz, DESIGN.md section 2 (mmml DCMNet compatible)",
        "command": rebuild_command(names, xyz_files, settings, out, workers, smiles, smiles_files),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data_checksum": checksum,
        "settings": dataclasses.asdict(settings),
        **_method_records(settings),
        "keys": KEYS,
        "versions": versions(_VERSIONS, python=True),
        "timing": {
            "wall_seconds": round(wall, 1),
            "workers": workers,
            **run["ran"],
            "cpus": os.cpu_count(),
            "conformers": M,
            "conformers_computed": computed,
            "conformers_per_hour": round(computed / wall * 3600.0, 1) if computed else None,
            "note": "wall time of this run's SCF/ESP stage (all processes or tasks); kept "
            "molecules (resumed) are not in it",
        },
        "resumed": {
            "kept_molecules": [specs[i].name for i in run["kept"]],
            "work_directory": parts_dir(out).name,
            "note": "molecules kept by an earlier, interrupted run with the same settings, "
            "reused bit for bit (removed once this file was written)",
        },
        "molecules": molecule_records(specs, results),
    }
