"""Experiments written before the subpackages still resume and rank.

`tests/data/legacy_experiment/` is a tiny sweep (the spec `tests/data/legacy_spec.yaml`, on the
bundled demo set) that the code at commit 32e85dd wrote and that was interrupted with Ctrl-C
after its first trial (`tests/data/make_legacy_experiment.py`, run with that commit on the
PYTHONPATH). Its Tune state pickled the searcher, the ASHA callback and the loggers under the
old module paths (`dcmtune._tune_ext`, `dcmtune._tune_loggers`, `dcmtune.trainable`), which
the import-alias shims keep (docs/architecture.md).
"""

import shutil
from pathlib import Path

import pandas as pd
import pytest

from dcmtune.analysis.rank import rank_experiment
from dcmtune.sweep.driver import run_sweep
from dcmtune.sweep.spec import load_spec

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.ray
def test_an_experiment_written_before_the_subpackages_resumes_and_ranks(ray_session, tmp_path):
    shutil.copytree(DATA / "legacy_experiment", tmp_path / "results" / "legacy")
    spec_path = shutil.copy(DATA / "legacy_spec.yaml", tmp_path / "legacy.yaml")
    before = {
        p.name: (p / "history.csv").read_text()
        for p in (tmp_path / "results" / "legacy").glob("trial_*")
    }
    finished = [n for n, h in before.items() if len(h.splitlines()) == 7]  # header + 6 epochs
    assert len(before) == 2 and len(finished) == 1  # one done, one interrupted at epoch 2

    spec = load_spec(spec_path, storage_path=tmp_path / "results")
    outcome = run_sweep(spec, resume=True, verbose=0)

    assert outcome.status == "completed"
    trials = sorted((tmp_path / "results" / "legacy").glob("trial_*"))
    assert len(trials) == 4  # the interrupted trial finished, the two missing ones ran
    done = (tmp_path / "results" / "legacy" / finished[0] / "history.csv").read_text()
    assert done == before[finished[0]]  # the finished trial was not trained again
    for t in trials:  # every trial's epochs once, in order
        epochs = pd.read_csv(t / "history.csv")["epoch"].tolist()
        assert epochs == list(range(1, len(epochs) + 1)), t.name
    best = tmp_path / "results" / "legacy" / "best_model"
    assert (best / "state.msgpack").is_file() and (best / "evaluation.json").is_file()
    # The finished experiment ranks again by itself (`python -m dcmtune.rank`).
    df = rank_experiment(tmp_path / "results" / "legacy", write=False)
    assert len(df) == 2 and df["test_esp_rmse"].notna().all()
