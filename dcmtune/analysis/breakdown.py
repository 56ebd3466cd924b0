"""Where the ESP error is: the RMSE of an evaluated split per grid shell, per element, per
molecule size and per functional class (issue 22).

Each grid point of each conformer is put into groups, and each group's ESP RMSE is pooled over
its points: sqrt(sum of squared errors / points), in kcal/mol/e. Pooling points (rather than
averaging conformers, as the headline `esp_rmse` does) makes the groups of one partition add
up: sum over groups of n_points x RMSE^2 / total points = the pooled RMSE^2 of all points. The
headline `esp_rmse` weights conformers equally instead; the two differ only where conformers
have different numbers of grid points (organic set: at most 700 per conformer, most have 700).

The four groupings:

* **shell**: the Merz-Kollman shell factor f (`dcmtune.data.grids.SHELLS`, 1.4/1.6/1.8/2.0) the
  point was generated on: the file's own `shell` key (M, G) where it has one (files written by
  `python -m dcmtune.data generate` since the larger-molecule set; `ESPData.shell`, 0 where
  unknown). Elsewhere (the organic and demo sets) it is recovered from the geometry: the
  generator put the point at exactly f x vdW_a from some atom a (radii
  `dcmtune.data.grids.VDW_RADII`, the generator's table), so the recovered shell is the factor
  f and atom a minimising | |r - R_a| / vdW_a - f |. (The nearest scaled surface,
  min_a |r - R_a| / vdW_a, is not the shell: the generator only removes points inside another
  atom's innermost, 1.4 sphere, so a point on atom a's 2.0 shell may lie at 1.6 x vdW of atom
  b. On the organic set that rule misplaces 36% of the points.) On the bundled organic and demo
  sets every point matches a factor within 3.4e-7 (float32 coordinates). Points matching no
  factor within SHELL_TOLERANCE (1e-3), e.g. grids of other generators, or atoms without a
  vdW radius, are labelled "other".
* **element**: of the atom nearest the point by plain Euclidean distance (the Voronoi cell),
  which needs no radii table and is defined for every element.
* **size**: heavy atoms (Z > 1) of the conformer's molecule, in SIZE_BINS.
* **class**: the functional classes of the molecule (`dcmtune.qm.conformers.FUNCTIONAL_CLASSES`,
  RDKit SMARTS on its SMILES; a molecule may be in several classes, so these groups overlap and
  do not add up). "none": a known molecule in no class (water, alkanes); "unknown": no SMILES
  (the file's provenance records none for that mol_id, or RDKit is not installed).

SMILES come from the provenance JSON beside each data file (`molecules[].smiles`, written by
`python -m dcmtune.data generate --smiles...`). Pure numpy and pandas; RDKit only for classes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dcmtune.data.dataset import ESPData, bundled_dataset_path, data_file_path
from dcmtune.data.file_format import provenance_path
from dcmtune.data.grids import SHELLS, VDW_RADII
from dcmtune.units import HARTREE_TO_KCAL

__all__ = [
    "KINDS",
    "KIND_TITLES",
    "SHELL_TOLERANCE",
    "SIZE_BINS",
    "OTHER",
    "NO_CLASS",
    "UNKNOWN",
    "Breakdown",
    "recover_shells",
    "nearest_atom_numbers",
    "size_label",
    "molecule_classes",
    "grouped_errors",
    "esp_breakdown",
    "smiles_from_provenance",
    "format_breakdown",
]

log = logging.getLogger(__name__)

# The groupings, in the order tables are shown.
KINDS = ("shell", "element", "size", "class")
# Column headings of the group column per kind.
KIND_TITLES = {
    "shell": "shell (x vdW)",
    "element": "nearest atom",
    "size": "heavy atoms",
    "class": "functional class",
}
# A point is on shell f when | |r - R_a| / vdW_a - f | <= this for some atom a (float32
# coordinates give <= 3.4e-7 on the bundled sets; a wrong factor is at least 0.2 away except by
# coincidence).
SHELL_TOLERANCE = 1e-3
# Heavy-atom bins (inclusive; None = no upper bound).
SIZE_BINS: tuple[tuple[int, int | None], ...] = (
    (1, 3),
    (4, 6),
    (7, 9),
    (10, 14),
    (15, 18),
    (19, None),
)
OTHER = "other"  # a shell no factor matches
NO_CLASS = "none"  # a known molecule in no functional class
UNKNOWN = "unknown"  # a molecule without SMILES
_CHUNK = 32  # conformers per vectorised block: (32, G, A, shells) float64 stays small


# --------------------------------------------------------------------------- per point


def _radii(Z: np.ndarray) -> np.ndarray:
    """vdW radius per atomic number in Z (Angstrom), NaN for padding and unknown elements."""
    table = np.full(max(int(Z.max(initial=0)), max(VDW_RADII)) + 1, np.nan)
    for z, r in VDW_RADII.items():
        table[z] = r
    out = table[Z]
    out[Z <= 0] = np.nan
    return out


def recover_shells(
    R: np.ndarray,
    Z: np.ndarray,
    grid: np.ndarray,
    n_grid: np.ndarray,
    shells: Sequence[float] = SHELLS,
    tolerance: float = SHELL_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """The generator's shell of every grid point, recovered from the geometry.

    Args:
      R: (M, A, 3) Angstrom. Z: (M, A) atomic numbers, 0 = padding.
      grid: (M, G, 3) Angstrom. n_grid: (M,) valid points (the first n_grid).
      shells: The generator's factors (multiples of the vdW radius).
      tolerance: Largest | |r - R_a| / vdW_a - f | still counted as shell f.

    Returns:
      shell: (M, G) int index into `shells`; -1 for "other" (no factor within tolerance) and
        for padding points.
      deviation: (M, G) float64, the smallest | |r - R_a| / vdW_a - f | over atoms and
        factors; NaN for padding points and points with no atom of known radius.
    """
    factors = np.asarray(shells, np.float64)
    M, G = grid.shape[:2]
    shell = np.full((M, G), -1, np.int64)
    deviation = np.full((M, G), np.nan)
    valid = np.arange(G)[None, :] < n_grid[:, None]  # (M, G)
    radii = _radii(Z)  # (M, A)
    for lo in range(0, M, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        # 1. Distance over radius to every atom. Shape (c, G, A).
        d = np.linalg.norm(
            grid[sl, :, None, :].astype(np.float64) - R[sl, None, :, :].astype(np.float64), axis=-1
        )
        ratio = d / radii[sl, None, :]
        # 2. Distance of each ratio from each factor, best atom per factor. Shape (c, G, K).
        dev = np.abs(ratio[..., None] - factors)
        dev = np.where(np.isnan(dev), np.inf, dev).min(axis=2)
        # 3. Best factor per point. Shape (c, G).
        best = dev.argmin(axis=-1)
        best_dev = np.take_along_axis(dev, best[..., None], axis=-1)[..., 0]
        ok = valid[sl] & (best_dev <= tolerance)
        shell[sl] = np.where(ok, best, -1)
        deviation[sl] = np.where(valid[sl] & np.isfinite(best_dev), best_dev, np.nan)
    return shell, deviation


def nearest_atom_numbers(
    R: np.ndarray, Z: np.ndarray, grid: np.ndarray, n_grid: np.ndarray
) -> np.ndarray:
    """(M, G) atomic number of the real atom nearest each grid point (Euclidean distance);
    0 for padding points.

    Args:
      R: (M, A, 3) Angstrom. Z: (M, A), 0 = padding. grid: (M, G, 3). n_grid: (M,).
    """
    M, G = grid.shape[:2]
    out = np.zeros((M, G), np.int64)
    valid = np.arange(G)[None, :] < n_grid[:, None]
    for lo in range(0, M, _CHUNK):
        sl = slice(lo, lo + _CHUNK)
        # Shape (c, G, A); padding atoms infinitely far.
        d = np.linalg.norm(
            grid[sl, :, None, :].astype(np.float64) - R[sl, None, :, :].astype(np.float64), axis=-1
        )
        d = np.where(Z[sl, None, :] > 0, d, np.inf)
        nearest = d.argmin(axis=-1)  # (c, G)
        out[sl] = np.where(valid[sl], np.take_along_axis(Z[sl], nearest, axis=1), 0)
    return out


def size_label(heavy_atoms: int) -> str:
    """The SIZE_BINS label of a heavy-atom count ("1-3", ..., "19+"; "0" for none)."""
    for lo, hi in SIZE_BINS:
        if heavy_atoms >= lo and (hi is None or heavy_atoms <= hi):
            return f"{lo}+" if hi is None else f"{lo}-{hi}"
    return str(heavy_atoms)


def _size_labels() -> list[str]:
    return ["0"] + [size_label(lo) for lo, _ in SIZE_BINS]


def molecule_classes(
    mol_ids: Iterable[object], smiles_of: Mapping[str, str] | None
) -> dict[str, tuple[str, ...]]:
    """{mol_id: its functional classes (sorted)}: NO_CLASS for a known molecule in none,
    UNKNOWN without SMILES, with a SMILES RDKit refuses, or without RDKit (logged once)."""
    from dcmtune.qm.specs import QMError

    out: dict[str, tuple[str, ...]] = {}
    for mid in dict.fromkeys(str(m) for m in mol_ids):
        smiles = (smiles_of or {}).get(mid)
        if smiles is None:
            out[mid] = (UNKNOWN,)
            continue
        try:
            from dcmtune.qm.conformers import functional_classes

            classes = functional_classes(smiles)
        except QMError as e:
            log.info("functional class of %s unknown: %s", mid, e)
            out[mid] = (UNKNOWN,)
            continue
        out[mid] = tuple(sorted(classes)) or (NO_CLASS,)
    return out


# --------------------------------------------------------------------------- grouping


def grouped_errors(
    err: np.ndarray,
    group: np.ndarray,
    conformer: np.ndarray,
    molecule: np.ndarray,
    order: Sequence | None = None,
) -> pd.DataFrame:
    """Pooled ESP errors per group.

    Args:
      err: (P,) prediction minus reference at P grid points, kcal/mol/e.
      group: (P,) group label of each point.
      conformer: (P,) conformer of each point. molecule: (P,) molecule of each point.
      order: Group labels in table order (labels absent from `group` are skipped; labels not
        in `order` follow, sorted). Default: sorted.

    Returns:
      One row per group present: group, n_points, n_conformers, n_molecules, esp_rmse
      (sqrt of the mean squared error over the group's points) and esp_mae (kcal/mol/e).
    """
    err = np.asarray(err, np.float64)
    frame = pd.DataFrame(
        {"group": group, "sq": err**2, "abs": np.abs(err), "c": conformer, "m": molecule}
    )
    g = frame.groupby("group", sort=False)
    table = pd.DataFrame(
        {
            "n_points": g.size(),
            "n_conformers": g["c"].nunique(),
            "n_molecules": g["m"].nunique(),
            "esp_rmse": np.sqrt(g["sq"].mean()),
            "esp_mae": g["abs"].mean(),
        }
    )
    present = list(table.index)
    ordered = [k for k in (order or []) if k in present]
    ordered += sorted((k for k in present if k not in ordered), key=str)
    return table.loc[ordered].rename_axis("group").reset_index()


@dataclasses.dataclass
class Breakdown:
    """The ESP error of an evaluated split per group.

    Attributes:
      tables: {kind: grouped_errors table} for KINDS ("class" groups overlap; the others
        partition the points).
      n_points: Valid grid points evaluated.
      esp_rmse: Pooled over all those points, kcal/mol/e (the "all" row of every table).
      esp_mae: Likewise, kcal/mol/e.
      shell_max_deviation: Largest | |r - R_a| / vdW_a - f | of the points given a shell from
        the geometry (NaN when shells were given or none matched).
      shell_source: "geometry" (recovered), "file" (given per point) or "mixed" (given for
        some points, recovered for the others).
    """

    tables: dict[str, pd.DataFrame]
    n_points: int
    esp_rmse: float
    esp_mae: float
    shell_max_deviation: float
    shell_source: str

    def to_frame(self) -> pd.DataFrame:
        """All tables as one long table with a leading `kind` column (breakdown.csv)."""
        return pd.concat(
            [t.assign(kind=k)[["kind", *t.columns]] for k, t in self.tables.items()],
            ignore_index=True,
        )

    def to_dict(self) -> dict:
        """JSON-able: the tables as records and the scalars."""
        return {
            "tables": {k: t.to_dict(orient="records") for k, t in self.tables.items()},
            "n_points": self.n_points,
            "esp_rmse": self.esp_rmse,
            "esp_mae": self.esp_mae,
            "shell_max_deviation": self.shell_max_deviation,
            "shell_source": self.shell_source,
        }


def _shell_label(f: float) -> str:
    return f"{f:.1f}" if round(f, 1) == f else f"{f:g}"


def esp_breakdown(
    data: ESPData,
    esp_pred: np.ndarray,
    smiles_of: Mapping[str, str] | None = None,
    *,
    shell: np.ndarray | None = None,
    shells: Sequence[float] = SHELLS,
) -> Breakdown:
    """The ESP RMSE of predicted against reference ESP per shell, element, size and class.

    Args:
      data: The evaluated conformers (M of them, G grid points).
      esp_pred: (M, G) predicted ESP, Hartree/e (values beyond n_grid are ignored).
      smiles_of: {mol_id: SMILES} for functional classes (missing: UNKNOWN).
      shell: (M, G) shell factor of every point, if the file stores it (then nothing is
        recovered); factors within SHELL_TOLERANCE of `shells` get that label, others theirs.
      shells: The generator's shell factors.

    Returns:
      A Breakdown.

    Raises:
      ValueError: esp_pred or shell not of shape (M, G).
    """
    M, G = data.esp.shape
    for name, a in (("esp_pred", esp_pred), ("shell", shell)):
        if a is not None and np.shape(a) != (M, G):
            raise ValueError(f"{name}: expected shape (M, G) = {(M, G)}, got {np.shape(a)}")
    valid = np.arange(G)[None, :] < data.n_grid[:, None]  # (M, G)
    # 1. Error at every valid point (kcal/mol/e), its conformer and molecule. Shape (P,).
    err = (esp_pred[valid].astype(np.float64) - data.esp[valid]) * HARTREE_TO_KCAL
    conf = np.broadcast_to(np.arange(M)[:, None], (M, G))[valid]
    mol_ids = np.asarray(data.mol_id).astype(str)
    mol = mol_ids[conf]
    # 2. Shell per point; 3. element of the nearest atom.
    shell_group, max_dev, shell_source = _shell_groups(data, valid, shell, shells)
    element_group, elements = _element_groups(data, valid)
    # 4. Heavy atoms of each conformer's molecule.
    size_group = np.asarray([size_label(int(h)) for h in (data.Z > 1).sum(axis=1)], object)
    # 5. Functional classes per molecule; a point counts once in each class of its molecule.
    pick, class_group = _class_points(data, mol_ids, smiles_of)
    classes = sorted({c for c in class_group if c not in (NO_CLASS, UNKNOWN)})
    tables = {
        "shell": grouped_errors(
            err, shell_group, conf, mol, [*(_shell_label(f) for f in shells), OTHER]
        ),
        "element": grouped_errors(err, element_group, conf, mol, elements),
        "size": grouped_errors(err, size_group[conf], conf, mol, _size_labels()),
        "class": grouped_errors(
            err[pick], class_group, conf[pick], mol[pick], [*classes, NO_CLASS, UNKNOWN]
        ),
    }
    return Breakdown(
        tables=tables,
        n_points=int(err.size),
        esp_rmse=float(np.sqrt(np.mean(err**2))) if err.size else float("nan"),
        esp_mae=float(np.mean(np.abs(err))) if err.size else float("nan"),
        shell_max_deviation=max_dev,
        shell_source=shell_source,
    )


def _element_groups(data: ESPData, valid: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(P,) element symbol of the atom nearest each valid point, and the symbols by Z."""
    from ase.data import chemical_symbols

    z_near = nearest_atom_numbers(data.R, data.Z, data.grid, data.n_grid)[valid]
    symbols = np.asarray(chemical_symbols, object)
    return symbols[z_near], [chemical_symbols[int(z)] for z in np.unique(z_near)]


def _shell_groups(
    data: ESPData, valid: np.ndarray, shell: np.ndarray | None, shells: Sequence[float]
) -> tuple[np.ndarray, float, str]:
    """(P,) shell label of every valid point and the largest deviation of the recovered ones
    (NaN when `shell` (M, G) factors are given, or nothing was recovered)."""
    labels = np.asarray([_shell_label(f) for f in shells], object)
    shell = data.shell if shell is None else shell  # given here, else the file's own
    given = None if shell is None else np.asarray(shell, np.float64)[valid]
    out = np.full(int(valid.sum()), OTHER, object)
    known = np.zeros(out.shape, bool) if given is None else given > 0
    max_dev = float("nan")
    if not known.all():  # 1. Recovered from the geometry where the file gives no shell.
        idx, dev = recover_shells(data.R, data.Z, data.grid, data.n_grid, shells)
        idx, dev = idx[valid], dev[valid]
        hit = ~known & (idx >= 0)
        out[hit] = labels[idx[hit]]
        max_dev = float(dev[hit].max()) if hit.any() else float("nan")
    if given is not None and known.any():  # 2. The file's own factors.
        g = given[known]
        near = np.abs(g[:, None] - np.asarray(shells)).argmin(axis=1)
        close = np.abs(g - np.asarray(shells)[near]) <= SHELL_TOLERANCE
        own = np.array([_shell_label(float(f)) for f in g], object)
        out[known] = np.where(close, labels[near], own)
    source = "geometry" if not known.any() else ("file" if known.all() else "mixed")
    return out, max_dev, source


def _class_points(
    data: ESPData, mol_ids: np.ndarray, smiles_of: Mapping[str, str] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Valid points repeated once per functional class of their molecule: (P_class,) indices
    into the (P,) valid points and (P_class,) class labels."""
    classes = molecule_classes(mol_ids, smiles_of)
    rows = [(i, c) for i, mid in enumerate(mol_ids) for c in classes[mid]]
    conf = np.array([i for i, _ in rows], np.int64)
    name = np.array([c for _, c in rows], object)
    # Points of conformer i (valid points are stored conformer by conformer).
    starts = np.concatenate([[0], np.cumsum(data.n_grid)])
    pick = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i in conf] or [np.zeros(0, np.int64)]
    )
    return pick, np.repeat(name, data.n_grid[conf])


# --------------------------------------------------------------------------- SMILES


def smiles_from_provenance(files: Sequence[str | Path] | None) -> dict[str, str]:
    """{mol_id: SMILES} from the provenance JSON beside each data file (`molecules[]` entries
    with a `smiles`; files generated from SMILES have them). Empty `files`: the bundled demo
    set. A missing or unreadable provenance file contributes nothing (logged)."""
    paths = [data_file_path(f) for f in files] if files else [bundled_dataset_path()]
    out: dict[str, str] = {}
    for p in paths:
        prov = provenance_path(p)
        if not prov.is_file():
            log.info("%s: no provenance file %s; functional classes unknown", p, prov.name)
            continue
        try:
            molecules = json.loads(prov.read_text()).get("molecules", [])
        except (OSError, ValueError, AttributeError) as e:
            log.warning("%s: unreadable provenance (%s); functional classes unknown", prov, e)
            continue
        for m in molecules:
            if isinstance(m, dict) and m.get("smiles") and "mol_id" in m:
                out[str(m["mol_id"])] = str(m["smiles"])
    return out


# --------------------------------------------------------------------------- text


def format_breakdown(b: Breakdown, digits: int = 4) -> str:
    """The tables as console text (the CLI prints it)."""
    lines = [
        f"Where the ESP error is (RMSE pooled over grid points, kcal/mol/e; all "
        f"{b.n_points} points: {b.esp_rmse:.{digits}g}):"
    ]
    for kind in KINDS:
        t = b.tables[kind]
        if not len(t):
            continue
        title = KIND_TITLES[kind]
        lines.append(
            f"  {title:<18}{'esp_rmse':>10}{'esp_mae':>10}{'points':>9}{'confs':>7}{'mols':>6}"
        )
        for r in t.itertuples(index=False):
            lines.append(
                f"  {str(r.group):<18}{r.esp_rmse:>10.{digits}g}{r.esp_mae:>10.{digits}g}"
                f"{r.n_points:>9d}{r.n_conformers:>7d}{r.n_molecules:>6d}"
            )
    if b.shell_source in ("geometry", "mixed"):
        lines.append(
            f"  shells recovered from the geometry where the file gives none (max deviation "
            f"{b.shell_max_deviation:.2g} x "
            "vdW); classes overlap (a molecule may be in several)"
        )
    return "\n".join(lines)
