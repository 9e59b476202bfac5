"""The journal's storage failing: S3 behind a fault proxy, and a local journal on a full filesystem.

An agent (model request 1 calls `fetch`, the tool runs, model request 2 answers) journals into a bucket on a real
moto S3 server, reached by prefect-aws's real boto3 client through `S3FaultProxy`: its answers 500, connections
reset mid-body, stalls longer than the client's read timeout, and writes accepted whose next reads fail. Its
client has fast settings (1 s timeouts, 2 attempts in all in botocore's standard retry mode) so that a stall costs
seconds. Every call the agent makes is counted; the numbers are the ones in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import subprocess
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import (
    PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
    PREFECT_LOCAL_STORAGE_PATH,
    temporary_settings,
)
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, RunError, StorageReadError, StorageWriteError
from tests.s3_servers import Fault, S3FaultProxy, moto_s3, save_bucket

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # starts moto_server

FAST = {"connect_timeout": 1, "read_timeout": 1, "retries": {"mode": "standard", "total_max_attempts": 2}}
"""The bucket's boto3 client settings: a stalled request times out after 1 s and is tried once more."""
ENTRY = r"/[0-9a-f]{64}$"
"""The path of a step's journal entry (its step key), as opposed to a run record's."""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3FaultProxy, str]]:
    """One moto server for the module, a fault proxy in front of it, and the bucket saved as a block that
    reaches it through the proxy: (proxy, block slug)."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as (endpoint, bucket):
        host, port = endpoint.removeprefix("http://").split(":")
        with S3FaultProxy((host, int(port))) as proxy:
            yield proxy, save_bucket(bucket, proxy.url, config=FAST)


@pytest.fixture
def proxy(s3: tuple[S3FaultProxy, str]) -> Iterator[S3FaultProxy]:
    """The proxy, with the module's bucket as this test's result storage (journal and run records); no fault
    outlives the test."""
    proxy, block = s3
    proxy.clear()
    proxy.seen.clear()
    with temporary_settings({PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: block}):
        yield proxy
    proxy.clear()


def counting_model(calls: Counter[str]) -> Callable[[list[ModelMessage], AgentInfo], ModelResponse]:
    """The model of model → fetch → model: asks for `fetch`, then answers; counts each call in `calls`."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            return ModelResponse(parts=[ToolCallPart("fetch", {"order": 42})])
        return ModelResponse(parts=[TextPart("done: order-42")])

    return model


def counted_agent(**task_configs: Any) -> tuple[PrefectAgent[None, str], Counter[str]]:
    """model → fetch → model, counting the calls that execute."""
    calls = Counter[str]()

    model = counting_model(calls)

    agent = Agent(FunctionModel(model), name="journal_faults")

    @agent.tool_plain
    def fetch(order: int) -> str:
        calls["tool"] += 1
        return f"order-{order}"

    return PrefectAgent(agent, **task_configs), calls


def outcomes(proxy: S3FaultProxy, method: str) -> list[str]:
    """What the proxy did with each `method` request for a journal entry, in order."""
    return [s.outcome for s in proxy.requests(method, ENTRY)]


