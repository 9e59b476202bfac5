"""The AI Data Analyst example: a Pydantic AI agent that plans, computes statistics, detects anomalies and
recommends, on the run's pandas DataFrame.

The agent lives in `prefect_pydantic_ai.demo.analyst`; this package re-exports it. Run it once, offline, with
``python -m examples.data_analyst [--csv PATH]``.
"""

from prefect_pydantic_ai.demo.analyst import (
    ANALYST_INSTRUCTIONS,
    DEFAULT_PROMPT,
    DEFAULT_THRESHOLD,
    OFFLINE_MODEL_NAME,
    Anomaly,
    AnomalyRow,
    ColumnStatistics,
    DataAnalysis,
    DatasetError,
    DatasetInfo,
    build_analyst_agent,
    calculate_statistics,
    detect_anomalies,
    get_column_info,
    load_csv,
    offline_analyst_model,
    sales_dataset,
)

__all__ = [
    "ANALYST_INSTRUCTIONS",
    "DEFAULT_PROMPT",
    "DEFAULT_THRESHOLD",
    "OFFLINE_MODEL_NAME",
    "Anomaly",
    "AnomalyRow",
    "ColumnStatistics",
    "DataAnalysis",
    "DatasetError",
    "DatasetInfo",
    "build_analyst_agent",
    "calculate_statistics",
    "detect_anomalies",
    "get_column_info",
    "load_csv",
    "offline_analyst_model",
    "sales_dataset",
]
