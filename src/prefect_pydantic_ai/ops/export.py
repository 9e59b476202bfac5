"""Exporting a run as a cassette: one self-contained, readable JSON file of its steps, in order.

A cassette holds the run's prompt, deps and metadata, and per step what the journal holds: a model step's
request (what was new in it: the prompt, the tool results) and its response in pydantic-ai's own message schema,
a tool step's call (name and arguments) and its result. `prefect_pydantic_ai.testing.Cassette` replays it in a
test as the model and the tools, with no Prefect server and no network.
"""

from __future__ import annotations

from typing import Any

from pydantic_ai.messages import ModelResponse, ToolCallPart

from prefect_pydantic_ai.durable.journal import JournalCorruptError, load_response, unseal
from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.ops.resume import records_of
from prefect_pydantic_ai.ops.runs import resolve_run, state_of
from prefect_pydantic_ai.store.prefect_rest import prefect_api
from prefect_pydantic_ai.store.records import AttemptRecord, RunRecord, StepRef, read_journal_entry

CASSETTE_FORMAT = "prefect-pydantic-ai/cassette/1"


async def export_run(ref: str) -> dict[str, Any]:
    """The cassette of run `ref` (its one agent run): the steps of its latest attempt that ended."""
    async with prefect_api() as api:
        flow_run = await resolve_run(api, ref)
    records = [r for r in await records_of(flow_run) if r.parent_step is None]
    if len(records) != 1:
        raise RunError(
            f"Run {flow_run.id} holds {len(records)} agent runs ({', '.join(r.agent for r in records)}); a cassette "
            "holds one. Export a run of one agent."
        )
    record = records[0]
    attempt = _last_indexed(record)
    if attempt is None:
        raise RunError(
            f"Run {flow_run.id} has no attempt that ended with its steps recorded (a killed attempt records none, "
            "and runs from before this version neither): resume it, then export it."
        )
    return {
        "format": CASSETTE_FORMAT,
        "run_id": str(flow_run.id),
        "agent": record.agent,
        "state": state_of(flow_run),
        "prompt": record.prompt,
        "deps": record.deps,
        "metadata": record.metadata,
        "redacted": record.redacted,
        "output": attempt.output,
        "error": attempt.error,
        "steps": await _steps(flow_run.id, record, attempt.steps),
    }


def _last_indexed(record: RunRecord) -> AttemptRecord | None:
    ended = [a for a in record.attempts if a.state != "running" and a.steps]
    return ended[-1] if ended else None


async def _steps(flow_run_id: Any, record: RunRecord, index: list[StepRef]) -> list[dict[str, Any]]:
    """Each step's cassette entry; a tool step gets its arguments from the model response that asked for it."""
    steps: list[dict[str, Any]] = []
    asked: list[ToolCallPart] = []  # the calls of the last model response not matched to a tool step yet
    results: list[dict[str, Any]] = []  # what the tool steps since the last model step returned
    for ref in sorted(index, key=lambda s: s.ordinal):
        entry = await read_journal_entry(ref.key)
        if entry is None:
            raise RunError(
                f"Step #{ref.ordinal} ({ref.kind} {ref.name}) of run {flow_run_id} has no journal entry any more "
                f"(key {ref.key}); it cannot be exported."
            )
        try:
            data = unseal(entry, ref.kind)
        except JournalCorruptError as exc:
            raise RunError(
                f"Step #{ref.ordinal} of run {flow_run_id} has a corrupt journal entry: {exc}."
            ) from None
        if ref.kind == "model":
            response: ModelResponse = load_response(data)
            request = [{"user_prompt": record.prompt}] if not steps else results
            steps.append(
                {
                    "step": ref.ordinal,
                    "kind": "model",
                    "model": ref.name,
                    "request": request,
                    "response": data,
                }
            )
            asked = [p for p in response.parts if isinstance(p, ToolCallPart)]
            results = []
        else:
            call = next((c for c in asked if c.tool_name == ref.name), None)
            if call is not None:
                asked.remove(call)
            steps.append(
                {
                    "step": ref.ordinal,
                    "kind": "tool",
                    "tool": ref.name,
                    "args": call.args_as_dict() if call is not None else None,
                    "result": data,
                }
            )
            if (seen := request_part(ref.name, data)) is not None:
                results.append(seen)
    return steps


def request_part(tool: str, outcome: dict[str, Any]) -> dict[str, Any] | None:
    """What a tool step's outcome puts in the next model request, as a cassette writes it (None: nothing)."""
    match outcome.get("outcome"):
        case "return":
            return {"tool": tool, "content": outcome["value"]}
        case "tool_return":
            return {"tool": tool, "content": outcome["value"].get("return_value")}
        case "retry":
            return {"tool": tool, "retry": outcome["message"]}
    return None
