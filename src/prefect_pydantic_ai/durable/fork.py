"""A fork in progress: a new logical run whose steps before `at` are answered from another run's journal.

While a fork runs, every step key of its top-level agent runs is also computed as the original run would have
computed it (the original's run key, and, with a changed prompt, the digest of the original's conversation);
`StepTasks.run` answers a step numbered below `at` with the original's entry under that key, copied into the
fork's own journal (so the fork resumes on its own), and runs every later step live.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

NO_RESULT: Any = object()
"""`ForkSource.tool_result` when the fork edits no tool result."""


@dataclass
class ForkSource:
    """What a fork replays: the original flow run and its run key, the step it runs live from, and its edits."""

    flow_run_id: str
    run_key: str
    """The original's run key (`key:<idempotency key>` or `flow:<root flow run id>`)."""
    at: int
    """The first step (its `#` in `show`) that runs live."""
    prompt: tuple[str, str] | None = None
    """(the fork's prompt, the original's) when the fork changes the prompt."""
    tool_result: Any = NO_RESULT
    """The JSON result the tool step numbered `at` returns instead of running, when given."""
    aliases: dict[str, str] = field(default_factory=dict)
    """A fork step key -> the original's key of the same step."""
    digests: dict[str, str] = field(default_factory=dict)
    """A fork conversation digest -> the original's digest of the same conversation (with a changed prompt)."""
    flow_runs: list[str] = field(default_factory=list)
    """The flow run(s) the fork ran in, as they start."""
    replayed: int = 0
    """How many steps the original's journal answered."""


_fork: contextvars.ContextVar[ForkSource | None] = contextvars.ContextVar("ppa_fork", default=None)


def forking() -> ForkSource | None:
    """The fork running in this context, if any."""
    return _fork.get()


@contextmanager
def fork_of(source: ForkSource) -> Iterator[ForkSource]:
    """Agent runs started in this block are the fork `source` describes."""
    token = _fork.set(source)
    try:
        yield source
    finally:
        _fork.reset(token)
