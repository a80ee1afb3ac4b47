"""What every settings model shares: the frozen, unknown-key-refusing base, and the one-line error.

Each package owns the settings of its part (``lowmem.offload.settings``: the ``offload:`` section);
:mod:`lowmem.recipe` assembles them into the recipe. Both take their base and their error line from
here, so a dict validated by a package alone reads as the recipe's own error.
"""

from __future__ import annotations

import difflib
from typing import get_args

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def section_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys of the section of ``root`` at ``loc`` (field names from the top; [] if not a section)."""
    model = root
    for key in loc:
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is None:
            return []
        kinds = (field.annotation, *get_args(field.annotation))  # a section, or an optional one
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def one_line(err: ValidationError, root: type[BaseModel] | None = None) -> str:
    """The first error of ``err`` as one line naming the dotted field (and how many more there are). An
    unknown key leads (a typo'd ``step:`` also makes ``steps`` missing), with its closest valid name in
    ``root``, the model that was validated."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        *parent, key = first["loc"]
        close = difflib.get_close_matches(str(key), section_keys(root, tuple(parent)), n=1) if root else []
        msg = "unknown key" + (f" (did you mean {'.'.join([*map(str, parent), close[0]])}?)" if close else "")
    where = f"{loc}: " if loc and not msg.startswith(loc) else ""
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return (where + msg).replace("\n", " ") + more
