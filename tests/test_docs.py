"""The docs are code: every fenced block of README.md and docs/*.md is checked here, so the docs cannot drift.

Each block is one test per check, its id `file:line` (the line of the opening fence). What a block gets:

- a ``python`` block is executed (`ast.PyCF_ALLOW_TOP_LEVEL_AWAIT`: a block with top-level ``await`` runs as a
  coroutine). Every executed block runs with ``OPENAI_BASE_URL``/``OPENAI_API_KEY`` pointing the real OpenAI
  client at a `LoopbackOpenAI` on 127.0.0.1, so a block naming ``"openai:gpt-4o"`` never reaches the network, and
  a `result` it leaves must be what that server answered. A ``print`` followed by comment lines must print what
  the comments show (``…`` stands for anything). ``f(...)`` stands for the reader's own arguments: it runs as
  ``f()``.
- a shell block (``bash``, ``sh``, ``console`` or no language) has every command line checked (`check_commands`):
  the module, subcommand or ``dev.py`` command it names exists, and every ``--flag`` written (in the command or its
  comment) is an option of that command (``--help`` through `tests.commands.cli` for ``prefect-pydantic-ai``, the
  example's own argparse parser for ``python -m examples.X``); ``export``ed variables are settings that accept the
  value; ``pip install`` extras exist. A line it cannot check fails, unless a prelude runs the block for real.

A marker comment right before a block (blank lines between are allowed) says more:

- ``<!-- docs-test: prelude=NAME -->``: the block runs in the environment `PRELUDES[NAME]` (the names it
  provides and what it checks afterwards are listed there). A shell block with a prelude is run by bash.
- ``<!-- docs-test: excerpt-of=PATH -->``: a fragment; its lines appear, contiguous and in order, in PATH
  (whitespace-normalised per line).
- ``<!-- docs-test: output=NAME -->``: an output sample; `OUTPUTS[NAME]` produces the real output, which must
  read the same (whitespace-normalised).
- ``<!-- docs-test: output, REASON -->`` / ``<!-- docs-test: external, REASON -->``: not checkable here; the
  reason is required. (None is in use: keep it that way where a block can be checked.)

A block of any other language, or with a marker this file does not know, fails `test_every_block_is_checked`.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import tomllib
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import CodeType
from typing import Any
from unittest import mock

import httpx
import pytest

from tests.commands import cli
from tests.test_patterns import registered

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console", ""}


# -- the parser ----------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language (the info string's first word), its text and its marker."""

    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str | None  # the body of the `<!-- docs-test: ... -->` comment before it

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    def lines(self) -> Iterator[tuple[int, str]]:
        """(markdown line number, line) of each line of the block's text."""
        for offset, line in enumerate(self.text.splitlines()):
            yield self.line + 1 + offset, line


def parse_blocks(path: str, text: str) -> list[Block]:
    """Every fenced block of a Markdown text (CommonMark fences: ``` or ~~~, at most 3 spaces of indent)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    number = 0
    while number < len(lines):
        opening = _FENCE.match(lines[number])
        if opening is None:
            number += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = number + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path}:{number + 1}: the fence opened here is never closed")
        body = [line[min(indent, len(line) - len(line.lstrip(" "))) :] for line in lines[number + 1 : end]]
        words = opening["info"].split()
        blocks.append(
            Block(
                path,
                number + 1,
                words[0].lower() if words else "",
                "\n".join(body) + "\n" if body else "",
                _marker_before(lines, number),
            )
        )
        number = end + 1
    return blocks


def _marker_before(lines: list[str], fence: int) -> str | None:
    before = fence - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    match = _MARKER.match(lines[before]) if before >= 0 else None
    return match["body"] if match else None


def all_blocks() -> list[Block]:
    return [
        block
        for file in DOC_FILES
        for block in parse_blocks(file.relative_to(ROOT).as_posix(), file.read_text(encoding="utf-8"))
    ]


BLOCKS = all_blocks()


@dataclass(frozen=True)
class Marker:
    kind: str  # "prelude", "excerpt-of", "output", "unchecked" (output or external, with a reason), "" (none)
    arg: str = ""  # the prelude's or output's NAME, the excerpt's PATH, or the reason


def marker_of(block: Block) -> Marker:
    if block.marker is None:
        return Marker("")
    if match := re.fullmatch(r"(prelude|excerpt-of|output)=(\S+)", block.marker):
        return Marker(match[1], match[2])
    if match := re.fullmatch(r"(output|external)\s*(?:,\s*(.*))?", block.marker):
        return Marker("unchecked", (match[2] or "").strip())
    raise AssertionError(f"{block.id}: unknown marker <!-- docs-test: {block.marker} -->")


def _params(kinds: Callable[[Block, Marker], bool], *, runs: bool = False) -> list[Any]:
    """The blocks a check applies to, one param each; a check that `runs` them gets their prelude's marks."""
    params = []
    for block in BLOCKS:
        try:
            marker = marker_of(block)
        except AssertionError:
            continue  # test_every_block_is_checked reports it
        if kinds(block, marker):
            prelude = PRELUDES.get(marker.arg) if runs and marker.kind == "prelude" else None
            marks = prelude.marks if prelude is not None else ()
            params.append(pytest.param(block, id=block.id, marks=marks))
    return params


# -- the loopback OpenAI server every executed block talks to ------------------------------------------------


