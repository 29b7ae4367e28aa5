"""Dataclass configs from the command line or a JSON file: one flag per field.

`add_config_arguments(parser, Config)` adds `--field-name` for every field (typed from its
default) plus `--config FILE.json`; `config_from_args(Config, args)` builds the config: field
defaults, then the file's values, then the flags given. Unknown keys in a file are an error.
"""

import argparse
import dataclasses
import json
import pathlib
from typing import Any, TypeVar


C = TypeVar("C")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str]):
    """One flag per field of the dataclass `cls`; defaults are left to the dataclass."""
    parser.add_argument(
        "--config",
        type=pathlib.Path,
        default=None,
        help="a JSON file of field values (flags given on the command line override it)",
    )
    for field in dataclasses.fields(cls):
        default = field.default
        doc = help_text.get(field.name, "")
        if isinstance(default, bool):
            kind: Any = _parse_bool
        elif isinstance(default, tuple):
            parser.add_argument(
                _flag(field.name),
                nargs="+",
                default=None,
                help=f"{doc} (default: {' '.join(map(str, default))})",
            )
            continue
        elif isinstance(default, int | float | str):
            kind = type(default)
        else:
            continue
        parser.add_argument(
            _flag(field.name), type=kind, default=None, help=f"{doc} (default: {default})"
        )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Defaults, then `--config FILE`, then explicit flags."""
    names = {field.name: field for field in dataclasses.fields(cls)}  # pyright: ignore
    values: dict[str, Any] = {}
    if getattr(args, "config", None) is not None:
        path = pathlib.Path(args.config)
        if not path.is_file():
            raise SystemExit(f"--config {path}: no such file")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(f"--config {path} is not valid JSON: {error}") from None
        if not isinstance(loaded, dict):
            raise SystemExit(f"--config {path} must hold a JSON object of config fields")
        unknown = sorted(set(loaded) - set(names))
        if unknown:
            raise SystemExit(
                f"{args.config}: unknown field(s) {unknown}; valid fields: {sorted(names)}"
            )
        for name, value in loaded.items():
            if isinstance(names[name].default, str) and isinstance(value, dict | list):
                value = json.dumps(value)  # a JSON-valued field may be written as JSON
            values[name] = value
    for name, field in names.items():
        given = getattr(args, name, None)
        if given is not None:
            if isinstance(field.default, tuple):
                kind = type(field.default[0]) if field.default else str
                given = tuple(kind(item) for item in given)
            values[name] = given
    for name, field in names.items():
        if name in values and isinstance(field.default, tuple):
            values[name] = tuple(values[name])
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"bad {cls.__name__}: {error}") from None


def save_config(config: Any, path: pathlib.Path) -> None:
    path.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
