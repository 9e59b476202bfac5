"""The journal's local storage: same files as Prefect's `LocalFileSystem`, written atomically, nothing else touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect.filesystems import LocalFileSystem

from prefect_pydantic_ai.store.journal_storage import JournalFileSystem, journal_storage

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


async def test_a_running_attempts_progress_is_appended_and_a_line_torn_by_a_kill_is_skipped() -> None:
    from datetime import UTC, datetime
    from uuid import uuid4

    from prefect_pydantic_ai.ledger import Ledger, UsageTotals
    from prefect_pydantic_ai.store.records import (
        AttemptRecord,
        RunRecord,
        _storage,
        read_record,
        record_path,
        write_progress,
        write_record,
    )

    record = RunRecord(flow_run_id=str(uuid4()), agent="progress", ordinal=0)
    await write_record(record, "")

    def running(calls: int) -> AttemptRecord:
        spent = UsageTotals(model_calls=calls)
        return AttemptRecord(
            run_count=1, state="running", finished_at=datetime.now(UTC), ledger=Ledger(spent=spent)
        )

    for calls in (1, 2, 3):
        await write_progress(record, running(calls))
    storage = await _storage()
    assert isinstance(storage, JournalFileSystem)
    path = record_path(record.flow_run_id, "progress", 0).removesuffix(".json") + ".progress.jsonl"
    storage.append_path(path, b"\n" + running(4).model_dump_json().encode()[:40])  # killed mid-write
    read = await read_record(record.flow_run_id, "progress", 0)
    assert read is not None and [(a.state, a.ledger.spent.model_calls) for a in read.attempts] == [
        ("running", 3)
    ]

    await write_progress(record, running(5))  # the next line is whole, even after a torn one
    read = await read_record(record.flow_run_id, "progress", 0)
    assert read is not None and [a.ledger.spent.model_calls for a in read.attempts] == [5]

    record.attempts = [running(5).model_copy(update={"state": "completed"})]
    await write_record(record, "")  # the attempt ended: its final state wins over its progress lines
    read = await read_record(record.flow_run_id, "progress", 0)
    assert read is not None and [(a.state, a.ledger.spent.model_calls) for a in read.attempts] == [
        ("completed", 5)
    ]


async def test_step_marks_say_which_steps_a_killed_attempt_was_in_and_which_it_completed() -> None:
    from uuid import uuid4

    from prefect_pydantic_ai.store.records import (
        RunRecord,
        _storage,
        read_record,
        record_path,
        write_record,
        write_step_mark,
    )

    record = RunRecord(flow_run_id=str(uuid4()), agent="marks", ordinal=0)
    await write_record(record, "")
    model, search, fetch = "model #1: m @ marks", "tool #2: search @ marks", "tool #3: fetch @ marks"
    await write_step_mark(record, 1, [model])
    await write_step_mark(record, 1, [], completed=model)
    await write_step_mark(record, 1, [search])  # two tool calls in parallel
    await write_step_mark(record, 1, [search, fetch])
    await write_step_mark(record, 1, [fetch], completed=search)
    storage = await _storage()
    assert isinstance(storage, JournalFileSystem)
    path = record_path(record.flow_run_id, "marks", 0).removesuffix(".json") + ".progress.jsonl"
    storage.append_path(path, b'\n{"run_count":1,"in_steps":[]')  # killed mid-write: the line is skipped

    read = await read_record(record.flow_run_id, "marks", 0)
    assert read is not None
    [attempt] = read.attempts  # the attempt never recorded any spend: its marks alone make it known
    assert (attempt.run_count, attempt.state) == (1, "running")
    assert (attempt.in_steps, attempt.completed_steps) == ([fetch], [model, search])
    assert (
        "in_steps" not in attempt.model_dump_json()
    )  # read back from the log, never written into the record

    await write_step_mark(record, 2, [model])  # the next attempt, killed in its first step
    read = await read_record(record.flow_run_id, "marks", 0)
    assert read is not None and [(a.run_count, a.in_steps) for a in read.attempts] == [
        (1, [fetch]),
        (2, [model]),
    ]


class S3Like(LocalFileSystem):
    """Answers every read as boto3 does: a ClientError whose code says what happened."""

    _block_type_name = "Test S3 Like File System"
    error_code: str = "NoSuchKey"

    async def aread_path(self, path: str) -> bytes:
        from botocore.exceptions import ClientError

        raise ClientError({"Error": {"Code": self.error_code, "Message": "..."}}, "GetObject")


async def test_a_read_tells_nothing_stored_from_a_storage_that_cannot_answer(tmp_path: Path) -> None:
    from prefect_pydantic_ai.errors import StorageReadError
    from prefect_pydantic_ai.store.journal_storage import read_if_present

    (tmp_path / "present").write_bytes(b"started")
    for storage in (JournalFileSystem(basepath=str(tmp_path)), LocalFileSystem(basepath=str(tmp_path))):
        assert await read_if_present(storage, "present") == b"started"
        assert await read_if_present(storage, "absent") is None

    assert await read_if_present(S3Like(basepath="journal"), "absent") is None
    for code in ("NoSuchKey", "404"):
        assert await read_if_present(S3Like(basepath="journal", error_code=code), "absent") is None
    with pytest.raises(
        StorageReadError, match=r"'key.started' from the result storage S3Like\('journal'\): "
    ):
        await read_if_present(S3Like(basepath="journal", error_code="AccessDenied"), "key.started")
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()  # a directory where a file should be: the read fails, and it is not "absent"
    with pytest.raises(StorageReadError, match="IsADirectoryError"):
        await read_if_present(JournalFileSystem(basepath=str(tmp_path)), "unreadable")


async def test_outside_a_flow_run_the_storage_is_resolved_once_per_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving the result storage asks the server for its default storage block: a command reading many run
    records (`export`, `gc`, `show`) asks once, and again only under other settings."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from prefect_pydantic_ai.store import journal_storage as module
    from prefect_pydantic_ai.store import records

    resolved: list[object] = []
    real = module.default_result_storage

    async def counted() -> object:
        resolved.append(storage := await real())
        return storage

    monkeypatch.setattr(module, "default_result_storage", counted)
    monkeypatch.setattr(records, "_storage_of_settings", {})
    first = await records.result_storage()
    assert [await records.result_storage() for _ in range(3)] == [first] * 3
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path}):
        other = await records.result_storage()
    assert isinstance(other, JournalFileSystem) and Path(other.root()) == tmp_path
    assert len(resolved) == 2
