"""Fine-tuning: a run's first weights from another model (`training.init_from`).

The source is a checkpoint directory, a run directory (its best checkpoint), a sweep directory
(its `best_model/`) or a shipped model's name (`dcmtune.models`, looked up only when no such
path exists). Only weights come over: the parameters and EMA weights. The optimizer state,
schedule, step, epoch count and data-order key are this run's own, fresh. Before its first
update the run's model predicts exactly what the source predicts (the weights it evaluates
with are the source's evaluated weights). The source must have this run's model section
(every field: they all shape what the weights compute); anything else is refused with one
line before anything compiles or is written. Checkpoints of the run record where it started
from (`record`, meta.json key "init_from").
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from dcmtune.config import ConfigError, ExperimentConfig, ModelConfig
from dcmtune.train import checkpoints as ckpt

__all__ = ["Source", "resolve_source", "open_source", "start_from", "record"]

log = logging.getLogger(__name__)

KEY = "training.init_from"


@dataclasses.dataclass(frozen=True)
class Source:
    """A verified source checkpoint: where it is, its run's config, its meta.json."""

    ref: str
    path: Path
    config: ExperimentConfig
    meta: dict


def resolve_source(ref: str) -> Path:
    """The checkpoint directory `ref` names (see the module docstring).

    Raises:
      CheckpointError: one line naming `ref` and what was expected.
    """
    p = Path(ref).expanduser()
    if p.exists():
        candidates = [p, p / "best_model", p / "checkpoints" / "best", p / "checkpoints" / "latest"]
        for c in candidates:
            if (c / ckpt.META_FILE).is_file():
                return c.resolve()
        raise ckpt.CheckpointError(
            f"{KEY}: {p}: not a dcmtune checkpoint (expected {ckpt.META_FILE}, a run directory "
            "with checkpoints/best, or a sweep directory with best_model/)"
        )
    if p.name == ref:  # a bare name: a shipped model
        from dcmtune.models import UnknownModel, model_dir

        try:
            return model_dir(ref)
        except UnknownModel as e:
            raise ckpt.CheckpointError(f"{KEY}: {e}") from None
    raise ckpt.CheckpointError(f"{KEY}: {p}: not found; expected a checkpoint or run directory")


def _check_compatible(source: ModelConfig, model: ModelConfig, where: Path) -> None:
    for f in dataclasses.fields(ModelConfig):
        theirs, mine = getattr(source, f.name), getattr(model, f.name)
        if theirs != mine:
            raise ckpt.CheckpointError(
                f"{KEY}: {where} is of another architecture: model.{f.name} = {mine!r} here, "
                f"{theirs!r} in the source (fine-tuning keeps the source's model)"
            )


def open_source(ref: str, model: ModelConfig) -> Source:
    """The checkpoint `ref` names, verified (checksums) and checked against this run's model.

    Raises:
      CheckpointError: not found, damaged, without a valid config, or another architecture.
    """
    path = resolve_source(ref)
    meta = ckpt.verify_checkpoint(path)
    try:
        config = ExperimentConfig.from_dict(meta.get("config") or {})
    except ConfigError as e:
        raise ckpt.CheckpointError(
            f"{KEY}: {path}: meta.json holds an invalid config ({e})"
        ) from None
    _check_compatible(config.model, model, path)
    return Source(ref=ref, path=path, config=config, meta=meta)


def start_from(state, source: Source, use_ema: bool):
    """`state` (a fresh TrainState of this run) with the source's weights.

    Parameters and EMA weights are the source's; when this run evaluates its parameters (no
    EMA) but the source evaluated its EMA weights, the parameters start from those, so the
    first predictions are the source's either way.
    """
    from dcmtune.train.step import init_state  # JAX loads here

    src, _ = ckpt.load_checkpoint(source.path, template=init_state(source.config))
    evaluated = src.ema_params if source.config.training.use_ema else src.params
    params = src.params if use_ema else evaluated
    log.info("starting from the weights of %s (epoch %s)", source.path, source.meta.get("epoch"))
    return state.replace(params=params, ema_params=evaluated if use_ema else params)


def record(source: Source, frozen: list[str]) -> dict:
    """What the run's checkpoints record about where it started from."""
    return {
        "source": source.ref,
        "checkpoint": str(source.path),
        "run": source.config.name,
        "epoch": source.meta.get("epoch"),
        "state_sha256": source.meta.get("state_sha256"),
        "frozen": list(frozen),
    }
