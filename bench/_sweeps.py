"""Shared by the sweep benches: specs derived from the shipped quick.yaml, their smoke-size
changes, and a Tune callback that records, in the driver, when each trial started, reported and
ended.

Imported by bench/sweep_overhead.py and bench/search_efficiency.py inside their functions,
after `dcmtune.sweep.local_ray.prefer_loopback()` (this module imports Ray); the script's
directory is on sys.path when they run as `python bench/NAME.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from dcmtune.sweep.spec import SweepSpec, find_spec, read_spec, spec_from_dict

# The smoke size of a quick.yaml sweep: 2 trials of 1 epoch, one at a time (the second reuses
# the first one's actor: one trial process to start), a tiny fixed model (4 features, degree 1,
# 1 iteration, 1 charge per atom, 4 basis functions), only the learning rate and chg_w
# searched, and the default split (so the trials can reuse programs compiled for the default
# split of the demo set in a shared compile cache).
SMOKE_CHANGES = {
    "model": {"n_dcm": 1, "features": 4, "num_basis_functions": 4},
    "data": {"valid_fraction": 0.1, "test_fraction": 0.1},
    "training": {"num_epochs": 1, "warmup_epochs": 0},
    "run": {"num_samples": 2, "max_concurrent_trials": 1},
}
SMOKE_SEARCH = ("training.learning_rate", "training.chg_w")


def quick_raw() -> tuple[dict, Path]:
    """The shipped quick.yaml as a dict, and its directory (relative paths resolve there)."""
    path = find_spec("quick")
    return read_spec(path), path.parent


def smoke_search() -> dict:
    """quick.yaml's search section without the model keys (the smoke model is fixed)."""
    raw, _ = quick_raw()
    return {k: v for k, v in raw["search"].items() if k in SMOKE_SEARCH}


def smoke_parts(changes: dict, replace: dict | None = None) -> tuple[dict, dict]:
    """(changes, replace) for `derived_spec` of the smoke size, `changes` and `replace` on top
    (the search section is replaced whole: the model keys are not searched)."""
    return merged(SMOKE_CHANGES, changes), {"search": smoke_search(), **(replace or {})}


def merged(changes: dict, more: dict) -> dict:
    """Per-section merge of two `derived_spec` change dicts (`more` wins)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in changes.items()}
    for section, value in more.items():
        if isinstance(value, dict) and isinstance(out.get(section), dict):
            out[section] = {**out[section], **value}
        else:
            out[section] = value
    return out


def derived_spec(
    changes: dict, storage_path: Path, name: str, replace: dict | None = None
) -> SweepSpec:
    """quick.yaml with `changes` merged per section ({"training": {"num_epochs": 60}, ...})
    and the sections in `replace` replaced whole, stored under `storage_path`/`name`."""
    raw, base_dir = quick_raw()
    raw = copy.deepcopy(raw)
    raw.update(copy.deepcopy(replace or {}))
    for section, value in changes.items():
        if isinstance(value, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **value}
        else:
            raw[section] = value
    raw["name"] = name
    raw.setdefault("run", {})["storage_path"] = str(storage_path)
    return spec_from_dict(raw, base_dir=base_dir, storage_path=storage_path)


@dataclasses.dataclass
class TrialTimes:
    trial_id: str
    start: float  # driver clock (time.time()) when Tune started the trial
    end: float | None = None  # when Tune marked it terminated
    time_total_s: float = 0.0  # Tune's own trial time (function start -> last report)
    epochs: int = 0
    epoch_time_s: float = 0.0  # the trainer's own epoch times, summed (updates + validation)
    config: dict = dataclasses.field(default_factory=dict)
    # (driver time, epoch, metric, time_total_s) of every result, in arrival order
    results: list = dataclasses.field(default_factory=list)


class TimingCallback(Callback):
    """Driver-side timestamps of a Tune run (time.time(), so comparable across processes).

    Attributes:
      setup_at: When Tune set up the experiment (Tuner.fit has started).
      trials: trial_id -> TrialTimes, in start order.
      ended_at: When the experiment ended (all trials done).
    """

    def __init__(self, metric: str = "valid_esp_rmse"):
        self.metric = metric
        self.setup_at: float | None = None
        self.ended_at: float | None = None
        self.trials: dict[str, TrialTimes] = {}

    def setup(self, *args: Any, **kwargs: Any) -> None:
        self.setup_at = time.time()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.trials[trial.trial_id] = TrialTimes(
            trial.trial_id, time.time(), config=dict(trial.config)
        )

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        t = self.trials[trial.trial_id]
        t.time_total_s = float(result.get("time_total_s", t.time_total_s))
        t.epochs = int(result.get("epoch", t.epochs))
        t.epoch_time_s += float(result.get("epoch_time", 0.0))
        t.results.append(
            (
                time.time(),
                int(result.get("epoch", 0)),
                float(result.get(self.metric, float("nan"))),
                t.time_total_s,
            )
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.trials[trial.trial_id].end = time.time()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.trials[trial.trial_id].end = time.time()

    def on_experiment_end(self, trials, **info) -> None:
        self.ended_at = time.time()

    def get_state(self) -> dict | None:
        return None  # nothing to restore: the benches never resume
