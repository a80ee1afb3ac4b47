"""Typed optimizer arguments, declared once: in each optimizer's constructor signature.

An optimizer's keyword arguments carry their type and range as annotations (the aliases
below) and their default as the signature's default, e.g.::

    @typed
    def __init__(self, params, lr: NonNegative = 1e-3, betas: Betas = (0.9, 0.999),
                 eps: NonNegative = 1e-6, state_bits: StateBits = 32): ...

:func:`signature_model` turns such a signature into a pydantic model; :func:`typed` validates
every call of the constructor with it (direct Python use), and the registry validates a
recipe's ``optim.args`` with the same model when the recipe loads. Target-group keys
(``rank``, ``update_proj_gap`` ...) are a :class:`GroupArgs` model per optimizer, checked by
:func:`check_group` in the constructor and merged into the recipe's model by the registry.

Every error is one line naming the argument as the recipe does: ``optim.lr``,
``optim.weight_decay``, else ``optim.args.<name>``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, create_model


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read True as 1.0
        raise ValueError("must be a number, not a bool")
    return value


Number = Annotated[float, BeforeValidator(_not_bool)]   # an int, a float or a numeric string ("1e-3" in YAML)
NonNegative = Annotated[Number, Field(ge=0)]
Positive = Annotated[Number, Field(gt=0)]
Fraction = Annotated[Number, Field(ge=0, lt=1)]          # a beta or a momentum: [0, 1)
Betas = tuple[Fraction, Fraction]
Count = Annotated[int, Strict(), Field(ge=1)]            # an integer >= 1 (a bool is refused)
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
StateBits = Literal[8, 32]                               # moments in fp32 or 8-bit blockwise

RECIPE_FIELDS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay"}  # the others are optim.args.<name>
NOT_IN_ARGS = (*RECIPE_FIELDS, "process_group")  # set elsewhere (optim.lr, optim.weight_decay) or by the trainer
_NOT_ARGUMENTS = ("self", "params")


class GroupArgs(BaseModel):
    """Base of an optimizer's typed target-group keys (and of the recipe's ``optim.args`` model)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def field_name(arg: str) -> str:
    return RECIPE_FIELDS.get(arg, f"optim.args.{arg}")


def one_line(err: ValidationError, optimizer: str, accepted: list[str]) -> str:
    """The first error as ``optim.args.<name>: <reason>, got <value>``."""
    first = err.errors()[0]
    if not first["loc"]:  # a model validator: its message names the field itself
        return first["msg"].removeprefix("Value error, ")
    arg, *inner = first["loc"]
    where = field_name(str(arg)) + "".join(f"[{i}]" for i in inner)
    if first["type"] == "extra_forbidden":
        accepted = [a for a in accepted if a not in NOT_IN_ARGS]
        close = difflib.get_close_matches(str(arg), accepted, n=1)
        hint = f"; did you mean {field_name(close[0])}?" if close else ""
        return f"{where}: not an argument of optimizer {optimizer!r}{hint} (accepted: {', '.join(accepted) or 'none'})"
    reason = first["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    reason = reason.removeprefix(f"{where}: ").removeprefix(f"{arg}: ")  # a check that names the field itself
    got = "" if "got " in reason else f", got {first['input']!r}"
    return f"{where}: {reason}{got}"


def validate(model: type[BaseModel], values: dict[str, Any], optimizer: str) -> BaseModel:
    """``model`` over ``values``, or a one-line ``ValueError`` (see :func:`one_line`)."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ValueError(one_line(err, optimizer, sorted(model.model_fields))) from None


def signature_model(init: Callable, types: dict[str, Any] | None = None) -> type[GroupArgs]:
    """The pydantic model of ``init``'s keyword arguments: annotations (or ``types``, for a class
    we do not own) and defaults from the signature; unannotated arguments accept anything."""
    overrides = types or {}
    fields = {}
    for name, p in inspect.signature(init, eval_str=True).parameters.items():
        if name in _NOT_ARGUMENTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = overrides.get(name, Any if p.annotation is p.empty else p.annotation)
        fields[name] = (kind, p.default)
    return create_model(f"{init.__qualname__}.args", __base__=GroupArgs, **fields)


def typed(init: Callable) -> Callable:
    """Validate every call of an optimizer's ``__init__`` against its own signature, then run it
    with the validated values (``[0.9, 0.99]`` becomes ``(0.9, 0.99)``, ``1`` becomes ``1.0``)."""
    sig = inspect.signature(init)
    model = functools.cache(lambda: signature_model(init))  # built on first call: annotations resolve late

    @functools.wraps(init)
    def checked(self, params, *args, **kwargs):
        given = sig.bind(self, params, *args, **kwargs).arguments
        values = {k: v for k, v in given.items() if k not in _NOT_ARGUMENTS}
        valid = validate(model(), values, type(self).__name__)
        return init(self, params, **{k: getattr(valid, k) for k in values})

    return checked


def check_group(group: dict, model: type[GroupArgs], optimizer: str) -> None:
    """Fill a target param group's missing keys with ``model``'s defaults and validate them, in place."""
    valid = validate(model, {k: group[k] for k in model.model_fields if k in group}, optimizer)
    group.update(dict(valid))
