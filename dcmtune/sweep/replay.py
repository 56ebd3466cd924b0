"""A sweep replayed on a table of learning curves: Tune's scheduler and dcmtune's Optuna searcher,
driven by a simulated clock instead of training (the LCBench / HPOBench idea).

A table (`bench/learning_curves.py record`) holds a grid of configurations, each trained once for
T epochs, with every epoch's validation and test metric and its epoch time. `replay(table,
spec)` runs the spec's sweep on it without training:

1. The searcher is the one a real sweep builds (`tuner.sampler` in a
   `tune_ext.PruningAwareOptunaSearch`, under Tune's `ConcurrencyLimiter` when
   `run.max_concurrent_trials` is set), over the spec's search space (`CurveTable.space` gives
   one that covers the grid: log-uniform cells around log-spaced values, randint over
   consecutive integers, choice otherwise). A suggested point is answered by the nearest grid
   configuration (`CurveTable.nearest`), so a sampler sees the distributions of a real spec.
2. The scheduler is the spec's own Tune object (`tuner.scheduler`; FIFO when none), called
   through its public `TrialScheduler` interface: `on_trial_add`, `on_trial_result` (one result
   per epoch, on the `epoch` attribute), `on_trial_complete` / `on_trial_remove`, and
   `choose_trial_to_run` to start pending trials and resume paused ones (HyperBand pauses
   trials at its milestones; a paused trial keeps its place under the concurrency limit, as in
   Tune).
3. The clock: `concurrency` slots; a running trial delivers epoch e at its start time plus e
   times its configuration's epoch time (the table's median), results are handled in time order
   (ties by trial number), and a free slot is filled at once as Tune would: with
   `run.max_concurrent_trials` set, new trials are asked for while fewer than that many are live
   (running, paused or pending: Tune's ConcurrencyLimiter); without it, one trial waits pending
   (Tune's max_pending_trials for a searcher). Then the scheduler picks which pending or paused
   trial runs. Trial start-up, checkpoints and actor reuse cost nothing here.

The result, `Replay`, lists every epoch in the order the driver received it, from which
`bench/search_efficiency.py --table` measures trial-epochs to a target and the test metric of
the trial a sweep would choose at a fixed budget. With concurrency 1 the order of events is
the same as in a real Tune run (tests/test_replay.py checks that against Tune).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dcmtune.sweep.spec import SweepSpec, spec_from_dict

__all__ = ["CurveTable", "Replay", "replay", "replay_spec"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class CurveTable:
    """Learning curves of a grid of configurations.

    Attributes:
      keys: The searched dotted keys (the grid's axes).
      points: (C, K) the configurations' values, in `keys` order.
      valid, test: (C, T) the sweep metric and the test metric per configuration and epoch.
      epoch_time: (C,) seconds per epoch: the median over every epoch of the configurations
        with the same model.* values (the cost of an epoch depends on the model's shape, not on
        the optimiser's settings; pooling also averages out the load of the machine that
        recorded the table).
      metric, test_metric: Their names.
    """

    keys: tuple[str, ...]
    points: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    epoch_time: np.ndarray
    metric: str = "valid_esp_rmse"
    test_metric: str = "test_esp_rmse"

    @classmethod
    def read_csv(
        cls, path: str | Path, metric: str = "valid_esp_rmse", test_metric: str = "test_esp_rmse"
    ) -> CurveTable:
        """A table written by `bench/learning_curves.py record`: columns config, the searched
        keys, epoch, the metrics, epoch_time; one row per (configuration, epoch)."""
        import pandas as pd

        return cls.from_frame(pd.read_csv(path), metric, test_metric)

    @classmethod
    def from_frame(cls, df, metric: str = "valid_esp_rmse", test_metric: str = "test_esp_rmse"):
        cols = list(df.columns)
        for needed in ("config", "epoch", metric, test_metric):
            if needed not in cols:
                raise ValueError(f"learning-curve table: no column {needed!r}")
        keys = tuple(cols[cols.index("config") + 1 : cols.index("epoch")])
        if not keys:
            raise ValueError("learning-curve table: no searched keys between config and epoch")
        df = df.sort_values(["config", "epoch"])
        groups = list(df.groupby("config", sort=True))
        lengths = {len(g) for _, g in groups}
        if len(lengths) != 1:
            raise ValueError(f"learning-curve table: configurations differ in length {lengths}")
        (n_epochs,) = lengths
        for name, g in groups:
            if list(g["epoch"]) != list(range(1, n_epochs + 1)):
                raise ValueError(f"learning-curve table: config {name} lacks epochs 1..{n_epochs}")
        times = _epoch_times(df, groups, [k for k in keys if k.startswith("model.")])
        return cls(
            keys=keys,
            points=np.array([[g[k].iloc[0] for k in keys] for _, g in groups], dtype=float),
            valid=np.stack([g[metric].to_numpy(float) for _, g in groups]),
            test=np.stack([g[test_metric].to_numpy(float) for _, g in groups]),
            epoch_time=np.asarray(times),
            metric=metric,
            test_metric=test_metric,
        )

    @property
    def num_configs(self) -> int:
        return self.valid.shape[0]

    @property
    def num_epochs(self) -> int:
        return self.valid.shape[1]

    def best(self) -> float:
        """The best validation metric of any configuration at any epoch."""
        return float(np.nanmin(self.valid))

    def target(self) -> tuple[float, float]:
        """(tolerance, target): within 5% of the best, or within 2% when more than a tenth of
        the configurations reach 5% (the target must single out the good region)."""
        best = self.best()
        per_config = np.nanmin(self.valid, axis=1)
        tol = 0.02 if np.mean(per_config <= 1.05 * best) > 0.1 else 0.05
        return tol, (1.0 + tol) * best

    def values(self, key: str) -> list[float]:
        return sorted(set(self.points[:, self.keys.index(key)].tolist()))

    def space(self) -> dict[str, dict]:
        """A spec `search:` section covering the grid: log-uniform over cells centred (in log
        space) on log-spaced values, randint over consecutive integers, choice otherwise."""
        out: dict[str, dict] = {}
        for key in self.keys:
            v = self.values(key)
            ints = all(float(x).is_integer() for x in v)
            if ints and v == list(np.arange(v[0], v[-1] + 1)) and len(v) > 1:
                out[key] = {"randint": [int(v[0]), int(v[-1])]}
            elif not ints and len(v) >= 2 and v[0] > 0:
                lo, hi = v[0] / math.sqrt(v[1] / v[0]), v[-1] * math.sqrt(v[-1] / v[-2])
                out[key] = {"loguniform": [_round(lo), _round(hi)]}
            else:
                out[key] = {"choice": [int(x) if ints else x for x in v]}
        return out

    def nearest(self, point: Mapping[str, Any]) -> int:
        """The configuration nearest to a suggested point: per key the closest grid value (in
        log space for positive floats)."""
        want = []
        for key in self.keys:
            v = np.asarray(self.values(key))
            x = float(point[key])
            if v[0] > 0 and x > 0 and not all(float(a).is_integer() for a in v):
                i = int(np.argmin(np.abs(np.log(v) - math.log(x))))
            else:
                i = int(np.argmin(np.abs(v - x)))
            want.append(v[i])
        hit = np.flatnonzero(np.all(self.points == np.asarray(want), axis=1))
        if hit.size == 0:
            raise ValueError(
                f"learning-curve table: no configuration {dict(zip(self.keys, want, strict=True))}"
            )
        return int(hit[0])

    def config(self, index: int) -> dict[str, float]:
        return {k: float(x) for k, x in zip(self.keys, self.points[index], strict=True)}


def _epoch_times(df, groups, shape_keys: list[str]) -> list[float]:
    """Seconds per epoch of each configuration, pooled over configurations of one model shape
    (1.0 each when the table has no epoch_time column)."""
    if "epoch_time" not in df:
        return [1.0] * len(groups)
    if not shape_keys:
        return [float(np.median(g["epoch_time"])) for _, g in groups]
    pooled = df.groupby(shape_keys)["epoch_time"].median()
    return [float(pooled.loc[tuple(g[k].iloc[0] for k in shape_keys)]) for _, g in groups]


def _round(x: float) -> float:
    return float(f"{x:.4g}")


# --------------------------------------------------------------------------- the replay


@dataclasses.dataclass(frozen=True)
class Replay:
    """Every epoch of a replayed sweep, in the order the driver received them.

    Attributes:
      trial, config, epoch: (R,) the trial number, its configuration and the epoch.
      valid, test: (R,) the metrics of that epoch.
      time: (R,) simulated seconds since the sweep started.
      trials: Per trial: (configuration, epochs run, how it ended: completed | stopped |
        paused).
    """

    trial: np.ndarray
    config: np.ndarray
    epoch: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    time: np.ndarray
    trials: tuple[tuple[int, int, str], ...]

    @property
    def trial_epochs(self) -> int:
        return int(self.epoch.size)

    def epochs_to(self, target: float) -> int | None:
        """Trial-epochs received up to and including the first epoch with valid <= target
        (None: never)."""
        hit = np.flatnonzero(self.valid <= target)
        return int(hit[0]) + 1 if hit.size else None

    def chosen(self, budget: int) -> tuple[int, int, float, float]:
        """The trial a sweep stopped after `budget` trial-epochs would choose (best validation
        metric so far): (configuration, epoch, valid, test)."""
        n = min(budget, self.valid.size)
        i = int(np.nanargmin(self.valid[:n]))
        return int(self.config[i]), int(self.epoch[i]), float(self.valid[i]), float(self.test[i])


def replay_spec(
    table: CurveTable,
    searcher: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    num_samples: int = 100,
    concurrency: int | None = 2,
    search: Mapping[str, Any] | None = None,
    points_to_evaluate: Sequence[Mapping[str, Any]] = (),
) -> SweepSpec:
    """The sweep spec a replay runs: the table's space (or `search`), the given searcher and
    scheduler sections, T = the table's epochs, an in-memory Optuna study, at most
    `concurrency` live trials (None: no limit on live trials; see `replay`)."""
    raw = {
        "name": "replay",
        "training": {"num_epochs": table.num_epochs},
        "search": dict(search or table.space()),
        "searcher": {
            **dict(searcher or {}),
            "storage": None,
            "points_to_evaluate": [dict(p) for p in points_to_evaluate],
        },
        "scheduler": dict(scheduler or {"name": "fifo"}),
        "run": {
            "num_samples": num_samples,
            "max_concurrent_trials": concurrency,
            "metric": table.metric,
        },
    }
    return spec_from_dict(raw)


class _Trial:
    """What Tune's schedulers read of a trial."""

    def __init__(self, number: int, config: int):
        self.trial_id = f"t{number:05d}"
        self.number = number
        self.config = config
        self.status = "PENDING"
        self.is_saving = False
        self.epoch = 0
        self.started = 0.0  # time the current run segment started, minus the epochs before it
        self.last_result: dict = {}

    def __repr__(self) -> str:
        return f"_Trial({self.trial_id}, {self.status}, epoch {self.epoch})"


class _Controller:
    """The part of Tune's TuneController the schedulers call back into."""

    def __init__(self, searcher):
        self.trials: list[_Trial] = []
        self.searcher = searcher
        self.scheduler = None

    def get_trials(self) -> list[_Trial]:
        return self.trials

    def get_live_trials(self) -> list[_Trial]:
        return [t for t in self.trials if t.status in ("PENDING", "RUNNING", "PAUSED")]

    def stop_trial(self, trial: _Trial) -> None:
        """Tune's stop_trial: a pending or paused trial is removed, a running one completes."""
        if trial.status in ("TERMINATED", "ERROR"):
            return
        if trial.status in ("PENDING", "PAUSED"):
            trial.status = "TERMINATED"
            self.scheduler.on_trial_remove(self, trial)
            self.searcher.on_trial_complete(trial.trial_id)
        else:
            trial.status = "TERMINATED"
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
            self.searcher.on_trial_complete(trial.trial_id, result=trial.last_result)


def replay(
    table: CurveTable,
    spec: SweepSpec,
    concurrency: int | None = None,
    until: tuple[float, int] | None = None,
) -> Replay:
    """Runs `spec`'s sweep on `table` (see the module doc).

    Args:
      table: The learning curves.
      spec: The sweep: its search space must only name the table's keys; training.num_epochs
        may be at most the table's epochs. `run.max_trial_epochs` ends it as in a real sweep
        (each trial counts its highest epoch).
      concurrency: Slots: trials running at once (default: run.max_concurrent_trials, else 1).
      until: (target, epochs): end early once a result reached `target` and at least `epochs`
        results were received (what the efficiency statistics need; None = run to the end).
    """
    import optuna

    unknown = sorted(set(spec.search) - set(table.keys))
    if unknown:
        raise ValueError(f"search.{unknown[0]}: not an axis of the table ({', '.join(table.keys)})")
    if spec.num_epochs > table.num_epochs:
        raise ValueError(
            f"training.num_epochs: {spec.num_epochs} > the table's {table.num_epochs} epochs"
        )
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's experimental and fallback warnings
        sim = _Simulation(table, spec, concurrency or spec.run.max_concurrent_trials or 1)
        reached = False
        while sim.fill():
            row = sim.next_result()
            if until is not None:
                reached = reached or row[3] <= until[0]
                if reached and len(sim.rows) >= until[1]:
                    break
            cap = spec.run.max_trial_epochs
            if cap is not None and sum(t.epoch for t in sim.ctl.trials) >= cap:
                break  # Tune's stop_all: the sweep ends, running trials with it
            sim.decide()
    return sim.replay()


class _Simulation:
    """Tune's controller loop on a simulated clock (see the module doc)."""

    def __init__(self, table: CurveTable, spec: SweepSpec, slots: int):
        from ray.tune.schedulers import FIFOScheduler

        from dcmtune.sweep.tuner import _searcher, scheduler

        self.table, self.spec, self.slots = table, spec, slots
        self.limit = spec.run.max_concurrent_trials
        self.metric = spec.run.metric
        self.search = _searcher(spec)
        self.search.set_search_properties(self.metric, spec.run.mode, spec.param_space())
        self.sched = scheduler(spec) or FIFOScheduler()
        self.sched.set_search_properties(self.metric, spec.run.mode)
        np.random.seed(spec.searcher.seed)  # ASHA draws brackets from numpy's global RNG
        self.ctl = _Controller(self.search)
        self.ctl.scheduler = self.sched
        self.rows: list[tuple[int, int, int, float, float, float]] = []
        self.running: list[tuple[float, int, _Trial]] = []  # heap: (next result time, #, trial)
        self.now, self.asked = 0.0, 0
        self.current: _Trial | None = None
        self.defaults = {k: table.values(k)[0] for k in table.keys}

    def fill(self) -> bool:
        """New trials, as Tune asks: while fewer than max_pending wait and (with the limiter)
        fewer than `limit` are live, paused ones included; then the scheduler starts pending
        trials and resumes paused ones into free slots; repeated until nothing changes.
        Returns whether a trial is running."""
        changed = True
        while changed:
            changed = self._ask()
            while len(self.running) < self.slots:
                trial = self.sched.choose_trial_to_run(self.ctl)
                if trial is None or trial.status == "RUNNING":
                    break
                self._start(trial)
                changed = True
        return bool(self.running)

    def _ask(self) -> bool:
        live = self.ctl.get_live_trials()
        pending = sum(t.status == "PENDING" for t in live)
        max_pending = self.limit or 1  # Tune's max_pending_trials for a searcher
        asked = False
        while (
            self.asked < self.spec.run.num_samples
            and pending < max_pending
            and (not self.limit or len(live) < self.limit)
        ):
            point = self.search.suggest(f"t{self.asked:05d}")
            if point is None:
                break
            trial = _Trial(self.asked, self.table.nearest({**self.defaults, **point}))
            self.asked += 1
            self.ctl.trials.append(trial)
            self.sched.on_trial_add(self.ctl, trial)
            live.append(trial)
            pending += 1
            asked = True
        return asked

    def _start(self, trial: _Trial) -> None:
        trial.status = "RUNNING"
        trial.started = self.now - trial.epoch * self.table.epoch_time[trial.config]
        self._schedule(trial)

    def _schedule(self, trial: _Trial) -> None:
        due = trial.started + (trial.epoch + 1) * self.table.epoch_time[trial.config]
        heapq.heappush(self.running, (due, trial.number, trial))

    def next_result(self) -> tuple[int, int, int, float, float, float]:
        """The earliest running trial's next epoch, as the driver receives it."""
        self.now, _, trial = heapq.heappop(self.running)
        trial.epoch += 1
        c, e = trial.config, trial.epoch
        trial.last_result = {
            "epoch": e,
            "training_iteration": e,
            self.metric: float(self.table.valid[c, e - 1]),
            self.table.test_metric: float(self.table.test[c, e - 1]),
            "trial_id": trial.trial_id,
        }
        self.current = trial
        r = trial.last_result
        row = (trial.number, c, e, r[self.metric], r[self.table.test_metric], self.now)
        self.rows.append(row)
        return row

    def decide(self) -> None:
        """The scheduler's decision on the current result, carried out as Tune does."""
        from ray.tune.schedulers import TrialScheduler

        trial = self.current
        assert trial is not None
        result = trial.last_result
        decision = self.sched.on_trial_result(self.ctl, trial, result)
        if decision != TrialScheduler.STOP:
            self.search.on_trial_result(trial.trial_id, result)
        if decision == TrialScheduler.STOP or trial.epoch >= self.spec.num_epochs:
            self.ctl.stop_trial(trial)  # Tune ends a trial whose function returned the same way
        elif decision == TrialScheduler.PAUSE:
            trial.status = "PAUSED"
        else:
            self._schedule(trial)

    def replay(self) -> Replay:
        t_max = self.spec.num_epochs
        trials = sorted(self.ctl.trials, key=lambda t: t.number)
        arr = np.asarray(self.rows, dtype=float).reshape(-1, 6)
        return Replay(
            trial=arr[:, 0].astype(int),
            config=arr[:, 1].astype(int),
            epoch=arr[:, 2].astype(int),
            valid=arr[:, 3],
            test=arr[:, 4],
            time=arr[:, 5],
            trials=tuple((t.config, t.epoch, _ending(t, t_max)) for t in trials),
        )


def _ending(trial: _Trial, t_max: int) -> str:
    if trial.status == "PAUSED":
        return "paused"
    return "completed" if trial.epoch >= t_max else "stopped"
