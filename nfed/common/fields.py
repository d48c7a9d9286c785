"""A config dataclass declares each field once: `option(default, help=..., limit=..., cli=..., flower_key=...)`.

The click options (nfed.commands.options.config_options), the number checks (`check_declared`, and
nfed.common.validate.LIMITS, which `declared` fills in) and the Flower run-config keys
(nfed.federation.flower.config) are all read from these declarations, so a default, a range or a name cannot
disagree between them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nfed.common.errors import ConfigError
from nfed.common.validate import LIMITS, Limit

METADATA_KEY = "nfed"


@dataclass(frozen=True)
class Declaration:
    """What a config field declares beside its default.

    `cli`: the command-line option (None: none; a bool field's option is a flag that sets the opposite of its
    default); `choices`: the accepted values; `parse`: turns the option's text into the value; `multiple`: a tuple
    field whose option may be given several times (limit, choices and parse then apply to each value);
    `flower_key`: the field's key in a Flower app's run config, `optional_in_flower` for every key added after the
    first Flower version (an app folder written before it still loads, with the default).
    """

    help: str = ""
    limit: Limit | None = None
    cli: str | None = None
    choices: tuple = ()
    parse: Callable[[str], Any] | None = None
    multiple: bool = False
    flower_key: str | None = None
    optional_in_flower: bool = False


def option(default=dataclasses.MISSING, *, help: str = "", limit: Limit | None = None, cli: str | None = None,
           choices: tuple = (), parse: Callable[[str], Any] | None = None, multiple: bool = False,
           flower_key: str | None = None, optional_in_flower: bool = False):
    """A dataclass field with its Declaration in the metadata."""
    declaration = Declaration(help=help, limit=limit, cli=cli, choices=tuple(choices), parse=parse,
                              multiple=multiple, flower_key=flower_key, optional_in_flower=optional_in_flower)
    return dataclasses.field(default=default, metadata={METADATA_KEY: declaration})


def declaration(field: dataclasses.Field) -> Declaration | None:
    return field.metadata.get(METADATA_KEY)


def declared_fields(cls) -> list[tuple[dataclasses.Field, Declaration]]:
    """(field, declaration) of every field of a `declared` class, in declaration order."""
    return [(field, declaration(field)) for field in dataclasses.fields(cls)]


def value_type(cls, name: str) -> type:
    """The type a field holds, None aside (`float | None` -> float; `tuple[int, ...]` -> tuple)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def declared(cls):
    """Class decorator for a config dataclass: every field must be declared with `option` (a field added
    without one fails at import), and the fields' limits join LIMITS under their names."""
    for field, found in declared_fields(cls):
        if found is None:
            raise TypeError(f"{cls.__name__}.{field.name} is not declared with nfed.common.fields.option")
        if found.limit is not None:
            known = LIMITS.setdefault(field.name, found.limit)
            if known != found.limit:
                raise TypeError(f"{cls.__name__}.{field.name}: limit {found.limit} disagrees with LIMITS' {known}")
    return cls


def check_declared(obj) -> None:
    """Check (and normalise in place) every declared field of `obj` that has a limit or choices (each value of a
    `multiple` one, held as a tuple); a field whose default is None may be None."""
    for field, found in declared_fields(type(obj)):
        value = getattr(obj, field.name)
        if value is None and field.default is None:
            continue
        if found.multiple:
            if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
                raise ConfigError(f"{found.cli or field.name} holds a list of values, got {value!r}")
            setattr(obj, field.name, tuple(_checked(field, found, item) for item in value))
        else:
            setattr(obj, field.name, _checked(field, found, value))


def _checked(field: dataclasses.Field, found: Declaration, value):
    """`value` checked against the declaration's limit or choices."""
    if found.limit is not None:
        return found.limit.check(field.name, value)
    if found.choices and value not in found.choices:
        shown = ", ".join(str(choice) for choice in found.choices)
        raise ConfigError(f"{found.cli or field.name} must be one of {shown}, got {value}")
    return value


def from_fields(cls, values: Mapping, what: str):
    """A dataclass from a dict of its fields; ConfigError naming the keys that are not fields (a typo or a file
    of another version is never silently dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{what} has unknown key(s): {', '.join(unknown)}")
    return cls(**dict(values))