class _Answers:
    """Answers every unscripted request with a numbered text, and remembers what it answered."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, body: dict[str, Any]) -> Any:
        from prefect_pydantic_ai.testing import TextReply

        text = f"loopback answer {len(self.texts) + 1}"
        self.texts.append(text)
        return TextReply(text, usage=(12, 3))


@contextlib.contextmanager
def loopback_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, _Answers]]:
    """A `LoopbackOpenAI` with `OPENAI_BASE_URL`/`OPENAI_API_KEY` set to it: pydantic-ai's ``"openai:<model>"``
    strings (the README's ``Agent("openai:gpt-4o", ...)``) reach it through the real client's Responses API."""
    from prefect_pydantic_ai.testing import LoopbackOpenAI

    answers = _Answers()
    with LoopbackOpenAI(responder=answers) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "docs-test-loopback")
        yield server, answers


# -- executing a Python block ---------------------------------------------------------------------------------


class _Placeholders(ast.NodeTransformer):
    """`f(...)` (a lone `...` argument) stands for the reader's own arguments: it runs as `f()`."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if not node.keywords and len(node.args) == 1:
            only = node.args[0]
            if isinstance(only, ast.Constant) and only.value is Ellipsis:
                node.args = []
        return node


def compile_block(block: Block) -> CodeType:
    tree = ast.parse(block.text, filename=str(ROOT / block.path))
    tree = ast.fix_missing_locations(_Placeholders().visit(tree))
    ast.increment_lineno(tree, block.line)  # tracebacks name the Markdown line
    return compile(tree, str(ROOT / block.path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def execute(block: Block, namespace: dict[str, Any]) -> str:
    """Run the block in `namespace` (awaiting it if it has top-level `await`); what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        value = eval(compile_block(block), namespace)  # exec-mode code: None, or a coroutine to await
        if inspect.iscoroutine(value):
            asyncio.run(value)
    return out.getvalue()


def printed_comment(block: Block) -> str | None:
    """What the comment lines right after the block's last `print(...)` say it prints, if there are any."""
    tree = ast.parse(block.text)
    prints = [
        node
        for node in tree.body
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "print"
    ]
    if not prints or prints[-1].end_lineno is None:
        return None
    lines = block.text.splitlines()[prints[-1].end_lineno :]
    comment = list(itertools.takewhile(lambda line: line.startswith("#"), lines))
    return " ".join(line.lstrip("#").strip() for line in comment) or None


def _normalised(text: str) -> str:
    return " ".join(text.split())


def matches_with_ellipsis(expected: str, actual: str) -> bool:
    """`actual` reads as `expected`, whitespace-normalised, where `…` in `expected` stands for anything."""
    pattern = ".*?".join(re.escape(part) for part in _normalised(expected).split("…"))
    return re.fullmatch(pattern, _normalised(actual)) is not None


@dataclass
class Run:
    """One executed block: its namespace, what it printed, and the loopback server it talked to."""

    block: Block
    request: pytest.FixtureRequest
    server: Any
    answers: _Answers
    tmp_path: Path
    started: datetime
    namespace: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""


@dataclass(frozen=True)
class Prelude:
    """The environment a block runs in: the names it provides (`setup`) and what is checked afterwards."""

    provides: str
    setup: Callable[[Run], dict[str, Any]] = lambda run: {}
    check: Callable[[Run], None] = lambda run: None
    marks: tuple[Any, ...] = ()


def _agent_flow_runs_since(started: datetime, *, keyed: bool) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime, FlowRunFilterTags

    from prefect_pydantic_ai.store.prefect_rest import TAG

    async def read() -> list[Any]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[TAG]), start_time=FlowRunFilterStartTime(after_=started)
                )
            )
        return [run for run in runs if not keyed or any(tag.startswith("key:") for tag in run.tags)]

    return asyncio.run(read())


def _delete_flow_runs(runs: list[Any]) -> None:
    from prefect import get_client

    async def delete() -> None:
        async with get_client() as client:
            for run in runs:
                await client.delete_flow_run(run.id)

    asyncio.run(delete())


# -- the preludes ---------------------------------------------------------------------------------------------


def _readme_names(run: Run) -> dict[str, Any]:
    from pydantic_ai import Agent

    from prefect_pydantic_ai import PrefectAgent, TaskConfig
    from prefect_pydantic_ai.demo.analyst import sales_dataset

    def send_email(to: str, body: str) -> str:
        """E-mail the report."""
        return f"sent to {to}"

    def cheap_lookup(key: str) -> str:
        """Look a figure up."""
        return f"{key}: 42"

    return {
        "Agent": Agent,
        "PrefectAgent": PrefectAgent,
        "TaskConfig": TaskConfig,
        "df": sales_dataset(),
        "send_email": send_email,
        "cheap_lookup": cheap_lookup,
    }


def _keyed_run(run: Run, key: str) -> Any:
    """The one completed flow run of logical run `key` that the block started."""
    runs = [r for r in _agent_flow_runs_since(run.started, keyed=True) if f"key:{key}" in r.tags]
    assert len(runs) == 1, [r.tags for r in runs]
    assert runs[0].state_type.value == "COMPLETED"
    return runs[0]


def _check_use_it(run: Run) -> None:
    from tests.test_task_config import BY_NAME, MODEL_CONFIG, TOOL_CONFIG

    agent = run.namespace["prefect_agent"]
    # the configs are the ones tests/test_task_config.py checks the layering of
    assert agent.model_task_config == MODEL_CONFIG and agent.tool_task_config == TOOL_CONFIG
    tools = agent.durability.tool_tasks
    assert tools.config_of("send_email") == BY_NAME["send_email"] and tools.config_of("cheap_lookup") is None
    assert run.answers.texts == ["loopback answer 1", "loopback answer 2"]  # two runs, each executed live
    assert [body["model"] for body in run.server.requests] == ["gpt-4o", "gpt-4o"]
    assert "agent:data_analyst" in _keyed_run(run, "q4-report").tags  # the second run, keyed


