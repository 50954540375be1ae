"""INT8 (onnxruntime static quantization, OpenVINO on the model's fitted INT8 graph) and BF16
are offered only for a model whose parity record passes; INT8's answers stay close to FP32 on
simulated frames."""

import json
import shutil
import threading

import pytest

from engine import backends
from engine.model_io import default_model_path, load
from engine.openvino_qat import FLOAT_LAYERS, fit_record_path, graph_path
from engine.parity import record_path
from engine.quantize import CalibrationConfig


@pytest.fixture(scope="module")
def bundled_copy(tmp_path_factory):
    """The bundled model copied, with its OpenVINO INT8 graph and that graph's fit record but
    without its parity records, into a temporary folder."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    shutil.copy(default_model_path(), path)
    for source, target in _int8_files(default_model_path(), path):
        shutil.copy(source, target)
    return load(path)


def _int8_files(source, target):
    """(source, target) paths of a model's OpenVINO INT8 graph (.xml, .bin) and fit record."""
    xml, to = graph_path(source), graph_path(target)
    return [
        (xml, to),
        (xml.with_suffix(".bin"), to.with_suffix(".bin")),
        (fit_record_path(source), fit_record_path(target)),
    ]


def _record(loaded, cls, **fields):
    record = {
        "model_sha256": loaded.sha256,
        "passed": True,
        "max_abs_diff_points": 0.1,
        "form": cls.parity_form(loaded),
        **fields,
    }
    record_path(loaded.path, cls.parity_record).write_text(json.dumps(record))


REDUCED = ("openvino-int8", "onnxruntime-int8", "torch-cpu-bf16")


@pytest.mark.parametrize("name", REDUCED)
def test_reduced_precision_is_offered_only_with_a_passing_record_of_the_same_model(
    bundled_copy, name
):
    cls = backends.BACKENDS[name]
    label = cls.parity_record.upper()
    for other_name in REDUCED:
        record_path(bundled_copy.path, backends.BACKENDS[other_name].parity_record).unlink(
            missing_ok=True
        )
    assert f"no {label} parity record" in cls.refusal(bundled_copy)
    assert f"--candidate {name}" in cls.refusal(bundled_copy)
    if cls.unavailable_reason() is None:
        with pytest.raises(RuntimeError, match="parity"):
            backends.resolve(name, bundled_copy)
    assert backends.resolve("auto", bundled_copy) not in REDUCED
    # each backend has its own record (the two INT8 ones too): another's offers not this one
    other = backends.BACKENDS[REDUCED[(REDUCED.index(name) + 1) % len(REDUCED)]]
    _record(bundled_copy, other)
    assert f"no {label} parity record" in cls.refusal(bundled_copy)
    record_path(bundled_copy.path, other.parity_record).unlink()
    _record(bundled_copy, cls, model_sha256="0" * 64)
    assert "another model" in cls.refusal(bundled_copy)
    _record(bundled_copy, cls, form=other.parity_form(bundled_copy))
    assert "another form" in cls.refusal(bundled_copy)
    _record(bundled_copy, cls, passed=False, max_abs_diff_points=2.3)
    assert "2.3 points" in cls.refusal(bundled_copy)
    _record(bundled_copy, cls)
    assert cls.refusal(bundled_copy) is None
    if cls.unavailable_reason() is None:
        assert backends.resolve(name, bundled_copy) == name
        if all(backends.BACKENDS[n].unavailable_reason() for n in ("tensorrt", "torch-cuda")):
            assert backends.resolve("auto", bundled_copy) == name
    record_path(bundled_copy.path, cls.parity_record).unlink()


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory):
    """One cache for both INT8 backends: the calibration library is simulated once."""
    return tmp_path_factory.mktemp("int8_cache")


@pytest.mark.slow
@pytest.mark.parametrize(
    "fp32_name, int8_name, column_agreement",
    [("onnxruntime", "onnxruntime-int8", 0.8), ("openvino", "openvino-int8", 0.98)],
)
def test_int8_agrees_with_fp32_on_simulated_frames(
    bundled_copy, int8_cache, fp32_name, int8_name, column_agreement
):
    """Same frames through the FP32 and the INT8 graph: the depth class of most pixels and the
    mean column-pixel confidence stay; a broken quantization (wrong scales, a skipped
    calibration) would not. Measured (pixels agreeing / column pixels agreeing / confidence
    change): onnxruntime v6 0.986 / 0.932 / 0.008, v7 0.978 / 0.894 / 0.0004; v7 calibrated on
    constant frames 0.79 / 0.00 / 0.23; OpenVINO, the shipped graph (fitted by ``segdepth
    quantize``) 0.997 / 0.988 / 0.0002, the earlier post-training form 0.998 / 0.991 / 0.001
    (column pixels: 0.984 with only the first convolution and the heads in float32, 0.971 with
    every layer quantized; quantized with dynamic sides, on the demo's frames, 0.78 / 0.05).
    Whether INT8 is accurate enough to offer is the parity record's question, not this test's."""
    from engine.quantize import calibration_frames

    for name in (fp32_name, int8_name):
        if backends.unavailable_reason(name):
            pytest.skip(f"{name}: {backends.unavailable_reason(name)}")
    _record(bundled_copy, backends.BACKENDS[int8_name])
    frames = calibration_frames(
        CalibrationConfig(structures=0, slab_frames=4, seed=8000), int8_cache
    )[:, 0]
    fp32 = backends.create(fp32_name, bundled_copy, cache_dir=int8_cache).infer(frames)
    int8 = backends.create(int8_name, bundled_copy, cache_dir=int8_cache).infer(frames)
    d32, d8 = fp32.depth_prob.argmax(1), int8.depth_prob.argmax(1)
    assert (d32 == d8).mean() >= 0.95
    column = d32 > 0
    assert column.mean() > 0.05  # the frames show columns
    assert (d32 == d8)[column].mean() >= column_agreement
    conf32, conf8 = fp32.depth_prob.max(1)[column], int8.depth_prob.max(1)[column]
    assert abs(conf32.mean() - conf8.mean()) < 0.03


