"""A command's options from a TOML file and from ``FEDRECON_<OPTION>`` environment variables, as well as
from flags: what a container or a systemd unit needs to configure ``fedrecon serve`` without a long
command line.

The command's own option declarations are the only list of options: a file key or a variable is an
option's name, checked and converted by that option's own type, with nothing declared twice. Click
resolves each option in this order, which is the precedence we want: a flag on the command line, then
the environment (``FEDRECON_PORT=50051``; ``auto_envvar_prefix``), then the file (``--config``, loaded
into the context's ``default_map`` before any other option is read), then the declared default.

The file is strict, because a configuration that is silently half-ignored is worse than none: an unknown
key (a typo, an option of another command) is an error naming it, a value its option would refuse is an
error naming the key, and secrets are never written into it: TLS keys are given by path (``tls_key``), and
a store URL carrying a password is refused (give the URL by ``FEDRECON_STORE`` from a secret instead, or a
libpq password file with ``?passfile=PATH``). A relative path in the file is relative to the working
directory, as it is in a flag: write absolute paths in a file that a service reads.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

ENV_PREFIX = "FEDRECON"
"""``FEDRECON_STORE``, ``FEDRECON_PORT``, ...: the option's name in capitals."""

FROM_ENVIRONMENT: dict[str, Any] = {"auto_envvar_prefix": ENV_PREFIX}
"""``context_settings`` of a command whose options may come from ``FEDRECON_<OPTION>`` variables."""

_INLINE_PASSWORD = re.compile(r"://[^/@:]*:[^/@]+@")


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as err:
        raise typer.BadParameter(f"cannot read {path}: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise typer.BadParameter(f"{path} is not valid TOML: {err}") from err


def options_from_file(ctx: typer.Context, path: Path, *, this_option: str) -> dict[str, Any]:
    """The options ``path`` sets for the command of ``ctx``, keyed by option name, each value checked by
    its option's type. Keys are option names with ``_`` or ``-`` (``max_workers`` or ``max-workers``).
    Raises `typer.BadParameter` naming every unknown key, or the first value that is refused."""
    table = _load(path)
    options = {p.name: p for p in ctx.command.params if p.name and p.name != this_option}
    keys = {key: key.replace("-", "_") for key in table}
    unknown = sorted(k for k, name in keys.items() if name not in options)
    if unknown:
        raise typer.BadParameter(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"`{ctx.command_path}` takes {', '.join(sorted(options))}")
    doubled = sorted(name for name in set(keys.values()) if list(keys.values()).count(name) > 1)
    if doubled:
        raise typer.BadParameter(f"{path}: {', '.join(doubled)} set twice (once with '-', once with '_')")
    values: dict[str, Any] = {}
    for key, name in keys.items():
        value = table[key]
        if isinstance(value, str) and _INLINE_PASSWORD.search(value):
            raise typer.BadParameter(
                f"{path}: {key} holds a password; keep secrets out of the file: give the URL by "
                f"{ENV_PREFIX}_{name.upper()} (e.g. from a secret), or name a libpq password file with "
                "?passfile=PATH")
        try:
            options[name].process_value(ctx, value)  # the option's own checks (type, range, choices)
        except typer.BadParameter as err:
            raise typer.BadParameter(f"{path}: {key} = {value!r}: {err.message}") from err
        values[name] = value
    return values


def _load_config(ctx: typer.Context, param: typer.CallbackParam, value: Path | None) -> Path | None:
    """``--config``'s callback: runs before every other option (it is eager) and makes the file's values
    their defaults, below flags and the environment."""
    if value is not None:
        assert param.name is not None
        ctx.default_map = {**(ctx.default_map or {}),
                           **options_from_file(ctx, value, this_option=param.name)}
    return value


ConfigOption = Annotated[Path | None, typer.Option(
    "--config", is_eager=True, callback=_load_config, dir_okay=False,
    help=f"a TOML file of this command's options (keys as the flags without '--'); a flag or a "
         f"{ENV_PREFIX}_<OPTION> environment variable overrides it (e.g. {ENV_PREFIX}_PORT)")]
"""The ``--config FILE.toml`` option of a command with ``FROM_ENVIRONMENT``."""
