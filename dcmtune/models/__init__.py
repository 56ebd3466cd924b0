"""Models shipped with the package, opened by name: `dcmtune.load_model("organic-v2")`.

Each is a directory here holding a checkpoint as training writes it (`meta.json`,
`state.msgpack`), its `config.json` and `split.json`, and a `MODEL_CARD.md` (data, training
command, test errors beside the classical baselines, domain and limits). A name is looked up
only when no file or directory of that name exists, so a user's `./organic-v2` run wins.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["list_models", "model_dir", "UnknownModel"]

HERE = Path(__file__).resolve().parent
CARD = "MODEL_CARD.md"


class UnknownModel(ValueError):
    """A name that is neither a path nor a shipped model."""


def list_models() -> list[str]:
    """Names of the shipped models, sorted."""
    return sorted(p.name for p in HERE.iterdir() if (p / CARD).is_file())


def model_dir(name: str) -> Path:
    """The directory of shipped model `name`.

    Raises:
      UnknownModel: one line naming the shipped models.
    """
    if name in list_models():
        return HERE / name
    raise UnknownModel(
        f"{name}: no such checkpoint or directory, and not a shipped model (shipped: "
        f"{', '.join(list_models()) or 'none'})"
    )
