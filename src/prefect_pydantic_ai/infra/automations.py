"""The automation that marks a flow run Crashed when its heartbeats stop: crash detection across machines.

A machine that dies cannot report its own end, and a pid means nothing on another host. Prefect's flow engine
emits a `prefect.flow-run.heartbeat` event every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds while a flow run
executes; this automation (Prefect's documented zombie-flow recipe, kept on the Prefect server) sets a flow run
Crashed when no heartbeat and no final state followed its last heartbeat within `within` seconds. Prefect's own
state then says `crashed` to every machine that lists the run, and `resume --all-crashed` picks it up.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.settings import get_current_settings

CRASH_AUTOMATION = "prefect-pydantic-ai: crash flow runs whose heartbeats stopped"
MISSED_HEARTBEATS = 3
"""How many heartbeat intervals may pass in silence before a run counts as crashed (the default `within`)."""


def default_within() -> float:
    """Seconds of silence after which a flow run is crashed: three of this machine's heartbeat intervals."""
    return float(MISSED_HEARTBEATS * (get_current_settings().flows.heartbeat_frequency or 180))


def crash_automation(within: float) -> AutomationCore:
    """The automation, as Prefect stores it."""
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(
            "Marks a flow run Crashed when it sent a heartbeat, then neither another heartbeat nor a final state "
            f"within {within:g}s: its machine died. Installed by `prefect-pydantic-ai install-automations`."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within:g}s: the machine running it stopped.",
            )
        ],
    )


async def install_crash_automation(within: float | None = None) -> tuple[UUID, bool]:
    """Create the automation on the Prefect server, or update it in place when it exists (so installing twice
    leaves one); returns its id and whether it was created."""
    wanted = crash_automation(default_within() if within is None else within)
    async with get_client() as client:
        existing = await client.read_automations_by_name(CRASH_AUTOMATION)
        if not existing:
            return await client.create_automation(wanted), True
        keep, *extra = existing
        await client.update_automation(keep.id, wanted)
        for duplicate in extra:
            await client.delete_automation(duplicate.id)
        return keep.id, False
