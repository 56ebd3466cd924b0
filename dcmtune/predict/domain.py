"""The training domain: what a model saw in training, and warnings for molecules outside it.

The trainer records in every checkpoint's meta.json (`training_domain`, from
`ESPData.domain` of the training split): the elements, the largest molecule (atoms) and the
total charges. A molecule is out of domain when it holds an element never seen (its embedding
is untrained: its charges are a guess), is larger than the largest training molecule
(message passing meets environments and sizes it never fitted), or carries a total charge the
model never trained on (the bundled data are neutral). Out of domain is a warning, not an
error: the prediction is made and says so.

A checkpoint written before the domain was recorded has none: the checks are skipped, and
`NO_DOMAIN` says so once per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["PredictWarning", "TrainingDomain", "NO_DOMAIN", "domain_warnings", "summarize"]

NO_DOMAIN = (
    "the checkpoint records no training domain (written before dcmtune recorded one): the "
    "out-of-domain checks (elements, molecule size, total charge) are skipped"
)
# Total charges closer than this to one seen in training count as seen (e).
CHARGE_TOLERANCE = 1e-3


class PredictWarning(UserWarning):
    """A prediction was made but may not be trusted (out of the training domain, doubtful
    input); the message names the molecules."""


@dataclasses.dataclass(frozen=True)
class TrainingDomain:
    """What the model saw in training.

    Attributes:
      elements: Sorted atomic numbers of the training molecules.
      max_atoms: Atoms of the largest training molecule.
      total_charges: Sorted total charges of the training molecules, e.
    """

    elements: tuple[int, ...]
    max_atoms: int
    total_charges: tuple[float, ...]

    @classmethod
    def from_meta(cls, meta: dict) -> TrainingDomain | None:
        """The domain a checkpoint's meta.json records, or None (an older checkpoint)."""
        d = meta.get("training_domain")
        if not isinstance(d, dict):
            return None
        return cls(
            elements=tuple(int(z) for z in d["elements"]),
            max_atoms=int(d["max_atoms"]),
            total_charges=tuple(float(q) for q in d["total_charges"]),
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _symbols(numbers) -> str:
    from ase.data import chemical_symbols

    return ", ".join(chemical_symbols[z] if z < len(chemical_symbols) else f"Z{z}" for z in numbers)


def domain_warnings(
    domain: TrainingDomain, numbers: np.ndarray, total_charge: float
) -> tuple[str, ...]:
    """The out-of-domain warnings of one molecule (empty when it is inside).

    Args:
      domain: The model's training domain.
      numbers: (n,) atomic numbers of the molecule.
      total_charge: Its total charge, e.
    """
    out = []
    unseen = sorted(set(int(z) for z in numbers) - set(domain.elements))
    if unseen:
        out.append(
            f"element {_symbols(unseen)} never seen in training (trained on "
            f"{_symbols(domain.elements)}): its charges are a guess"
        )
    if len(numbers) > domain.max_atoms:
        out.append(
            f"{len(numbers)} atoms, larger than the largest training molecule "
            f"({domain.max_atoms} atoms)"
        )
    seen = np.asarray(domain.total_charges, np.float64)
    if not np.any(np.abs(seen - total_charge) <= CHARGE_TOLERANCE):
        trained = ", ".join(f"{q:+g}" for q in seen) or "none"
        out.append(
            f"total charge {total_charge:+g} e never seen in training (trained on {trained})"
        )
    return tuple(out)


def summarize(sources: Sequence[str], warnings: Sequence[Sequence[str]]) -> list[str]:
    """One line per distinct warning, with how many molecules it concerns and the first one:
    what the API warns and the CLI prints (a trajectory gives one line, not one per frame)."""
    first: dict[str, str] = {}
    count: dict[str, int] = {}
    for source, ws in zip(sources, warnings, strict=True):
        for w in ws:
            first.setdefault(w, source)
            count[w] = count.get(w, 0) + 1
    return [
        f"{first[w]}: {w}" if count[w] == 1 else f"{first[w]} and {count[w] - 1} more: {w}"
        for w in first
    ]
