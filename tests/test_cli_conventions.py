"""The CLI's conventions: help that reads at 80 columns, one-line usage errors (exit 2), `--version`, state names
in any case, empty listings that say which filter found nothing, and a `runs` table that fits 80 columns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from importlib.metadata import version

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent
from tests import commands


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return commands.cli(*args, columns=80)  # in this process: no process boundary is under test here


COMMANDS = [
    [],
    ["runs"],
    ["show"],
    ["resume"],
    ["costs"],
    ["demo"],
    ["web"],
    ["server"],
    ["fork"],
    ["export"],
    ["gc"],
]
COMMANDS += [["server", name] for name in ("status", "start", "stop", "env")]
COMMANDS += [["cluster"], *(["cluster", name] for name in ("up", "status", "env", "down"))]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_fits_80_columns_without_boxes_and_flags_take_no_value(command: list[str]) -> None:
    out = cli(*command, "--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Usage: ")
    assert max(len(line) for line in lines) <= 80, out.stdout
    assert not re.search("[╭╮╰╯│─]", out.stdout), out.stdout
    assert "<bool>" not in out.stdout
    assert re.search(r"^  --help +Show this message and exit\.$", out.stdout, re.MULTILINE)


def test_help_says_which_prefect_api_is_used() -> None:
    text = " ".join(cli("--help").stdout.split())
    assert "PREFECT_API_URL" in text and "persistent local Prefect server" in text


def test_version() -> None:
    out = cli("--version")
    assert (out.returncode, out.stdout) == (0, f"prefect-pydantic-ai {version('prefect-pydantic-ai')}\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs", "--bogus"], "error: No such option: --bogus (see --help)"),
        (["nope"], "error: No such command 'nope'. (see --help)"),
        (
            ["runs", "--limit", "0"],
            # typer's own words for the bound: "0 is not in the range x>=1." (0.26), "Input should be ..." (later)
            re.compile(
                r"error: Invalid value for '--limit': (0 is not in the range x>=1\.|Input should be greater than or "
                r"equal to 1) \(see --help\)"
            ),
        ),
        (["demo", "--kill", "--no-failure"], "error: --kill needs a failure to inject; drop --no-failure."),
        (["fork", "abc"], "error: Missing option '--at'. (see --help)"),
        (
            ["gc", "--older-than", "soon"],
            "error: Cannot read 'soon' as a point in time: use a duration such as '7d', '24h' or '30m' (days, hours, "
            "minutes), or an ISO date such as '2025-01-31' or '2025-01-31T09:30:00+00:00'.",
        ),
        (
            ["cluster", "status", "--dir", "/nonexistent/cluster"],
            "error: No cluster in /nonexistent/cluster; start one with `cluster up`.",
        ),
        (
            ["runs", "--state", "sleeping"],
            "error: Unknown state 'sleeping'; use one of: completed, failed, "
            "crashed, running, paused, cancelled, pending.",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args: list[str], message: str | re.Pattern[str]) -> None:
    out = cli(*args)
    lines = out.stderr.splitlines()
    if isinstance(message, re.Pattern) and len(lines) == 1 and message.fullmatch(lines[0]):
        message = lines[0]
    assert (out.returncode, lines, out.stdout) == (2, [message], "")


@pytest.fixture(scope="module")
def one_run() -> tuple[str, str]:
    """The agent name and run id of one completed run."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("ok")])

    name = f"conventions_{uuid.uuid4().hex[:6]}"
    durable = PrefectAgent(Agent(FunctionModel(model), name=name))
    result = durable.run_sync("go")
    assert result.output == "ok"
    out = cli("runs", "--agent", name, "--json")
    assert out.returncode == 0, out.stderr
    [run_id] = re.findall(r'"run_id": "([0-9a-f-]{36})"', out.stdout)
    return name, run_id


@pytest.mark.parametrize("state", ["COMPLETED", "Completed", "completed"])
def test_state_names_are_accepted_in_any_case(one_run: tuple[str, str], state: str) -> None:
    name, run_id = one_run
    out = cli("runs", "--agent", name, "--state", state)
    assert out.returncode == 0, out.stderr
    assert run_id[:12] in out.stdout


