"""Parameter groups of a DCMNet, for fine-tuning with some of them frozen.

Flax names DCMNet's modules by class and creation order (`dcmtune.model.dcmnet`, step 3 and 4):
`Embed_0`; per message pass i `MessagePass_i` and its residual MLP `Dense_{2i}`, `Dense_{2i+1}`;
then the heads, `Dense_{2n}` (displacements), `Dense_{2n+1}` and `Dense_{2n+2}` (charges), for
n = num_iterations. Renaming the modules would change the parameter tree of every saved
checkpoint, so the groups are read from these names.
"""

from __future__ import annotations

import re

__all__ = ["GROUPS", "param_group"]

GROUPS = ("embedding", "message_passing", "head")

_NAME = re.compile(r"(Embed|MessagePass|Dense)_(\d+)")


def param_group(module: str, num_iterations: int) -> str:
    """The group of DCMNet's top-level module `module`: "embedding", "message_passing" or
    "head".

    Raises:
      ValueError: a module name DCMNet does not create.
    """
    m = _NAME.fullmatch(module)
    if m is None:
        raise ValueError(
            f"{module}: not a DCMNet module (expected Embed_0, MessagePass_i, Dense_i)"
        )
    kind, i = m.group(1), int(m.group(2))
    if kind == "Embed" and i == 0:
        return "embedding"
    if kind == "MessagePass" and i < num_iterations:
        return "message_passing"
    if kind == "Dense" and i < 2 * num_iterations:
        return "message_passing"
    if kind == "Dense" and i < 2 * num_iterations + 3:
        return "head"
    raise ValueError(f"{module}: not a module of a DCMNet with {num_iterations} message passes")
