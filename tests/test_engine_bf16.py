"""The BF16 CPU backend: a bfloat16 network with a float32 softmax, compiled per frame shape,
that runs only on a CPU with native BF16 and agrees with FP32 on a trained model's frames.
(Whether it is accurate enough to offer is the parity record's question:
tests/test_engine_int8.py.)"""

import logging

import numpy as np
import pytest
import torch
from engine_support import save_random_model

from engine import backends
from engine.model_io import Float32Module, load
from engine.quantize import CalibrationConfig

NATIVE_BF16 = backends.native_bf16_reason()
needs_native_bf16 = pytest.mark.skipif(NATIVE_BF16 is not None, reason=str(NATIVE_BF16))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return load(save_random_model(tmp_path_factory.mktemp("model") / "random.pt"))


@pytest.fixture
def small_frames(random_model):
    m = random_model.size_multiple
    rng = np.random.default_rng(1)
    return (rng.poisson(20.0, (2, 2 * m, 2 * m)) / 20.0).astype(np.float32)


def test_bf16_is_unavailable_without_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert "AMX" in backends.unavailable_reason("torch-cpu-bf16")
    with pytest.raises(RuntimeError, match="unavailable here"):
        backends.resolve("torch-cpu-bf16")
    assert backends.resolve("auto") != "torch-cpu-bf16"


def test_bf16_head_reads_the_frame_and_computes_the_softmax_in_float32(random_model, small_frames):
    """The network's logits are bfloat16 (8-bit mantissa); a softmax taken in bfloat16 would
    give a few hundred distinct probabilities and ties in the argmax, float32 gives one per
    pixel."""
    head = random_model.head(bf16=True)
    # the convolutions that read the frame and write the logits run in float32
    for module in (head.model.inc[0], head.model.depth_head, head.model.species_head):
        assert isinstance(module, Float32Module)
    with torch.inference_mode():
        depth, species = head(torch.from_numpy(small_frames[:, None]))
    assert depth.dtype == species.dtype == torch.float32
    assert torch.allclose(depth.sum(1), torch.ones(()), atol=1e-5)
    confidence = depth.amax(1)
    assert confidence.unique().numel() > 0.5 * confidence.numel()


def test_a_failed_compilation_falls_back_to_eager_with_a_warning(
    random_model, small_frames, monkeypatch, caplog
):
    def broken(module, **kw):
        def run(x):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    backend = backends.TorchCPUBF16Backend(random_model, compile=True)
    with caplog.at_level(logging.WARNING, logger="engine.backends"):
        out = backend.infer(small_frames)
    assert "running BF16 eager" in caplog.text and not backend.compiled
    eager = backends.TorchCPUBF16Backend(random_model, compile=False).infer(small_frames)
    assert np.array_equal(out.depth_prob, eager.depth_prob)


@needs_native_bf16
@pytest.mark.slow
def test_compiled_bf16_agrees_with_fp32_on_simulated_frames(tmp_path):
    """Simulated slabs through the bundled model in FP32 and in compiled BF16: the depth class
    of nearly every pixel and the mean column-pixel confidence stay. Measured on v7 (pixels /
    column pixels agreeing / confidence change): 0.999 / 0.995 / 0.0001; with the input's
    convolution in bfloat16 too, column pixels agree about 0.975 (512² frames). The shape
    warmed is the shape run: no compilation after warm()."""
    from torch._dynamo.utils import counters

    from engine.quantize import calibration_frames

    loaded = load()
    frames = calibration_frames(
        CalibrationConfig(structures=0, slab_frames=3, seed=8100), tmp_path
    )[:, 0]
    fp32 = backends.create("torch-cpu", loaded).infer(frames)
    bf16 = backends.TorchCPUBF16Backend(loaded)
    bf16.warm(frames.shape[1:])
    graphs = counters["stats"]["unique_graphs"]
    out = bf16.infer(frames)
    assert bf16.compiled and counters["stats"]["unique_graphs"] == graphs
    d32, d16 = fp32.depth_prob.argmax(1), out.depth_prob.argmax(1)
    column = d32 > 0
    assert column.mean() > 0.05  # the frames show columns
    assert (d32 == d16).mean() >= 0.99
    assert (d32 == d16)[column].mean() >= 0.985
    conf32, conf16 = fp32.depth_prob.max(1)[column], out.depth_prob.max(1)[column]
    assert abs(conf32.mean() - conf16.mean()) < 0.003
