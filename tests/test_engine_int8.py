"""INT8 (onnxruntime static quantization) is offered only for a model whose parity record
passes, and its answers stay close to FP32 on simulated frames."""

import json
import shutil
from dataclasses import asdict

import pytest

from engine import backends
from engine.export import EXPORT_VERSION
from engine.model_io import default_model_path, load
from engine.quantize import CalibrationConfig, parity_path, parity_refusal


@pytest.fixture(scope="module")
def bundled_copy(tmp_path_factory):
    """The bundled model copied alone (without its parity record) into a temporary folder."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    shutil.copy(default_model_path(), path)
    return load(path)


def _record(loaded, **fields):
    record = {
        "model_sha256": loaded.sha256,
        "passed": True,
        "max_abs_diff_points": 0.1,
        "export_version": EXPORT_VERSION,
        "calibration": asdict(CalibrationConfig()),
        **fields,
    }
    parity_path(loaded.path).write_text(json.dumps(record))


def test_int8_is_offered_only_with_a_passing_record_of_the_same_model(bundled_copy):
    parity_path(bundled_copy.path).unlink(missing_ok=True)
    assert "no INT8 parity record" in parity_refusal(bundled_copy)
    with pytest.raises(RuntimeError, match="parity"):
        backends.resolve("onnxruntime-int8", bundled_copy)
    assert backends.resolve("auto", bundled_copy) != "onnxruntime-int8"
    _record(bundled_copy, model_sha256="0" * 64)
    assert "another model" in parity_refusal(bundled_copy)
    _record(bundled_copy, export_version=EXPORT_VERSION - 1)
    assert "another form" in parity_refusal(bundled_copy)
    _record(bundled_copy, passed=False, max_abs_diff_points=2.3)
    assert "2.3 points" in parity_refusal(bundled_copy)
    _record(bundled_copy)
    assert parity_refusal(bundled_copy) is None
    assert backends.resolve("onnxruntime-int8", bundled_copy) == "onnxruntime-int8"
    if all(backends.BACKENDS[n].unavailable_reason() for n in ("tensorrt", "torch-cuda")):
        assert backends.resolve("auto", bundled_copy) == "onnxruntime-int8"


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_simulated_frames(bundled_copy, tmp_path):
    """Same frames through the FP32 and the INT8 graph: the depth class of most pixels and the
    mean column-pixel confidence stay; a broken quantization (wrong scales, a skipped
    calibration) would not. Measured (pixels agreeing / column pixels agreeing / confidence
    change): v6 0.986 / 0.932 / 0.008, v7 0.978 / 0.894 / 0.0004; v7 calibrated on constant
    frames 0.79 / 0.00 / 0.23. Whether INT8 is accurate enough to offer is the parity record's
    question (v7: no), not this test's."""
    from engine.quantize import calibration_frames

    _record(bundled_copy)
    frames = calibration_frames(
        CalibrationConfig(structures=0, slab_frames=4, seed=8000), tmp_path
    )[:, 0]
    fp32 = backends.create("onnxruntime", bundled_copy, cache_dir=tmp_path).infer(frames)
    int8 = backends.create("onnxruntime-int8", bundled_copy, cache_dir=tmp_path).infer(frames)
    d32, d8 = fp32.depth_prob.argmax(1), int8.depth_prob.argmax(1)
    assert (d32 == d8).mean() >= 0.95
    column = d32 > 0
    assert column.mean() > 0.05  # the frames show columns
    assert (d32 == d8)[column].mean() >= 0.8
    conf32, conf8 = fp32.depth_prob.max(1)[column], int8.depth_prob.max(1)[column]
    assert abs(conf32.mean() - conf8.mean()) < 0.03
