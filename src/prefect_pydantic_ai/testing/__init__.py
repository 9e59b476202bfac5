"""Test helpers: a real OpenAI-compatible HTTP server that injects faults, and fault plans for scripted steps.

Drive pydantic-ai's real OpenAI client over a loopback socket::

    with LoopbackOpenAI() as server:
        server.reply_tool_calls([("lookup", {"key": "a"})], usage=(10, 2))
        server.fault_status(429, retry_after=1.0)  # the next request is rate limited
        server.reply_text("done", usage=(12, 3))
        server.chunking = Chunking("burst")  # how streamed replies reach the socket (see Chunking)
        agent = Agent(server.openai_model(), tools=[lookup])
        ...
        assert server.request_count == 3

Fail, slow down or SIGKILL a `FunctionModel` or a tool on its Nth call, counted across processes::

    plan = FaultPlan(state_file=tmp_path / "calls.jsonl").kill("lookup", on_call=1)
    env = {**os.environ, **plan.to_env()}  # the subprocess calls FaultPlan.from_env()
    ...
    await plan.hit("lookup")  # first line of the tool

or give a run the plan as a capability, which wraps every model request and tool call inside its durable step::

    await durable.run(prompt, capabilities=[FaultInjection(plan)])

`CallLog` counts calls of named steps across processes (one fsync'ed JSON line per call).

Replay a run exported with `prefect-pydantic-ai export RUN -o run.json` as the model and the tools' results, with
no server and no network (`CassetteMismatch`, a diff, when the agent asks for something else)::

    replay = Cassette.load("run.json").replay()
    result = await agent.run(prompt, capabilities=[replay])  # each agent run of the cassette gets the same replay
    replay.assert_done()
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cassette import Cassette as Cassette
    from .cassette import CassetteMismatch as CassetteMismatch
    from .cassette import CassetteReplay as CassetteReplay
    from .cassette import RecordedRun as RecordedRun
from .faults import (
    ENV_VAR,
    TRANSPORTABLE_EXCEPTIONS,
    CallLog,
    CallLogEntry,
    Fault,
    FaultPlan,
    wrap_function_model,
)
from .injection import FaultInjection
from .openai_server import (
    Chunking,
    CutStreamFault,
    DelayFault,
    Exchange,
    JsonReply,
    LoopbackOpenAI,
    MalformedJsonFault,
    RecordedRequest,
    ResetFault,
    Responder,
    Scripted,
    StatusFault,
    TextReply,
    ToolCallsReply,
    Usage,
)

__all__ = [
    "ENV_VAR",
    "TRANSPORTABLE_EXCEPTIONS",
    "CallLog",
    "CallLogEntry",
    "Cassette",
    "CassetteMismatch",
    "CassetteReplay",
    "Chunking",
    "CutStreamFault",
    "DelayFault",
    "Exchange",
    "Fault",
    "FaultInjection",
    "FaultPlan",
    "JsonReply",
    "LoopbackOpenAI",
    "MalformedJsonFault",
    "RecordedRequest",
    "RecordedRun",
    "ResetFault",
    "Responder",
    "Scripted",
    "StatusFault",
    "TextReply",
    "ToolCallsReply",
    "Usage",
    "wrap_function_model",
]


def __getattr__(name: str) -> Any:
    """The cassette names, imported on first use: they import Prefect, which the fault helpers do not need."""
    if name in ("Cassette", "CassetteMismatch", "CassetteReplay", "RecordedRun"):
        from . import cassette

        return getattr(cassette, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
