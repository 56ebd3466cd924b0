"""An experiment in object storage (S3, GCS), ranked from a local copy: everything but the
checkpoints' state files is read at once, a checkpoint's state only when it is evaluated, and the
ranking's outputs are written back (docs/cluster.md)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from dcmtune import storage
from dcmtune.analysis.ranking import BEST_MODEL, PARETO_DIR, RankError
from dcmtune.train import checkpoints as ckpt

__all__ = ["RemoteExperiment"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RemoteExperiment:
    """An experiment in an object store, read into a local copy: everything but the
    checkpoints' state files (and Tune's pickles and event streams) at once, the state of a
    checkpoint only when it is evaluated (`fetch`)."""

    loc: storage.Location
    local: Path

    @classmethod
    def open(cls, uri: str, local_copy: Path | None) -> RemoteExperiment:
        loc = storage.resolve(uri, "experiment")
        storage.probe(loc, "experiment")
        if not loc.exists():
            raise RankError(f"{uri}: not found; expected a dcmtune sweep experiment")
        local = (
            Path(local_copy)
            if local_copy
            else storage.local_copy_dir(uri, Path("ray_results").resolve())
        )

        def skip(rel: str) -> bool:
            name = rel.rsplit("/", 1)[-1]
            return (
                rel.startswith((".", BEST_MODEL + "/", PARETO_DIR + "/"))
                or name == ckpt.STATE_FILE
                or name.endswith(".pkl")
                or name.startswith("events.out.tfevents")
            )

        n = len(loc.download("", local, skip=skip))
        log.info("%s: %d files read into %s", uri, n, local)
        return cls(loc, local)

    def fetch(self, checkpoint: Path) -> None:
        rel = Path(checkpoint).relative_to(self.local).as_posix()
        self.loc.download(f"{rel}/{ckpt.STATE_FILE}", Path(checkpoint) / ckpt.STATE_FILE)

    def upload(self, files: Sequence[str]) -> None:
        for f in files:
            p = Path(f)
            if p.exists():
                self.loc.upload(p, p.relative_to(self.local.resolve()).as_posix())
