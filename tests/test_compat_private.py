"""Each private part of another library that `prefect_pydantic_ai.compat` reaches still does what we use it for.

One test per use, quick and without a server. A failure names the library and its installed version, so an
upgrade that breaks one says which dependency moved and what it no longer does.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import pytest


def broke(library: str, what: str) -> str:
    """The failure message: `<library> <installed version>: <what no longer holds>`."""
    return f"{library} {version(library)}: {what}"


def compat(module: str, library: str) -> ModuleType:
    """`prefect_pydantic_ai.compat.<module>`, or a failure naming `library`'s version when its import breaks."""
    try:
        return importlib.import_module(f"prefect_pydantic_ai.compat.{module}")
    except (ImportError, AttributeError) as exc:
        pytest.fail(broke(library, f"compat.{module} cannot import what it uses: {exc}"))


def test_prefect_result_records_are_read_with_their_value_and_expiration(tmp_path: Path) -> None:
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    read_result_record = compat("prefect", "prefect").read_result_record
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)), serializer=JSONSerializer())
    expires = datetime.now(UTC) + timedelta(days=1)
    store.write({"parts": [1, 2]}, key="step-key", expiration=expires)
    store.write("forever", key="other-key")
    what = "prefect._internal.result_records.ResultRecord.deserialize no longer reads a record the result store wrote"
    assert read_result_record((tmp_path / "step-key").read_bytes()) == ({"parts": [1, 2]}, expires), broke(
        "prefect", what
    )
    assert read_result_record((tmp_path / "other-key").read_bytes()) == ("forever", None), broke(
        "prefect", what
    )


def test_prefect_local_file_systems_resolve_every_path_through_resolve_path(tmp_path: Path) -> None:
    from prefect.filesystems import LocalFileSystem

    resolves_paths = compat("prefect", "prefect").ResolvesPaths
    elsewhere = tmp_path / "elsewhere"

    class Redirected(resolves_paths, LocalFileSystem):  # type: ignore[misc]
        _block_type_name = (
            "prefect-pydantic-ai compat test"  # its own: Prefect's LocalFileSystem stays registered
        )

        def resolve_path(self, path: str) -> Path:
            return elsewhere / path if path == "entry" else super().resolve_path(path)

    storage = Redirected(basepath=str(tmp_path / "base"))
    storage.write_path("entry", b"redirected")
    storage.write_path("plain", b"plain")
    assert (elsewhere / "entry").read_bytes() == b"redirected", broke(
        "prefect", "LocalFileSystem.write_path no longer resolves its path through _resolve_path"
    )
    assert storage.read_path("entry") == b"redirected", broke(
        "prefect", "LocalFileSystem.read_path no longer resolves its path through _resolve_path"
    )
    assert (tmp_path / "base" / "plain").read_bytes() == b"plain", broke(
        "prefect", "LocalFileSystem._resolve_path no longer puts a relative path under basepath"
    )
    with pytest.raises(ValueError):
        storage.resolve_path("../outside")  # Prefect's resolution refuses a path that leaves the base path


def test_prefect_blocks_keep_the_name_they_were_loaded_under() -> None:
    from uuid import uuid4

    from prefect.filesystems import LocalFileSystem

    saved_block_name = compat("prefect", "prefect").saved_block_name

    class Saved(LocalFileSystem):
        _block_type_name = (
            "prefect-pydantic-ai compat test block"  # loading sets class attributes: not Prefect's
        )

    assert saved_block_name(Saved(basepath="/tmp")) is None
    block_type = uuid4()
    document = Saved(basepath="/tmp")._to_block_document(
        name="journal", block_schema_id=uuid4(), block_type_id=block_type
    )
    document.block_schema = Saved._to_block_schema(block_type_id=block_type)
    assert saved_block_name(Saved._from_block_document(document)) == "journal", broke(
        "prefect", "a block loaded from a block document no longer keeps its name in _block_document_name"
    )