def test_empty_listings_say_which_filter_found_nothing(one_run: tuple[str, str]) -> None:
    name, _ = one_run
    assert cli("runs", "--agent", "nobody").stdout.splitlines() == ["No runs of agent 'nobody'."]
    assert cli("runs", "--agent", name, "--state", "Crashed").stdout.splitlines() == [
        f"No crashed runs of agent {name!r}."
    ]


@pytest.mark.parametrize("columns", [80, 120])
def test_runs_table_fits_80_columns_with_whole_ids_states_and_headers(
    one_run: tuple[str, str], columns: int
) -> None:
    name, run_id = one_run
    out = commands.cli("runs", "--limit", "5", columns=columns)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns, out.stdout
    assert lines[1].split() == ["Run", "id", "Key", "Agent", "State", "Steps", "Replayed", "Started", "Took"]
    assert "…" not in out.stdout, out.stdout
    assert re.search(rf"{run_id[:12]} .* completed ", out.stdout) or run_id[:12] not in out.stdout
    mine = commands.cli("runs", "--agent", name, columns=columns)
    row = next(line for line in mine.stdout.splitlines() if run_id[:12] in line)
    assert " completed " in row and len(row) <= columns, mine.stdout


@pytest.mark.parametrize("command", [["runs"], ["show", "some-run"], ["costs"]])
@pytest.mark.slow
def test_an_unreachable_api_is_one_line_naming_its_url_with_exit_code_1(command: list[str]) -> None:
    from prefect_pydantic_ai.infra.server import free_port

    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "prefect_pydantic_ai", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_API_URL": url, "COLUMNS": "80"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"error: Cannot reach the Prefect API at {url} (ConnectError: All connection attempts failed). Start it "
        "(`prefect-pydantic-ai server start` for the local one) or fix PREFECT_API_URL, then run the command again."
    )


def test_show_of_a_run_that_has_not_started_is_its_state_and_no_steps() -> None:
    """A deployment's run waiting for a worker: `show` says what it is (was an IndexError traceback)."""
    import asyncio

    from prefect import flow, get_client

    @flow(name=f"not-started-{uuid.uuid4().hex[:6]}")
    def never_run() -> None: ...

    async def create() -> str:
        async with get_client() as client:
            created = await client.create_flow_run(
                never_run, tags=["prefect-pydantic-ai", "agent:waiting_one"]
            )
        return str(created.id)

    run_id = asyncio.run(create())
    shown = cli("show", run_id, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert (detail["run_count"], detail["steps"], detail["earlier_attempts"]) == (0, [], [])
    assert detail["state"] in ("pending", "running")  # Prefect's Pending, or Scheduled
    table = cli("show", run_id)
    assert table.returncode == 0 and run_id in table.stdout, table.stderr


_IMPORTS = """
import json, sys
from prefect_pydantic_ai.cli.app import main
sys.argv = ["prefect-pydantic-ai", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exit:
    code = exit.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"prefect", "pydantic_ai", "genai_prices"})
print(json.dumps({"code": code, "imported": heavy}), file=sys.stderr)
"""


@pytest.mark.slow
def test_read_only_commands_answer_as_in_process_without_importing_prefect_or_pydantic_ai(
    one_run: tuple[str, str],
) -> None:
    """A fresh process answers `runs`, `show`, `costs` and `server status` over Prefect's REST API, with the
    settings and run records found without Prefect: the same answers as this process, where Prefect is loaded."""
    name, run_id = one_run
    for command in (
        ["runs", "--agent", name, "--json"],
        ["show", run_id, "--json"],
        ["costs", "--agent", name, "--json"],
        ["server", "status", "--json"],
    ):
        proc = subprocess.run(
            [sys.executable, "-c", _IMPORTS, json.dumps(command)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        report = json.loads(proc.stderr.strip().splitlines()[-1])
        assert report == {"code": 0, "imported": []}, proc.stderr
        expected = json.loads(cli(*command).stdout)
        if command[0] == "costs":
            expected.pop("since"), (answer := json.loads(proc.stdout)).pop("since")
        else:
            answer = json.loads(proc.stdout)
        assert answer == expected
