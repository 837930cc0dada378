"""What configs and entry points share: config errors that name the field, field parsers,
command-line parsing and the registered variants' options. Configs import only this module.
"""

from __future__ import annotations

import sys
from typing import Any

from absl import flags
from ml_collections import ConfigDict
from ml_collections.config_dict import FieldReference

import attention_variants as av


class ConfigError(ValueError):
    """An invalid config value; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config.{field}: {message}")
        self.field = field


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing; a bad value, an unknown field or an unreadable config file is reported as
    a config error (exit code 2)."""
    try:
        return flags.FLAGS(argv)
    except KeyError as e:  # str() of a KeyError is the repr of its message: print the text
        print(f"invalid config: unknown field {e.args[0] if e.args else e}", file=sys.stderr)
    except AttributeError as e:
        print(f"invalid config: unknown field {e}", file=sys.stderr)
    except (flags.Error, OSError, TypeError, ValueError) as e:
        print(f"invalid config: {e}", file=sys.stderr)
    sys.exit(2)


def field(config: Any, name: str) -> Any:
    """config[name]; ConfigError when the config has no such field."""
    if name not in config:
        raise ConfigError(name, "missing field")
    return config[name]


def csv_field(config: Any, name: str) -> list[str]:
    """A comma-separated field (`--config.lengths=1024,4096`) as a list of strings."""
    value = field(config, name)
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    items = [str(s).strip() for s in items if str(s).strip()]
    if not items:
        raise ConfigError(name, "is empty")
    return items


def int_field(config: Any, name: str, minimum: int = 1) -> int:
    value = field(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be an int >= {minimum}, got {value!r}")
    return value


def float_field(config: Any, name: str, minimum: float = 0.0, strict: bool = True) -> float:
    value = field(config, name)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value < minimum or (strict and value == minimum):
        bound = ">" if strict else ">="
        raise ConfigError(name, f"must be a number {bound} {minimum:g}, got {value!r}")
    return float(value)


def registered_options() -> ConfigDict:
    """{variant: {option: default}} for every registered variant, as a config section whose
    every entry can be overridden from the command line (--config.options.fixed.block=32,
    --config.options.sliding_window.window='(256, 0)'). Entries take any Python literal (the
    variant validates it), so an int default accepts a tuple, and None accepts an int."""
    return ConfigDict(
        {
            name: {
                k: FieldReference(v, field_type=object) for k, v in av.spec(name).defaults.items()
            }
            for name in av.names()
        }
    )
