"""The durable run: the capability and agent wrapper, steps as Prefect tasks, the journal's keys, task configs,
the wait for a human decision, and the spent/saved report a run writes."""
