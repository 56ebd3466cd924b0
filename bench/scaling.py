"""Scaling of training time with conformers, atoms and grid points, and where the time goes.

Four sweeps of the default model (dcmtune.config defaults: 16 features, n_dcm 2, max_degree 2,
2 iterations, batch 8):

  conformers  the demo set repeated 1x, 4x, 16x (each copy's atoms jittered by 0.01 A;
              240 -> 3,840 conformers, up to 12 atoms, up to 1,200 grid points)
  atoms       synthetic molecules (dcmtune.synthetic) of exactly 10, 20, 40, 60 atoms,
              240 conformers, 1,200 grid points each
  grid        synthetic molecules of 12 atoms, 240 conformers, 600, 1,200, 2,400, 3,200 grid
              points each
  real        real geometries (bench/molecules: RDKit ETKDG + MMFF conformers, 3 drug-like
              molecules x 16 conformers per set, synthetic ESP targets, `real_set`) of about
              10, 20, 40 and 60 atoms (drug10 ... drug60, split by conformer), then the
              bundled demo and organic sets (split by molecule)

For each point:
  epoch_s     median epoch time of `dcmtune.train.fit` over epochs 2..--epochs (epoch 1
              compiles); updates and validation
  ms_update   the trainer's time per optimizer update (train part of the epoch / updates)
  conf_per_s  training conformers per second (batch size / ms_update)
For the real points also (the trainer's plan: size buckets, pair slots, scan steps):
  train_cps   training conformers per second of whole epochs (training conformers / epoch_s)
  edges       edges computed per epoch (pair slots of every molecule slot, dummies included) /
              ordered pairs of the training conformers within the cutoff
  us_edge     microseconds of training per computed edge (train time / computed edges)
  gflop_s     achieved GFLOP/s of training: XLA's cost analysis (flops) of each bucket's scan
              step, times the steps of an epoch, / the epoch's train time
For the other points a profile of one batch of 8 with its neighbour pairs (median of --repeats
calls of separately jitted functions, interleaved):
  model_ms    model forward + backward (value_and_grad of a linear function of the charges and
              positions): message passing and the charge heads
  esp_ms      ESP, monopole, dipole and loss, forward + backward w.r.t. charges and positions
  full_ms     the whole loss, forward + backward w.r.t. the parameters (model + ESP + loss)
  esp_share   esp_ms / (model_ms + esp_ms)
  edge_frac   of the edges computed (every padded pair), those joining two real atoms within the
              model's cutoff (what a sparse edge list would keep)
  gflop       XLA's cost analysis (flops) of full_ms's program, per batch of 8
  gflop_s     gflop / full_ms
  (--json adds model_gflop, esp_gflop, the bytes accessed, *_gbyte, for a roofline, and
  *kernels, the operations of each compiled program's entry computation that run as kernels)

  python bench/scaling.py [--epochs 3] [--repeats 30] [--only conformers atoms grid real]
                          [--json] [--profile-only] [--output-dir experiments/bench_scaling]

`--smoke`: every column for the first point of each sweep chosen (demo 1x; the synthetic
points with 10 atoms and with 600 grid points hold 40 conformers instead of 240; drug10) with
a tiny model (4 features, degree 1, 1 iteration, 1 charge per atom, 4 basis functions),
2 epochs and one profiled call per function.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dcmtune.config import DataConfig, ExperimentConfig, ModelConfig, TrainingConfig
from dcmtune.data import (
    ESPData,
    describe,
    load_dataset,
    make_batch,
    shell_grid,
    to_arrays,
    validate_arrays,
)
from dcmtune.data.synthetic import make_synthetic
from dcmtune.train.environment import use_compilation_cache
from dcmtune.units import BOHR

SWEEPS = {
    "conformers": (1, 4, 16),
    "atoms": (10, 20, 40, 60),
    "grid": (600, 1200, 2400, 3200),
    "real": ("drug10", "drug20", "drug40", "drug60", "demo", "organic"),
}
NUM_CONFORMERS = 240  # as many as the demo set
SMOKE_CONFORMERS = 40
SMOKE_MODEL = ModelConfig(
    n_dcm=1, features=4, max_degree=1, num_iterations=1, num_basis_functions=4
)
COLUMNS = (
    "epoch_s",
    "ms_update",
    "conf_per_s",
    "train_cps",
    "edges",
    "us_edge",
    "gflop_s",
    "model_ms",
    "esp_ms",
    "full_ms",
    "esp_share",
    "edge_frac",
    "gflop",
)


# --------------------------------------------------------------------------- data


def repeated_demo(times: int, seed: int = 0) -> ESPData:
    """The demo set `times` times; every copy after the first has its atoms moved by N(0, 0.01 A)
    (a timing set: the stored ESP is kept, not recomputed)."""
    rng = np.random.default_rng(seed)
    arrays = to_arrays(load_dataset())
    parts = [arrays]
    for _ in range(times - 1):
        copy = dict(arrays)
        mask = (arrays["Z"] > 0)[..., None]
        copy["R"] = arrays["R"] + mask * rng.normal(scale=0.01, size=arrays["R"].shape)
        parts.append(copy)
    out = {k: np.concatenate([p[k] for p in parts]) for k in arrays}
    return validate_arrays(out, source=f"<demo x{times}>")


def synthetic_set(
    num_atoms: int, num_grid: int, seed: int = 0, conformers: int = NUM_CONFORMERS
) -> ESPData:
    """conformers / 10 (24) synthetic molecules of exactly `num_atoms` atoms, 10 conformers
    each, `num_grid` grid points per conformer, each 1.8-3.0 A from a random atom, with the exact
    ESP of the reference charges (a timing set: points may lie inside other atoms)."""
    rng = np.random.default_rng(seed)
    base = to_arrays(
        make_synthetic(
            num_molecules=conformers // 10,
            conformers=10,
            min_atoms=num_atoms,
            max_atoms=num_atoms,
            num_grid=8,
            seed=seed,
        )
    )
    M = len(base["R"])
    grid = np.zeros((M, num_grid, 3))
    esp = np.zeros((M, num_grid))
    for i in range(M):
        R, q = base["R"][i], base["mono"][i]
        n = int(base["N"][i])
        atom = rng.integers(0, n, size=num_grid)
        u = rng.normal(size=(num_grid, 3))
        g = R[atom] + rng.uniform(1.8, 3.0, size=(num_grid, 1)) * u / np.linalg.norm(
            u, axis=1, keepdims=True
        )
        d = np.linalg.norm(g[:, None] - R[None], axis=-1) / BOHR  # Shape (G, A), Bohr.
        grid[i], esp[i] = g, (q[None] / d).sum(1)
    base.update(vdw_surface=grid, esp=esp, n_grid=np.full(M, num_grid, np.int32))
    return validate_arrays(base, source=f"<synthetic {num_atoms} atoms x {num_grid} points>")


MOLECULES = Path(__file__).resolve().parent / "molecules"
REAL_SETS = ("drug10", "drug20", "drug40", "drug60")
REAL_GRID = 1200  # grid points per conformer at most (dcmtune.data.shell_grid's default)
# Pauling electronegativities: the synthetic reference charges of the real geometries.
_CHI = {1: 2.20, 6: 2.55, 7: 3.04, 8: 3.44, 9: 3.98, 16: 2.58, 17: 3.16}


def real_set(name: str, seed: int = 0) -> ESPData:
    """The conformers of bench/molecules/<name>/*.xyz (RDKit ETKDG + MMFF geometries, 16 per
    molecule) with synthetic ESP targets: grid points on vdW shells (`shell_grid`, at most
    REAL_GRID), ESP of atom charges q_a = 0.25 sum_b s(r_ab) (chi_b - chi_a) (s a smooth
    3 A cutoff; neutral). A timing set: no QM, realistic geometries and sizes."""
    import ase.io

    rng = np.random.default_rng(seed)
    rows = []
    for path in sorted((MOLECULES / name).glob("*.xyz")):
        for atoms in ase.io.read(path, ":"):
            R, Z = atoms.positions, atoms.numbers
            chi = np.array([_CHI[int(z)] for z in Z])
            r = np.linalg.norm(R[:, None] - R[None], axis=-1)
            s = np.where(r < 3.0, np.cos(0.5 * np.pi * np.minimum(r / 3.0, 1.0)) ** 2, 0.0)
            np.fill_diagonal(s, 0.0)
            q = 0.25 * (s * (chi[None, :] - chi[:, None])).sum(axis=1)
            g = shell_grid(R, Z, rng, max_grid=REAL_GRID)
            esp = (q[None] / (np.linalg.norm(g[:, None] - R[None], axis=-1) / BOHR)).sum(1)
            rows.append((R, Z, q, g, esp, path.stem))
    A, G = max(len(r[1]) for r in rows), max(len(r[3]) for r in rows)
    M = len(rows)
    out = {
        "R": np.zeros((M, A, 3)),
        "Z": np.zeros((M, A), np.int32),
        "N": np.array([len(r[1]) for r in rows], np.int32),
        "mono": np.zeros((M, A)),
        "vdw_surface": np.zeros((M, G, 3)),
        "esp": np.zeros((M, G)),
        "n_grid": np.array([len(r[3]) for r in rows], np.int32),
        "mol_id": np.array([r[5] for r in rows]),
    }
    for i, (R, Z, q, g, esp, _) in enumerate(rows):
        n, k = len(Z), len(g)
        out["R"][i, :n], out["Z"][i, :n], out["mono"][i, :n] = R, Z, q
        out["vdw_surface"][i, :k], out["esp"][i, :k] = g, esp
    return validate_arrays(out, source=f"<bench/molecules/{name}>")


# --------------------------------------------------------------------------- timing


class _Stop(Exception):
    """Raised by the reporter to end a run after the measured epochs."""


def run_config(
    name: str, out: Path, model: ModelConfig | None, split_by: str, run_epochs: int
) -> ExperimentConfig:
    """The default training of a run of `run_epochs` epochs (the bucket plan depends on it)."""
    return ExperimentConfig(
        name=name,
        output_dir=str(out),
        random_seed=0,
        model=model or ModelConfig(),
        data=DataConfig(split_by=split_by),
        training=TrainingConfig(num_epochs=run_epochs, save_every_n_epochs=0),
    )


def epoch_times(
    data: ESPData,
    epochs: int,
    out: Path,
    name: str,
    model: ModelConfig | None = None,
    split_by: str = "molecule",
    run_epochs: int | None = None,
) -> dict:
    """Median epoch time and time per update of `fit` with the default model (or `model`) on
    `data`, over epochs 2..`epochs` of a run planned for `run_epochs` (default `epochs`)."""
    from dcmtune.train.loop import fit

    cfg = run_config(name, out, model, split_by, run_epochs or epochs)

    def stop(epoch, *_):
        if epoch >= epochs:
            raise _Stop

    try:
        fit(cfg, data, reporter=stop)
    except _Stop:
        pass
    with open(out / name / "history.csv") as fh:
        hist = list(csv.DictReader(fh))[1:]
    bs = cfg.training.batch_size
    ms_update = statistics.median(float(r["batch_time"]) for r in hist) * 1e3
    train = json.loads((out / name / "split.json").read_text())["indices"]["train"]
    epoch_s = statistics.median(float(r["epoch_time"]) for r in hist)
    return {
        "epoch_s": epoch_s,
        "ms_update": ms_update,
        "conf_per_s": bs / ms_update * 1e3,
        "train_cps": len(train) / epoch_s,
        "train_idx": np.asarray(train),
        "config": cfg,
    }


def training_work(data: ESPData, cfg: ExperimentConfig, epochs: int | None = None) -> dict:
    """What one epoch of `cfg`'s trainer computes on the training conformers `data`: its
    buckets (pair slots, scan steps), the edges it computes and the pairs within the cutoff,
    and XLA's flops (cost analysis of each bucket's scan step, one molecule's loss forward +
    backward w.r.t. the parameters, times the epoch's steps)."""
    import jax

    from dcmtune.data import bucket_rows, num_updates, pair_counts, plan_buckets
    from dcmtune.model.dcmnet import build_model, init_params
    from dcmtune.model.loss import loss_and_sums
    from dcmtune.train.feed import step_molecules
    from dcmtune.train.hparams import Hparams
    from dcmtune.train.step import apply_model

    t, m = cfg.training, cfg.model
    slots = t.batch_size * t.gradient_accumulation_steps
    buckets = plan_buckets(
        data,
        t.batch_size,
        t.gradient_accumulation_steps,
        cfg.data.max_buckets,
        m.n_dcm,
        t.num_epochs,
        m.cutoff,
    )
    model = build_model(m)
    params = jax.jit(lambda k: init_params(model, k))(jax.random.PRNGKey(0))
    w = Hparams.of(t)
    edges = flops = 0.0
    for b in buckets:
        updates = num_updates([b], slots)
        pairs = b.num_pairs if b.num_pairs is not None else b.num_atoms * (b.num_atoms - 1)
        edges += updates * slots * pairs
        step = step_molecules(b, t.batch_size, m)
        batch = jax.device_put(bucket_rows(data, b, b.members[:step], step))
        fn = jax.jit(
            jax.value_and_grad(lambda p, x: loss_and_sums(*apply_model(model, p, x), x, w)[0])
        )
        cost = fn.lower(params, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops += updates * (slots // step) * float(cost.get("flops", float("nan")))
    within = float(pair_counts(data.R, data.Z > 0, m.cutoff).sum())
    return {
        "buckets": buckets,
        "computed_edges": edges,
        "edges": edges / within,
        "flops": flops,
        "updates": num_updates(buckets, slots),
    }


def real_point(
    name: str, epochs: int, out: Path, model: ModelConfig | None, run_epochs: int = 200
) -> dict:
    """The fit columns of a real point, and its edges and achieved GFLOP/s (see the module
    docstring); the run planned for `run_epochs` epochs (the default run length), stopped after
    `epochs`."""
    data = dataset("real", name)
    split_by = "molecule" if name in ("demo", "organic") else "conformer"
    row = epoch_times(data, epochs, out, f"real_{name}", model, split_by, run_epochs)
    work = training_work(data.subset(row.pop("train_idx")), row.pop("config"))
    train_s = row["ms_update"] * work["updates"] / 1e3  # the training part of an epoch
    row.update(
        edges=work["edges"],
        us_edge=train_s * 1e6 / work["computed_edges"],
        gflop_s=work["flops"] / 1e9 / train_s,
        buckets=describe(work["buckets"]),
    )
    return row


def _median_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds per call of each {name: (fn, args)}, calls interleaved round-robin
    so that load from other processes falls on all of them alike."""
    import jax

    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))  # compile
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def profile(data: ESPData, repeats: int, model_config: ModelConfig | None = None) -> dict:
    """Model vs ESP/loss time of one batch of 8 (forward + backward), and the FLOPs of both
    (the default model, or `model_config`)."""
    import jax
    import jax.numpy as jnp

    from dcmtune.model.dcmnet import build_model
    from dcmtune.model.loss import loss_and_sums
    from dcmtune.train.hparams import Hparams
    from dcmtune.train.step import apply_model, init_state

    cfg = ExperimentConfig(model=model_config or ModelConfig())
    model = build_model(cfg.model)
    params = init_state(cfg).params  # the trainer's init program (shared with the fit's)
    idx = np.arange(cfg.training.batch_size)
    batch = jax.device_put(make_batch(data, idx, cutoff=cfg.model.cutoff))
    w = Hparams.of(cfg.training)  # the default loss weights (traced in the trainer)

    def apply(p):
        return apply_model(model, p, batch)

    q0, pos0 = jax.jit(apply)(params)
    cq, cp = jax.random.normal(jax.random.PRNGKey(1), q0.shape), jnp.ones_like(pos0)

    # 1. Model only: a linear read-out of (charges, positions) keeps the backward pass whole.
    def readout(p):
        q, pos = apply(p)
        return jnp.sum(q * cq) + jnp.sum(pos * cp)

    model_fn = jax.jit(jax.value_and_grad(readout))
    # 2. ESP, observables and loss, w.r.t. charges and positions. Shapes (B, A, n), (B, A, n, 3).
    esp_fn = jax.jit(
        jax.value_and_grad(lambda q, pos: loss_and_sums(q, pos, batch, w)[0], argnums=(0, 1))
    )
    # 3. Everything, w.r.t. the parameters (what an update differentiates).
    full_fn = jax.jit(jax.value_and_grad(lambda p: loss_and_sums(*apply(p), batch, w)[0]))

    out = _median_ms(
        {
            "model_ms": (model_fn, (params,)),
            "esp_ms": (esp_fn, (q0, pos0)),
            "full_ms": (full_fn, (params,)),
        },
        repeats,
    )
    out["esp_share"] = out["esp_ms"] / (out["model_ms"] + out["esp_ms"])
    for key, fn, args in (
        ("", full_fn, (params,)),
        ("model_", model_fn, (params,)),
        ("esp_", esp_fn, (q0, pos0)),
    ):
        compiled = fn.lower(*args).compile()
        out[f"{key}kernels"] = kernel_count(compiled.as_text())
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out[f"{key}gflop"] = float(cost.get("flops", float("nan"))) / 1e9
        out[f"{key}gbyte"] = float(cost.get("bytes accessed", float("nan"))) / 1e9
    out["gflop_s"] = out["gflop"] / out["full_ms"] * 1e3
    return out


def edge_fraction(data: ESPData, cutoff: float) -> float:
    """Of the edges the model computes (all A(A-1) ordered pairs of every padded conformer),
    the fraction that join two real atoms within `cutoff` (what a sparse edge list keeps)."""
    A = data.num_atoms
    d = np.linalg.norm(data.R[:, :, None] - data.R[:, None, :], axis=-1)  # Shape (M, A, A).
    real = (data.Z > 0)[:, :, None] & (data.Z > 0)[:, None, :] & ~np.eye(A, dtype=bool)
    return float((real & (d < cutoff)).sum() / (data.num_conformers * A * (A - 1)))


def kernel_count(hlo: str) -> int:
    """Operations of a compiled program's entry computation that run as kernels (fusions,
    dots, custom calls, ...; not parameters, constants, tuples, bitcasts): on a GPU, roughly
    the kernel launches of one call."""
    entry = hlo[hlo.index("\nENTRY") :]
    body = entry[entry.index("{") + 1 : entry.index("\n}")]
    skip = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
    ops = (
        re.search(r" ([a-z][a-z0-9-]*)\(", line.split(" = ", 1)[1])
        for line in body.splitlines()
        if " = " in line
    )
    return sum(1 for m in ops if m and m.group(1) not in skip)


LABELS = {"conformers": "{}x demo", "atoms": "{} atoms", "grid": "{} grid"}


def points(only, smoke: bool = False) -> list[tuple[str, int, str]]:
    rows = []
    for sweep, values in SWEEPS.items():
        if only and sweep not in only:
            continue
        if smoke:
            values = values[:1]
        rows += [(sweep, v, LABELS.get(sweep, "{}").format(v)) for v in values]
    return rows


def dataset(sweep: str, value, conformers: int = NUM_CONFORMERS) -> ESPData:
    if sweep == "real":
        if value == "demo":
            return load_dataset()
        return load_dataset(["organic"]) if value == "organic" else real_set(value)
    if sweep == "conformers":
        return repeated_demo(value)
    if sweep == "atoms":
        return synthetic_set(value, 1200, conformers=conformers)
    return synthetic_set(12, value, conformers=conformers)


def measure_point(sweep, value, label, args, tmp: Path, model, conformers: int) -> dict:
    """One row of the table: the point's data shape and fraction of pairs within the cutoff,
    then its fits (epoch columns; a real point's training work) and its profile."""
    data = dataset(sweep, value, conformers)
    row = {
        "sweep": sweep,
        "value": value,
        "label": label,
        "conformers": int(data.num_conformers),
        "atoms": int(data.num_atoms),
        "grid": int(data.num_grid),
        "edge_frac": edge_fraction(data, ExperimentConfig().model.cutoff),
    }
    if sweep == "real":
        row.update(real_point(value, args.epochs, tmp, model))
        return row
    if not args.profile_only:
        times = epoch_times(data, args.epochs, tmp, f"{sweep}_{value}", model)
        row.update({k: v for k, v in times.items() if k not in ("train_idx", "config")})
    row.update(profile(data, args.repeats, model))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per fit (>= 2)")
    p.add_argument("--repeats", type=int, default=30, help="calls per profiled function")
    p.add_argument("--only", nargs="+", choices=tuple(SWEEPS), help="some sweeps only")
    p.add_argument("--output-dir", default="experiments/bench_scaling")
    p.add_argument("--json", action="store_true", help="also print all rows as JSON")
    p.add_argument(
        "--profile-only", action="store_true", help="skip the fits (epoch columns, real points)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="first point of each sweep, tiny model, 2 epochs"
    )
    args = p.parse_args(argv)
    model, conformers = None, NUM_CONFORMERS
    if args.smoke:
        args.epochs, args.repeats = 2, 1
        model, conformers = SMOKE_MODEL, SMOKE_CONFORMERS
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(out / ".jax_cache")
    import jax

    print(
        f"{'tiny' if args.smoke else 'default'} model, batch 8, {jax.devices()[0].platform}; "
        f"epochs 2..{args.epochs}",
        flush=True,
    )
    print(
        f"{'point':<14}{'conformers':>11}{'A':>4}{'G':>6}" + "".join(f"{c:>11}" for c in COLUMNS),
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for sweep, value, label in points(args.only, args.smoke):
            if sweep == "real" and args.profile_only:
                continue  # the real points are measured by their fits
            row = measure_point(sweep, value, label, args, Path(tmp), model, conformers)
            rows.append(row)
            print(
                f"{label:<14}{row['conformers']:>11}{row['atoms']:>4}{row['grid']:>6}"
                + "".join(f"{row.get(c, float('nan')):>11.3f}" for c in COLUMNS),
                flush=True,
            )
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
