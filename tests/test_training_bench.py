"""`segdepth bench train` runs every backend present and writes its table as JSON."""

from __future__ import annotations

import json
import subprocess

import pytest

from training.model import SegDepthUNet, UNetConfig, save_model


def test_bench_train_writes_rates_per_backend(tmp_path, segdepth_cmd):
    model = tmp_path / "m.pt"
    save_model(model, SegDepthUNet(UNetConfig(base_channels=4, max_channels=8)))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            *segdepth_cmd,
            "bench",
            "train",
            "--sizes",
            "64",
            "--model",
            str(model),
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train samples/s" in proc.stdout
    result = json.loads(out.read_text())
    backends = {r["backend"] for r in result["rows"]}
    assert "torch-cpu FP32" in backends
    for row in result["rows"]:
        assert row["size"] == 64 and row["infer_frames_per_s"] > 0
    pytest.importorskip("onnxruntime")
    assert "onnxruntime-cpu FP32" in backends
