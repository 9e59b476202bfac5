"""The AI Data Analyst: a Pydantic AI agent that analyses a pandas DataFrame, with no Prefect code.

The agent follows the five steps of the story: plan (model) → ``calculate_statistics`` (tool) → interpret
(model) → ``detect_anomalies`` (tool) → recommendations (model), and returns a validated `DataAnalysis`.
The DataFrame is the run's deps; its schema also reaches the model through the instructions.

Without an API key, `offline_analyst_model()` plays the model: a scripted, deterministic policy (not an LLM)
that reads the tool results from the message history and writes the analysis from them.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, TypeAdapter
from pydantic_ai import Agent, ModelRetry, RunContext
from pydantic_ai.messages import (
    BaseToolReturnPart,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    SystemPromptPart,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import KnownModelName, Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage
from typing_extensions import TypedDict

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

DEFAULT_PROMPT = "Analyze the sales data for Q4"
"""The user prompt of the demo run."""

DEFAULT_THRESHOLD = 3.5
"""The modified z-score above which `detect_anomalies` reports a value (Iglewicz and Hoaglin's cut-off)."""
"""The |z-score| above which a value counts as an anomaly."""

OFFLINE_MODEL_NAME = "offline-analyst (scripted)"
"""The model name of `offline_analyst_model()`, saying plainly that no LLM is involved."""

ANALYST_INSTRUCTIONS = (
    "You are an expert data analyst. The dataset is a pandas DataFrame you reach through your tools.\n"
    "1. Plan: pick the numeric column that matters most and call calculate_statistics on it.\n"
    "2. Interpret the statistics, then call detect_anomalies on that column "
    f"(modified z-score threshold {DEFAULT_THRESHOLD:g}).\n"
    "3. Answer with a DataAnalysis built only from the tool results: a one-paragraph summary, the key findings "
    "with their numbers, every anomaly the tool reported, and concrete recommendations."
)
"""The static instructions of the analyst agent."""

_SCHEMA_PREFIX = "Dataset schema (JSON): "


class DatasetError(ValueError):
    """A dataset that the analyst cannot use; the message says what to fix."""


class DatasetInfo(TypedDict):
    """What `get_column_info` returns."""

    rows: int
    columns: dict[str, str]
    numeric_columns: list[str]


class ColumnStatistics(TypedDict):
    """What `calculate_statistics` returns; `std` is None for a single value."""

    column: str
    count: int
    mean: float
    std: float | None
    min: float
    p25: float
    median: float
    p75: float
    max: float


class AnomalyRow(TypedDict):
    """One row that `detect_anomalies` reports."""

    column: str
    row: int
    value: float
    z_score: float


class Anomaly(BaseModel):
    """A value far from its column's mean."""

    column: str = Field(description="The column holding the value.")
    row: int = Field(description="0-based position of the row in the dataset.")
    value: float = Field(description="The anomalous value.")
    z_score: float = Field(
        description="The modified z-score: 0.6745 * (value - median) / MAD of the column (robust to outliers)."
    )


class DataAnalysis(BaseModel):
    """The structured result of an analysis."""

    summary: str = Field(description="One paragraph describing the dataset and what stands out.")
    key_findings: list[str] = Field(description="Findings, each with the numbers behind it.")
    anomalies: list[Anomaly] = Field(description="Every anomaly reported by detect_anomalies.")
    recommendations: list[str] = Field(description="Concrete next steps.")
    columns_analyzed: list[str] = Field(description="The columns whose statistics were computed.")


def sales_dataset(seed: int = 7) -> pd.DataFrame:
    """Return 100 Q4 sales rows (product, sales, region, month), deterministic for `seed`.

    Sales are about 100 ± 20 (clipped to 40..160), except two planted outliers, 1000 and 2000, at rows
    chosen by the seed: at the default threshold they are the only anomalies.
    """
    rng = np.random.default_rng(seed)
    n = 100
    sales = np.clip(rng.normal(100.0, 20.0, n), 40.0, 160.0).round(2)
    sales[rng.choice(n, size=2, replace=False)] = [1000.0, 2000.0]
    months = ["2024-10", "2024-11", "2024-12"]
    return pd.DataFrame(
        {
            "product": rng.choice(["Widget", "Gadget", "Gizmo", "Doohickey"], n),
            "sales": sales,
            "region": rng.choice(["North", "South", "East", "West"], n),
            "month": [months[i * len(months) // n] for i in range(n)],
        }
    )


def load_csv(path: str | PathLike[str]) -> pd.DataFrame:
    """Read a CSV file to analyse; raise `DatasetError` if it is missing, empty, malformed or has no numbers."""
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"{file}: no such file; pass the path of an existing CSV file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(file, index_col=False)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{file} is empty; it needs a header row and at least one data row.") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, UnicodeDecodeError) as error:
        detail = str(error).strip().splitlines()[0]
        raise DatasetError(
            f"{file} is not a readable CSV file ({detail}); save it as UTF-8 comma-separated text "
            "with the same number of fields on every row."
        ) from None
    if frame.empty:
        raise DatasetError(f"{file} has no data rows; add at least one row below the header.")
    if not _columns_with_numbers(frame):
        raise DatasetError(
            f"{file} has no numeric column with values (columns: {', '.join(map(str, frame.columns))}); "
            "the analyst needs at least one column of numbers."
        )
    return frame


def get_column_info(ctx: RunContext[pd.DataFrame]) -> DatasetInfo:
    """Describe the dataset: row count, every column with its dtype, and which columns are numeric."""
    return _dataset_info(ctx.deps)


def calculate_statistics(ctx: RunContext[pd.DataFrame], column: str) -> ColumnStatistics:
    """Compute count, mean, standard deviation, min, quartiles and max of a numeric column.

    Args:
        column: Name of a numeric column of the dataset.
    """
    values = _numeric_values(ctx.deps, column)
    std = float(values.std())
    return ColumnStatistics(
        column=column,
        count=int(values.count()),
        mean=float(values.mean()),
        std=std if math.isfinite(std) else None,
        min=float(values.min()),
        p25=float(values.quantile(0.25)),
        median=float(values.median()),
        p75=float(values.quantile(0.75)),
        max=float(values.max()),
    )


def detect_anomalies(
    ctx: RunContext[pd.DataFrame], column: str, threshold: float = DEFAULT_THRESHOLD
) -> list[AnomalyRow]:
    """Find the rows whose modified z-score exceeds `threshold`: values far from the column's typical value.

    The modified z-score is 0.6745 * (value - median) / MAD (the median absolute deviation from the median). Unlike
    (value - mean) / std, the outliers themselves cannot hide it: in n rows |value - mean| / std never exceeds
    (n - 1) / sqrt(n), under 3 for 10 rows, however extreme a value is. When more than half the values are equal
    (MAD = 0), the mean absolute deviation scaled by 1.2533 stands in for MAD / 0.6745.

    Args:
        column: Name of a numeric column of the dataset.
        threshold: The |modified z-score| a value must exceed to be reported (3.5 is the usual cut-off).
    """
    if not threshold > 0:
        raise ModelRetry(f"threshold must be a positive modified z-score, not {threshold}.")
    values = _numeric_values(ctx.deps, column)
    deviations = values - values.median()
    mad = float(deviations.abs().median())
    scale = mad / 0.6745 if mad > 0 else 1.253314 * float(deviations.abs().mean())
    if not math.isfinite(scale) or scale == 0:
        return []
    z_scores = deviations / scale
    outliers = z_scores.abs() > threshold
    return [
        AnomalyRow(column=column, row=int(row), value=float(value), z_score=float(z))
        for row, value, z in zip(values.index[outliers], values[outliers], z_scores[outliers], strict=True)
    ]


def build_analyst_agent(
    model: Model | KnownModelName | str | None = None, *, name: str = "data_analyst"
) -> Agent[pd.DataFrame, DataAnalysis]:
    """Build the analyst agent; `model=None` uses `offline_analyst_model()`, anything else is passed to `Agent`."""
    return Agent(
        offline_analyst_model() if model is None else model,
        name=name,
        deps_type=pd.DataFrame,
        output_type=DataAnalysis,
        instructions=[ANALYST_INSTRUCTIONS, _schema_instructions],
        tools=[get_column_info, calculate_statistics, detect_anomalies],
        retries=2,
    )


def offline_analyst_model() -> FunctionModel:
    """A scripted stand-in for an LLM, named `OFFLINE_MODEL_NAME`, that needs no API key.

    It is stateless: every response is derived from the messages and instructions it receives, so a replayed
    or resumed run gets the same answers. With the analyst agent it takes exactly three model requests:
    ``calculate_statistics`` on the first numeric column, then ``detect_anomalies`` on it, then the final
    `DataAnalysis` written from those tool results. A column the tool rejects (``ModelRetry``) is skipped
    for the next numeric one. Token usage is estimated from the text sizes (about four characters a token).
    """
    return FunctionModel(_offline_policy, model_name=OFFLINE_MODEL_NAME)


def _numeric_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of a numeric dtype (booleans excluded), in order."""
    return [
        str(name)
        for name, dtype in frame.dtypes.items()
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    ]


def _finite(series: pd.Series[Any]) -> pd.Series[float]:
    """The finite values of a numeric column, indexed by row position."""
    values = series.astype(float).reset_index(drop=True)
    return values[np.isfinite(values)]


def _columns_with_numbers(frame: pd.DataFrame) -> list[str]:
    names = {str(name): name for name in frame.columns}
    return [column for column in _numeric_columns(frame) if not _finite(frame[names[column]]).empty]


def _dataset_info(frame: pd.DataFrame) -> DatasetInfo:
    return DatasetInfo(
        rows=len(frame),
        columns={str(name): str(dtype) for name, dtype in frame.dtypes.items()},
        numeric_columns=_numeric_columns(frame),
    )


def _numeric_values(frame: pd.DataFrame, column: str) -> pd.Series[float]:
    """The finite values of `column`; a `ModelRetry` names the columns to use instead."""
    names = {str(name): name for name in frame.columns}
    if column not in names:
        raise ModelRetry(f"Unknown column {column!r}. Valid columns: {', '.join(names)}.")
    if column in _numeric_columns(frame):
        values = _finite(frame[names[column]])
        if not values.empty:
            return values
    raise ModelRetry(
        f"Column {column!r} has no numbers to analyse. "
        f"Columns with numbers: {', '.join(_columns_with_numbers(frame)) or 'none'}."
    )


def _schema_instructions(ctx: RunContext[pd.DataFrame]) -> str:
    return _SCHEMA_PREFIX + json.dumps(_dataset_info(ctx.deps))


# The offline policy. Everything below reads only what a model receives: messages and AgentInfo.
_DATASET_INFO = TypeAdapter(DatasetInfo)
_STATISTICS = TypeAdapter(ColumnStatistics)
_ANOMALIES = TypeAdapter(list[Anomaly])
_T = TypeVar("_T")


@dataclass(frozen=True)
class _Call:
    """A function tool call from the history and how it ended."""

    name: str
    args: dict[str, Any]
    succeeded: bool
    result: Any
    rejection: str | None


def _offline_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    step = 1 + sum(isinstance(message, ModelResponse) for message in messages)
    parts = _decide(_calls(messages, {tool.name for tool in info.function_tools}), info, step)
    return ModelResponse(parts=parts, usage=_estimate_usage(messages, info.instructions, parts))


def _decide(calls: list[_Call], info: AgentInfo, step: int) -> list[ModelResponsePart]:
    def call(tool: str, **args: Any) -> ToolCallPart:
        return ToolCallPart(tool, args, tool_call_id=f"offline-{step}-{tool}")

    dataset = _schema_from_instructions(info.instructions) or _last_result(
        calls, "get_column_info", _DATASET_INFO
    )
    if dataset is None:
        return [call("get_column_info")]
    stats = _last_result(calls, "calculate_statistics", _STATISTICS)
    if stats is None:
        rejected = {
            c.args.get("column") for c in calls if c.name == "calculate_statistics" and not c.succeeded
        }
        remaining = [column for column in dataset["numeric_columns"] if column not in rejected]
        if remaining:
            return [call("calculate_statistics", column=remaining[0])]
        return [_final(info, _no_analysis(calls), step)]
    column = stats["column"]
    detections = [c for c in calls if c.name == "detect_anomalies" and c.args.get("column") == column]
    if not detections:
        return [
            TextPart(_interpretation(stats)),
            call("detect_anomalies", column=column, threshold=DEFAULT_THRESHOLD),
        ]
    detection = detections[-1]
    anomalies = _ANOMALIES.validate_python(detection.result) if detection.succeeded else None
    threshold = float(detection.args.get("threshold", DEFAULT_THRESHOLD))
    return [_final(info, _analysis(dataset, stats, anomalies, threshold, calls), step)]


def _calls(messages: list[ModelMessage], function_tools: set[str]) -> list[_Call]:
    """Pair each call of a function tool with its return, in order."""
    returns = {
        part.tool_call_id: part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, BaseToolReturnPart)
    }
    calls: list[_Call] = []
    for message in messages:
        if not isinstance(message, ModelResponse):
            continue
        for part in message.parts:
            if not isinstance(part, ToolCallPart) or part.tool_name not in function_tools:
                continue
            returned = returns.get(part.tool_call_id)
            succeeded = returned is not None and returned.outcome == "success"
            calls.append(
                _Call(
                    name=part.tool_name,
                    args=part.args_as_dict(),
                    succeeded=succeeded,
                    result=returned.structured_content() if returned is not None and succeeded else None,
                    rejection=returned.model_response_str(wrap_if_error=False)
                    if returned is not None and not succeeded
                    else None,
                )
            )
    return calls


def _last_result(calls: list[_Call], tool: str, adapter: TypeAdapter[_T]) -> _T | None:
    for c in reversed(calls):
        if c.name == tool and c.succeeded:
            return adapter.validate_python(c.result)
    return None


def _schema_from_instructions(instructions: str | None) -> DatasetInfo | None:
    for line in (instructions or "").splitlines():
        if line.startswith(_SCHEMA_PREFIX):
            return _DATASET_INFO.validate_json(line.removeprefix(_SCHEMA_PREFIX))
    return None


def _final(info: AgentInfo, analysis: DataAnalysis, step: int) -> ToolCallPart:
    if not info.output_tools:
        raise RuntimeError(
            "The offline analyst answers through an output tool; use output_type=DataAnalysis."
        )
    tool = info.output_tools[0].name
    return ToolCallPart(tool, analysis.model_dump(mode="json"), tool_call_id=f"offline-{step}-{tool}")


def _rejected_columns(calls: list[_Call]) -> list[str]:
    return [
        f"'{c.args.get('column')}': {c.rejection}"
        for c in calls
        if c.name == "calculate_statistics" and c.rejection
    ]


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _interpretation(stats: ColumnStatistics) -> str:
    return (
        f"'{stats['column']}': {stats['count']} values, mean {_num(stats['mean'])}, median "
        f"{_num(stats['median'])}, std {_num(stats['std'])}, range {_num(stats['min'])} to "
        f"{_num(stats['max'])}. Checking every row for a modified z-score above {DEFAULT_THRESHOLD:g} (median/MAD)."
    )


def _analysis(
    dataset: DatasetInfo,
    stats: ColumnStatistics,
    anomalies: list[Anomaly] | None,
    threshold: float,
    calls: list[_Call],
) -> DataAnalysis:
    column, count, mean = stats["column"], stats["count"], stats["mean"]
    findings = [
        f"'{column}' has {count} values with mean {_num(mean)} and standard deviation {_num(stats['std'])}.",
        f"The median is {_num(stats['median'])}; half of the values lie between {_num(stats['p25'])} and "
        f"{_num(stats['p75'])}, and the range is {_num(stats['min'])} to {_num(stats['max'])}.",
    ]
    findings += [f"Skipped {reason}" for reason in _rejected_columns(calls)]
    recommendations: list[str] = []
    if anomalies is None:
        outcome = "anomaly detection could not run"
        reason = next((c.rejection for c in reversed(calls) if c.name == "detect_anomalies"), None)
        findings.append(f"Anomaly detection failed ({reason}), so the data was not checked for outliers.")
        recommendations.append(f"Re-run the analysis to check '{column}' for outliers.")
    elif anomalies:
        numbers = [str(a.row) for a in anomalies]
        rows = (
            f"row {numbers[0]}" if len(numbers) == 1 else f"rows {', '.join(numbers[:-1])} and {numbers[-1]}"
        )
        outcome = f"{_count(len(anomalies), 'anomaly', 'anomalies')} at modified |z| > {threshold:g} ({rows})"
        listing = "; ".join(f"row {a.row}: {_num(a.value)} (modified z = {a.z_score:.2f})" for a in anomalies)
        findings.append(
            f"{_count(len(anomalies), 'value lies', 'values lie')} far from the median (modified z-score above "
            f"{threshold:g}): {listing}."
        )
        if count > len(anomalies):
            clean_mean = (mean * count - sum(a.value for a in anomalies)) / (count - len(anomalies))
            findings.append(f"Without them the mean would be {_num(clean_mean)} instead of {_num(mean)}.")
        recommendations += [
            f"Check {rows} against the source records: confirm or correct those '{column}' values.",
            f"Until they are resolved, report the median ({_num(stats['median'])}) rather than the mean.",
            f"Flag '{column}' values far outside the usual {_num(stats['p25'])}–{_num(stats['p75'])} range "
            "when data is loaded, so such errors are caught before they reach reports.",
        ]
    else:
        outcome = f"no anomalies at modified |z| > {threshold:g}"
        findings.append(f"No value lies far from the median (modified z-score above {threshold:g}).")
        recommendations.append(f"The mean is a fair summary of '{column}'; no cleanup is needed.")
    others = [name for name in dataset["numeric_columns"] if name != column]
    if others:
        recommendations.append(f"Analyse the other numeric columns ({', '.join(others)}) the same way.")
    summary = (
        f"Analysed '{column}' over {count} of {dataset['rows']} rows: mean {_num(mean)}, median "
        f"{_num(stats['median'])}, standard deviation {_num(stats['std'])}; {outcome}."
    )
    return DataAnalysis(
        summary=summary,
        key_findings=findings,
        anomalies=anomalies or [],
        recommendations=recommendations,
        columns_analyzed=[column],
    )


def _no_analysis(calls: list[_Call]) -> DataAnalysis:
    return DataAnalysis(
        summary="No numeric column could be analysed.",
        key_findings=_rejected_columns(calls),
        anomalies=[],
        recommendations=["Provide a dataset with at least one numeric column that has values."],
        columns_analyzed=[],
    )


def _estimate_usage(
    messages: list[ModelMessage], instructions: str | None, parts: list[ModelResponsePart]
) -> RequestUsage:
    """Tokens as about a quarter of the characters sent and received; ids and timestamps are not counted."""
    sent = [instructions or "", *(_part_text(part) for message in messages for part in message.parts)]
    received = [_part_text(part) for part in parts]
    return RequestUsage(
        input_tokens=math.ceil(sum(map(len, sent)) / 4), output_tokens=math.ceil(sum(map(len, received)) / 4)
    )


def _part_text(part: object) -> str:
    match part:
        case UserPromptPart(content=str() as text) | SystemPromptPart(content=text) | TextPart(content=text):
            return text
        case UserPromptPart(content=items):
            return " ".join(item for item in items if isinstance(item, str))
        case ToolCallPart():
            return part.tool_name + part.args_as_json_str()
        case BaseToolReturnPart():
            return part.tool_name + part.model_response_str()
    return ""