def _fed_by_fake_quantize(node, hops: int = 3) -> bool:
    """Whether an input of OpenVINO graph ``node`` comes through a FakeQuantize within ``hops``
    producers (weights pass a Convert and a Multiply or two on their way)."""
    for port in node.inputs():
        producer = port.get_source_output().get_node()
        if producer.get_type_name() == "FakeQuantize" or (
            hops > 1 and _fed_by_fake_quantize(producer, hops - 1)
        ):
            return True
    return False


def test_openvino_int8_needs_the_models_own_unchanged_graph(bundled_copy, tmp_path):
    """openvino-int8 is refused for a model without its fitted graph, with a graph fitted to
    another model file, or with a graph changed since its fit, whatever its parity record
    says; and the shipped parity record was measured on the shipped graph."""
    cls = backends.BACKENDS["openvino-int8"]
    shipped = load(default_model_path())
    record = json.loads(record_path(shipped.path, cls.parity_record).read_text())
    assert record["form"] == cls.parity_form(shipped)
    assert (cls.refusal(shipped) is None) == record["passed"]
    lone = tmp_path / "lone.pt"
    shutil.copy(default_model_path(), lone)
    assert "no OpenVINO INT8 graph" in cls.refusal(load(lone))
    assert "segdepth quantize" in cls.refusal(load(lone))
    for source, target in _int8_files(default_model_path(), lone):
        shutil.copy(source, target)
    _record(load(lone), cls)
    assert cls.refusal(load(lone)) is None
    fit = json.loads(fit_record_path(lone).read_text())
    fit_record_path(lone).write_text(json.dumps({**fit, "model_sha256": "0" * 64}))
    assert "fitted to another model file" in cls.refusal(load(lone))
    fit_record_path(lone).write_text(json.dumps(fit))
    with open(graph_path(lone).with_suffix(".bin"), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    assert "changed after its fit" in cls.refusal(load(lone))
    with pytest.raises(RuntimeError, match="changed after its fit"):
        backends.create("openvino-int8", load(lone), ignore_parity=True)


@pytest.mark.slow
def test_openvino_int8_keeps_the_first_convolution_and_the_heads_in_float(bundled_copy):
    """The shipped INT8 graph runs the full-resolution level's convolutions and the two heads
    (:data:`engine.openvino_qat.FLOAT_LAYERS`) on float inputs and every other convolution on
    quantized ones."""
    if backends.unavailable_reason("openvino-int8"):
        pytest.skip(backends.unavailable_reason("openvino-int8"))
    import openvino as ov

    graph = ov.Core().read_model(str(graph_path(bundled_copy.path)))
    convolutions = [op for op in graph.get_ops() if op.get_type_name() == "Convolution"]
    floats = [op for op in convolutions if not _fed_by_fake_quantize(op)]
    assert len(convolutions) == len(list(_convolutions(bundled_copy.model)))
    assert len(floats) == len(FLOAT_LAYERS)
    first = [op for op in convolutions if _reaches(op, "Parameter", lambda o: _producers(o)[:1])]
    heads = [op for op in convolutions if _reaches(op, "Result", _consumers)]
    assert len(first) == 1 and len(heads) == 2
    assert all(op in floats for op in first + heads)


def _producers(node):
    return [port.get_source_output().get_node() for port in node.inputs()]


def _consumers(node):
    return [i.get_node() for out in node.outputs() for i in out.get_target_inputs()]


def _reaches(node, kind: str, step) -> bool:
    """Whether ``node`` reaches an op of type ``kind`` through ``step`` (producers or consumers)
    without passing another convolution."""
    for other in step(node):
        if other.get_type_name() == kind:
            return True
        if other.get_type_name() != "Convolution" and _reaches(other, kind, step):
            return True
    return False


def _convolutions(model):
    import torch

    return (m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_ignore_parity_runs_a_refused_backend_named_explicitly_and_says_so(
    bundled_copy, caplog, endpoint_factory
):
    """A refused backend runs only when named with ignore_parity (logged), never by auto, and
    serve's statistics say why it was not offered."""
    from engine.serve import ServeConfig, Server

    record_path(bundled_copy.path, "int8").unlink(missing_ok=True)
    with caplog.at_level("WARNING", logger="engine.backends"):
        assert (
            backends.resolve("onnxruntime-int8", bundled_copy, ignore_parity=True)
            == "onnxruntime-int8"
        )
    assert "not offered for this model, run anyway" in caplog.text
    assert backends.resolve("auto", bundled_copy, ignore_parity=True) != "onnxruntime-int8"
    name = "torch-cpu-bf16"  # builds nothing before its first frame, unlike INT8's quantization
    if backends.unavailable_reason(name):
        pytest.skip(f"{name}: {backends.unavailable_reason(name)}")
    record_path(bundled_copy.path, "bf16").unlink(missing_ok=True)

    def config(**kw):
        return ServeConfig(
            frames=endpoint_factory(),
            results=endpoint_factory(),
            viewer=None,
            model=str(bundled_copy.path),
            backend=name,
            **kw,
        )

    with pytest.raises(RuntimeError, match="--ignore-parity runs it anyway"):
        Server(config())
    server = Server(config(ignore_parity=True))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        stats = server.stats()
        assert stats["backend"] == name
        assert "no BF16 parity record" in stats["backend_refusal"]
    finally:
        server.stop.set()
        thread.join(10)
        server.close()
