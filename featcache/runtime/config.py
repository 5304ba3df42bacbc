"""TOML settings files: one table per command, keys named like the flags."""

from __future__ import annotations

import sys
from pathlib import Path

from featcache.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def read_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a missing or malformed file is a user error."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {file}")
    try:
        return tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is not valid TOML: {exc}") from None


def load_table(path: str, command: str, valid: set[str]) -> dict:
    """The ``[command]`` table of ``path`` as argparse defaults (``batch-size`` -> ``batch_size``).

    Relative paths in the table stay relative to the working directory, like flags.
    """
    file = Path(path)
    document = read_toml(file)
    table = document.get(command)
    if table is None:
        raise UserError(f"{file} has no [{command}] table (tables: {', '.join(document) or 'none'})")
    if not isinstance(table, dict):
        raise UserError(f"{file}: [{command}] must be a table of settings")
    settings = {key.replace("-", "_"): value for key, value in table.items()}
    unknown = sorted(k for k in settings if k not in valid)
    if unknown:
        raise UserError(f"{file} [{command}]: unknown setting {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(valid))})")
    return settings
