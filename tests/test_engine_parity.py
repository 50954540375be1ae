"""``segdepth bench parity`` end to end on a tiny robustness suite: the record pools every row's
column counts over its draws, judges the pooled difference against the bound (each with a
bootstrap interval over the structures shown), and is what the engine's refusal then reads."""

import json
import shutil
import subprocess

import pytest

from engine import backends
from engine.model_io import default_model_path, load
from engine.parity import PARITY_BOUND_POINTS, record_path
from training.robustness import suite_rows


@pytest.mark.slow
def test_parity_cli_pools_draws_and_gates_the_backend(tmp_path, segdepth_cmd):
    model = tmp_path / "model.pt"
    shutil.copy(default_model_path(), model)
    run = subprocess.run(
        [
            *segdepth_cmd,
            "bench",
            "parity",
            "--candidate",
            "onnxruntime-int8",
            "--model",
            str(model),
            "--suite-dir",
            str(tmp_path / "suite"),
            "--suite-scale",
            "0.01",
            "--suite-gpts",
            "384",
            "--crop",
            "64",
            "--samples",
            "2",
            "--seeds",
            "3",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    record = json.loads(record_path(model, "int8").read_text())
    assert run.returncode == (0 if record["passed"] else 1), run.stderr[-2000:]
    assert [r["row"] for r in record["rows"]] == [row.name for row in suite_rows()]
    for k, row in enumerate(record["rows"]):
        assert [d["seed"] for d in row["draws"]] == [3 + k, 5 + k]
        pooled = {
            name: {key: sum(d[name][key] for d in row["draws"]) for key in ("columns", "exact")}
            for name in ("onnxruntime", "onnxruntime-int8")
        }
        assert row["columns"] == pooled["onnxruntime"]["columns"] > 0
        assert pooled["onnxruntime-int8"]["columns"] == row["columns"]  # the same frames
        exact = {
            name: pooled[name]["exact"] / row["columns"]
            for name in ("onnxruntime", "onnxruntime-int8")
        }
        assert row["fp32"]["column_exact"] == pytest.approx(exact["onnxruntime"])
        assert row["candidate"]["column_exact"] == pytest.approx(exact["onnxruntime-int8"])
        assert row["column_exact_diff_points"] == pytest.approx(
            100 * (exact["onnxruntime-int8"] - exact["onnxruntime"])
        )
        # the interval brackets the pooled difference; draws of one structure are grouped
        low, high = row["column_exact_diff_ci95_points"]
        assert low - 1e-9 <= row["column_exact_diff_points"] <= high + 1e-9
        assert 1 <= row["structures"] <= 2 * 2  # at most samples x draws
        # a column read differently is needed for each one gained or lost, and every draw's
        # count is in the pooled one
        changed = abs(pooled["onnxruntime-int8"]["exact"] - pooled["onnxruntime"]["exact"])
        assert changed <= row["read_differently"] <= row["columns"]
        assert row["read_differently"] == sum(d["read_differently"] for d in row["draws"])
    worst = max(abs(r["column_exact_diff_points"]) for r in record["rows"])
    assert record["max_abs_diff_points"] == pytest.approx(worst)
    assert record["passed"] == (worst <= PARITY_BOUND_POINTS)
    assert "legacy simulate slabs" in run.stdout
    # onnxruntime's INT8 graph moves rows by several points: it reads some columns otherwise
    assert sum(r["read_differently"] for r in record["rows"]) > 0
    assert "columns read differently from FP32" in run.stdout
    refusal = backends.BACKENDS["onnxruntime-int8"].refusal(load(model))
    assert (refusal is None) == record["passed"]
