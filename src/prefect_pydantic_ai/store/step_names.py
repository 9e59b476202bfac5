"""How steps are named in Prefect: a step's task run is `<kind> #<ordinal>: <model or tool name> @ <agent>`, so
`show`, `runs` and the live progress read a run's steps back from Prefect's task runs by name alone."""

from __future__ import annotations

import re
from typing import Literal

StepKind = Literal["model", "tool"]


def step_title(kind: StepKind, ordinal: int, name: str) -> str:
    """What a step is called everywhere (live progress, `show`, the demo): `model #2: gpt-4o`, `tool #3: search`.

    The ordinal is the step's place in its flow run attempt (the `#` of `show`), so fifty calls of one model
    read apart; a replayed step keeps its ordinal, since a resumed attempt takes the same steps in order."""
    return f"{kind} #{ordinal}: {name}"


def task_run_name(kind: StepKind, ordinal: int, name: str, agent: str) -> str:
    """A step's Prefect task-run name: its title and agent (`model #2: gpt-4o @ analyst`), known when it starts.
    `parse_task_run_name` reads it back."""
    return f"{step_title(kind, ordinal, name)} @ {agent}"


_TASK_RUN_NAME = re.compile(r"(model|tool)(?: #(\d+))?: (.+?)(?: @ ([^@]+))?")


def parse_task_run_name(name: str) -> tuple[StepKind, int | None, str, str | None] | None:
    """`(kind, ordinal, model or tool name, agent)` of a step task run's name (`task_run_name`), or None
    for any other task run. Names recorded before steps had ordinals (`model: gpt-4o @ analyst`) parse too."""
    match = _TASK_RUN_NAME.fullmatch(name)
    if match is None:
        return None
    kind, ordinal, step, agent = match.groups()
    return ("model" if kind == "model" else "tool"), int(ordinal) if ordinal else None, step, agent
