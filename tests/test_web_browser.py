"""The durable chat page in a real headless Chromium (Debian's, driven by Playwright as tests/test_ui_browser.py
does): tokens stream as they come; a tab closed mid-answer and opened again continues from its offset with nothing
lost or doubled; a server SIGKILLed mid-turn and started again is reconnected to by the page, which completes the
turn with each call executed once and marks ⚡ each call the resumed attempt replayed; a refund is approved on the
page's card.

Screenshots go to $PPA_SCREENSHOTS (default: the test's temporary directory).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_pydantic_ai.testing import LoopbackOpenAI
from tests import test_ui_browser
from tests.chat_server import ChatServer, serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        test_ui_browser.CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)"
    ),
]

ANSWER = " ".join(f"token{n}" for n in range(60))
WAIT = 60_000
"""Milliseconds an expectation waits (Playwright's default, 5 s, is short for a loaded CI machine)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackOpenAI, ChatServer]]:
    with serving(tmp_path_factory.mktemp("chat"), pause=0.05) as both:
        yield both


@pytest.fixture
def browser_page() -> Iterator[object]:
    """A page in a browser context of its own, where a second page (a reopened tab) shares its storage."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=test_ui_browser.CHROMIUM, args=test_ui_browser.CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1100, "height": 800})
        yield context.new_page()
        browser.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("PPA_SCREENSHOTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _open(page: object, chat: ChatServer, conversation: str) -> object:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    page.goto(f"{chat.url}/?c={conversation}")
    expect(page.locator("body[data-ready='1']")).to_have_count(1, timeout=WAIT)
    return page


def _send(page: object, message: str) -> None:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    page.fill("#message", message)
    page.press("#message", "Enter")


def test_tokens_stream_and_a_reopened_tab_continues_the_answer(
    served: tuple[LoopbackOpenAI, ChatServer], browser_page: object, shots: Path
) -> None:
    from playwright.sync_api import Page, expect

    model, chat = served
    model.reply_text(ANSWER, usage=(200, 60))
    conversation = "b" + uuid.uuid4().hex[:8]
    page = _open(browser_page, chat, conversation)
    assert isinstance(page, Page)
    _send(page, "Count to sixty.")
    text = page.locator(".assistant .text")
    # tokens arrive while the answer is still being written
    expect(text).to_contain_text("token3", timeout=WAIT)
    partial = text.inner_text()
    assert "token59" not in partial
    page.screenshot(path=str(shots / "chat-streaming.png"))
    page.close()  # the tab closes mid-answer

    reopened = _open(page.context.new_page(), chat, conversation)
    assert isinstance(reopened, Page)
    expect(reopened.locator(".assistant[data-done='1']")).to_have_count(1, timeout=WAIT)
    assert int(reopened.locator("body").get_attribute("data-resumed-from") or 0) > 0  # asked from its offset
    assert reopened.locator(".assistant .text").all_inner_texts() == [ANSWER]  # nothing lost, nothing doubled
    expect(reopened.locator(".ledger")).to_contain_text("1 model", timeout=WAIT)
    reopened.screenshot(path=str(shots / "chat-reopened.png"))


def test_the_page_recovers_from_a_server_killed_mid_turn(
    served: tuple[LoopbackOpenAI, ChatServer], browser_page: object, shots: Path
) -> None:
    from playwright.sync_api import Page, expect

    model, chat = served
    model.reply_tool_calls([("order_status", {"order_id": 7})], usage=(100, 10))
    model.reply_text(ANSWER, usage=(200, 60))  # cut by the kill
    model.reply_text(ANSWER, usage=(200, 60))  # sent again by the resumed run
    requests, calls = model.request_count, chat.calls.counts()
    page = _open(browser_page, chat, "k" + uuid.uuid4().hex[:8])
    assert isinstance(page, Page)
    _send(page, "Where is order 7?")
    expect(page.locator(".assistant .text")).to_contain_text("token4", timeout=WAIT)
    chat.kill()
    page.screenshot(path=str(shots / "chat-server-killed.png"))
    chat.start()

    expect(page.locator(".assistant[data-done='1']")).to_have_count(1, timeout=WAIT)
    assert page.locator(".assistant .text").all_inner_texts() == [ANSWER]
    expect(page.locator(".tool.executed")).to_have_count(1, timeout=WAIT)
    # the resumed attempt answered the tool-call request and the tool call from the journal: ⚡ on each
    expect(page.locator(".tool.executed[data-replayed='1'] .replay")).to_have_text("⚡ replayed")
    model_replayed = page.locator(".replayed.model")
    expect(model_replayed).to_have_text("⚡ model request 1 (gpt-4o) replayed from the journal")
    assert page.locator(".assistant > *").evaluate_all(  # the model request's line comes before its call
        "els => els.map((e) => e.className).filter((c) => c.includes('replayed') || c.startsWith('tool'))"
    ) == ["replayed model", "tool executed"]
    page.screenshot(path=str(shots / "chat-recovered.png"))
    assert chat.calls.counts() - calls == {"order_status": 1}
    assert [e.status for e in model.exchanges[requests:]] == [200, None, 200]  # only the cut answer twice


def test_a_refund_is_approved_on_the_page(
    served: tuple[LoopbackOpenAI, ChatServer], browser_page: object, shots: Path
) -> None:
    from playwright.sync_api import Page, expect

    model, chat = served
    model.reply_tool_calls([("refund", {"order_id": 42})], usage=(100, 10))
    model.reply_text("Order 42 is refunded.", usage=(120, 8))
    requests, calls = model.request_count, chat.calls.counts()
    page = _open(browser_page, chat, "a" + uuid.uuid4().hex[:8])
    assert isinstance(page, Page)
    _send(page, "Please refund order 42.")
    card = page.locator(".approval")
    expect(card).to_contain_text("refund(order_id=42)", timeout=WAIT)
    page.screenshot(path=str(shots / "chat-approval-card.png"))
    card.locator("button.approve").click()

    expect(card).to_have_attribute("data-decided", "approved", timeout=WAIT)
    expect(page.locator(".assistant[data-done='1']")).to_have_count(1, timeout=WAIT)
    assert page.locator(".assistant .text").all_inner_texts() == ["Order 42 is refunded."]
    page.screenshot(path=str(shots / "chat-approved.png"))
    assert chat.calls.counts() - calls == {"refund": 1}
    assert model.request_count - requests == 2