def _check_capability(run: Run) -> None:
    from pydantic_ai import Agent

    from prefect_pydantic_ai import PrefectDurability

    agent = run.namespace["agent"]
    assert isinstance(agent, Agent) and agent.name == "data_analyst"
    assert any(isinstance(c, PrefectDurability) for c in agent.root_capability.capabilities)
    assert run.answers.texts == ["loopback answer 1"]  # executed live, not a re-call of another block's run
    assert "agent:data_analyst" in _keyed_run(run, "q4-report").tags  # `with idempotency_key(...)` keyed it


_CONFIG_SAYS = re.compile(r'^\s*"(?P<tool>\w+)": TaskConfig\(.*\),\s*# -> (?P<says>.+?)\s*$')
_PHRASES = {
    r"retries=(\d+)": lambda m: {"retries": int(m[1])},
    r"delays (\[[^\]]*\])": lambda m: {"retry_delay_seconds": ast.literal_eval(m[1])},
    r"timeout (\d+(?:\.\d+)?)": lambda m: {"timeout_seconds": float(m[1])},
    r"(\d+(?:\.\d+)?) s between attempts": lambda m: {"retry_delay_seconds": float(m[1])},
}


def config_said(says: str) -> dict[str, Any]:
    """The effective config a `# -> ...` comment states: a dict literal, or phrases such as
    `retries=2, delays [0.5, 1.0], timeout 120` and `retries=5, 10 s between attempts`."""
    if says.startswith("{"):
        return dict(ast.literal_eval(says))
    config: dict[str, Any] = {}
    rest = says
    while rest:
        for phrase, value in _PHRASES.items():
            if match := re.match(phrase + r"(?:, |$)", rest):
                config.update(value(match))
                rest = rest[match.end() :]
                break
        else:
            raise AssertionError(f"cannot read the config comment at {rest!r}")
    return config


def _check_per_tool_configs(run: Run) -> None:
    from prefect_pydantic_ai.durable.tool_step import ToolTasks
    from tests.test_task_config import TOOL_CONFIG  # the README's `tool_task_config`, checked there

    said = {
        m["tool"]: config_said(m["says"]) for _, line in run.block.lines() if (m := _CONFIG_SAYS.match(line))
    }
    by_name = run.namespace["tool_task_config_by_name"]
    assert set(said) == set(by_name), "every per-tool config of the block says what it gives"
    tasks = ToolTasks(TOOL_CONFIG, by_name, agent="data_analyst")
    for tool, config in said.items():
        assert dict(tasks.config_of(tool) or {}) == config, tool


def _check_openai_client(run: Run) -> None:
    from openai import AsyncOpenAI

    from prefect_pydantic_ai import PrefectAgent

    client = run.namespace["client"]
    assert isinstance(client, AsyncOpenAI) and client.max_retries == 0  # the SDK's retry loop is off
    assert str(client.base_url).startswith(run.server.base_url)  # the environment pointed it at the loopback
    agent = run.namespace["agent"]
    assert isinstance(agent, PrefectAgent)
    result = asyncio.run(agent.run("How did Q4 go?"))
    assert result.output == run.answers.texts[-1] and run.server.request_count == 1


def _durable_names(run: Run) -> dict[str, Any]:
    from pydantic_ai import Agent

    from prefect_pydantic_ai import PrefectAgent, TaskConfig

    def search(query: str) -> str:
        """Search the notes."""
        return f"3 notes about {query}"

    run.server.reply_tool_calls([("search", {"query": "retries"})], usage=(20, 5))
    run.server.reply_text("Found 3 notes about retries.", usage=(30, 8))
    agent: Agent[None, str] = Agent(
        "openai:gpt-4o", name=f"docs_durable_{uuid.uuid4().hex[:6]}", tools=[search]
    )
    return {"durable": PrefectAgent(agent, tool_task_config=TaskConfig(retries=1, retry_delay_seconds=0))}


def _check_durable(run: Run) -> None:
    assert run.namespace["result"].output == "Found 3 notes about retries."
    assert run.server.request_count == 2  # the tool's retry asked the model nothing again


def _triage_names(run: Run) -> dict[str, Any]:
    from examples.triage_ticket import SAMPLE_TICKETS, triage_ticket
    from tests.test_patterns import flow_run_id, task_run_names

    async def triage() -> Any:
        state = await triage_ticket(SAMPLE_TICKETS[0], queue_dir=str(run.tmp_path), return_state=True)
        await task_run_names(flow_run_id(state), at_least=4)  # the reader reads a run that ended a while ago
        return flow_run_id(state)

    return {"flow_run_id": asyncio.run(triage())}


def _check_journal_block(run: Run) -> None:
    from prefect import get_client
    from prefect_aws import S3Bucket

    bucket = S3Bucket.load("agent-journal")
    try:
        assert bucket.bucket_name == "agent-journal"
        # the next block's PREFECT_DEFAULT_RESULT_STORAGE_BLOCK names this block by its slug
        exported = re.search(
            r"PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=(\S+)", (ROOT / run.block.path).read_text()
        )
        assert exported is not None and exported[1] == f"{S3Bucket.get_block_type_slug()}/agent-journal"
    finally:

        async def delete() -> None:
            async with get_client() as client:
                await client.delete_block_document(bucket._block_document_id)

        asyncio.run(delete())


def _served_names(run: Run) -> dict[str, Any]:
    run.request.getfixturevalue("served")
    return {}


def _check_run_deployment(run: Run) -> None:
    from prefect_pydantic_ai.demo.analyst import DEFAULT_PROMPT, build_analyst_agent, sales_dataset

    expected = asyncio.run(build_analyst_agent().run(DEFAULT_PROMPT, deps=sales_dataset())).output
    assert run.stdout == expected.summary + "\n"


SERVED = (pytest.mark.slow, pytest.mark.xdist_group("docs-served"))

