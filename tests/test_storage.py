"""The journal's local storage: same files as Prefect's `LocalFileSystem`, written atomically, nothing else touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.filesystems import LocalFileSystem

from prefect_pydantic_ai.storage import JournalFileSystem, journal_storage

pytestmark = pytest.mark.anyio


class ElsewhereFileSystem(LocalFileSystem):
    """Stands in for any storage that is not a plain local directory (a subclass, S3, a saved block)."""

    _block_type_name = "Test Elsewhere File System"


async def test_only_a_plain_local_directory_is_replaced(tmp_path: Path) -> None:
    journal = await journal_storage(LocalFileSystem(basepath=str(tmp_path)))
    assert isinstance(journal, JournalFileSystem) and journal.basepath == str(tmp_path)
    assert await journal_storage(tmp_path) is journal  # a Path means the same directory
    assert await journal_storage(ElsewhereFileSystem(basepath=str(tmp_path))) is None
    assert await journal_storage("s3-bucket/results") is None


async def test_entries_round_trip_through_the_same_files_prefect_reads(tmp_path: Path) -> None:
    journal = JournalFileSystem(basepath=str(tmp_path))
    written = await journal.awrite_path("a" * 64, b'{"entry": 1}')
    assert written == str(tmp_path.resolve() / ("a" * 64))
    assert await LocalFileSystem(basepath=str(tmp_path)).aread_path("a" * 64) == b'{"entry": 1}'
    assert await journal.aread_path(written) == b'{"entry": 1}'  # Prefect passes the full path back
    await journal.awrite_path("a" * 64, b'{"entry": 2}')
    assert await journal.aread_path("a" * 64) == b'{"entry": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a" * 64]  # no temporary files left behind
    reference = tmp_path.parent / f"{tmp_path.name}-reference"
    reference.write_bytes(b"")  # permissions as Prefect's own writes get them (the umask applies)
    assert (tmp_path / ("a" * 64)).stat().st_mode == reference.stat().st_mode

    nested = await journal.awrite_path("prefect-pydantic-ai/runs/x/agent.0.json", b"{}")
    assert Path(nested).read_bytes() == b"{}"
    large = b"x" * (1024 * 1024)  # written from a worker thread, same result
    await journal.awrite_path("b" * 64, large)
    assert await journal.aread_path("b" * 64) == large


async def test_missing_entries_and_paths_outside_the_base_are_errors(tmp_path: Path) -> None:
    journal = JournalFileSystem(basepath=str(tmp_path / "journal"))
    with pytest.raises(ValueError, match="does not exist"):
        await journal.aread_path("c" * 64)
    with pytest.raises(ValueError, match="outside of the base path"):
        await journal.awrite_path("../escaped", b"x")
    assert not (tmp_path / "escaped").exists()
