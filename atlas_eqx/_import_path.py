"""Naming a researcher's own part by import path, `"package.module:attribute"`.

Config files and the command line hold strings; an import path lets them name any object a
Python session could pass instead (a memory factory, an objective, a feature map, an inner
learner, a mixer factory), and keeps the config JSON-serialisable and hashable.
"""

import importlib
from typing import Any


def is_import_path(text: Any) -> bool:
    """Whether `text` has the form `"package.module:attribute"`."""
    if not isinstance(text, str) or text.count(":") != 1:
        return False
    module, attribute = text.split(":")
    return bool(module) and bool(attribute)


def resolve_import_path(text: str, argument: str) -> Any:
    """Import `package.module` and return its `attribute` (dots walk nested attributes).

    Errors name `argument` (the config field or flag that held `text`) and say what failed.
    """
    if not is_import_path(text):
        raise ValueError(
            f"`{argument}`: expected an import path 'package.module:attribute'; got {text!r}"
        )
    module_name, attribute = text.split(":")
    try:
        value: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"`{argument}`={text!r}: cannot import module {module_name!r} ({error}); is its "
            "package installed or on PYTHONPATH?"
        ) from None
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(
                f"`{argument}`={text!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return value
