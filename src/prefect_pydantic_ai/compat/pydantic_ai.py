"""pydantic-ai's private parts: the hooks of a `StreamedResponse` implementation (its event iterator, its parts
manager, its usage), which a model that streams someone else's events has to fill in."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import AsyncIterator

from pydantic_ai.messages import ModelResponsePart, ModelResponseStreamEvent
from pydantic_ai.models import StreamedResponse
from pydantic_ai.usage import RequestUsage


class EventStreamResponse(StreamedResponse):
    """A `StreamedResponse` whose events come from `events()`, its parts built from them with the same parts
    manager a provider's stream uses, and its usage set once known."""

    @abstractmethod
    def events(self) -> AsyncIterator[ModelResponseStreamEvent]:
        """The stream's events, in order (pydantic-ai's `_get_event_iterator`)."""

    def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        return self.events()

    def apply_event(self, event: ModelResponseStreamEvent) -> None:
        """Update this response's parts with `event` (a part start or delta streamed elsewhere)."""
        self._parts_manager.apply_event(event)

    def part_event(self, index: int, part: ModelResponsePart) -> ModelResponseStreamEvent:
        """Add `part`, complete, as part `index` of this response; the event that shows it."""
        return self._parts_manager.handle_part(vendor_part_id=index, part=part)

    def set_usage(self, usage: RequestUsage) -> None:
        """What `usage()` reports for this response."""
        self._usage = usage