PRELUDES: dict[str, Prelude] = {
    "use-it": Prelude(
        "`Agent`, `PrefectAgent`, `TaskConfig`, `df` (the demo's Q4 sales DataFrame) and the seed's tools "
        "`send_email` and `cheap_lookup`; checks the configs "
        "against tests/test_task_config.py and that both runs were answered by the loopback server",
        _readme_names,
        _check_use_it,
    ),
    "per-tool-configs": Prelude(
        "`TaskConfig`; checks each `# -> ...` comment against the config the tool gets layered over the "
        "README's `tool_task_config`",
        lambda run: {"TaskConfig": _readme_names(run)["TaskConfig"]},
        _check_per_tool_configs,
    ),
    "capability": Prelude(
        "the names of `use-it`; checks the agent carries `PrefectDurability` and its keyed run executed",
        _readme_names,
        _check_capability,
    ),
    "openai-client": Prelude(
        "nothing; checks the client's SDK retries are off and runs the agent once against the loopback server",
        check=_check_openai_client,
    ),
    "durable": Prelude(
        "`durable`: a `PrefectAgent` over `openai:gpt-4o` (the loopback server) with a `search` tool the model "
        "calls once, tool steps retried once; checks the run's output and that the model was asked twice",
        _durable_names,
        _check_durable,
    ),
    "triage-run": Prelude(
        "`flow_run_id`: a run of examples.triage_ticket's flow on the critical sample ticket",
        _triage_names,
    ),
    "journal-block": Prelude(
        "nothing (a session server to save the block in); checks the saved block loads, under the slug the next "
        "block exports, then deletes it",
        check=_check_journal_block,
    ),
    "served": Prelude(
        "docs/patterns.md's service, started by running its `serve_analyst` block (slow); checks the printed "
        "summary is the offline analyst's",
        _served_names,
        _check_run_deployment,
        marks=SERVED,
    ),
    "fault-plan": Prelude(
        "bash from the repository root with .venv/bin first on PATH, /tmp/ moved to a temporary directory "
        "(slow); checks the call log against the block's comment",
        marks=(pytest.mark.slow,),
    ),
}


# -- the output samples ---------------------------------------------------------------------------------------


def _resume_without_record() -> tuple[str, dict[str, str]]:
    """`prefect-pydantic-ai resume RUN` of an agent run whose record this machine's storage does not hold."""
    from prefect import flow, get_client
    from prefect.states import Failed, Running

    from prefect_pydantic_ai.store.prefect_rest import TAG

    @flow(name="docs-test-elsewhere")
    def elsewhere() -> None:
        """A run another machine ran."""

    async def create() -> Any:
        async with get_client() as client:
            flow_run = await client.create_flow_run(elsewhere, tags=[TAG, "agent:analyst"])
            await client.set_flow_run_state(flow_run.id, Running())  # its one attempt ran elsewhere
            await client.set_flow_run_state(flow_run.id, Failed())
            return flow_run

    flow_run = asyncio.run(create())
    try:
        resumed = cli("resume", str(flow_run.id), columns=400)
    finally:
        _delete_flow_runs([flow_run])
    assert resumed.returncode == 2, resumed
    storage = Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]).resolve()
    # the sample's run id and storage path stand for this run's and this session's
    return resumed.stderr, {str(flow_run.id): "0e0adf60-...", str(storage): "/home/me/.prefect/storage"}


OUTPUTS: dict[str, Callable[[], tuple[str, dict[str, str]]]] = {
    "resume-without-record": _resume_without_record,
}


# -- checking shell command lines -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    line: int  # the Markdown line it starts on
    code: str  # without its comments, continuation lines joined
    comment: str


