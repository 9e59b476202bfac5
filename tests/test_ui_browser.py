"""A real browser opens the local Prefect UI for a finished run: the task names and the cost artifact are there.

Headless Chromium comes from Debian's packages (`.ci/run` installs it); Playwright drives it without
downloading a browser of its own. Skipped, saying why, only when no Chromium is installed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from prefect_pydantic_ai import PrefectAgent, show_run
from tests.warm import python

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)"),
]


@pytest.fixture
def browser_page() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


@pytest.fixture
def finished_run() -> str:
    """A completed agent run (made before the browser starts: Playwright's sync API owns an event loop)."""
    import asyncio

    key = f"ui-{uuid.uuid4().hex[:6]}"

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        usage = RequestUsage(input_tokens=1000, output_tokens=50)
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("fetch_report", {"quarter": "Q4"})], usage=usage)
        return ModelResponse(parts=[TextPart("Q4 looks fine")], usage=usage)

    agent: Agent[None, str] = Agent(FunctionModel(model, model_name="gpt-4o"), name="ui_checked")

    @agent.tool_plain
    def fetch_report(quarter: str) -> str:
        return f"{quarter}: 42 sales"

    async def go() -> str:
        await PrefectAgent(agent).run("Summarise Q4", idempotency_key=key)
        return (await show_run(key)).run_id

    return asyncio.run(go())


def test_prefect_ui_shows_the_step_tasks_and_the_cost_artifact(
    finished_run: str, browser_page: object
) -> None:
    from playwright.sync_api import Page, expect

    page = browser_page
    assert isinstance(page, Page)
    run_id = finished_run
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    page.goto(f"{ui}/runs/flow-run/{run_id}")

    page.get_by_text("Task Runs", exact=True).first.click()
    expect(page.get_by_text("tool #2: fetch_report @").first).to_be_visible()
    expect(page.get_by_text("model #1: gpt-4o @").first).to_be_visible()

    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("what ui_checked spent and what replay saved").first.click()
    expect(page.get_by_text("ui_checked: spent vs saved by replay")).to_be_visible()
    expect(page.get_by_text("Q4 looks fine").first).to_be_visible()  # the whole artifact has rendered
    body = page.inner_text("body")
    assert "Model calls\t2\t0" in body and "Tool calls\t1\t0" in body
    assert "$0.0" in body and "Q4 looks fine" in body


def test_prefect_ui_resume_form_approves_a_waiting_run(tmp_path: object, browser_page: object) -> None:
    """The paused run's Resume form in the Prefect UI is the decision: submitted, the run continues and
    completes, with the approved call executed once."""
    from pathlib import Path

    from playwright.sync_api import Page, expect

    from prefect_pydantic_ai.testing import CallLog

    page = browser_page
    assert isinstance(page, Page)
    calls = CallLog(Path(str(tmp_path)) / "calls.jsonl")
    env = {"APPROVAL_CALLS": str(calls.path)}
    script = Path(__file__).parent / "scripts" / "approval.py"
    first = python(str(script), f"ui-approve-{uuid.uuid4().hex[:6]}", env=env)
    assert first.stdout.startswith("AWAITING "), first.stdout + first.stderr
    run_id = first.stdout.split()[1]
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    page.goto(f"{ui}/runs/flow-run/{run_id}")
    page.get_by_role("button", name="Resume").first.click()
    expect(page.get_by_text("Approve refund(order_id=42)").first).to_be_visible()
    page.get_by_role("button", name="Submit").last.click()
    # a script's run has no worker: the decision is stored and `resume` continues it
    resumed = python("-m", "prefect_pydantic_ai", "resume", run_id, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    page.reload()
    expect(page.get_by_text("Completed").first).to_be_visible()
    assert calls.counts() == {"model": 2, "refund": 1}