async def test_faults_the_client_retries_lose_nothing_and_repeat_nothing(
    proxy: S3FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    durable, calls = counted_agent()
    key = f"s3-retried-{uuid.uuid4().hex[:8]}"
    # Each step's entry write meets faults: two 500s (botocore's both attempts: Prefect's write at the step's end
    # fails, ours succeeds), a reset after the write reached the bucket, a stall.
    for nth, fault, times in ((1, "500", 2), (2, "reset", 1), (3, "stall", 1)):
        proxy.fault(fault, methods="PUT", path=ENTRY, nth=nth, times=times)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
        assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    assert calls == Counter(model=2, tool=1)
    assert outcomes(proxy, "PUT") == ["500", "500", "forwarded", "reset", "forwarded", "stall", "forwarded"]
    assert (
        "Journal entry of model step 'function:model:' was not written when the step completed; written on a "
        "second try." in caplog.messages
    )

    # Replaying, each entry's read meets one: a 500 (on its HEAD), a body cut halfway (torn), a stall.
    proxy.clear()
    proxy.seen.clear()
    proxy.fault("500", methods="HEAD", path=ENTRY, nth=1, times=1)
    proxy.fault("reset", methods="GET", path=ENTRY, nth=2, times=1)
    proxy.fault("stall", methods="HEAD", path=ENTRY, nth=3, times=1)
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    assert calls == Counter(model=2, tool=1)  # nothing executed again
    assert outcomes(proxy, "GET") == ["forwarded", "reset", "forwarded", "forwarded"]
    assert outcomes(proxy, "PUT") == []  # and nothing rewritten


@pytest.mark.parametrize("fault", ["500", "reset", "stall"])
async def test_a_write_that_keeps_failing_stops_the_run_in_one_line(
    proxy: S3FaultProxy, fault: Fault
) -> None:
    durable, calls = counted_agent()
    key = f"s3-write-{fault}-{uuid.uuid4().hex[:8]}"
    proxy.fault(fault, methods="PUT", path=ENTRY, nth=2)  # the tool step's entry
    with pytest.raises(StorageWriteError) as failed:
        await durable.run("go", idempotency_key=key)
    [tool_entry] = {s.path for s in proxy.requests("PUT", ENTRY)} - {proxy.requests("PUT", ENTRY)[0].path}
    [line] = str(failed.value).splitlines()
    assert line.startswith(
        f"Tool step 'fetch' completed, but its journal entry could not be written to "
        f"{tool_entry.split('/', 2)[2]!r} in the result storage S3Bucket('{tool_entry.split('/')[1]}'): "
    ), line
    assert line.endswith(
        ". The run stops here: fix the storage, then resume the run (the step runs again unless its entry "
        "did reach the storage)."
    ), line
    assert calls == Counter(model=1, tool=1)
    # Prefect's write at the step's end, then ours: botocore tries each twice
    assert outcomes(proxy, "PUT")[1:] == [fault] * 4

    proxy.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    # Model request 1 replays. The tool runs again where its entry never arrived; a reset came after the write
    # had reached the bucket, so there the entry is found and the tool replays.
    assert calls == Counter(model=2, tool=1 if fault == "reset" else 2)


@pytest.mark.parametrize("fault", ["500", "reset", "stall", "put-then-get"])
async def test_a_read_that_keeps_failing_executes_nothing_and_stops_in_one_line(
    proxy: S3FaultProxy, fault: str
) -> None:
    durable, calls = counted_agent()
    key = f"s3-read-{fault}-{uuid.uuid4().hex[:8]}"
    if fault == "put-then-get":  # the bucket accepts every write, then fails every read of what was written
        proxy.fault("500", methods="HEAD GET", path=ENTRY, after_put=True)
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    assert calls == Counter(model=2, tool=1)
    first_entry = proxy.requests("PUT", ENTRY)[0].path

    if fault != "put-then-get":
        proxy.fault(fault, methods="GET" if fault == "reset" else "HEAD", path=ENTRY)  # type: ignore[arg-type]
    with pytest.raises(StorageReadError) as failed:
        await durable.run("go", idempotency_key=key)
    [line] = str(failed.value).splitlines()
    assert line.startswith(
        "Model step 'function:model:' cannot tell whether it completed in an earlier attempt, so it does not "
        f"run: Cannot read {first_entry.split('/', 2)[2]!r} from the result storage "
        f"S3Bucket('{first_entry.split('/')[1]}'): "
    ), line
    assert line.endswith(". Fix the storage, then resume the run."), line
    assert calls == Counter(model=2, tool=1)  # nothing executed again

    proxy.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    assert calls == Counter(model=2, tool=1)


# --- the run records ---

RECORD = r"/prefect-pydantic-ai/runs/[^/]+/journal_faults\.0\.json$"
"""The path of the agent's run record (where it runs from, its inputs, its attempts and what they spent)."""
PUT_FAILED = (
    "ClientError: An error occurred (InternalError) when calling the PutObject operation (reached max retries: 1): "
    "injected by the fault proxy"
)


def _record_at(proxy: S3FaultProxy) -> tuple[str, str]:
    """(the record's path in the bucket, the bucket) from the first request for it."""
    path = proxy.requests("PUT", RECORD)[0].path
    return path.split("/", 2)[2], path.split("/")[1]


async def test_a_run_record_that_cannot_be_written_stops_the_run_before_any_step_in_one_line(
    proxy: S3FaultProxy,
) -> None:
    """Without its record a run could not be resumed, so it does not start: one line, no call made."""
    durable, calls = counted_agent()
    key = f"s3-record-{uuid.uuid4().hex[:8]}"
    proxy.fault("500", methods="PUT", path=RECORD)
    with pytest.raises(StorageWriteError) as failed:
        await durable.run("go", idempotency_key=key)
    path, bucket = _record_at(proxy)
    assert str(failed.value) == (
        f"The run record of agent 'journal_faults' could not be written to {path!r} in the result storage "
        f"S3Bucket('{bucket}'): {PUT_FAILED}. No step ran in this attempt: fix the storage, then run it again."
    )
    assert calls == Counter()

    proxy.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    assert calls == Counter(model=2, tool=1)


@pytest.mark.parametrize("end", ["written", "failing"])
async def test_progress_that_cannot_be_written_is_said_once_and_the_run_goes_on(
    proxy: S3FaultProxy, caplog: pytest.LogCaptureFixture, end: str
) -> None:
    """The record is written at the start; its rewrites after each step (what the run spent so far) fail. The
    run goes on with one warning. When the record's last write fails too, the run stops in one line after its
    last step, and the rerun replays every step: nothing executes twice."""
    durable, calls = counted_agent()
    key = f"s3-progress-{end}-{uuid.uuid4().hex[:8]}"
    # after the first write: the rewrites after the two model requests (a tool spends nothing), two tries each,
    # then the end's (or every one)
    proxy.fault("500", methods="PUT", path=RECORD, after_put=True, times=4 if end == "written" else 1_000_000)
    with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
        if end == "written":
            assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
        else:
            with pytest.raises(StorageWriteError) as failed:
                await durable.run("go", idempotency_key=key)
    path, bucket = _record_at(proxy)
    flow_run_id = path.split("/")[2]
    assert [m for m in caplog.messages if m.startswith("The progress")] == [
        f"The progress of run {flow_run_id} (agent 'journal_faults') could not be recorded in the result storage "
        f"S3Bucket('{bucket}'): {PUT_FAILED}. The run goes on (its steps are journaled); if it is killed, `show` "
        "and `costs` tell less of this attempt."
    ]
    assert calls == Counter(model=2, tool=1)
    assert [s.outcome for s in proxy.requests("PUT", RECORD)] == ["forwarded"] + ["500"] * 4 + (
        ["forwarded"] if end == "written" else ["500"] * 2
    )
    if end == "failing":
        assert str(failed.value) == (
            f"The run record of agent 'journal_faults' could not be written to {path!r} in the result storage "
            f"S3Bucket('{bucket}'): {PUT_FAILED}. Its steps are journaled: fix the storage, then resume the run "
            "(they replay). Until then the record tells of this attempt only what it had spent."
        )
        proxy.clear()
        assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
        assert calls == Counter(model=2, tool=1)  # every step replayed


async def test_a_run_failing_while_its_record_cannot_be_written_reports_its_own_failure(
    proxy: S3FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The tool fails the run; recording that failure fails too: the run's error is the tool's, and the record's
    is one warning."""
    agent = Agent(FunctionModel(counting_model(Counter())), name="journal_faults")

    @agent.tool_plain
    def fetch(order: int) -> str:
        raise LookupError(f"order {order} is gone")

    proxy.fault("500", methods="PUT", path=RECORD, after_put=True)
    with (
        caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"),
        pytest.raises(LookupError, match="order 42 is gone"),
    ):
        await PrefectAgent(agent).run("go", idempotency_key=f"s3-failed-{uuid.uuid4().hex[:8]}")
    path, bucket = _record_at(proxy)
    assert (
        f"The run record of agent 'journal_faults' could not be written to {path!r} in the result storage "
        f"S3Bucket('{bucket}'): {PUT_FAILED}. Its steps are journaled: fix the storage, then resume the run "
        "(they replay). Until then the record tells of this attempt only what it had spent."
    ) in caplog.messages


async def test_a_run_record_that_cannot_be_read_executes_nothing_and_says_so_in_one_line(
    proxy: S3FaultProxy,
) -> None:
    """A later attempt with the same key reads the earlier one's record; it cannot, so nothing runs."""
    durable, calls = counted_agent()
    key = f"s3-record-read-{uuid.uuid4().hex[:8]}"
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    _, bucket = _record_at(proxy)
    proxy.fault("500", methods="HEAD GET", path=RECORD)
    with pytest.raises(RunError) as failed:
        await durable.run("go", idempotency_key=key)
    assert re.fullmatch(
        r"Cannot read the run record prefect-pydantic-ai/runs/[0-9a-f-]{36}/journal_faults\.0\.json from block "
        rf"s3-bucket/{bucket} \(ClientError: An error occurred \(500\) when calling the HeadObject operation "
        r"\(reached max retries: 1\): Internal Server Error\)\.",
        str(failed.value),
    ), failed.value
    assert calls == Counter(model=2, tool=1)

    proxy.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "done: order-42"
    assert calls == Counter(model=2, tool=1)  # nothing executed again


# --- a local journal on a full filesystem ---


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for this test (always unmounted after it); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@contextlib.contextmanager
def filled(directory: Path) -> Iterator[Path]:
    """Fill the filesystem of `directory` with one file until ENOSPC; the file is removed at the end."""
    filler = directory / f"filler-{uuid.uuid4().hex[:8]}"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (65536, 4096, 1):  # down to the last byte of the last page
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
        yield filler
    finally:
        os.close(fd)
        filler.unlink(missing_ok=True)


def test_a_full_disk_stops_the_step_in_one_line_and_the_resume_repeats_nothing_completed(
    small_tmpfs: Path,
) -> None:
    journal = small_tmpfs / "storage"
    journal.mkdir()
    filler = small_tmpfs / "filler"
    calls = Counter[str]()

    model = counting_model(calls)

    agent = Agent(FunctionModel(model), name="full_disk")
    fill = True

    @agent.tool_plain
    def fetch(order: int) -> str:
        calls["tool"] += 1
        if fill:  # the disk fills up while the tool runs: its entry has no room
            with filled(small_tmpfs) as f:
                os.link(f, filler)  # kept after `filled` ends, until the test frees the space
        return f"order-{order}"

    durable = PrefectAgent(agent)
    key = f"full-{uuid.uuid4().hex[:8]}"
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: journal}):
        with pytest.raises(StorageWriteError) as failed:
            durable.run_sync("go", idempotency_key=key)
        [line] = str(failed.value).splitlines()
        assert line.startswith(
            f"Tool step 'fetch' completed, but its journal entry could not be written to '{journal.resolve()}/"
        ), line
        assert (
            f"in the result storage JournalFileSystem('{journal}'): OSError: [Errno {errno.ENOSPC}] " in line
        )
        assert "No space left on device: " in line
        assert calls == Counter(model=1, tool=1)
        files = [p.name for p in journal.iterdir() if p.is_file()]
        assert not [name for name in files if name.endswith(".tmp")]  # no partial entry left behind
        assert len([name for name in files if re.fullmatch("[0-9a-f]{64}", name)]) == 1  # model 1's, whole

        filler.unlink()
        fill = False
        assert durable.run_sync("go", idempotency_key=key).output == "done: order-42"
        assert calls == Counter(model=2, tool=2)  # model request 1 replayed; the tool's result was not kept
        assert durable.run_sync("go", idempotency_key=key).output == "done: order-42"
        assert calls == Counter(model=2, tool=2)
