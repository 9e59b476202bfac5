"""The analyst agent with plain Pydantic AI: tools, datasets, and the scripted offline model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic_ai import Agent, ModelRetry, RunContext, Tool
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RunUsage

from prefect_pydantic_ai.demo.analyst import (
    DEFAULT_PROMPT,
    OFFLINE_MODEL_NAME,
    DataAnalysis,
    DatasetError,
    build_analyst_agent,
    calculate_statistics,
    detect_anomalies,
    get_column_info,
    load_csv,
    offline_analyst_model,
    sales_dataset,
)
from tests.warm import python

ROOT = Path(__file__).resolve().parents[1]


def ctx(frame: pd.DataFrame) -> RunContext[pd.DataFrame]:
    return RunContext(deps=frame, model=offline_analyst_model(), usage=RunUsage())


def responses(messages: list[ModelMessage]) -> list[ModelResponse]:
    return [message for message in messages if isinstance(message, ModelResponse)]


def tool_calls(messages: list[ModelMessage]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (part.tool_name, part.args_as_dict())
        for response in responses(messages)
        for part in response.parts
        if isinstance(part, ToolCallPart) and part.tool_name != "final_result"
    ]


def analysis_text(output: DataAnalysis) -> str:
    return " ".join([output.summary, *output.key_findings])


def write_visitors_csv(path: Path, outlier_row: int = 17) -> Path:
    visitors = [50 + (i % 7) - 3 for i in range(30)]
    visitors[outlier_row] = 500
    rows = [f"store-{i % 3},{v}" for i, v in enumerate(visitors)]
    path.write_text("store,visitors\n" + "\n".join(rows) + "\n")
    return path


# The dataset


def test_sales_dataset_is_deterministic_with_two_planted_outliers() -> None:
    frame = sales_dataset()
    assert list(frame.columns) == ["product", "sales", "region", "month"]
    assert len(frame) == 100
    pd.testing.assert_frame_equal(frame, sales_dataset())
    assert not frame.equals(sales_dataset(seed=8))
    assert sorted(frame.loc[frame["sales"] >= 1000, "sales"]) == [1000.0, 2000.0]
    normal = frame.loc[frame["sales"] < 1000, "sales"]
    assert normal.between(40, 160).all()
    assert 90 < normal.mean() < 110


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 1234])
def test_planted_outliers_are_the_only_anomalies_at_the_default_threshold(seed: int) -> None:
    frame = sales_dataset(seed)
    sales = frame["sales"]
    z = 0.6745 * (sales - sales.median()) / (sales - sales.median()).abs().median()
    expected = sorted(frame.index[z.abs() > 3.5])
    assert sorted(frame.loc[expected, "sales"]) == [1000.0, 2000.0]
    found = detect_anomalies(ctx(frame), "sales")
    assert [a["row"] for a in found] == expected
    assert [a["z_score"] for a in found] == pytest.approx(list(z[expected]))


def test_one_outlier_in_ten_rows_is_found_and_changes_the_advice(tmp_path: Path) -> None:
    """With 10 rows |value - mean| / std cannot exceed 2.85: the robust score must still see a 5000 among ~100s."""
    values = [98.0, 101.0, 97.0, 103.0, 100.0, 99.0, 5000.0, 102.0, 96.0, 104.0]
    frame = pd.DataFrame({"sales": values})
    assert [(a["row"], a["value"]) for a in detect_anomalies(ctx(frame), "sales")] == [(6, 5000.0)]
    result = build_analyst_agent().run_sync(DEFAULT_PROMPT, deps=frame)
    assert [(a.row, a.value) for a in result.output.anomalies] == [(6, 5000.0)]
    text = analysis_text(result.output)
    assert "1 anomaly at modified |z| > 3.5 (row 6)" in result.output.summary
    assert "Without them the mean would be 100.00 instead of 590.00." in text
    advice = " ".join(result.output.recommendations)
    assert "report the median (100.50) rather than the mean" in advice
    assert "The mean is a fair summary" not in advice


def test_more_than_half_equal_values_still_flag_the_odd_one() -> None:
    """MAD is 0 when most values are equal; the mean absolute deviation stands in."""
    found = detect_anomalies(ctx(pd.DataFrame({"x": [5.0] * 8 + [6.0, 500.0]})), "x")
    assert [(a["row"], a["value"]) for a in found] == [(9, 500.0)]


# The tools


def test_calculate_statistics_equals_pandas() -> None:
    frame = sales_dataset()
    stats = calculate_statistics(ctx(frame), "sales")
    described = frame["sales"].describe()
    assert stats["column"] == "sales"
    assert stats["count"] == described["count"] == 100
    assert [stats["mean"], stats["std"], stats["min"], stats["max"]] == pytest.approx(
        [described["mean"], described["std"], described["min"], described["max"]]
    )
    assert [stats["p25"], stats["median"], stats["p75"]] == pytest.approx(
        [described["25%"], described["50%"], described["75%"]]
    )
    assert json.loads(json.dumps(stats)) == stats
    assert all(type(value) in {str, int, float} for value in stats.values())


def test_statistics_of_a_single_value_have_no_std() -> None:
    stats = calculate_statistics(ctx(pd.DataFrame({"x": [4.0]})), "x")
    assert stats["std"] is None
    assert stats["mean"] == stats["max"] == 4.0


def test_detect_anomalies_reports_rows_values_and_z_scores() -> None:
    frame = sales_dataset()
    found = detect_anomalies(ctx(frame), "sales", threshold=3.5)
    assert json.loads(json.dumps(found)) == found
    rows = frame.index[frame["sales"] >= 1000].tolist()
    assert [(a["column"], a["row"], a["value"]) for a in found] == [
        ("sales", row, frame.loc[row, "sales"]) for row in rows
    ]
    assert all(abs(a["z_score"]) > 3.5 for a in found)
    assert detect_anomalies(ctx(pd.DataFrame({"x": [5.0, 5.0, 5.0]})), "x") == []


def test_get_column_info_lists_dtypes_and_numeric_columns() -> None:
    info = get_column_info(ctx(sales_dataset()))
    assert info["rows"] == 100
    assert list(info["columns"]) == ["product", "sales", "region", "month"]
    assert info["columns"]["sales"] == "float64"
    assert info["numeric_columns"] == ["sales"]
    assert json.loads(json.dumps(info)) == info


@pytest.mark.parametrize("tool", [calculate_statistics, detect_anomalies])
def test_unknown_column_asks_the_model_to_retry_with_the_valid_columns(tool: Any) -> None:
    with pytest.raises(ModelRetry) as raised:
        tool(ctx(sales_dataset()), "revenue")
    assert "'revenue'" in raised.value.message
    for column in ["product", "sales", "region", "month"]:
        assert column in raised.value.message


def test_non_numeric_column_asks_the_model_to_retry_with_the_numeric_columns() -> None:
    with pytest.raises(ModelRetry, match=r"'region' has no numbers.*Columns with numbers: sales\."):
        calculate_statistics(ctx(sales_dataset()), "region")


def test_non_positive_threshold_asks_the_model_to_retry() -> None:
    with pytest.raises(ModelRetry, match="positive"):
        detect_anomalies(ctx(sales_dataset()), "sales", threshold=0)


# The offline model with the agent


def test_offline_run_follows_the_five_steps_and_reports_the_planted_outliers() -> None:
    frame = sales_dataset()
    result = build_analyst_agent().run_sync(DEFAULT_PROMPT, deps=frame)
    messages = result.all_messages()

    assert len(responses(messages)) == 3
    assert tool_calls(messages) == [
        ("calculate_statistics", {"column": "sales"}),
        ("detect_anomalies", {"column": "sales", "threshold": 3.5}),
    ]
    assert {response.model_name for response in responses(messages)} == {OFFLINE_MODEL_NAME}
    final = responses(messages)[-1].parts
    assert [type(part) for part in final] == [ToolCallPart]
    assert isinstance(final[0], ToolCallPart) and final[0].tool_name == "final_result"

    output = result.output
    planted = frame.index[frame["sales"] >= 1000].tolist()
    assert [(a.row, a.value) for a in output.anomalies] == [(row, frame.loc[row, "sales"]) for row in planted]
    assert sorted(a.value for a in output.anomalies) == [1000.0, 2000.0]
    assert output.columns_analyzed == ["sales"]
    assert f"2 anomalies at modified |z| > 3.5 (rows {planted[0]} and {planted[1]})" in output.summary
    assert output.recommendations

    sales = frame["sales"]
    text = analysis_text(output)
    for number in [sales.mean(), sales.std(), sales.median(), sales.min(), sales.max()]:
        assert f"{number:.2f}" in text
    clean_mean = sales[sales < 1000].mean()
    assert f"{clean_mean:.2f}" in text


def test_interpret_step_reads_the_statistics() -> None:
    frame = sales_dataset()
    result = build_analyst_agent().run_sync(DEFAULT_PROMPT, deps=frame)
    interpret = responses(result.all_messages())[1]
    texts = [part.content for part in interpret.parts if isinstance(part, TextPart)]
    assert len(texts) == 1
    assert f"mean {frame['sales'].mean():.2f}" in texts[0]
    assert f"std {frame['sales'].std():.2f}" in texts[0]


def test_runs_are_deterministic_in_output_and_usage() -> None:
    agent = build_analyst_agent()
    first = agent.run_sync(DEFAULT_PROMPT, deps=sales_dataset())
    second = agent.run_sync(DEFAULT_PROMPT, deps=sales_dataset())
    assert first.output == second.output
    assert first.usage == second.usage
    assert [r.usage for r in responses(first.all_messages())] == [
        r.usage for r in responses(second.all_messages())
    ]
    assert first.usage.requests == 3
    assert first.usage.tool_calls == 2
    assert all(
        r.usage.input_tokens > 0 and r.usage.output_tokens > 0 for r in responses(first.all_messages())
    )


def test_offline_model_is_stateless_so_each_request_replays_identically_even_from_stored_history() -> None:
    offline = offline_analyst_model()
    assert offline.function is not None
    policy = offline.function
    seen: list[tuple[list[ModelMessage], AgentInfo, ModelResponse]] = []

    def recording(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        response = policy(messages, info)
        assert isinstance(response, ModelResponse)
        seen.append((list(messages), info, response))
        return response

    agent = build_analyst_agent(FunctionModel(recording, model_name=OFFLINE_MODEL_NAME))
    agent.run_sync(DEFAULT_PROMPT, deps=sales_dataset())
    assert len(seen) == 3
    for messages, info, response in reversed(seen):
        stored = ModelMessagesTypeAdapter.validate_json(ModelMessagesTypeAdapter.dump_json(messages))
        for history in (messages, stored):
            replayed = policy(history, info)
            assert isinstance(replayed, ModelResponse)
            assert replayed.parts == response.parts
            assert replayed.usage == response.usage


def test_model_argument_is_passed_through() -> None:
    agent = build_analyst_agent("test", name="custom")
    assert agent.name == "custom"
    assert agent.model is not None and not isinstance(agent.model, str)
    assert agent.model.model_name == "test"
    assert build_analyst_agent().model is not None


def test_user_csv_column_is_analysed(tmp_path: Path) -> None:
    frame = load_csv(write_visitors_csv(tmp_path / "visits.csv", outlier_row=17))
    result = build_analyst_agent().run_sync("Analyse store visits", deps=frame)
    assert tool_calls(result.all_messages()) == [
        ("calculate_statistics", {"column": "visitors"}),
        ("detect_anomalies", {"column": "visitors", "threshold": 3.5}),
    ]
    assert result.output.columns_analyzed == ["visitors"]
    assert [(a.column, a.row, a.value) for a in result.output.anomalies] == [("visitors", 17, 500.0)]
    text = analysis_text(result.output)
    assert f"{frame['visitors'].mean():.2f}" in text
    assert "1 anomaly at modified |z| > 3.5 (row 17)" in result.output.summary
    assert "1 value lies far from the median (modified z-score above 3.5)" in text


def test_a_rejected_column_is_skipped_for_the_next_numeric_one(tmp_path: Path) -> None:
    path = write_visitors_csv(tmp_path / "visits.csv")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(["discount," + lines[0], *(f",{line}" for line in lines[1:])]) + "\n")
    frame = load_csv(path)
    assert frame["discount"].isna().all()

    result = build_analyst_agent().run_sync("Analyse store visits", deps=frame)
    assert tool_calls(result.all_messages()) == [
        ("calculate_statistics", {"column": "discount"}),
        ("calculate_statistics", {"column": "visitors"}),
        ("detect_anomalies", {"column": "visitors", "threshold": 3.5}),
    ]
    assert len(responses(result.all_messages())) == 4
    assert result.output.columns_analyzed == ["visitors"]
    assert [a.value for a in result.output.anomalies] == [500.0]
    assert "Skipped 'discount': Column 'discount' has no numbers" in analysis_text(result.output)


def test_no_usable_column_ends_with_an_empty_analysis() -> None:
    frame = pd.DataFrame({"empty": [np.nan, np.nan], "label": ["a", "b"]})
    result = build_analyst_agent().run_sync(DEFAULT_PROMPT, deps=frame)
    assert tool_calls(result.all_messages()) == [("calculate_statistics", {"column": "empty"})]
    assert result.output.columns_analyzed == []
    assert result.output.anomalies == []
    assert "No numeric column" in result.output.summary


def test_without_the_schema_in_its_instructions_the_model_plans_with_get_column_info() -> None:
    agent = Agent(
        offline_analyst_model(),
        deps_type=pd.DataFrame,
        output_type=DataAnalysis,
        tools=[get_column_info, calculate_statistics, detect_anomalies],
    )
    result = agent.run_sync(DEFAULT_PROMPT, deps=sales_dataset())
    assert [name for name, _ in tool_calls(result.all_messages())] == [
        "get_column_info",
        "calculate_statistics",
        "detect_anomalies",
    ]
    assert sorted(a.value for a in result.output.anomalies) == [1000.0, 2000.0]


def test_a_failing_detect_anomalies_still_ends_with_an_analysis() -> None:
    def unavailable(
        ctx: RunContext[pd.DataFrame], column: str, threshold: float = 3.0
    ) -> list[dict[str, Any]]:
        raise ModelRetry("anomaly service unavailable")

    agent = Agent(
        offline_analyst_model(),
        deps_type=pd.DataFrame,
        output_type=DataAnalysis,
        tools=[get_column_info, calculate_statistics, Tool(unavailable, name="detect_anomalies")],
    )
    result = agent.run_sync(DEFAULT_PROMPT, deps=sales_dataset())
    assert [name for name, _ in tool_calls(result.all_messages())][-1] == "detect_anomalies"
    assert result.output.anomalies == []
    assert result.output.columns_analyzed == ["sales"]
    assert "anomaly detection could not run" in result.output.summary
    assert any("anomaly service unavailable" in finding for finding in result.output.key_findings)


# load_csv


def test_load_csv_reads_a_user_file(tmp_path: Path) -> None:
    frame = load_csv(write_visitors_csv(tmp_path / "visits.csv"))
    assert list(frame.columns) == ["store", "visitors"]
    assert len(frame) == 30


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"a,b\n", "has no data rows"),
        (b"name,city\nann,paris\nbob,rome\n", r"has no numeric column with values \(columns: name, city\)"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x10", "is not a readable CSV file"),
        (b'a,b\n"1,2\n', "is not a readable CSV file"),
        (b"a,b\n1,2,3,4\n5,6\n", "is not a readable CSV file"),
    ],
    ids=["empty", "header-only", "no-numeric", "binary", "unclosed-quote", "extra-fields"],
)
def test_load_csv_rejects_unusable_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=message) as raised:
        load_csv(path)
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_load_csv_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_csv(tmp_path / "missing.csv")
    assert issubclass(DatasetError, ValueError)


# The example


@pytest.mark.slow
def test_example_prints_the_analysis_as_json() -> None:
    done = python("-m", "examples.data_analyst", cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    analysis = DataAnalysis.model_validate_json(done.stdout)
    assert sorted(a.value for a in analysis.anomalies) == [1000.0, 2000.0]
    assert "1000" in done.stdout and "2000" in done.stdout


@pytest.mark.slow
def test_example_reads_a_csv_and_reports_bad_files(tmp_path: Path) -> None:
    command = ["-m", "examples.data_analyst", "--csv"]
    ok = python(*command, str(write_visitors_csv(tmp_path / "visits.csv")), cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert DataAnalysis.model_validate_json(ok.stdout).columns_analyzed == ["visitors"]
    bad = python(*command, str(tmp_path / "missing.csv"), cwd=ROOT, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and "no such file" in bad.stderr
