"""Accuracy against cost: the front of a multi-objective sweep and the model chosen from it.

Every objective is lower-is-better (a validation error first, then costs such as charges per
atom). A point dominates another when it is no worse on every objective and better on at least
one; the front is the set of points no other point dominates. Equal points do not dominate each
other, so ties are all kept. Points with a non-finite value take no part.

`select` picks one point of the front by a rule (`rank.select` in a sweep spec):

  most_accurate        the lowest error (objectives[0])
  knee                 the cheapest point whose error is within `KNEE_TOLERANCE` (5%) of the
                       best error: what a chemist picks for long MD runs, where every extra
                       charge costs at every step
  {max_cost: bounds}   the lowest error among points whose costs are within the bounds

"Cheapest" compares the costs in objective order (the first cost decides, the next breaks ties),
then the error; remaining ties go to the earlier point. Pure functions of plain numbers: the
ranking (`dcmtune.analysis.rank`) and the benches use them alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["KNEE_TOLERANCE", "dominates", "front", "select", "check_rule", "describe_rule"]

KNEE_TOLERANCE = 0.05


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether `a` is no worse than `b` on every objective and better on one (lower is
    better)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    Args:
      points: One row of objective values per candidate, every objective lower-is-better.

    Returns:
      The indices of the finite points that no other finite point dominates (equal points are
      all kept).
    """
    finite = [i for i, p in enumerate(points) if all(math.isfinite(float(v)) for v in p)]
    return [i for i in finite if not any(dominates(points[j], points[i]) for j in finite if j != i)]


def select(points: Sequence[Sequence[float]], rule: Any, names: Sequence[str]) -> int:
    """The index of the point chosen by `rule` among `points` (normally a front).

    Args:
      points: Rows [error, cost, ...] in the order of `names`.
      rule: "most_accurate", "knee" or {"max_cost": bound or {cost name: bound}} (a bare bound
        applies to the one cost).
      names: The objective names, error first.

    Raises:
      ValueError: an unknown rule, a bound on a name that is not a cost, or no point within
        the bounds (one line naming the bound).
    """
    if not points:
        raise ValueError("select: no points to choose from")
    order = range(len(points))

    def accurate(i: int) -> tuple:
        return (points[i][0], *points[i][1:], i)

    def cheap(i: int) -> tuple:
        return (*points[i][1:], points[i][0], i)

    if rule == "most_accurate":
        return min(order, key=accurate)
    if rule == "knee":
        best = min(p[0] for p in points)
        limit = best + KNEE_TOLERANCE * abs(best)
        return min((i for i in order if points[i][0] <= limit), key=cheap)
    bounds = _bounds(rule, names)
    col = {n: k for k, n in enumerate(names)}
    ok = [i for i in order if all(points[i][col[n]] <= b for n, b in bounds.items())]
    if not ok:
        name, bound = next(iter(bounds.items()))
        cheapest = min(p[col[name]] for p in points)
        raise ValueError(
            f"rank.select.max_cost: no model of the front has {name} <= {bound:g} (the "
            f"cheapest has {cheapest:g})"
        )
    return min(ok, key=accurate)


def check_rule(rule: Any, names: Sequence[str]) -> None:
    """Raises ValueError (one line) unless `rule` is a selection rule for objectives `names`."""
    if rule not in ("most_accurate", "knee"):
        _bounds(rule, names)


def _bounds(rule: Any, names: Sequence[str]) -> dict[str, float]:
    if not isinstance(rule, Mapping) or set(rule) != {"max_cost"}:
        raise ValueError(
            f"rank.select: expected most_accurate, knee or {{max_cost: ...}}, got {rule!r}"
        )
    costs = list(names[1:])
    bound = rule["max_cost"]
    if not isinstance(bound, Mapping):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise ValueError(f"rank.select.max_cost: expected a number, got {bound!r}")
        if len(costs) != 1:
            raise ValueError(
                f"rank.select.max_cost: {len(costs)} costs ({', '.join(costs)}); give a bound "
                "per cost"
            )
        return {costs[0]: float(bound)}
    for name, value in bound.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"rank.select.max_cost.{name}: expected a number, got {value!r}")
        if name not in costs:
            raise ValueError(
                f"rank.select.max_cost.{name}: not a cost objective; expected one of "
                f"{', '.join(costs)}"
            )
    return {n: float(b) for n, b in bound.items()}


def describe_rule(rule: Any, names: Sequence[str]) -> str:
    """One sentence saying how `rule` chooses, for the report."""
    error, costs = names[0], ", then ".join(names[1:])
    if rule == "most_accurate":
        return f"most_accurate: the lowest {error}"
    if rule == "knee":
        return (
            f"knee: the cheapest model (by {costs}) whose {error} is within "
            f"{KNEE_TOLERANCE:.0%} of the best"
        )
    bounds = _bounds(rule, names)
    within = " and ".join(f"{n} <= {b:g}" for n, b in bounds.items())
    return f"max_cost: the lowest {error} among the models with {within}"
