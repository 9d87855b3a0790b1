"""Command-line flags made from config fields: one source for a setting's name, type, default and help.

A `Flag` names a field of a pydantic model (NodeOptions, MachineConfig, SwarmConfig, ...). `with_flags`
adds one typer option per flag to a command's signature: its type and bounds from the field's
annotation, its help and shown default from the field, so `pmnode join --help` says what the model
says. The command receives the values in `**flags`; `FlagValues.build` hands each model only what
the user gave (the model's own default stands otherwise) and turns a refused value into one line that
names the flag, never a traceback.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import typer
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from pmnode.errors import PmnodeError

F = TypeVar("F", bound=Callable[..., Any])
Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """The flag of `model.field`. `name`: the option's name without dashes (default: the field's, with
    dashes); `text`: the flag takes text that this parses into the field's value (sizes, rates);
    `default`/`help`: only where the command line means something other than the model (shown as is);
    `section`: the flag overrides this section of the run config (its default is the config's)."""

    model: type[BaseModel]
    field: str
    name: str | None = None
    text: Callable[[str], Any] | None = None
    default: Any = None
    help: str | None = None
    metavar: str | None = None
    section: str | None = None

    @property
    def param(self) -> str:
        return (self.name or self.field).replace("-", "_")

    @property
    def option(self) -> str:
        return "--" + self.param.replace("_", "-")

    def info(self) -> Any:
        """The field's pydantic FieldInfo (KeyError for a field the model does not have)."""
        return self.model.model_fields[self.field]


def _base(annotation: Any) -> Any:
    """`int | None` -> int; a Literal stays a Literal; `X | Literal[...]` -> str (typer parses text)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _base(args[0])
        return str
    if get_origin(annotation) is Annotated:
        return _base(get_args(annotation)[0])
    return annotation


def _bounds(info: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in info.metadata:
        if isinstance(m, Ge | Gt):
            out["min"] = m.ge if isinstance(m, Ge) else m.gt  # typer's min is inclusive; gt 0 on ints = ge 1
            if isinstance(m, Gt) and isinstance(m.gt, int):
                out["min"] = m.gt + 1
        elif isinstance(m, Le | Lt):
            out["max"] = m.le if isinstance(m, Le) else m.lt
    return out


def _parameter(flag: Flag) -> inspect.Parameter:
    info = flag.info()
    help_ = flag.help or info.description or ""
    model_default = info.default if info.default is not PydanticUndefined else None
    base = bool if flag.text is None and _base(info.annotation) is bool else None
    if base is bool and flag.default is None and model_default is False:  # a bare switch
        opt = typer.Option(flag.option, help=help_)
        return _param(flag.param, Annotated[bool, opt], False)
    if base is bool:  # bool | None: --x/--no-x, unset keeps the model's choice
        opt = typer.Option(f"{flag.option}/--no-{flag.option[2:]}", help=help_, show_default=False)
        return _param(flag.param, Annotated[bool | None, opt], None)
    kind = str if flag.text is not None else _base(info.annotation)
    metavar = flag.metavar
    if get_origin(kind) is list:  # given once per value: --announce A --announce B
        kind, metavar = list[str], metavar or "TEXT"
    elif get_origin(kind) is Literal:  # the model checks the choice: a wrong one is one line, not a box
        kind, metavar = str, metavar or "|".join(str(a) for a in get_args(kind))
    elif kind not in (str, int, float, Path):
        kind = str
    shown = flag.default if flag.default is not None else model_default
    if flag.section is not None:  # unset: whatever the config file says
        help_, shown = f"{help_} Overrides {flag.section}.{flag.field}.", None
    if shown not in (None, "", []):  # unset stays None (the model's default); say which that is
        help_ = f"{help_} (default: {shown})"
    opt = typer.Option(
        flag.option,
        help=help_,
        show_default=False,
        metavar=metavar,
        **({} if flag.text is not None else _bounds(info)),
    )
    return _param(flag.param, Annotated[kind | None, opt], None)


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_flags(*flags: Flag) -> Callable[[F], F]:
    """Add each flag as an option of the decorated command; it takes them in `**flags`."""

    def wrap(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        fn.__signature__ = sig.replace(parameters=[*own, *(_parameter(f) for f in flags)])  # type: ignore[attr-defined]  # typer reads it
        fn.__annotations__ = {p.name: p.annotation for p in fn.__signature__.parameters.values()}  # type: ignore[attr-defined]  # set just above
        return fn

    return wrap


class FlagValues:
    """What a command was given for its flags, as keyword arguments for each model."""

    def __init__(self, flags: tuple[Flag, ...], given: dict[str, Any]):
        self.flags, self.given = flags, given

    def of(self, model: type[BaseModel]) -> dict[str, Any]:
        """The given flags of `model`, parsed; an unset flag is left out, so the model's default stands."""
        out: dict[str, Any] = {}
        for f in self.flags:
            value = self.given.get(f.param)
            if f.model is not model or value is None or value == []:
                continue
            if f.text is not None:
                try:
                    value = f.text(value)
                except (ValueError, PmnodeError) as e:
                    raise PmnodeError(f"{f.option} {value}: {e}") from None
            out[f.field] = value
        return out

    def build(self, model: type[Model], **more: Any) -> Model:
        """`model` from its given flags and `more`; a refused value is one line naming its flag."""
        try:
            return model(**{**self.of(model), **more})  # `more` decides: values the command worked out
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            names = {f.field: f.option for f in self.flags if f.model is model}
            raise PmnodeError(f"{names.get(field, field)}: {err['msg']}") from None
