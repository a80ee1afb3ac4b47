"""What every settings model shares: the frozen, unknown-key-refusing base, and the one-line error.

Each package owns the settings of its part (``lowmem.offload.settings``: the ``offload:`` section);
:mod:`lowmem.recipe` assembles them into the recipe. Both take their base and their error line from
here, so a dict validated by a package alone reads as the recipe's own error.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def one_line(err: ValidationError) -> str:
    """The first error of ``err`` as one line naming the dotted field (and how many more there are)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    where = f"{loc}: " if loc and not msg.startswith(loc) else ""
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return (where + msg).replace("\n", " ") + more
