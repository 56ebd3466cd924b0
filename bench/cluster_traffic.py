"""What one sweep trial moves between nodes and storage, measured on the default model.

Trains the default DCMNet (`ExperimentConfig()` defaults) for a few epochs on the bundled demo
set on the CPU, exactly as a trial does (`train.fit`), and prints the sizes behind the estimate
in docs/cluster.md:

  - a checkpoint (state.msgpack + meta.json): what `tune.report` uploads to storage when a trial
    attaches one, and how meta.json grows per epoch (it carries the training history);
  - a result row: the dict a trial reports every epoch (what reaches the driver), as JSON;
  - the run files a trial keeps in storage (config.json, split.json, history.csv per epoch);
  - the dataset as the driver puts it into Ray's object store (`tune.with_parameters`), for
    the demo set and the organic set.

  python bench/cluster_traffic.py [--epochs 3] [--features 16]

`--smoke`: the same measurements after 1 epoch of a tiny model (4 features, degree 1,
1 iteration, 1 charge per atom).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from importlib import resources
from pathlib import Path

from dcmtune.config import ExperimentConfig
from dcmtune.data import load_dataset
from dcmtune.train.environment import use_compilation_cache
from dcmtune.train.loop import fit


def _data_bytes(data) -> int:
    return sum(
        getattr(data, f.name).nbytes
        for f in dataclasses.fields(data)
        if hasattr(getattr(data, f.name), "nbytes")
    )


SMOKE_MODEL = {
    "model.n_dcm": 1,
    "model.features": 4,
    "model.max_degree": 1,
    "model.num_iterations": 1,
    "model.num_basis_functions": 4,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--features", type=int, help="model.features (default: the default model's)")
    p.add_argument("--smoke", action="store_true", help="1 epoch of a tiny model")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs = 1
    use_compilation_cache(Path(tempfile.gettempdir()) / "dcmtune-jax-cache")
    data = load_dataset()
    rows, metas = [], []

    def reporter(epoch, metrics, checkpoint_dir):
        rows.append(len(json.dumps({k: float(v) for k, v in metrics.items()})))
        metas.append((checkpoint_dir / "meta.json").stat().st_size)
        state = (checkpoint_dir / "state.msgpack").stat().st_size
        print(
            f"epoch {epoch}: state.msgpack {state} B, meta.json {metas[-1]} B, "
            f"result row {rows[-1]} B ({len(metrics)} metrics)"
        )

    with tempfile.TemporaryDirectory() as tmp:
        changes = {"training.num_epochs": args.epochs, "training.save_every_n_epochs": 0}
        if args.smoke:
            changes.update(SMOKE_MODEL)
        if args.features:
            changes["model.features"] = args.features
        cfg = ExperimentConfig().replace(**changes)
        run = Path(tmp) / "run"
        res = fit(cfg, data, reporter=reporter, run_dir=run)
        m = cfg.model
        import jax

        n_params = sum(x.size for x in jax.tree_util.tree_leaves(res.params))
        print(
            f"model: features {m.features}, max_degree {m.max_degree}, num_iterations "
            f"{m.num_iterations}, n_dcm {m.n_dcm}: {n_params} parameters; {res.status}"
        )
        for name in ("config.json", "split.json", "history.csv"):
            print(f"{name}: {(run / name).stat().st_size} B after {args.epochs} epochs")
        if len(metas) > 1:
            print(f"meta.json grows {(metas[-1] - metas[0]) / (len(metas) - 1):.0f} B per epoch")
    print(
        f"demo set in the object store: {_data_bytes(data) / 1e6:.2f} MB "
        f"({data.num_conformers} conformers)"
    )
    org = load_dataset([str(resources.files("dcmtune.datasets") / "organic_esp.npz")])
    print(
        f"organic set in the object store: {_data_bytes(org) / 1e6:.2f} MB "
        f"({org.num_conformers} conformers)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