def _split_shell(text: str) -> tuple[str, str, bool]:
    """(code, comments, whether a quote is still open) of shell text, quote-aware."""
    code: list[str] = []
    comments: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        c = text[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif quote == '"':
            if c == "\\" and i + 1 < len(text):
                code.append(c)
                i += 1
                c = text[i]
            elif c == '"':
                quote = None
        elif c in "'\"":
            quote = c
        elif c == "\\" and i + 1 < len(text):
            code.append(c)
            i += 1
            c = text[i]
        elif c == "#" and (not code or code[-1].isspace()):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            comments.append(text[i + 1 : end].strip())
            i = end
            continue
        code.append(c)
        i += 1
    return "".join(code), " ".join(comments), quote is not None


def shell_commands(block: Block) -> list[Command]:
    """The block's logical command lines: continuation lines (`\\`) and quotes spanning lines joined."""
    commands: list[Command] = []
    buffer: list[str] = []
    start = 0
    for number, line in block.lines():
        if not buffer and not line.strip():
            continue
        if not buffer:
            start = number
        buffer.append(line)
        text = "\n".join(buffer)
        code, comment, open_quote = _split_shell(text)
        if open_quote or code.rstrip().endswith("\\"):
            continue
        commands.append(Command(start, code.replace("\\\n", " ").strip(), comment))
        buffer = []
    assert not buffer, f"{block.id}: the command starting on line {start} never ends"
    return commands


def _substitutions(code: str) -> tuple[str, list[str]]:
    """`code` with each `$(...)` replaced by `__SUBST<n>__`, and the inner commands."""
    out: list[str] = []
    inner: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(code):
        c = code[i]
        if quote != "'" and code.startswith("$(", i):
            depth, j, q = 1, i + 2, None
            while j < len(code) and depth:
                d = code[j]
                if q:
                    q = None if d == q else q
                elif d in "'\"":
                    q = d
                elif d == "(":
                    depth += 1
                elif d == ")":
                    depth -= 1
                j += 1
            inner.append(code[i + 2 : j - 1])
            out.append(f"__SUBST{len(inner) - 1}__")
            i = j
            continue
        if c in "'\"" and quote in (None, c):
            quote = None if quote == c else c
        out.append(c)
        i += 1
    return "".join(out), inner


_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")


def without_optional(code: str) -> str:
    """A synopsis as a runnable command: its `[...]` groups (innermost first) left out."""
    while (shorter := re.sub(r"\s*\[[^\[\]]*\]", "", code)) != code:
        code = shorter
    return code


@dataclass
class Commands:
    """The state of one block's check: what went wrong, what earlier lines said, whether bash runs it."""

    block: Block
    runs_for_real: bool
    pytestconfig: pytest.Config
    problems: list[str] = field(default_factory=list)
    earlier: str = ""

    def problem(self, line: int, message: str) -> None:
        self.problems.append(f"{self.block.path}:{line}: {message}")


def check_commands(state: Commands, text: str, line: int) -> None:
    for command in shell_commands(Block(state.block.path, line - 1, "bash", text, None)):
        check_command(state, command)
        state.earlier += command.code + "\n"


def check_command(state: Commands, command: Command) -> str | None:
    """Check one command line; its output when it can run in this process (for `$(...)`), else None."""
    code, inner = _substitutions(command.code)
    values = [_substituted(state, command, text) for text in inner]
    try:
        tokens = shlex.split(code)
    except ValueError as exc:
        state.problem(command.line, f"cannot parse {command.code!r}: {exc}")
        return None
    for n, value in enumerate(values):
        tokens = [token.replace(f"__SUBST{n}__", value if value is not None else "") for token in tokens]
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):  # VAR=value before a command, or alone
        tokens = tokens[1:]
    if not tokens:
        return None
    program, args = tokens[0], tokens[1:]
    flags = _FLAG.findall(code) + _FLAG.findall(command.comment)
    if program in {"python", "python3", ".venv/bin/python"} and args[:1] == ["-m"] and len(args) > 1:
        module = args[1]
        if module == "prefect_pydantic_ai":
            return check_cli(state, command, args[2:], flags)
        if module.split(".")[0] == "examples":
            check_example(state, command, module, code, flags)
            return None
    elif program in {"python", "python3"} and args[:1] == ["-c"] and len(args) > 1:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(args[1], f"{state.block.id} python -c", "exec"), {"__name__": "__main__"})
        return out.getvalue().strip()
    elif program in {"python", "python3"} and args[:1] == ["dev.py"] and len(args) > 1:
        check_dev(state, command, args[1:], flags)
        return None
    elif program in {"prefect-pydantic-ai", ".venv/bin/prefect-pydantic-ai"}:
        return check_cli(state, command, args, flags)
    elif program == "export":
        for assignment in args:
            name, _, value = assignment.partition("=")
            check_setting(state, command, name, value)
        return None
    elif program == "eval" and len(args) == 1 and inner:
        if values[0] is None:
            state.problem(command.line, f"cannot evaluate {inner[0]!r} here")
        else:
            check_commands(state, values[0], command.line)
        return None
    elif program == "pip" and args[:1] == ["install"]:
        check_extras(state, command, args[1:])
        return None
    elif program == "cat" and len(args) == 1:
        if args[0] not in state.earlier and args[0] not in " ".join(v or "" for v in values):
            state.problem(command.line, f"cat {args[0]}: no earlier line of the block writes it")
        return None
    elif program in {"mypy", ".venv/bin/mypy"} and not args:
        check_mypy(state, command)
        return None
    if not state.runs_for_real:
        state.problem(
            command.line, f"no check for {command.code!r}: check it here, or run the block (prelude)"
        )
    return None


def _substituted(state: Commands, command: Command, text: str) -> str | None:
    code, comment, _ = _split_shell(text)
    return check_command(state, Command(command.line, code.strip(), comment))


def _cli_tree() -> Any:
    import typer.main

    from prefect_pydantic_ai.cli.app import app

    return typer.main.get_command(app)


RUNS_IN_PROCESS = {("server", "env"), ("server", "status")}
"""Read-only commands whose output a `$(...)` may use: with the session's PREFECT_API_URL they start nothing."""


def check_cli(state: Commands, command: Command, args: list[str], flags: list[str]) -> str | None:
    paths: list[list[str]] = [[]]
    node = _cli_tree()
    rest = list(args)
    while hasattr(node, "commands") and rest and not rest[0].startswith("-"):
        names = rest.pop(0).split("|")
        unknown = [name for name in names if name not in node.commands]
        if unknown:
            state.problem(
                command.line, f"prefect-pydantic-ai has no command {' '.join([*paths[0], *unknown])}"
            )
            return None
        paths = [[*path, name] for path in paths for name in names]
        node = node.commands[names[0]]
    if not paths[0] or hasattr(node, "commands"):
        state.problem(command.line, f"{command.code!r} names no prefect-pydantic-ai command")
        return None
    for path in paths:
        helped = cli(*path, "--help")
        if helped.returncode != 0:
            state.problem(
                command.line, f"prefect-pydantic-ai {' '.join(path)} --help: {helped.stderr.strip()}"
            )
            continue
        for flag in flags:
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helped.stdout):
                state.problem(command.line, f"prefect-pydantic-ai {' '.join(path)} has no option {flag}")
    if len(paths) == 1 and tuple(paths[0]) in RUNS_IN_PROCESS and rest == []:
        ran = cli(*paths[0])
        assert ran.returncode == 0, ran
        return ran.stdout.strip()
    return None


class _Captured(Exception):
    pass


def example_parser(module: str) -> argparse.ArgumentParser:
    """The argparse parser an example's `main()` builds (its `python -m` entry point), caught before parsing."""
    loaded = importlib.import_module(module)
    if not hasattr(loaded, "main") and hasattr(loaded, "__path__"):
        loaded = importlib.import_module(f"{module}.__main__")
    captured: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        captured.append(self)
        raise _Captured

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), contextlib.suppress(_Captured):
        loaded.main([])
    assert captured, f"{module}.main() builds no argparse parser"
    return captured[0]