def test_pydantic_ai_streamed_responses_build_parts_and_usage_from_forwarded_events() -> None:
    from pydantic_ai.messages import PartDeltaEvent, PartStartEvent, TextPart, TextPartDelta, ToolCallPart
    from pydantic_ai.models import ModelRequestParameters
    from pydantic_ai.usage import RequestUsage

    event_stream = compat("pydantic_ai", "pydantic-ai-slim").EventStreamResponse
    forwarded = [
        PartStartEvent(index=0, part=TextPart("Hel")),
        PartDeltaEvent(index=0, delta=TextPartDelta("lo")),
    ]

    class Forwarding(event_stream):  # type: ignore[misc]
        async def events(self) -> AsyncIterator[Any]:
            for event in forwarded:
                self.apply_event(event)
                yield event
            yield self.part_event(1, ToolCallPart("lookup", {"q": 1}, tool_call_id="c1"))
            self.set_usage(RequestUsage(input_tokens=7, output_tokens=3))

        model_name = "m"
        provider_name = None
        provider_url = None
        timestamp = datetime.now(UTC)

    async def consume() -> tuple[list[Any], Any]:
        stream = Forwarding(model_request_parameters=ModelRequestParameters())
        seen = [event async for event in stream]
        return seen, stream

    seen, stream = asyncio.run(consume())
    seen = [
        event for event in seen if isinstance(event, PartStartEvent | PartDeltaEvent)
    ]  # not FinalResultEvent
    assert seen[:2] == forwarded and len(seen) == 3, broke(
        "pydantic-ai-slim", "StreamedResponse no longer iterates the events of _get_event_iterator"
    )
    assert stream.get().parts == [TextPart("Hello"), ToolCallPart("lookup", {"q": 1}, tool_call_id="c1")], (
        broke(
            "pydantic-ai-slim",
            "StreamedResponse._parts_manager (apply_event, handle_part) no longer builds the parts",
        )
    )
    assert stream.usage == RequestUsage(input_tokens=7, output_tokens=3), broke(
        "pydantic-ai-slim", "StreamedResponse.usage no longer reports StreamedResponse._usage"
    )


def test_typer_raises_its_vendored_click_usage_errors_when_not_standalone(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import typer

    errors = compat("typer", "typer")
    app = typer.Typer(no_args_is_help=True)

    @app.command()
    def one(count: int = 1) -> None: ...

    @app.command()
    def two() -> None: ...

    with pytest.raises(errors.NoArgsIsHelpError) as no_args:
        app([], standalone_mode=False)
    assert no_args.value.ctx is not None
    shown = no_args.value.ctx.get_help() + capsys.readouterr().out  # typer's rich help prints it
    assert "one" in shown and "two" in shown, broke(
        "typer", "NoArgsIsHelpError no longer carries the context whose help the CLI prints"
    )
    with pytest.raises(errors.UsageError) as usage:
        app(["one", "--count", "many"], standalone_mode=False)
    assert "'--count'" in usage.value.format_message(), broke(
        "typer", "typer._click.exceptions.UsageError no longer formats a bad option's message"
    )
    assert issubclass(errors.NoArgsIsHelpError, errors.UsageError) and usage.value.exit_code == 2


def test_prefect_redis_keeps_a_steps_lock_under_the_name_compat_gives() -> None:
    import redis.lock
    from prefect_redis.locking import RedisLockManager

    lock_name = compat("prefect_redis", "prefect-redis").lock_name
    manager = RedisLockManager(
        connection_url="redis://127.0.0.1:1/0"
    )  # never connected: the client is replaced
    asked: list[str] = []

    class Client:
        def register_script(self, script: str) -> object:
            return object()

        def get(self, name: str) -> None:
            asked.append(name)

    manager.client = Client()  # type: ignore[assignment]
    # redis-py keeps the scripts of the first client a `Lock` meets on the class: the stand-in's must not stay
    # there for the real locks that later tests of this process take.
    with mock.patch.multiple(redis.lock.Lock, lua_release=None, lua_extend=None, lua_reacquire=None):
        assert not manager.is_locked("step-key")
    assert asked == [lock_name(manager, "step-key")], broke(
        "prefect-redis",
        f"RedisLockManager reads the lock of a key under {asked}, not _lock_name_for_key(key)",
    )


def test_prefect_events_workers_are_found_and_their_clients_told_to_try_each_event_once() -> None:
    import inspect

    from prefect._internal.concurrency.services import _QueueServiceBase
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker

    send_each_event_once = compat("prefect", "prefect").send_each_event_once
    client = PrefectEventsClient(api_url="http://127.0.0.1:9/api")  # built, not connected
    assert client._reconnection_attempts == 10, broke(
        "prefect", "PrefectEventsClient keeps no _reconnection_attempts"
    )
    assert "range(self._reconnection_attempts + 1)" in inspect.getsource(PrefectEventsClient._emit), broke(
        "prefect", "PrefectEventsClient._emit no longer tries an event _reconnection_attempts + 1 times"
    )
    worker = EventsWorker.__new__(EventsWorker)  # a running worker holds its client as _client
    worker._client = client
    with mock.patch.dict(vars(_QueueServiceBase)["_instances"], {-1: worker}, clear=True):  # this one alone
        assert send_each_event_once() == 1, broke("prefect", "services are no longer kept in _instances")
    assert client._reconnection_attempts == 0
