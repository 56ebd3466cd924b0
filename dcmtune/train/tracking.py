"""Experiment tracking, opt-in from YAML: MLflow and Weights & Biases.

A sweep spec (or the file given to `python -m dcmtune.train --tracking FILE.yaml`) may hold

  tracking:
    mlflow:
      tracking_uri: sqlite:///mlflow.db   # relative to the YAML file; default: MLflow's own
      experiment_name: my-sweep           # default: the sweep's (or run's) name
      tags: {project: esp}                # optional, string values
    wandb:
      project: dcmtune                    # required
      entity: my-team                     # optional
      group: my-sweep                     # default: the sweep's name
      mode: offline                       # online (default; `wandb login`) | offline | disabled
      tags: [demo]                        # optional

Each sweep trial becomes one MLflow run / one W&B run through Ray Tune's `MLflowLoggerCallback`
and `WandbLoggerCallback` (`dcmtune.sweep.tune_loggers`); a `python -m dcmtune.train` run logs
to the same libraries directly (`run_reporters`; a sweep's `--debug` trial writes TensorBoard
events only). Both receive every epoch's metrics under their registry names
(`dcmtune.metrics`) with the epoch as the step, and the config as parameters. MLflow 3
refuses plain-directory stores: use an sqlite URL or a tracking server. Both libraries come with
the `track` extra; asking for one that is not installed is bad input (one line, exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from dcmtune._yaml import read_yaml
from dcmtune.train.tensorboard import EventReporter, Tee

__all__ = [
    "TrackingError",
    "MlflowSpec",
    "WandbSpec",
    "TrackingSpec",
    "parse_tracking",
    "load_tracking",
    "run_reporters",
    "WANDB_MODES",
]

WANDB_MODES = ("online", "offline", "disabled")
_INSTALL = "install the track extra: pip install 'dcmtune[track]'"


class TrackingError(ValueError):
    """A `tracking:` section is invalid; one line starting with the offending key."""


@dataclasses.dataclass(frozen=True)
class MlflowSpec:
    """MLflow settings. tracking_uri None = MLflow's default (MLFLOW_TRACKING_URI, else its
    local default); experiment_name None = the sweep's or run's name."""

    tracking_uri: str | None = None
    experiment_name: str | None = None
    tags: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class WandbSpec:
    """Weights & Biases settings. group None = the sweep's name."""

    project: str
    entity: str | None = None
    group: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrackingSpec:
    """Where runs are tracked besides the run directory (None = not there)."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None

    def __bool__(self) -> bool:
        return self.mlflow is not None or self.wandb is not None

    def to_dict(self) -> dict:
        out = {}
        if self.mlflow is not None:
            out["mlflow"] = {**dataclasses.asdict(self.mlflow), "tags": dict(self.mlflow.tags)}
        if self.wandb is not None:
            out["wandb"] = {**dataclasses.asdict(self.wandb), "tags": list(self.wandb.tags)}
        return out


# --------------------------------------------------------------------------- parsing


def _mapping(key: str, value: Any, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TrackingError(f"{key}: expected a mapping, got {value!r}")
    for k in value:
        if k not in allowed:
            raise TrackingError(f"{key}.{k}: unknown key; expected one of {', '.join(allowed)}")
    return dict(value)


def _opt_str(key: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise TrackingError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _require(module: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TrackingError(f"{key}: needs the {module} package; {_INSTALL}")


def _uri(value: str | None, base_dir: Path) -> str | None:
    """sqlite:///relative.db -> relative to base_dir (like every path in a spec)."""
    prefix = "sqlite:///"
    if value and value.startswith(prefix) and not value.startswith(prefix + "/"):
        return prefix + str((base_dir / value[len(prefix) :]).resolve())
    return value


def parse_tracking(
    raw: Any,
    base_dir: str | Path = ".",
    key: str = "tracking",
    error: type[ValueError] = TrackingError,
) -> TrackingSpec:
    """Validates a `tracking:` mapping; relative sqlite paths resolve against `base_dir`.

    Raises:
      `error` (TrackingError by default): one line naming the key (unknown keys, wrong types,
      a library that is not installed).
    """
    try:
        return _parse(raw, Path(base_dir).resolve(), key)
    except TrackingError as e:
        raise error(str(e)) from None


def _parse(raw: Any, base_dir: Path, key: str) -> TrackingSpec:
    d = _mapping(key, raw, ("mlflow", "wandb"))
    mlflow = wandb = None
    if "mlflow" in d:
        k = f"{key}.mlflow"
        m = _mapping(k, d["mlflow"], ("tracking_uri", "experiment_name", "tags"))
        tags = _mapping(f"{k}.tags", m.get("tags"), tuple(m.get("tags") or ()))
        for name, v in tags.items():
            if not isinstance(name, str) or not isinstance(v, (str, int, float, bool)):
                raise TrackingError(f"{k}.tags.{name}: expected a string value, got {v!r}")
        _require("mlflow", k)
        mlflow = MlflowSpec(
            tracking_uri=_uri(_opt_str(f"{k}.tracking_uri", m.get("tracking_uri")), base_dir),
            experiment_name=_opt_str(f"{k}.experiment_name", m.get("experiment_name")),
            tags=tuple((n, str(v)) for n, v in tags.items()),
        )
    if "wandb" in d:
        k = f"{key}.wandb"
        w = _mapping(k, d["wandb"], ("project", "entity", "group", "mode", "tags"))
        if w.get("project") is None:
            raise TrackingError(f"{k}.project: required (the W&B project name)")
        mode = w.get("mode", "online")
        if mode not in WANDB_MODES:
            raise TrackingError(f"{k}.mode: expected {' or '.join(WANDB_MODES)}, got {mode!r}")
        labels = w.get("tags") or []
        if not isinstance(labels, list) or not all(isinstance(t, str) and t for t in labels):
            raise TrackingError(f"{k}.tags: expected a list of strings, got {labels!r}")
        _require("wandb", k)
        wandb = WandbSpec(
            project=str(_opt_str(f"{k}.project", w["project"])),
            entity=_opt_str(f"{k}.entity", w.get("entity")),
            group=_opt_str(f"{k}.group", w.get("group")),
            mode=mode,
            tags=tuple(labels),
        )
    return TrackingSpec(mlflow, wandb)