def check_example(state: Commands, command: Command, module: str, code: str, flags: list[str]) -> None:
    if importlib.util.find_spec(module) is None:
        state.problem(command.line, f"no module {module}")
        return
    parser = example_parser(module)
    options = {option for action in parser._actions for option in action.option_strings}
    help_text = parser.format_help()
    for flag in flags:
        if flag not in options or flag not in help_text:
            state.problem(command.line, f"python -m {module} has no option {flag}")
    if "[--" in code:  # a synopsis: it lists every option the example takes
        missing = sorted(
            option for option in options - {"-h", "--help"} if option.startswith("--") and option not in flags
        )
        if missing:
            state.problem(command.line, f"the synopsis of {module} leaves out {', '.join(missing)}")
    args = shlex.split(without_optional(code))
    args = args[args.index(module) + 1 :]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            argparse.ArgumentParser.parse_args(parser, args)
    except SystemExit:
        state.problem(command.line, f"python -m {module} {' '.join(args)}: {err.getvalue().strip()}")


def _dev_commands() -> dict[str, str]:
    """dev.py's commands (the `commands` dict of its `main`), each as the source of what it runs."""
    tree = ast.parse((ROOT / "dev.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["commands"]
            and isinstance(node.value, ast.Dict)
        ):
            return {
                ast.literal_eval(key): ast.unparse(value)
                for key, value in zip(node.value.keys, node.value.values, strict=True)
                if key is not None
            }
    raise AssertionError("dev.py has no `commands` dict")


def _dev_constant(name: str) -> Any:
    for node in ast.parse((ROOT / "dev.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"dev.py defines no {name}")


def _bench_options() -> set[str]:
    tree = ast.parse((ROOT / "benchmarks" / "run.py").read_text())
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-")
    }


def check_dev(state: Commands, command: Command, args: list[str], flags: list[str]) -> None:
    name, rest = args[0], args[1:]
    runs = _dev_commands().get(name)
    if runs is None:
        state.problem(command.line, f"dev.py has no command {name!r}")
        return
    if "prefect-pydantic-ai" in runs:  # demo, cli, cluster: `prefect-pydantic-ai <their words> *rest`
        words = re.findall(r"'([\w-]+)'", runs.split("prefect-pydantic-ai", 1)[1])
        check_cli(state, command, [*words, *rest], flags)
    elif "pytest" in runs:
        check_pytest(state, command, rest)
        if workers := re.search(r"(\d+) parallel workers", command.comment):
            assert workers[1] == _dev_constant("TEST_WORKERS"), command
    elif "run.py" in runs:
        for flag in flags:
            if flag not in _bench_options():
                state.problem(command.line, f"dev.py {name} (benchmarks/run.py) has no option {flag}")
    elif "*rest" not in runs and rest:
        state.problem(command.line, f"dev.py {name} takes no arguments (it ignores {rest})")


def check_pytest(state: Commands, command: Command, args: list[str]) -> None:
    options = set(state.pytestconfig._parser.optparser._option_string_actions)
    markers = {line.split(":")[0].split("(")[0].strip() for line in state.pytestconfig.getini("markers")}
    args = iter(args)
    for arg in args:
        if arg.startswith("-"):
            if arg.split("=")[0] not in options:
                state.problem(command.line, f"pytest has no option {arg}")
            elif arg == "-m":
                expression = next(args, "")
                for word in set(re.findall(r"\w+", expression)) - {"and", "or", "not"}:
                    if word not in markers:
                        state.problem(command.line, f"-m {expression!r}: no marker {word!r} is registered")
            elif arg == "-n":
                next(args, None)
        elif not (ROOT / arg.split("::")[0]).exists():
            state.problem(command.line, f"pytest: no {arg} in the repository")


def check_setting(state: Commands, command: Command, name: str, value: str) -> None:
    """An exported variable is a setting that reads this value (and its comment's `default N` is the default)."""
    import prefect.settings
    from pydantic import ValidationError

    from prefect_pydantic_ai.settings import Settings
    from prefect_pydantic_ai.testing import ENV_VAR, FaultPlan

    if name == ENV_VAR:
        try:
            plan = FaultPlan.from_json(value)
        except ValueError as exc:
            state.problem(command.line, f"{name} holds no fault plan: {exc}")
            return
        if not plan.faults:
            state.problem(command.line, f"{name} holds a plan without faults")
    elif name.startswith("PREFECT_PYDANTIC_AI_"):
        setting = name.removeprefix("PREFECT_PYDANTIC_AI_").lower()
        if setting not in Settings.model_fields:
            state.problem(command.line, f"{name} is no setting of prefect_pydantic_ai.settings")
            return
        try:
            with mock.patch.dict(os.environ, {name: value}):
                read = getattr(Settings(), setting)
        except ValidationError as exc:
            state.problem(command.line, f"{name}={value} is refused: {exc.errors()[0]['msg']}")
            return
        if str(read) != value and not _same_number(read, value):
            state.problem(command.line, f"{name}={value} reads as {read!r}")
        default = re.search(r"default (\S+)", command.comment)
        if default and not _same_number(Settings.model_fields[setting].default, default[1]):
            state.problem(command.line, f"the default of {name} is {Settings.model_fields[setting].default}")
    elif name.startswith("PREFECT_"):
        try:
            prefect_setting = getattr(prefect.settings, name)
        except AttributeError:
            state.problem(command.line, f"{name} is not a Prefect setting")
            return
        try:
            with mock.patch.dict(os.environ, {name: value}):
                read = prefect_setting.value_from(prefect.settings.Settings())
        except ValidationError as exc:
            state.problem(command.line, f"{name}={value} is refused: {exc.errors()[0]['msg']}")
            return
        if str(read) != value and not _same_number(read, value):
            state.problem(command.line, f"{name}={value} reads as {read!r}")
    else:
        state.problem(command.line, f"{name} is neither a Prefect nor a prefect-pydantic-ai setting")


def _same_number(read: Any, value: str) -> bool:
    try:
        return float(read) == float(value)
    except (TypeError, ValueError):
        return False


def check_extras(state: Commands, command: Command, specs: list[str]) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in specs:
        match = re.fullmatch(r"prefect-pydantic-ai(?:\[([\w,-]+)\])?", spec)
        if match is None:
            state.problem(command.line, f"pip install {spec}: not this project")
            continue
        for extra in (match[1] or "").split(","):
            if extra and extra not in extras:
                state.problem(command.line, f"prefect-pydantic-ai has no extra [{extra}]")


def check_mypy(state: Commands, command: Command) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mypy = pyproject["tool"].get("mypy", {})
    if not any(dep.startswith("mypy") for dep in pyproject["project"]["optional-dependencies"]["dev"]):
        state.problem(command.line, "mypy is not a dev dependency")
    if "strict" in command.comment and mypy.get("strict") is not True:
        state.problem(command.line, "the comment says strict; [tool.mypy] is not")
    for path in re.findall(r"\bon (\S+)/", command.comment):
        if path not in mypy.get("files", []):
            state.problem(
                command.line, f"the comment says on {path}/; [tool.mypy] files are {mypy.get('files')}"
            )


# -- the tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS])
def test_every_block_is_checked(block: Block) -> None:
    marker = marker_of(block)
    if marker.kind == "":
        assert block.language in PYTHON | SHELL, (
            f"{block.id}: a {block.language!r} block needs a marker (see this module's docstring)"
        )
    elif marker.kind == "prelude":
        assert marker.arg in PRELUDES, f"{block.id}: no prelude {marker.arg!r}; there are {sorted(PRELUDES)}"
        assert block.language in PYTHON | SHELL, f"{block.id}: a prelude runs python or shell blocks"
    elif marker.kind == "excerpt-of":
        assert (ROOT / marker.arg).is_file(), f"{block.id}: no file {marker.arg}"
    elif marker.kind == "output":
        assert marker.arg in OUTPUTS, f"{block.id}: no output {marker.arg!r}; there are {sorted(OUTPUTS)}"
    else:  # output or external, unchecked: the reason is required
        assert marker.arg, f"{block.id}: say why this block cannot be checked"
    if block.language in PYTHON and marker.kind in {"", "prelude"}:
        compile_block(block)  # at least it is Python


def test_the_docs_have_their_blocks_and_no_stray_markers() -> None:
    assert len(BLOCKS) >= 25 and {b.path for b in BLOCKS} >= {"README.md", "docs/patterns.md"}
    for file in DOC_FILES:
        lines = file.read_text(encoding="utf-8").splitlines()
        fences = {b.line - 1 for b in BLOCKS if b.path == file.relative_to(ROOT).as_posix()}
        for number, line in enumerate(lines):
            if _MARKER.match(line):
                following = next((n for n in range(number + 1, len(lines)) if lines[n].strip()), None)
                assert following in fences, f"{file.name}:{number + 1}: a marker that precedes no block"


def test_the_parser_finds_fences_info_strings_and_markers() -> None:
    text = (
        "intro\n\n<!-- docs-test: prelude=x -->\n\n```Python title\nprint(1)\n```\n"
        "~~~~\n```not a fence```\n~~~~\n  ```\n  indented\n  ```\n"
    )
    first, second, third = parse_blocks("t.md", text)
    assert (first.line, first.language, first.text, first.marker) == (5, "python", "print(1)\n", "prelude=x")
    assert (second.language, second.text, second.marker) == ("", "```not a fence```\n", None)
    assert third.text == "indented\n"
    with pytest.raises(AssertionError, match="never closed"):
        parse_blocks("t.md", "```\nopen\n")
    assert config_said("retries=2, delays [0.5, 1.0], timeout 120") == {
        "retries": 2,
        "retry_delay_seconds": [0.5, 1.0],
        "timeout_seconds": 120.0,
    }
    with pytest.raises(AssertionError, match="cannot read"):
        config_said("retries=2, forever")
    assert without_optional("x [--a A [--b B]] [--c] y") == "x y"


@pytest.mark.parametrize(
    "block", _params(lambda b, m: b.language in PYTHON and m.kind in {"", "prelude"}, runs=True)
)
def test_python_block_runs(
    block: Block, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    marker = marker_of(block)
    prelude = PRELUDES[marker.arg] if marker.kind == "prelude" else Prelude("nothing")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra in re.findall(r"pip install 'prefect-pydantic-ai\[(\w+)\]'", block.text):
        assert extra in extras, f"{block.id}: no extra [{extra}]"
    started = datetime.now(UTC)
    with loopback_openai(monkeypatch) as (server, answers):
        run = Run(block, request, server, answers, tmp_path, started)
        run.namespace = {"__name__": "docs_block", **prelude.setup(run)}
        try:
            run.stdout = execute(block, run.namespace)
            prelude.check(run)
        finally:
            _delete_flow_runs(
                _agent_flow_runs_since(started, keyed=True)
            )  # a later block's key is not a re-call
    assert server.exhausted_count == 0
    result = run.namespace.get("result")
    if result is not None and hasattr(result, "output") and answers.texts:
        assert result.output == answers.texts[-1], "the block's result is what the loopback server answered"
    if (says := printed_comment(block)) is not None:
        assert matches_with_ellipsis(says, run.stdout), (
            f"{block.id} printed {run.stdout!r}, its comment: {says!r}"
        )


@pytest.mark.parametrize("block", _params(lambda b, m: m.kind == "excerpt-of"))
def test_excerpt_is_in_its_source(block: Block) -> None:
    source = [_normalised(line) for line in (ROOT / marker_of(block).arg).read_text().splitlines()]
    excerpt = [_normalised(line) for line in block.text.strip("\n").splitlines()]
    starts = [n for n in range(len(source)) if source[n : n + len(excerpt)] == excerpt]
    assert starts, f"{block.id}: these lines are not, together and in this order, in {marker_of(block).arg}"


@pytest.mark.parametrize("block", _params(lambda b, m: m.kind == "output"))
def test_output_sample_is_what_the_command_prints(block: Block) -> None:
    actual, stand_ins = OUTPUTS[marker_of(block).arg]()
    for real, stand_in in stand_ins.items():
        actual = actual.replace(real, stand_in)
    assert _normalised(actual) == _normalised(block.text)


@pytest.mark.parametrize("block", _params(lambda b, m: b.language in SHELL and m.kind in {"", "prelude"}))
def test_shell_block_commands(block: Block, pytestconfig: pytest.Config) -> None:
    state = Commands(block, marker_of(block).kind == "prelude", pytestconfig)
    check_commands(state, block.text, block.line + 1)
    assert not state.problems, "\n".join(state.problems)


# -- shell blocks run for real (slow) -------------------------------------------------------------------------


def bash(script: str, *, env: dict[str, str] | None = None, timeout: float = 240) -> str:
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass
class Service:
    """docs/patterns.md's service, started from its own block; shell variables its blocks set."""

    process: subprocess.Popen[bytes]
    log: Path
    deployment: dict[str, Any]
    variables: dict[str, str] = field(default_factory=dict)


def _served_block(contains: str) -> Block:
    return next(
        b for b in BLOCKS if b.marker == "prelude=served" and b.language in SHELL and contains in b.text
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Run the block that starts the service (its synopsis without the optional flags), until the module ends."""
    tmp = tmp_path_factory.mktemp("served")
    log = tmp / "serve.log"
    script = without_optional(_served_block("examples.serve_analyst").text)
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "TMPDIR": str(tmp)}  # the outbox goes to tmp
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Service(process, log, registered("data-analysis-service", process, log))
    finally:
        os.killpg(
            process.pid, signal.SIGTERM
        )  # bash and the service it started: the group this fixture began
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _flow_run(run_id: str) -> dict[str, Any]:
    from tests.test_patterns import call

    async def read() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"] + "/") as api:
            return dict(await call(api, "GET", f"flow_runs/{run_id}"))

    return asyncio.run(read())


def _final(run_id: str) -> dict[str, Any]:
    from tests.test_patterns import wait_for_final_state

    async def wait() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"] + "/") as api:
            return await wait_for_final_state(api, run_id)

    return asyncio.run(wait())


def _run_served_block(block: Block, service: Service) -> None:
    if "examples.serve_analyst" in block.text:  # the block that started the service
        assert service.process.poll() is None, service.log.read_text()
        assert service.deployment["name"] == "data-analysis-service"
        return
    assigned = re.findall(r"^([A-Z_]+)=", block.text, flags=re.MULTILINE)
    if (
        "FLOW_RUN_ID" not in assigned and "FLOW_RUN_ID" not in service.variables
    ):  # run alone: make a run first
        _run_served_block(_served_block("create_flow_run"), service)
    env = dict(service.variables)
    if "set_state" in block.text:  # resuming a run that ended
        before = _final(env["FLOW_RUN_ID"])
    dump = "".join(f'\necho "__docs_test__ {name}=${name}"' for name in assigned)
    out = bash(block.text + dump, env=env)
    service.variables.update(re.findall(r"^__docs_test__ (\w+)=(\S*)$", out, flags=re.MULTILINE))
    printed = [line for line in out.splitlines() if not line.startswith("__docs_test__")]
    if "create_flow_run" in block.text:
        run = _flow_run(service.variables["FLOW_RUN_ID"])
        assert run["deployment_id"] == service.variables["DEPLOYMENT_ID"] == service.deployment["id"]
        assert run["parameters"]["recipient"] == "ops@example.com"
        assert re.fullmatch(r"(SCHEDULED|PENDING|RUNNING|COMPLETED) \d+", printed[-1]), printed
    if "set_state" in block.text:
        assert json.loads("\n".join(printed))["status"] == "ACCEPT"
        after = _final(env["FLOW_RUN_ID"])
        assert after["state_type"] == "COMPLETED", service.log.read_text()
        assert after["run_count"] == before["run_count"] + 1  # the same flow run, once more


def _run_fault_plan_block(block: Block, tmp_path: Path) -> None:
    from prefect_pydantic_ai.testing import CallLog
    from tests.test_patterns import RESEARCH_STEPS

    assert "# the researcher's steps appear once; get_findings four times" in block.text
    script = block.text.replace("/tmp/", f"{tmp_path}/")
    bash(script, env={"PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"})
    executed = Counter(entry.name for entry in CallLog(tmp_path / "calls.jsonl").entries())
    assert Counter({k: v for k, v in executed.items() if k.startswith("researcher:")}) == RESEARCH_STEPS
    assert executed["summarizer:get_findings"] == 4


@pytest.mark.parametrize(
    "block",
    _params(lambda b, m: b.language in SHELL and m.kind == "prelude" and m.arg in PRELUDES, runs=True),
)
def test_shell_block_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    name = marker_of(block).arg
    if name == "served":
        _run_served_block(block, request.getfixturevalue("served"))
    elif name == "fault-plan":
        _run_fault_plan_block(block, tmp_path)
    else:
        raise AssertionError(f"{block.id}: prelude {name!r} does not run shell blocks")
