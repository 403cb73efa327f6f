"""The ``:key=value,...`` argument of ``get_config(arg)``, parsed into typed fields."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses ``"smoke,size=0p5b"`` against typed ``defaults``.

    A bare ``key`` means ``key=True``. Values take the type of their default (bool accepts
    true/false/1/0); a key without a default is an error naming it.
    """
    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(
                f"config argument {key!r} is unknown; expected one of {sorted(defaults)}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r} is not a boolean")
            out[key] = lowered in ("true", "1")
        elif default is None:
            out[key] = value
        else:
            try:
                out[key] = type(default)(value)
            except ValueError as e:
                raise ValueError(
                    f"config argument {key}={value!r} is not a {type(default).__name__}"
                ) from e
    return out
