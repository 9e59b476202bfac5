"""A user flow whose agent's tool fails its first N attempts (argv[1]) with one retry allowed."""

import sys

from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, TaskConfig

fails = int(sys.argv[1])


def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
        return ModelResponse(parts=[ToolCallPart("flaky", {})])
    return ModelResponse(parts=[TextPart("ok")])


agent = Agent(FunctionModel(model), name="retry_once")
count = [0]


@agent.tool_plain
def flaky() -> str:
    count[0] += 1
    if count[0] <= fails:
        raise ConnectionError(f"blip {count[0]}")
    return "fine"


durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=1, retry_delay_seconds=0))


@flow
def user_flow() -> str:
    return durable.run_sync("go").output


print(user_flow())
