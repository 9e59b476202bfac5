"""The few Prefect settings our commands need (the API, its credentials, PREFECT_HOME, result storage), resolved
as Prefect resolves them, without importing Prefect when that gives the same answer.

Importing anything of Prefect costs about a second (its package imports its settings, context and client), which
is most of what `runs` or `show` would take. Prefect reads a setting from, in order: the environment, a `.env`
file, `prefect.toml` and `pyproject.toml` (`[tool.prefect]`) in the working directory, then the active profile of
`profiles.toml`. The environment and the profile are read here directly. When anything else could decide (one of
those files is present, Prefect's test mode, a setting of the client we do not apply ourselves, Prefect Cloud) or
Prefect is imported already, Prefect's own settings answer: slower, never different.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DEFAULT_HOME = "~/.prefect"
_ALIASES = {  # each setting's names, in Prefect's order of precedence
    "api_url": ("PREFECT_API_URL",),
    "api_key": ("PREFECT_API_KEY",),
    "api_auth_string": ("PREFECT_API_AUTH_STRING",),
    "ui_url": ("PREFECT_UI_URL",),
    "home": ("PREFECT_HOME",),
    "default_storage_block": (
        "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
    ),
    "local_storage_path": ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH"),
}
_HANDLED = {name for names in _ALIASES.values() for name in names}
_HARMLESS = {"PREFECT_API_ENABLE_HTTP2", "PREFECT_API_REQUEST_TIMEOUT"}
"""Client settings that change how requests travel, not what they answer; the rest of `PREFECT_API_*` and
`PREFECT_CLIENT_*` (certificates, custom headers, proxies) send the question to Prefect's settings."""
_TEST_MODE = (
    "PREFECT_TEST_MODE",
    "PREFECT_UNIT_TEST_MODE",
    "PREFECT_TESTING_UNIT_TEST_MODE",
    "PREFECT_TESTING_TEST_MODE",
)


@dataclass(frozen=True)
class PrefectSettings:
    """What `runs`, `show`, `costs` and the local server need of Prefect's settings."""

    api_url: str | None
    api_key: str | None
    api_auth_string: str | None
    ui_url: str | None
    """The UI of `api_url`: PREFECT_UI_URL, else the API URL without its `/api`."""
    home: Path
    default_storage_block: str | None
    """`block-type/name` of the result storage set by PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK, if any."""
    local_storage_path: Path
    """Where results are kept when no storage block is configured (PREFECT_HOME/storage)."""
    exact: bool
    """True when Prefect's own settings gave these values (it is imported, or a source only it reads is present)."""


def prefect_settings() -> PrefectSettings:
    """This process's Prefect settings as Prefect would resolve them now (the environment can change between calls:
    pointing this process at the local server sets PREFECT_API_URL)."""
    values = None if "prefect.settings" in sys.modules else _without_prefect()
    return _from_prefect() if values is None else values


_resolved: dict[tuple[object, ...], PrefectSettings | None] = {}


def _without_prefect() -> PrefectSettings | None:
    """The settings from the environment and the active profile; None when some other source could decide.

    Resolved once per state of what they are read from (the `PREFECT_` variables, the working directory, the
    files' sizes and times): `costs` and `show` read hundreds of run records, and each record asked again (0.4 s
    of `costs` over 200 runs, in a command that takes about a second)."""
    cwd = os.getcwd()
    home = os.path.expanduser(os.environ.get("PREFECT_HOME") or _DEFAULT_HOME)
    environment = sorted((k, v) for k, v in os.environ.items() if k.startswith("PREFECT_"))
    files = (*(os.path.join(cwd, name) for name in _CWD_FILES), os.path.join(home, "profiles.toml"))
    key = (cwd, home, *environment, *map(_stamp, files))
    if key not in _resolved:
        _resolved[key] = _resolve_without_prefect(Path(cwd), Path(home))
    return _resolved[key]


