"""The servers we start or talk to: the configured Prefect API or the persistent local server, the one-machine
cluster, and the automations it installs."""
