"""The settings our read-only commands resolve without importing Prefect are Prefect's own, source by source; where
a source only Prefect reads is present, Prefect's settings answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.settings import Settings

from prefect_pydantic_ai.prefect_settings import _from_prefect, _without_prefect

_CLEARED = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_UI_URL",
    "PREFECT_PROFILE",
    "PREFECT_PROFILES_PATH",
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK",
    "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_LOCAL_STORAGE_PATH",
    "PREFECT_TEST_MODE",
    "PREFECT_UNIT_TEST_MODE",
    "PREFECT_TESTING_UNIT_TEST_MODE",
    "PREFECT_TESTING_TEST_MODE",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "home"


PROFILES = """
active = "{active}"
[profiles.local]
PREFECT_API_URL = "http://127.0.0.1:4321/api"
PREFECT_API_KEY = "pnu_profile"
PREFECT_RESULTS_LOCAL_STORAGE_PATH = "{storage}"
[profiles.team]
PREFECT_API_URL = "http://10.0.0.7:4200/api"
PREFECT_UI_URL = "http://prefect.example/ui"
PREFECT_DEFAULT_RESULT_STORAGE_BLOCK = "s3-bucket/journal"
"""


def _both() -> tuple[object, object]:
    light = _without_prefect()
    assert light is not None, "resolved without Prefect"
    exact = _from_prefect(Settings())
    fields = ("api_url", "api_key", "api_auth_string", "ui_url", "home", "default_storage_block")
    return (
        {f: getattr(light, f) for f in fields} | {"storage": light.local_storage_path.resolve()},
        {f: getattr(exact, f) for f in fields} | {"storage": exact.local_storage_path.resolve()},
    )


@pytest.mark.parametrize(
    "case",
    ["nothing", "environment", "profile", "PREFECT_PROFILE", "environment over profile", "unknown profile"],
)
def test_resolved_without_prefect_as_prefect_resolves_it(
    case: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = home / "elsewhere"
    if case != "nothing" and case != "environment":
        active = "nowhere" if case == "unknown profile" else "local"
        (home / "profiles.toml").write_text(PROFILES.format(active=active, storage=storage))
    if case == "PREFECT_PROFILE":
        monkeypatch.setenv("PREFECT_PROFILE", "team")
    if case.startswith("environment"):
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4999/api")
        monkeypatch.setenv("PREFECT_API_AUTH_STRING", "admin:pass")
        monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(storage))
    light, exact = _both()
    assert light == exact


@pytest.mark.parametrize(
    "source",
    [".env", "prefect.toml", "pyproject.toml", "test mode", "a client setting", "Prefect Cloud"],
)
def test_a_source_only_prefect_reads_sends_the_question_to_prefect(
    source: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if source == ".env":
        Path(".env").write_text("PREFECT_API_URL=http://127.0.0.1:4888/api\n")
    elif source == "prefect.toml":
        Path("prefect.toml").write_text('[api]\nurl = "http://127.0.0.1:4888/api"\n')
    elif source == "pyproject.toml":
        Path("pyproject.toml").write_text('[tool.prefect.api]\nurl = "http://127.0.0.1:4888/api"\n')
    elif source == "test mode":
        monkeypatch.setenv("PREFECT_TESTING_TEST_MODE", "1")
    elif source == "a client setting":
        monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", "/etc/ssl/certs/ca.pem")
    else:
        monkeypatch.setenv("PREFECT_API_URL", "https://api.prefect.cloud/api/accounts/a/workspaces/w")
    assert _without_prefect() is None
    if source in (".env", "prefect.toml", "pyproject.toml"):  # and Prefect does read it
        assert _from_prefect(Settings()).api_url == "http://127.0.0.1:4888/api"


def test_a_harmless_setting_or_another_projects_files_keep_the_fast_path(home: Path) -> None:
    Path(".env").write_text("DATABASE_URL=postgresql://localhost/app\n")
    Path("pyproject.toml").write_text('[project]\nname = "app"\n')
    light, exact = _both()
    assert light == exact
