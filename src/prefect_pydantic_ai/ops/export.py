"""Exporting a run as a cassette: one self-contained, readable JSON file of its agent runs' steps, in order.

A cassette holds every agent run of the flow run: the agents a user's `@flow` ran, and the sub-agents their
tools delegated to (`within` names the run and the step that started one). Per agent run it holds the prompt,
deps and metadata, and per step what the journal holds: a model step's request (what was new in it: the prompt,
the tool results) and its response in pydantic-ai's own message schema, a tool step's call (name and arguments)
and its result. A streamed request is journaled as its complete response, so it is exported like any other.
`prefect_pydantic_ai.testing.Cassette` replays it in a test as the models and the tools, with no Prefect server
and no network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic_ai.messages import ModelResponse, ToolCallPart

from prefect_pydantic_ai.durable.journal import JournalCorruptError, load_response, unseal
from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.infra.server import ensure_api
from prefect_pydantic_ai.ops.resume import records_of
from prefect_pydantic_ai.ops.runs import resolve_run, state_of
from prefect_pydantic_ai.store.prefect_rest import ApiFlowRun, prefect_api, tag_values
from prefect_pydantic_ai.store.records import (
    AttemptRecord,
    RunRecord,
    StepRef,
    read_journal_entry,
    read_record,
)

CASSETTE_FORMAT = "prefect-pydantic-ai/cassette/2"
"""Format 2 holds a list of agent runs (`runs`); format 1, one agent run's fields at the top level, is still read."""


async def export_run(ref: str, output: str | Path | None = None) -> dict[str, Any]:
    """The cassette of run `ref` (a flow run id, unique prefix or idempotency key), written to `output` when
    given: each of its agent runs with the steps of its latest attempt that ended, a sub-agent run after the
    run that started it.

    Raises `RunError` (one line naming the run and what to do) when the run is unknown, holds no run record
    here, was killed and never resumed (no attempt recorded its steps), a step's entry is gone (`gc`), or
    `output` cannot be written."""
    ensure_api()  # no server configured: the persistent local one the runs were recorded in
    async with prefect_api() as api:
        flow_run = await resolve_run(api, ref)
    runs: list[dict[str, Any]] = []
    for record in await records_of(flow_run):
        await _add_run(flow_run, record, None, runs)
    document = {
        "format": CASSETTE_FORMAT,
        "run_id": str(flow_run.id),
        "state": state_of(flow_run),
        "runs": runs,
    }
    if output is not None:
        try:
            Path(output).write_text(cassette_json(document))
        except OSError as exc:
            raise RunError(f"Cannot write the cassette to {output}: {exc.strerror or exc}.") from None
    return document


def cassette_json(document: dict[str, Any]) -> str:
    """A cassette as its file holds it: indented JSON, text as written."""
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


async def _add_run(
    flow_run: ApiFlowRun, record: RunRecord, within: dict[str, int] | None, runs: list[dict[str, Any]]
) -> None:
    """Add `record`'s agent run to `runs`, then the sub-agent runs each of its tool steps started, depth first."""
    attempt = _last_indexed(record)
    if attempt is None:
        raise RunError(
            f"Agent run {record.agent!r} of run {flow_run.id} has no attempt that ended with its steps recorded "
            "(a killed attempt records none, and runs from before this version neither): resume it, then export it."
        )
    index = len(runs)
    runs.append(
        {
            "agent": record.agent,
            "ordinal": record.ordinal,
            "within": within,
            "prompt": record.prompt,
            "deps": record.deps,
            "metadata": record.metadata,
            "redacted": record.redacted,
            "output": attempt.output,
            "error": attempt.error,
            "steps": await _steps(flow_run.id, record, attempt.steps),
        }
    )
    for step in sorted(attempt.steps, key=lambda s: s.ordinal):
        # a sub-agent runs inside a tool call (or an output function, journaled as one)
        if step.kind != "tool":
            continue
        for agent in tag_values(flow_run, "agent:"):
            ordinal = 0
            while (sub := await read_record(str(flow_run.id), agent, ordinal, step.key)) is not None:
                await _add_run(flow_run, sub, {"run": index, "step": step.ordinal}, runs)
                ordinal += 1


def _last_indexed(record: RunRecord) -> AttemptRecord | None:
    ended = [a for a in record.attempts if a.state != "running" and a.steps]
    return ended[-1] if ended else None


async def _steps(flow_run_id: Any, record: RunRecord, index: list[StepRef]) -> list[dict[str, Any]]:
    """Each step's cassette entry; a tool step gets its arguments from the model response that asked for it."""
    steps: list[dict[str, Any]] = []
    asked: list[ToolCallPart] = []  # the calls of the last model response not matched to a tool step yet
    results: list[dict[str, Any]] = []  # what the tool steps since the last model step returned
    for ref in sorted(index, key=lambda s: s.ordinal):
        data = await _entry(flow_run_id, record, ref)
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
            if (seen := _request_part(ref.name, data)) is not None:
                results.append(seen)
    return steps


async def _entry(flow_run_id: Any, record: RunRecord, ref: StepRef) -> Any:
    """The journaled data of step `ref` of `record`'s agent run, or `RunError` naming the step."""
    entry = await read_journal_entry(ref.key)
    where = f"Step #{ref.ordinal} ({ref.kind} {ref.name}) of agent {record.agent!r} in run {flow_run_id}"
    if entry is None:
        raise RunError(f"{where} has no journal entry any more (key {ref.key}); it cannot be exported.")
    try:
        return unseal(entry, ref.kind)
    except JournalCorruptError as exc:
        raise RunError(f"{where} has a corrupt journal entry: {exc}.") from None


def _request_part(tool: str, outcome: dict[str, Any]) -> dict[str, Any] | None:
    """What a tool step's outcome puts in the next model request, as a cassette writes it (None: nothing)."""
    match outcome.get("outcome"):
        case "return":
            return {"tool": tool, "content": outcome["value"]}
        case "tool_return":
            return {"tool": tool, "content": outcome["value"].get("return_value")}
        case "retry":
            return {"tool": tool, "retry": outcome["message"]}
    return None
