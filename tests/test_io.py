"""The one crash-safe writer: a failed write leaves the old file or directory intact."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from dcmtune import _io


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_write_json_text_csv_round_trip(tmp_path):
    _io.write_json(
        tmp_path / "a.json",
        {"x": np.float32(1.5), "n": np.int64(3), "nan": math.nan, "arr": np.arange(3)},
    )
    assert json.loads((tmp_path / "a.json").read_text()) == {
        "x": 1.5,
        "n": 3,
        "nan": None,
        "arr": [0, 1, 2],
    }
    _io.write_text(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    _io.write_csv(tmp_path / "c.csv", [{"a": 1}, {"a": 2, "b": 3}])
    assert (tmp_path / "c.csv").read_text().splitlines() == ["a,b", "1,", "2,3"]
    _io.write_csv(tmp_path / "d.csv", pd.DataFrame({"m": [1.0, 2.0]}))
    assert pd.read_csv(tmp_path / "d.csv")["m"].tolist() == [1.0, 2.0]
    assert _leftovers(tmp_path) == []


def test_jsonable_maps_every_leaf_kind():
    x = {
        "f": [1.0, math.nan, math.inf, -math.inf, np.float32(2.5), np.float64(-math.inf)],
        "i": [3, np.int64(4), True, np.bool_(False), None, "s"],
        5: (1, 2),
        "nested": {"arr": np.array([1.0, np.nan]), "p": _io.Path("a/b")},
    }
    assert _io.jsonable(x) == {
        "f": [1.0, None, 1e308, -1e308, 2.5, -1e308],
        "i": [3, 4, True, False, None, "s"],
        "5": [1, 2],
        "nested": {"arr": [1.0, None], "p": "a/b"},
    }
    out = _io.jsonable(x)
    assert type(out["i"][2]) is bool and type(out["i"][3]) is bool and type(out["i"][1]) is int
    json.dumps(out, allow_nan=False)  # strictly valid JSON


def test_failed_write_leaves_old_file_intact(tmp_path):
    path = tmp_path / "f.json"
    _io.write_json(path, {"version": 1})

    def broken(f):
        f.write(b'{"version": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _io.atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"version": 1}
    assert _leftovers(tmp_path) == []
    with pytest.raises(TypeError):  # not JSON-serialisable: nothing is written
        _io.write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"version": 1}


def test_durable_writes_fsync_and_bookkeeping_writes_do_not(tmp_path, monkeypatch):
    synced = []
    real = _io.os.fsync
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    _io.write_json(tmp_path / "a.json", {"epoch": 1})
    assert len(synced) == 2  # the file and its directory
    synced.clear()
    _io.write_json(tmp_path / "b.json", {"epoch": 2}, durable=False)
    assert synced == [] and json.loads((tmp_path / "b.json").read_text()) == {"epoch": 2}
    assert _leftovers(tmp_path) == []


def test_two_writers_use_distinct_temp_names(tmp_path):
    path = tmp_path / "x.txt"
    names = []

    def spy(f):
        names.append(f.name)
        f.write(b"x")

    _io.atomic_write(path, spy)
    _io.atomic_write(path, spy)
    assert len(set(names)) == 2 and all(n != str(path) for n in names)


def test_failed_directory_write_keeps_old_directory(tmp_path):
    target = tmp_path / "ckpt"
    with _io.atomic_directory(target) as d:
        (d / "state").write_text("old")
    with pytest.raises(RuntimeError):
        with _io.atomic_directory(target) as d:
            (d / "state").write_text("new, half")
            raise RuntimeError("killed")
    assert (target / "state").read_text() == "old"
    assert _leftovers(tmp_path) == []
    with _io.atomic_directory(target) as d:
        (d / "state").write_text("new")
    assert (target / "state").read_text() == "new" and _leftovers(tmp_path) == []


def test_move_aside_never_overwrites(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a")
    moved = _io.move_aside(a, "b")
    assert moved != b and (moved / "f").read_text() == "a" and b.is_dir() and not a.exists()
