"""Kept molecules: every finished molecule of a generation on disk, so a killed run resumes.

While `X.npz` is generated, each molecule's result is written, as soon as it finishes, to the
work directory `X.npz.parts/` beside it, one `.npz` per molecule (plain arrays, no pickle),
written atomically (a temporary name, then renamed). The directory's `settings.json` names the
generation settings it belongs to.

Keys, so that nothing stale is reused:

  * a part's name and its stored `key` are the SHA-256 of the settings (every field of
    `GenerationSettings`) and of the molecule (name, atomic numbers, positions and masses, the
    bytes of the float64 arrays): what the numbers depend on. Its source (a path as given) and
    the worker count are not in it; the results do not depend on them.
  * a work directory of other settings that keeps molecules is refused (`QMError`, one line):
    rerun with the arguments that made it, or pass force (`--force`) to discard it (one that
    keeps none is replaced). Parts of molecules that are no longer asked for are ignored
    (adding or dropping molecules keeps the others' parts).

The directory is removed once the final file and its provenance are written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dcmtune import _io
from dcmtune.qm.specs import GenerationSettings, MoleculeSpec, QMError

__all__ = ["parts_dir", "settings_key", "molecule_key", "PartStore"]

log = logging.getLogger(__name__)

_FORMAT = 1
_MANIFEST = "settings.json"
# The per-conformer arrays of a `compute_molecule` result with one shape per conformer.
_STACKED = ("R", "mono", "mulliken", "Dxyz", "com", "energy", "scf_cycles")


def parts_dir(out: str | Path) -> Path:
    """The work directory of kept molecules beside the output `out`: `out` + ".parts"."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _settings_json(settings: GenerationSettings) -> str:
    return json.dumps(dataclasses.asdict(settings), sort_keys=True)


def settings_key(settings: GenerationSettings) -> str:
    """SHA-256 (hex) of every generation setting."""
    return hashlib.sha256(_settings_json(settings).encode()).hexdigest()


def molecule_key(spec: MoleculeSpec, settings: GenerationSettings) -> str:
    """SHA-256 (hex) of the settings and of what the molecule's numbers depend on."""
    h = hashlib.sha256(settings_key(settings).encode())
    h.update(spec.name.encode() + b"\0")
    for a, dtype in ((spec.numbers, np.int64), (spec.positions, np.float64)):
        h.update(np.ascontiguousarray(a, dtype).tobytes())
    h.update(np.ascontiguousarray(spec.masses, np.float64).tobytes())
    return h.hexdigest()


def _to_arrays(result: dict, key: str) -> dict[str, np.ndarray]:
    """A `compute_molecule` result as flat arrays (grids of different sizes concatenated)."""
    out = {k: np.asarray(result[k]) for k in _STACKED}
    out["grid_sizes"] = np.array([len(g) for g in result["grid"]], np.int64)
    out["grid"] = np.concatenate([np.asarray(g, np.float64) for g in result["grid"]])
    out["esp"] = np.concatenate([np.asarray(e, np.float64) for e in result["esp"]])
    out["shell"] = np.concatenate([np.asarray(s, np.float64) for s in result["shell"]])
    out["seconds"] = np.float64(result["seconds"])
    out["key"] = np.array(key)
    return out


def _from_arrays(a: dict[str, np.ndarray]) -> dict:
    """The inverse of `_to_arrays`: the same lists and scalars, bit for bit."""
    cuts = np.cumsum(a["grid_sizes"])[:-1]
    out: dict = {k: list(a[k]) for k in ("R", "mono", "mulliken", "Dxyz", "com")}
    out["grid"] = np.split(a["grid"], cuts)
    out["esp"] = np.split(a["esp"], cuts)
    out["shell"] = np.split(a["shell"], cuts)
    out["energy"] = [float(e) for e in a["energy"]]
    out["scf_cycles"] = [int(c) for c in a["scf_cycles"]]
    out["seconds"] = float(a["seconds"])
    return out


class PartStore:
    """The kept molecules of one generation (`parts_dir(out)`), keyed by `molecule_key`.

    Opening one checks the directory's settings (`QMError` on others unless `force`) and writes
    the manifest; `kept` loads the parts of the given molecules; `keep` writes one.
    """

    def __init__(self, out: str | Path, settings: GenerationSettings, force: bool = False):
        self.directory = parts_dir(out)
        self.settings = settings
        manifest = self.directory / _MANIFEST
        if manifest.is_file():
            theirs = json.loads(manifest.read_text())
            if theirs.get("settings_key") != settings_key(settings):
                if any(self.directory.glob("*.npz")) and not force:
                    raise QMError(_stale_message(self.directory, theirs, settings))
                log.warning("discarding %s (other settings)", self.directory)
                shutil.rmtree(self.directory)
        if not manifest.is_file():
            _io.write_json(
                manifest,
                {
                    "format": _FORMAT,
                    "settings_key": settings_key(settings),
                    "settings": dataclasses.asdict(settings),
                    "note": "molecules of an unfinished generation; removed when it finishes",
                },
            )

    def path(self, spec: MoleculeSpec) -> Path:
        return self.directory / f"{molecule_key(spec, self.settings)[:32]}.npz"

    def kept(self, specs: Sequence[MoleculeSpec]) -> dict[int, dict]:
        """{index in specs: result} of every molecule kept under the same key."""
        out = {}
        for i, spec in enumerate(specs):
            path = self.path(spec)
            if not path.is_file():
                continue
            try:
                with np.load(path, allow_pickle=False) as f:
                    arrays = {k: f[k] for k in f.files}
            except (OSError, ValueError) as e:  # atomic writes make this unlikely
                log.warning("%s: unreadable kept part (%s); recomputing %s", path, e, spec.name)
                continue
            if str(arrays.get("key")) != molecule_key(spec, self.settings):
                log.warning("%s: key differs; recomputing %s", path, spec.name)
                continue
            out[i] = _from_arrays(arrays)
        return out

    def keep(self, spec: MoleculeSpec, result: dict) -> Path:
        """Writes one finished molecule (atomically)."""
        arrays = _to_arrays(result, molecule_key(spec, self.settings))
        return _io.atomic_write(self.path(spec), lambda f: np.savez(f, **arrays))

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _stale_message(directory: Path, theirs: dict, settings: GenerationSettings) -> str:
    mine = json.loads(_settings_json(settings))  # tuples as JSON lists, as stored
    other = theirs.get("settings", {})
    differ = [f"{k} {other.get(k)!r} (now {v!r})" for k, v in mine.items() if other.get(k) != v]
    n = len(list(directory.glob("*.npz")))
    return (
        f"{directory}: {n} molecules kept by an unfinished generation with other settings "
        f"({', '.join(differ) or 'another format'}); rerun with its arguments to finish it, "
        "or pass --force to discard them"
    )
