"""A sweep's experiment wherever it lives: checks before a sweep starts, the one-driver lock,
the spec record, the Optuna journal and trials lost by a restore.

On a POSIX storage path (local, or a file system every node mounts) the experiment directory
is read and written in place. With object storage (`dcmtune.storage`: s3://, gs://, ...) the
experiment is read in the bucket, and the driver keeps a local copy of what it writes itself
(`SweepSpec.experiment_dir`: the lock, the Optuna journal, the ranking's files), uploading
what belongs to the experiment. The lock is an fcntl lock in that local copy: it refuses a
second driver on the same machine (or on any machine that shares the local copy's file
system); object stores have no lock that dies with its holder, so two drivers on machines
that share nothing are not detected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

from dcmtune import _io, storage
from dcmtune.analysis.ranking import SPEC_RECORD
from dcmtune.config import ExperimentConfig, flat_dict
from dcmtune.sweep import study
from dcmtune.sweep.overrides import format_overrides
from dcmtune.sweep.sections import SchedulerSpec, SearcherSpec
from dcmtune.sweep.spec import SpecError, SweepSpec

__all__ = [
    "SPEC_RECORD",
    "LOCK_FILE",
    "location",
    "check_experiment_dir",
    "sync_study",
    "driver_lock",
    "write_spec_record",
    "set_aside_orphans",
]

log = logging.getLogger(__name__)

LOCK_FILE = ".driver.lock"


def location(spec: SweepSpec, probe: bool = False) -> storage.Location:
    """The experiment in its storage (with `probe`: checked to answer within a bounded wait);
    SpecError otherwise."""
    try:
        loc = storage.resolve(spec.run.storage_path, "storage_path")
        if probe:
            storage.probe(loc, "storage_path")
    except storage.StorageError as e:
        raise SpecError(str(e)) from None
    return loc.child(spec.name)


def check_experiment_dir(spec: SweepSpec, resume: bool) -> None:
    """Refuses, with one line, an experiment that cannot start: storage not writable or not
    answering, a new experiment whose name is taken, a --resume without an experiment or with
    another spec, a new study that would join an old one of the same name."""
    if spec.remote:
        _check_remote_experiment(spec, resume)
        return
    exp = spec.experiment_dir
    problem = _io.writable_problem(exp)
    if problem:
        raise SpecError(f"run.storage_path: {problem} (experiment {exp})")
    if resume:
        if not (exp / "tuner.pkl").is_file():
            raise SpecError(f"--resume: no experiment to resume at {exp}")
        record = exp / SPEC_RECORD
        if record.is_file():
            try:
                saved = json.loads(record.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SpecError(
                    f"{record}: unreadable ({type(e).__name__}); the experiment record is damaged"
                ) from None
            _check_same_spec(saved, spec.to_dict())
    else:
        if exp.exists() and any(p.name != LOCK_FILE for p in exp.iterdir()):
            raise SpecError(
                f"name: the experiment {exp} already exists; continue it with "
                "--resume, or choose another name (--name) or --storage-path"
            )
        if spec.study_storage and not _inside(spec.study_storage, exp):
            _check_fresh_study(spec)


def _check_remote_experiment(spec: SweepSpec, resume: bool) -> None:
    """`check_experiment_dir` for object storage: the experiment is read in the bucket, the
    driver's local copy (lock, Optuna journal, ranking) must be writable."""
    loc, local = location(spec, probe=True), spec.experiment_dir
    problem = _io.writable_problem(local)
    if problem:
        raise SpecError(f"run.local_dir: {problem} (local copy {local})")
    if resume:
        if not loc.is_file("tuner.pkl"):
            raise SpecError(f"--resume: no experiment to resume at {spec.experiment_uri}")
        if loc.is_file(SPEC_RECORD):
            try:
                saved = json.loads(loc.read_bytes(SPEC_RECORD).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SpecError(
                    f"{spec.experiment_uri}/{SPEC_RECORD}: unreadable "
                    f"({type(e).__name__}); the experiment record is damaged"
                ) from None
            _check_same_spec(saved, spec.to_dict())
        return
    if [n for n in loc.listdir() if n not in (storage.RAY_MARKER, LOCK_FILE)]:
        raise SpecError(
            f"name: the experiment {spec.experiment_uri} already exists; continue it "
            "with --resume, or choose another name (--name) or --storage-path"
        )
    if local.exists() and any(p.name != LOCK_FILE for p in local.iterdir()):
        # A local copy left by an experiment of that name that no longer is in the bucket.
        moved = _io.move_aside(local, f".stale-{local.name}-{os.getpid()}")
        log.warning("%s: local copy of an experiment not in storage; moved to %s", local, moved)
    if spec.study_storage and not _inside(spec.study_storage, local):
        _check_fresh_study(spec)


def sync_study(spec: SweepSpec, up: bool) -> None:
    """With object storage, the Optuna journal kept in the driver's local copy travels with
    the experiment: uploaded after a run, fetched before --resume when missing here."""
    url = spec.study_storage
    if not (spec.remote and url and study.is_journal(url) and _inside(url, spec.experiment_dir)):
        return
    loc, rel = location(spec), Path(url).relative_to(spec.experiment_dir).as_posix()
    if up and Path(url).is_file():
        loc.upload(Path(url), rel)
    elif not up and not Path(url).is_file() and loc.is_file(rel):
        loc.download(rel, Path(url))


def _check_fresh_study(spec: SweepSpec) -> None:
    """A new experiment must not add its trials to an old Optuna study of the same name."""
    import optuna

    url = spec.study_storage
    if study.is_journal(url) and not Path(url).is_file():
        return
    try:
        storage = study.open_storage(url)
        names = optuna.study.get_all_study_names(storage=storage)
    except Exception as e:  # SQLAlchemy raises many types for a bad URL or database
        raise SpecError(
            f"searcher.storage: cannot open {url} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if spec.name in names:
        n = len(optuna.load_study(study_name=spec.name, storage=storage).trials)
        raise SpecError(
            f"searcher.storage: {url} already holds a study {spec.name!r} with {n} "
            "trials; use --resume, another name (--name) or another storage"
        )


def _inside(storage: str, directory: Path) -> bool:
    """Whether a resolved storage is a file in `directory` (new with a new experiment)."""
    path = (
        Path(storage)
        if study.is_journal(storage)
        else (Path(storage[len("sqlite:///") :]) if storage.startswith("sqlite:///") else None)
    )
    return path is not None and directory.resolve() in path.parents


def _check_same_spec(saved: dict, now: dict) -> None:
    """Resuming with a changed spec would mix two experiments: refuse. Command-line overrides
    must be the same ones (records written before overrides existed had none)."""
    was, now_set = saved.get("overrides") or {}, now.get("overrides") or {}
    if json.loads(json.dumps(now_set)) != was:
        raise SpecError(
            f"--set: the experiment being resumed was started with overrides "
            f"{format_overrides(was)}, not {format_overrides(now_set)}; resume with the same "
            "--set/--data/--num-samples flags"
        )
    keep = ("base", "search", "searcher", "scheduler")
    a = flat_dict({k: saved.get(k) for k in keep})
    b = flat_dict({k: json.loads(json.dumps(now.get(k))) for k in keep})
    # Settings added after the experiment was written held their defaults then.
    defaults = flat_dict(
        {
            "base": ExperimentConfig().to_dict(),
            "searcher": dataclasses.asdict(SearcherSpec()),
            "scheduler": dataclasses.asdict(SchedulerSpec()),
        }
    )
    a.update({k: defaults[k] for k in set(b) - set(a) if k in defaults})
    # Where the data lives (device-resident or streamed) gives the same results, and its
    # default changed (a fixed 1024 MB before it followed the device): free, as on a restart.
    for key in ("base.created_at", "base.data.device_data_budget_mb"):
        a.pop(key, None), b.pop(key, None)
    for key in ("num_samples", "metric", "mode"):
        a[f"run.{key}"], b[f"run.{key}"] = saved["run"][key], now["run"][key]
    # Objectives (records written before they existed had one: none listed).
    a["run.objectives"] = json.dumps(saved["run"].get("objectives") or [])
    b["run.objectives"] = json.dumps(json.loads(json.dumps(now["run"].get("objectives") or [])))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise SpecError(
            f"{diff[0]}: differs from the experiment being resumed ({a.get(diff[0])!r}"
            f" there, {b.get(diff[0])!r} now); resume with the original spec"
        )


@contextlib.contextmanager
def driver_lock(experiment_dir: Path):
    """Holds `<experiment>/.driver.lock` (fcntl.flock) for the life of this driver; a second
    driver on the same experiment is refused (SpecError). The lock dies with the process."""
    import fcntl

    experiment_dir.mkdir(parents=True, exist_ok=True)
    path = experiment_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise SpecError(
                f"{experiment_dir}: another driver (pid {holder}) is running this "
                "experiment; wait for it or stop it first"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def write_spec_record(spec: SweepSpec) -> None:
    exp = spec.experiment_dir
    exp.mkdir(parents=True, exist_ok=True)
    _io.write_json(exp / SPEC_RECORD, spec.to_dict())
    if spec.path is not None:
        _io.write_bytes(exp / "spec.yaml", Path(spec.path).read_bytes())
    if spec.remote:  # the record lives with the experiment, in the bucket
        loc = location(spec)
        for name in (SPEC_RECORD, "spec.yaml"):
            if (exp / name).is_file():
                loc.upload(exp / name, name)


def set_aside_orphans(spec: SweepSpec, known: set) -> None:
    """Moves trial directories the restored experiment does not know (started after its last
    snapshot) to `.orphan-<name>`, so the ranking does not read them."""
    if spec.remote:
        loc = location(spec)
        for name in loc.listdir():
            if name.startswith("trial_") and name not in known:
                loc.copy(name, f".orphan-{name}")
                loc.delete(name)
                log.warning(
                    "%s: a trial started after the last experiment snapshot and lost "
                    "by the restore; moved to .orphan-%s",
                    name,
                    name,
                )
        return
    for d in sorted(spec.experiment_dir.glob("trial_*")):
        if d.is_dir() and d.name not in known:
            moved = _io.move_aside(d, f".orphan-{d.name}")
            log.warning(
                "%s: a trial started after the last experiment snapshot and lost by "
                "the restore; moved to %s",
                d.name,
                moved.name,
            )
