"""Errors that name what is wrong, so a user can fix their input without reading our code."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

Model = TypeVar("Model", bound="BaseModel")


class PrefillRouterError(Exception):
    """Base class for every error this package raises on purpose."""


class DataError(PrefillRouterError, ValueError):
    """Bad routing data. Names the file, the line (1-based, header is line 1 for CSV) and the field."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")


class ConfigError(PrefillRouterError, ValueError):
    """A configuration file or argument is invalid. The message names the field; `field`, when given, is the
    parameter's name, so a caller can say it in its own words (the CLI as its --flag)."""

    def __init__(self, message: str, *, field: str | None = None):
        self.field, self.reason = field, message
        super().__init__(f"{field}: {message}" if field else message)


class EncoderError(PrefillRouterError, ValueError):
    """The encoder cannot run on this input (empty prompt, unknown encoder, bad spec)."""


class CheckpointError(PrefillRouterError, ValueError):
    """A router checkpoint is missing, corrupt, or does not match the encoder in use."""


def invalid_config(title: str, exc: Any) -> ConfigError:
    """A ConfigError from a pydantic ValidationError: the title, then one line per problem naming the dotted
    path of the field."""
    lines = [title] + [f"  {'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}" for e in exc.errors()]
    return ConfigError("\n".join(lines))


def parse_config(model: type[Model], data: Any, title: str) -> Model:
    """`model.model_validate(data)`, with a pydantic ValidationError turned into `invalid_config(title, ...)`."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_config(title, exc) from exc


def read_json_object(path: str | os.PathLike[str], *, missing: str, invalid: str = "invalid JSON") -> dict:
    """A JSON object read from `path`; a missing file, bad JSON or a non-object is a DataError naming the file
    (`missing` and `invalid` word the first two cases)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise DataError(missing, file=str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{invalid}: {exc}", file=str(path)) from None
    if not isinstance(data, dict):
        raise DataError(f"{invalid}: expected a JSON object, got {type(data).__name__}", file=str(path))
    return data
