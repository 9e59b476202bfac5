"""Agent delegation: a coordinator whose `delegate` tool runs a durable researcher, as a script that can be killed.

`delegation.py KEY SHAPE` runs the coordinator under idempotency key KEY, where SHAPE is
- `one`: one delegation (the researcher: model → lookup → model);
- `parallel`: two delegations in one coordinator response (topics "a" and "b"; the researcher's calls are
  counted as `researcher:model:a`, `researcher:lookup:b`...);
- `twice`: one delegation that runs the researcher twice, one run after the other, with the same prompt;
- `iter`: one delegation that drives the researcher through `iter()`;
- `output`: the coordinator's output function `deliver` delegates (instead of the `delegate` tool);
- `nested`: one delegation whose researcher itself delegates to a fact checker (model → source → model) from its
  `verify` tool, two levels deep.
Every model and tool call (and the moment `delegate` got the researcher's output back, `coordinator:returned`)
counts a call in the fault plan of $PPA_FAULT_PLAN (a `FaultPlan` with a state file), which SIGKILLs the process
at the planned call. Each model response reports usage (`10·call + agent` input tokens, 1 output token).
$DELEGATION_KILL_AFTER=`agent:kind:N` SIGKILLs the process right after the Nth executed step of that kind of that
agent was journaled (between a model call and the tool call it asked for). Prints `OUTPUT {json}` with the output,
the usage and the coordinator's ledger.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import Counter
from typing import Any

from pydantic_ai import Agent, ToolOutput
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from prefect_pydantic_ai import PrefectAgent, TaskConfig, ledger_of
from prefect_pydantic_ai.durable.steps import StepEvent, observe_steps
from prefect_pydantic_ai.testing import FaultPlan

PLAN = FaultPlan.from_env()
SHAPE = sys.argv[2] if len(sys.argv) > 2 else "one"
_TOKENS = {"coordinator": 1, "researcher": 2, "fact_checker": 3}
_executed: Counter[str] = Counter()


def _kill_after(event: StepEvent) -> None:
    if event.replayed or event.error:
        return
    _executed[f"{event.agent}:{event.kind}"] += 1
    agent_kind, _, number = os.environ["DELEGATION_KILL_AFTER"].rpartition(":")
    if _executed[agent_kind] == int(number):
        os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("DELEGATION_KILL_AFTER"):
    observe_steps(_kill_after)


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]


def _topic(messages: list[ModelMessage]) -> str:
    prompt = messages[0].parts[-1]
    return str(getattr(prompt, "content", "")).rsplit(" ", 1)[-1]


def _named(name: str, topic: str) -> str:
    """A call's name in the plan; in the `parallel` shape the researcher's calls also name their topic."""
    return f"{name}:{topic}" if SHAPE == "parallel" and name.startswith("researcher:") else name


def _reply(agent: str, parts: list[Any], topic: str = "") -> ModelResponse:
    number = PLAN.hit_sync(_named(f"{agent}:model", topic))
    return ModelResponse(
        parts=parts, usage=RequestUsage(input_tokens=10 * number + _TOKENS[agent], output_tokens=1)
    )


def coordinator_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    if SHAPE == "output":
        return _reply("coordinator", [ToolCallPart(info.output_tools[0].name, {"topic": "a"})])
    if not returns:
        topics = ["a", "b"] if SHAPE == "parallel" else ["a"]
        return _reply("coordinator", [ToolCallPart("delegate", {"topic": t}) for t in topics])
    return _reply("coordinator", [TextPart(" | ".join(str(r.content) for r in returns))])


def researcher_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    topic = _topic(messages)
    if not returns:
        tool = "verify" if SHAPE == "nested" else "lookup"
        return _reply("researcher", [ToolCallPart(tool, {"topic": topic})], topic)
    return _reply("researcher", [TextPart(f"findings on {topic}: {returns[0].content}")], topic)


def fact_checker_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    if not returns:
        return _reply("fact_checker", [ToolCallPart("source", {"topic": _topic(messages)})])
    return _reply("fact_checker", [TextPart(f"checked {returns[0].content}")])


fact_checker_agent = Agent(
    FunctionModel(fact_checker_policy, model_name="checker-scripted"), name="fact_checker"
)


@fact_checker_agent.tool_plain
async def source(topic: str) -> str:
    await PLAN.hit("fact_checker:source")
    return f"source of {topic}"


fact_checker = PrefectAgent(fact_checker_agent, tool_task_config=TaskConfig(retries=0))

researcher_agent = Agent(
    FunctionModel(researcher_policy, model_name="researcher-scripted"), name="researcher"
)


@researcher_agent.tool_plain
async def lookup(topic: str) -> str:
    await PLAN.hit(_named("researcher:lookup", topic))
    return f"fact {topic}"


@researcher_agent.tool_plain
async def verify(topic: str) -> str:
    await PLAN.hit("researcher:verify")
    return str((await fact_checker.run(f"Check {topic}")).output)


researcher = PrefectAgent(researcher_agent, tool_task_config=TaskConfig(retries=0))


async def delegate(topic: str) -> str:
    """Run the researcher on `topic`: the coordinator's `delegate` tool, or its output function `deliver`."""
    await PLAN.hit("coordinator:deliver" if SHAPE == "output" else "coordinator:delegate")
    if SHAPE == "iter":
        async with researcher.iter(f"Research {topic}") as run:
            async for _ in run:
                pass
        assert run.result is not None
        output = str(run.result.output)
    else:
        output = str((await researcher.run(f"Research {topic}")).output)
    if SHAPE == "twice":
        output += " & " + str((await researcher.run(f"Research {topic}")).output)
    await PLAN.hit("coordinator:returned")
    return output


coordinator_agent = Agent(
    FunctionModel(coordinator_policy, model_name="coordinator-scripted"),
    name="coordinator",
    output_type=ToolOutput(delegate, name="deliver") if SHAPE == "output" else str,
)
if SHAPE != "output":
    coordinator_agent.tool_plain(delegate)

coordinator = PrefectAgent(coordinator_agent, tool_task_config=TaskConfig(retries=0))


if __name__ == "__main__":
    result = coordinator.run_sync("Coordinate", idempotency_key=sys.argv[1])
    usage = result.usage
    ledger = ledger_of(result)
    assert ledger is not None
    print(
        "OUTPUT "
        + json.dumps(
            {
                "output": result.output,
                "usage": [usage.requests, usage.input_tokens, usage.output_tokens, usage.tool_calls],
                "ledger": ledger.model_dump(mode="json", include={"spent", "saved", "sub_agents"}),
            }
        )
    )
