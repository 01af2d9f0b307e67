"""Reading a TOML file with one-line errors, for every config file the project takes (recipes, [dfq], --config)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_toml(path, error: type[Exception], what: str) -> dict:
    """The parsed file; a missing or malformed one raises ``error("<what> <path> not found" / "... is not valid
    TOML: ...")``, so each caller keeps its own error type and exit code."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder; give a .toml file") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{what} {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror or type(e).__name__})") from None