def load_tracking(path: str | Path) -> TrackingSpec:
    """The tracking settings in a YAML file: a `tracking:` section (a sweep spec works) or the
    section's content itself. Relative paths are relative to the file."""
    path = Path(path)
    try:
        raw = read_yaml(path, TrackingError, "tracking file")
    except TrackingError as e:
        raise TrackingError(f"--tracking: {e}") from None
    if isinstance(raw, Mapping) and "tracking" in raw:
        return parse_tracking(raw["tracking"], path.parent, key="tracking")
    return parse_tracking(raw, path.parent, key=f"{path.name}")


# --------------------------------------------------------------------------- direct logging


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = v.item() if hasattr(v, "item") else v
        if isinstance(v, (int, float)) and k != "epoch":
            out[k] = float(v)
    return out


class _MlflowRun:
    """One MLflow run fed by the trainer, created at the first report (MlflowClient: no global
    active run)."""

    def __init__(self, spec: MlflowSpec, name: str, params: Mapping[str, Any]):
        self.spec, self.name, self.params = spec, name, params
        self.client: Any = None
        self.run_id: str | None = None

    def _start(self) -> None:
        import mlflow
        from mlflow.entities import Param

        self.client = mlflow.MlflowClient(tracking_uri=self.spec.tracking_uri)
        exp_name = self.spec.experiment_name or self.name
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        run = self.client.create_run(exp_id, run_name=self.name, tags=dict(self.spec.tags))
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:500]) for k, v in self.params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def __call__(self, epoch, metrics, checkpoint_dir=None) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self._start()
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, epoch) for k, v in _scalars(metrics).items()]
        )

    def close(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


class _WandbRun:
    """One W&B run fed by the trainer, created at the first report; its local files go to
    <run_dir>/wandb/."""

    def __init__(self, spec: WandbSpec, name: str, params: Mapping[str, Any], run_dir: Path):
        self.spec, self.name, self.params, self.run_dir = spec, name, params, run_dir
        self.run: Any = None

    def __call__(self, epoch, metrics, checkpoint_dir=None) -> None:
        if self.run is None:
            import wandb

            s = self.spec
            self.run = wandb.init(
                project=s.project,
                entity=s.entity,
                group=s.group,
                mode=s.mode,
                tags=list(s.tags) or None,
                name=self.name,
                dir=str(self.run_dir),
                config=dict(self.params),
                settings=wandb.Settings(console="off", silent=True),
            )
        self.run.log(_scalars(metrics), step=epoch)

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)


@contextlib.contextmanager
def run_reporters(
    run_dir: str | Path,
    reporter=None,
    *,
    tracking: TrackingSpec = TrackingSpec(),
    name: str = "",
    params: Mapping[str, Any] | None = None,
    hparams: Mapping[str, Any] | None = None,
) -> Iterator[Tee]:
    """The reporter of one training run: `reporter` (e.g. the epoch table), the run's
    TensorBoard event stream in `run_dir`, and the tracking the settings ask for.

    Args:
      run_dir: The run directory (event file, W&B's local files).
      reporter: Another Reporter, called after the event file is written (may be None).
      tracking: MLflow / W&B settings (default: neither).
      name: The run's name in MLflow / W&B (and default MLflow experiment).
      params: Flat config logged as MLflow parameters / W&B config.
      hparams: Hyper-parameters for TensorBoard's HParams view.

    Yields:
      One Reporter. Nothing is written before its first call (a run that fails its checks
      leaves no trace); on exit every stream is closed, MLflow/W&B runs marked finished,
      failed or killed (an interrupt).
    """
    run_dir = Path(run_dir)
    params = dict(params or {})
    trackers: list[Any] = []
    with EventReporter(run_dir, hparams=hparams) as events:
        try:
            if tracking.mlflow is not None:
                trackers.append(_MlflowRun(tracking.mlflow, name or run_dir.name, params))
            if tracking.wandb is not None:
                trackers.append(_WandbRun(tracking.wandb, name or run_dir.name, params, run_dir))
            yield Tee(events, *trackers, reporter)
        except KeyboardInterrupt:
            _close(trackers, "KILLED")
            raise
        except BaseException:
            _close(trackers, "FAILED")
            raise
        _close(trackers, "FINISHED")


def _close(trackers, status: str) -> None:
    for t in trackers:
        t.close(status)
