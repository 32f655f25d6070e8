"""Run configuration files for the command line: YAML or TOML whose keys mirror the flags.

``--lr 0.05`` on the command line and ``lr: 0.05`` (or ``lr = 0.05``) in the file mean the
same; dashes and underscores are interchangeable in keys. Precedence: built-in defaults <
config file < flags given on the command line. Unknown keys and malformed files raise
:class:`ConfigError` naming the file and the problem.
"""
from __future__ import annotations

import os


class ConfigError(ValueError):
    """A config file that cannot be read, parsed or understood."""


def load_config(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r}")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        if ext == ".toml":
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        elif ext in (".yaml", ".yml", ".json", ""):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8"))
        else:
            raise ConfigError(f"config {path!r}: unknown extension {ext!r} (use .yaml, .yml or .toml)")
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError, tomllib.TOMLDecodeError, UnicodeDecodeError
        msg = str(exc).strip().splitlines()
        raise ConfigError(f"malformed config {path!r}: {type(exc).__name__}: {' '.join(msg)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"malformed config {path!r}: the top level must be a mapping of option: value, "
                          f"got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge(defaults: dict, config: dict, given: dict, source: str = "config") -> dict:
    """``defaults`` updated by ``config`` then by the explicitly given flags; rejects keys of
    ``config`` that are not options, and values of the wrong type."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {unknown}; valid options: {sorted(defaults)}")
    out = dict(defaults)
    for k, v in config.items():
        out[k] = _coerce(k, v, defaults[k], source)
    out.update(given)
    return out


def _coerce(key, value, default, source):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: option {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: option {key!r} must be a number, got {value!r}")
        return type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: option {key!r} must be a list, got {value!r}")
        return list(value)
    if isinstance(default, str) and isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
        raise ConfigError(f"{source}: option {key!r} must be a string, got {value!r}; quote the value "
                          f"(e.g. {key}: \"off\") so YAML keeps it a string")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{source}: option {key!r} must be a string, got {value!r}")
    return value
