"""A durable chat backend: an ASGI app that runs each conversation turn as a durable run and streams its events
to a browser over pydantic-ai's UI protocols, from a durable event log a client can resume at any offset."""
