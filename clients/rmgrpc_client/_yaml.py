"""A tiny YAML emitter for `rmgrpcctl -o yaml`.

It writes JSON-shaped documents only (dicts, lists, strings, numbers, booleans, None) in
block style, which is all the CLI prints, so it needs no YAML library. A string is left
plain only when no YAML reader could take it for anything else (a number, a boolean,
null, a key or a comment); otherwise it is double-quoted with JSON escapes, which YAML's
double-quoted style reads the same way.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./@=+ -]*")
# YAML 1.1 and 1.2 readers turn these into booleans or null when left plain.
_RESERVED = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "none", "~"}


def scalar(value: Any) -> str:
    """One YAML scalar for a JSON value that is not a dict or list."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and not text.endswith(" ") and text.lower() not in _RESERVED:
        return text
    return json.dumps(text, ensure_ascii=False)


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            name = scalar(str(key))
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{name}:")
                # A list under a key may sit at the key's own indent, as kubectl prints it.
                out += _lines(item, indent if isinstance(item, list) else indent + 2)
            else:
                out.append(f"{pad}{name}: {_inline(item)}")
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _lines(item, indent + 2)
                out.append(f"{pad}- {nested[0].lstrip()}")
                out += nested[1:]
            else:
                out.append(f"{pad}- {_inline(item)}")
        return out
    return [pad + scalar(value)]


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return scalar(value)


def dump(document: Any) -> str:
    """`document` as block-style YAML text ending in a newline."""
    if isinstance(document, dict | list) and not document:
        return _inline(document) + "\n"
    return "\n".join(_lines(document, 0)) + "\n"
