"""Shipped models: listed, opened by name in a fresh install (package data, no network), a path of
the same name preferred, an unknown name refused in one line, and each model card's test errors
re-measured from the shipped checkpoint on the split it records."""

import json
import re
import shutil

import ase
import ase.io
import numpy as np
import pytest

import dcmtune
from dcmtune.models import list_models, model_dir
from dcmtune.predict import PredictError, load_model
from dcmtune.predict.commands import main as cli_main

NAME = "organic-v2"  # the recommended model: organic + large sets
SHIPPED = ["organic-v1", "organic-v2"]
MAX_BYTES = 5 * 2**20


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_model_is_listed_small_and_carded(name):
    assert list_models() == dcmtune.list_models() == SHIPPED
    d = model_dir(name)
    files = {p.name for p in d.iterdir()}
    assert {"meta.json", "state.msgpack", "config.json", "split.json", "MODEL_CARD.md"} <= files
    assert sum(p.stat().st_size for p in d.iterdir()) < MAX_BYTES
    card = (d / "MODEL_CARD.md").read_text()
    for needed in ("python -m dcmtune.train", "HF/6-31G", "test", "MMFF94", "neutral"):
        assert needed in card, needed


def test_load_by_name_predicts_a_neutral_molecule():
    predictor = load_model(NAME)
    assert predictor.path.is_relative_to(model_dir(NAME))
    assert predictor.domain is not None and predictor.domain.max_atoms >= 20
    methanol = ase.Atoms(
        "COHHHH",
        positions=[
            [0.0, 0.0, 0.0], [1.43, 0.0, 0.0], [1.75, 0.9, 0.0],
            [-0.36, 1.03, 0.0], [-0.36, -0.52, 0.89], [-0.36, -0.52, -0.89],
        ],
    )  # fmt: skip
    (pred,) = predictor.predict(methanol)
    assert pred.charges.shape == (6, predictor.n_dcm)
    assert abs(pred.charges.sum()) < 1e-4  # neutral: the charges sum to the total charge
    assert pred.monopoles[1] < 0 < pred.monopoles[2]  # O negative, its H positive


def test_a_path_of_the_same_name_wins(tiny_predict_run, tmp_path, monkeypatch):
    shutil.copytree(tiny_predict_run, tmp_path / NAME)
    monkeypatch.chdir(tmp_path)
    assert load_model(NAME).path.resolve().is_relative_to((tmp_path / NAME).resolve())


def test_an_unknown_name_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PredictError, match=rf"no-such-model: .*shipped: {', '.join(SHIPPED)}\)"):
        load_model("no-such-model")
    xyz = tmp_path / "water.xyz"
    ase.io.write(xyz, ase.Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    assert cli_main(["no-such-model", str(xyz)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a shipped model" in err[0]
    assert not list(tmp_path.glob("water.dcm*"))


def test_cli_predicts_with_the_model_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    xyz = tmp_path / "water.xyz"
    ase.io.write(xyz, ase.Atoms("OHH", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]))
    assert cli_main([NAME, str(xyz), "--out", str(tmp_path / "w.npz")]) == 0
    assert f"models/{NAME}" in capsys.readouterr().out
    with np.load(tmp_path / "w.npz") as f:
        assert abs(f["charges"].sum()) < 1e-4


def _card_breakdown(card: str) -> dict[str, dict[str, tuple[int, float]]]:
    """{kind: {group: (points, model ESP RMSE)}} from the card's "Where the error is" tables."""
    from dcmtune.analysis.breakdown import KIND_TITLES

    kind_of = {title: kind for kind, title in KIND_TITLES.items()}
    section = card.split("## Where the error is", 1)[1].split("\n## ", 1)[0]
    out: dict[str, dict[str, tuple[int, float]]] = {}
    kind = None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0].startswith("---"):
            continue
        if cells[0] in kind_of:
            kind = kind_of[cells[0]]
            assert cells[1:4] == ["points", "molecules", "model"], line
            out[kind] = {}
            continue
        out[kind][cells[0]] = (int(cells[1]), float(cells[3]))
    return out


@pytest.mark.parametrize("name", SHIPPED)
def test_the_cards_test_errors_are_what_the_checkpoint_gives(name):
    from dcmtune.analysis.breakdown import KINDS
    from dcmtune.analysis.evaluate import analysis_breakdown, analyze_checkpoint

    d = model_dir(name)
    card = (d / "MODEL_CARD.md").read_text()
    stated = float(re.search(r"test ESP RMSE \*\*([0-9.]+)\*\*", card).group(1))
    split = json.loads((d / "split.json").read_text())
    analysis = analyze_checkpoint(d, "test")
    measured = analysis.metrics["esp_rmse"]
    assert len(split["indices"]["test"]) > 0
    assert measured == pytest.approx(stated, abs=5e-4)
    # The breakdown tables' model column and point counts, every row (the "all" rows included).
    b = analysis_breakdown(analysis)
    tables = _card_breakdown(card)
    assert set(tables) == set(KINDS)
    for kind, rows in tables.items():
        got = {str(r.group): (int(r.n_points), r.esp_rmse) for r in b.tables[kind].itertuples()}
        got["all"] = (b.n_points, b.esp_rmse)
        assert set(rows) == set(got), kind
        for group, (points, rmse) in rows.items():
            assert points == got[group][0], (kind, group)
            assert rmse == pytest.approx(got[group][1], abs=5e-4), (kind, group)


def test_organic_v2_keeps_v1s_small_test_molecules_and_covers_larger_ones():
    """organic-v2 (organic + large) holds out every molecule organic-v1 held out, so their cards
    compare on the same small test molecules; and it was trained on molecules of 10-18 heavy
    atoms: a 30-atom molecule is outside v1's domain and inside v2's."""
    from dcmtune.predict.domain import domain_warnings

    v1, v2 = (json.loads((model_dir(n) / "split.json").read_text()) for n in SHIPPED)
    for part in ("valid", "test"):
        assert set(v1["mol_ids"][part]) <= set(v2["mol_ids"][part]), part
    assert not set(v2["mol_ids"]["train"]) & set(v1["mol_ids"]["test"])
    d1, d2 = (load_model(n).domain for n in SHIPPED)
    assert d1.elements == d2.elements and d1.max_atoms < 30 <= d2.max_atoms
    numbers = np.array([6] * 14 + [7, 8] + [1] * 14)  # 30 atoms, 16 heavy
    assert any("larger than" in w for w in domain_warnings(d1, numbers, 0.0))
    assert domain_warnings(d2, numbers, 0.0) == ()
