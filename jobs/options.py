"""Command-line options made from `DecodeConfig`, so a new decoding setting reaches every command
without being written out again: `@decode_options()` adds one `--name` option per field (its
help and default from the config) and hands the command a validated `decode: DecodeConfig`."""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable

import typer
from pydantic import ValidationError

from cdsl.config import DecodeConfig
from cdsl.request import validation_error

DEFAULTS = DecodeConfig()


def _cli_type(annotation) -> type:
    """int and float as they are (also inside `X | None`); Literal, dict and str as text."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float) else str


def _help(name: str) -> str:
    text, shown = " ".join((DecodeConfig.model_fields[name].description or "").split()), getattr(DEFAULTS, name)
    if name == "policy":
        text, shown = text + " Give it as a JSON object.", json.dumps({k.value: v.value for k, v in shown.items()})
    return f"{text} [default: {shown}]"


def decode_options(skip: tuple[str, ...] = ()) -> Callable:
    """Give the decorated typer command one option per `DecodeConfig` field not in `skip`; the
    command's own `decode` parameter receives the config (a bad value exits 2 naming the field)."""
    names = [n for n in DecodeConfig.model_fields if n not in skip]

    def wrap(command: Callable) -> Callable:
        sig = inspect.signature(command)
        options = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=_cli_type(
            DecodeConfig.model_fields[n].annotation), default=typer.Option(None, help=_help(n), show_default=False))
            for n in names]

        @functools.wraps(command)
        def run(*args, **kwargs):
            given = {n: v for n in names if (v := kwargs.pop(n, None)) is not None}
            try:
                if isinstance(given.get("policy"), str):
                    given["policy"] = json.loads(given["policy"])
                decode = DecodeConfig(**given)
            except ValidationError as err:
                _fail(str(validation_error(err, "decode.")))
            except json.JSONDecodeError as err:
                _fail(f"decode.policy: not a JSON object ({err})")
            return command(*args, decode=decode, **kwargs)

        kept = [p for p in sig.parameters.values() if p.name != "decode"]
        run.__signature__ = sig.replace(parameters=kept + options)
        return run

    return wrap


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)
