"""Where durable state lives: run records, the journal's storage, step locks (host-local files or Redis), and
settling the record of a run whose process died."""
