"""Operating on runs as Prefect knows them: listing, one run's timeline, costs across runs, resuming, approving."""
