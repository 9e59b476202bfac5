"""The AI Data Analyst walkthrough (`walkthrough`, its first attempt in a child process: `worker`) and the analyst
agent itself, plain Pydantic AI (`analyst`)."""