_CWD_FILES = ("prefect.toml", ".env", "pyproject.toml")
"""The files of the working directory the settings are read from, besides the environment and PREFECT_HOME's
`profiles.toml`. Their sizes and times are part of the key (plain `os` calls: it is computed for every record)."""


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _resolve_without_prefect(cwd: Path, home: Path) -> PrefectSettings | None:
    if any(os.environ.get(name) for name in _TEST_MODE) or (cwd / "prefect.toml").is_file():
        return None
    if _mentions_prefect(cwd / ".env", "PREFECT_") or _mentions_prefect(
        cwd / "pyproject.toml", "tool.prefect"
    ):
        return None
    profile = _active_profile(home)
    if profile is None:
        return None
    sources = [{k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}, profile]
    if any(_decides_elsewhere(name) for source in sources for name in source):
        return None

    def value(setting: str) -> str | None:
        for source in sources:  # the environment first, then the profile
            for name in _ALIASES[setting]:
                if found := source.get(name):
                    return str(found)
        return None

    api_url = value("api_url")
    if api_url is not None and "prefect.cloud" in api_url:
        return None  # Cloud's UI address is derived differently
    storage = value("local_storage_path")
    return PrefectSettings(
        api_url=api_url,
        api_key=value("api_key"),
        api_auth_string=value("api_auth_string"),
        ui_url=value("ui_url") or _ui_of(api_url),
        home=home,
        default_storage_block=value("default_storage_block"),
        local_storage_path=Path(storage).expanduser() if storage else home / "storage",
        exact=False,
    )


def _decides_elsewhere(name: str) -> bool:
    """A setting that changes what our commands would see, which only Prefect's settings apply faithfully."""
    if name in _HANDLED or name in _HARMLESS:
        return False
    return name.startswith(("PREFECT_API_", "PREFECT_CLIENT_", "PREFECT_CLOUD_", "PREFECT_PROFILES_PATH"))


def _mentions_prefect(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except OSError:
        return False


def _active_profile(home: Path) -> dict[str, Any] | None:
    """The settings of the active profile in `home`'s profiles.toml (Prefect's default profile when there is none
    or it names no known profile); None when the file cannot be read as Prefect would."""
    path = home / "profiles.toml"
    try:
        data = tomllib.loads(path.read_text()) if path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or data.get("active")
    profiles = data.get("profiles", {})
    if active and active in profiles and isinstance(profiles[active], dict):
        return dict(profiles[active])
    return _default_profile()


def _default_profile() -> dict[str, Any] | None:
    """The active profile of the profiles.toml shipped inside Prefect's package (read as a file, not imported)."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        data = tomllib.loads(
            (Path(next(iter(spec.submodule_search_locations))) / "settings" / "profiles.toml").read_text()
        )
    except (OSError, tomllib.TOMLDecodeError):
        return None
    found = data.get("profiles", {}).get(data.get("active", "ephemeral"), {})
    return dict(found) if isinstance(found, dict) else None


def _ui_of(api_url: str | None) -> str | None:
    """Prefect's UI address for a self-hosted API: the API URL without its `/api`."""
    if not api_url:
        return None
    return api_url[:-4] if api_url.endswith("/api") else api_url.replace("/api/", "/")


def _from_prefect(settings: Any = None) -> PrefectSettings:
    """The values of Prefect's settings object (this process's current one by default)."""
    if settings is None:
        from prefect.settings import get_current_settings

        settings = get_current_settings()
    key = settings.api.key
    auth = settings.api.auth_string
    return PrefectSettings(
        api_url=settings.api.url or None,
        api_key=key.get_secret_value() if key else None,
        api_auth_string=auth.get_secret_value() if auth else None,
        ui_url=settings.ui_url or None,
        home=Path(settings.home).expanduser(),
        default_storage_block=settings.results.default_storage_block,
        local_storage_path=Path(settings.results.local_storage_path).expanduser(),
        exact=True,
    )
