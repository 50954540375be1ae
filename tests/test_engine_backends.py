"""Every backend present agrees with torch-cpu FP32 (INT8 and BF16: tests/test_engine_int8.py and
tests/test_engine_bf16.py, on a trained model, within their own bounds); export to ONNX; TensorRT
skips cleanly."""

import json
import subprocess

import numpy as np
import pytest
from engine_support import save_random_model

from engine import backends
from engine.cli import BACKEND_NAMES
from engine.model_io import load
from engine.prediction import Prediction, channel_max


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(save_random_model(tmp_path_factory.mktemp("model") / "random.pt"))


@pytest.fixture(scope="module")
def frames(loaded):
    """Five Poisson frames (dose 20 e-/px) whose sides are NOT multiples of the model's: at
    max_batch 2, two chunks of one shape (a CUDA graph's outputs reused) and a short one."""
    m = loaded.size_multiple
    rng = np.random.default_rng(0)
    return (rng.poisson(20.0, (5, 2 * m + 6, 2 * m - 10)) / 20.0).astype(np.float32)


@pytest.fixture(scope="module")
def reference(loaded, frames):
    return backends.create("torch-cpu", loaded, max_batch=2).infer(frames)


def test_cli_names_match_the_backends():
    assert BACKEND_NAMES == tuple(backends.BACKENDS)


def test_reference_shapes_and_probabilities(reference, frames):
    n, h, w = frames.shape
    assert reference.depth_prob.shape == (n, 11, h, w)
    assert reference.species_prob.shape == (n, 3, h, w)
    assert np.allclose(reference.depth_prob.sum(axis=1), 1, atol=1e-4)
    assert np.allclose(reference.species_prob.sum(axis=1), 1, atol=1e-4)


@pytest.mark.parametrize(
    "name",
    [n for n in BACKEND_NAMES if n not in ("onnxruntime-int8", "openvino-int8", "torch-cpu-bf16")],
)
def test_backend_matches_torch_cpu_fp32(name, loaded, frames, reference, tmp_path):
    reason = backends.unavailable_reason(name)
    if reason:
        pytest.skip(f"backend {name} unavailable here: {reason}")
    out = backends.create(name, loaded, max_batch=2, cache_dir=tmp_path).infer(frames)
    assert out.depth_prob.shape == reference.depth_prob.shape
    same_depth = (out.depth_prob.argmax(1) == reference.depth_prob.argmax(1)).mean()
    same_species = (out.species_prob.argmax(1) == reference.species_prob.argmax(1)).mean()
    assert same_depth >= 0.995 and same_species >= 0.995


def test_openvino_keeps_a_bounded_number_of_compiled_shapes(loaded, tmp_path):
    """A source that keeps changing the frame shape does not grow the compiled graphs without
    bound: the least recently used shape goes, and a shape used again is recompiled with the
    same answers."""
    if backends.unavailable_reason("openvino"):
        pytest.skip(backends.unavailable_reason("openvino"))
    backend = backends.create("openvino", loaded, max_batch=1, cache_dir=tmp_path)
    shapes = backend._shapes
    shapes.max_shapes = 2
    m = loaded.size_multiple
    rng = np.random.default_rng(1)
    frames = {k: (rng.poisson(20.0, (1, m * k, m)) / 20.0).astype(np.float32) for k in (1, 2, 3)}
    first = backend.infer(frames[1]).depth_prob
    backend.infer(frames[2])
    backend.infer(frames[1])  # used again: now the most recent
    backend.infer(frames[3])  # evicts shape 2, the least recently used
    assert shapes.shapes == [(1, 1, m, m), (1, 1, 3 * m, m)]
    backend.infer(frames[2])
    assert shapes.shapes == [(1, 1, 3 * m, m), (1, 1, 2 * m, m)]
    shapes.max_shapes = 1
    again = backend.infer(frames[1]).depth_prob  # recompiled after eviction
    assert shapes.shapes == [(1, 1, m, m)]
    assert np.array_equal(first, again)


def test_fp16_graph_for_tensorrt_matches_fp32(loaded, frames, reference, tmp_path):
    """The FP16 ONNX graph TensorRT builds from, run here by ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    from engine.export import INPUT_NAME, export_onnx
    from engine.model_io import pad_to_multiple

    path = export_onnx(loaded, tmp_path, half=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    padded, (h, w) = pad_to_multiple(frames, loaded.size_multiple)
    depth, _ = session.run(None, {INPUT_NAME: padded[:, None]})
    same = (depth[..., :h, :w].argmax(1) == reference.depth_prob.argmax(1)).mean()
    assert same >= 0.995


def test_auto_picks_the_first_available_and_bad_names_fail():
    first = next(n for n in BACKEND_NAMES if backends.unavailable_reason(n) is None)
    assert backends.resolve("auto") == first
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("nope")
    if backends.unavailable_reason("torch-cuda"):
        with pytest.raises(RuntimeError, match="unavailable here"):
            backends.resolve("torch-cuda")


def test_export_onnx_cli_has_dynamic_batch_and_size(loaded, segdepth_cmd, tmp_path):
    import onnxruntime as ort

    out = subprocess.run(
        [
            *segdepth_cmd,
            "export",
            "--format",
            "onnx",
            "--model",
            str(loaded.path),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (onnx_path,) = tmp_path.glob("*.onnx")
    info = json.loads(next(tmp_path.glob("*.export.json")).read_text())
    assert info["model_sha256"] == loaded.sha256 and info["dynamic_axes"][0] == "batch"
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    m = loaded.size_multiple
    for shape in ((1, 1, m, m), (3, 1, 2 * m, m)):
        depth, species = session.run(None, {"frames": np.ones(shape, np.float32)})
        assert depth.shape == (shape[0], 11, *shape[2:])
        assert species.shape == (shape[0], 3, *shape[2:])


def test_export_tensorrt_skips_with_the_reason(loaded, segdepth_cmd, tmp_path):
    from engine.export import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT is available here: the skip path does not apply")
    out = subprocess.run(
        [
            *segdepth_cmd,
            "export",
            "--format",
            "tensorrt",
            "--model",
            str(loaded.path),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert f"tensorrt export skipped: {reason}" in out.stderr
    assert not list(tmp_path.iterdir())


def test_median_filter_model_exports_and_matches_training(tmp_path):
    """A model with the paper's median filter (kernel 4) gives the training model's own
    probabilities on torch-cpu, and the same depth map through ONNX Runtime."""
    import torch

    from engine.model_io import pad_to_multiple
    from training.model import SegDepthUNet, UNetConfig, load_model, save_model

    torch.manual_seed(1)
    path = tmp_path / "median.pt"
    save_model(path, SegDepthUNet(UNetConfig(base_channels=8, median_kernel=4)))
    loaded = load(path)
    frames = (np.random.default_rng(1).poisson(2.5, (2, 70, 64)) / 2.5).astype(np.float32)
    ref = backends.create("torch-cpu", loaded).infer(frames)
    model, _ = load_model(path)
    padded, _ = pad_to_multiple(frames, loaded.size_multiple)
    with torch.no_grad():
        depth_logits, _ = model(torch.from_numpy(padded[:, None]))
    own = depth_logits.softmax(dim=1)[..., :70, :64].numpy()
    assert np.allclose(own, ref.depth_prob, atol=1e-5)
    out = backends.create("onnxruntime", loaded, cache_dir=tmp_path).infer(frames)
    assert (out.depth_prob.argmax(1) == ref.depth_prob.argmax(1)).mean() >= 0.995


def test_calibration_temperature_of_the_model_file_is_applied(tmp_path):
    import torch

    from training.model import SegDepthUNet, UNetConfig, load_model, save_model

    torch.manual_seed(2)
    path = tmp_path / "calibrated.pt"
    save_model(path, SegDepthUNet(UNetConfig(base_channels=8)), {"temperature": 2.5})
    loaded = load(path)
    frames = (np.random.default_rng(2).poisson(2.5, (1, 64, 64)) / 2.5).astype(np.float32)
    model, _ = load_model(path)
    with torch.no_grad():
        logits, _ = model(torch.from_numpy(frames[:, None]))
    expected = (logits / 2.5).softmax(dim=1).numpy()
    for name in ("torch-cpu", "onnxruntime"):
        out = backends.create(name, loaded, cache_dir=tmp_path).infer(frames)
        assert np.allclose(out.depth_prob, expected, atol=1e-5), name


def test_tta_in_the_engine_matches_training_tta(loaded, frames):
    """serve --tta: the backend's 8-fold average equals training.inference's TTA, and it is
    not the plain answer."""
    from training.inference import predict_batches, turn_scores

    backend = backends.create("torch-cpu", loaded, max_batch=2)
    side = min(frames.shape[-2:])
    square = np.ascontiguousarray(frames[..., :side, :side])
    out, turn, uncertainty = backends.infer_tta(backend, square)
    ((_, ref),) = predict_batches(loaded.model, square, len(square), loaded.temperature, tta=True)
    np.testing.assert_allclose(out.depth_prob, ref.probabilities, atol=2e-6)
    # a random model is nearly uniform, so the TTA average moves probabilities by ~1e-4
    plain_pred = backend.infer(square)
    plain = plain_pred.depth_prob
    assert np.abs(out.depth_prob - plain).max() > 2e-5
    # the turn score of its passes is the one of a separate quarter-turned inference
    turned = backend.infer(np.ascontiguousarray(np.rot90(square, 1, axes=(1, 2)))).depth_prob
    want = turn_scores(plain, np.rot90(turned, -1, axes=(2, 3)))
    assert want.min() > 0
    np.testing.assert_allclose(turn, want, rtol=1e-5)
    # the one-pass score is the plain pass's (the one the warning levels were measured on),
    # not the average's own
    np.testing.assert_allclose(uncertainty, plain_pred.uncertainty_scores(), rtol=1e-5)
    assert np.abs(uncertainty - out.uncertainty_scores()).max() > 1e-6


def test_tta_with_device_maps_stays_on_the_device_and_equals_the_host_answer(loaded, frames):
    """serve --tta on a backend that post-processes on its device (torch-cuda's default): the
    8 views are averaged where the network left them, a DevicePrediction comes back (a host
    array could not be made of CUDA tensors by numpy), equal to the host path's answer."""
    from engine.device_maps import DevicePrediction

    side = min(frames.shape[-2:])
    square = np.ascontiguousarray(frames[..., :side, :side])
    host = backends.infer_tta(backends.create("torch-cpu", loaded), square)
    device = backends.create("torch-cpu", loaded, device_maps=True)
    out = backends.infer_tta(device, square)
    assert isinstance(out.pred, DevicePrediction)
    np.testing.assert_allclose(out.pred.depth_prob, host.pred.depth_prob, atol=1e-6)
    np.testing.assert_allclose(out.pred.species_prob, host.pred.species_prob, atol=1e-6)
    np.testing.assert_allclose(out.turn, host.turn, rtol=1e-5)
    np.testing.assert_allclose(out.uncertainty, host.uncertainty, rtol=1e-5)


def test_channel_max_is_numpys_argmax_and_max_ties_included():
    rng = np.random.default_rng(3)
    prob = rng.random((2, 11, 33, 17)).astype(np.float32)
    prob[:, 4] = prob[:, 7] = 2.0  # a tie everywhere: the first channel wins, as in argmax
    prob[0, 9, :5] = 3.0
    index, best = channel_max(prob)
    assert index.dtype == np.uint8 and best.dtype == np.float32
    assert (index == prob.argmax(axis=1)).all() and (best == prob.max(axis=1)).all()
    depth, confidence, species = Prediction(prob, prob[:, :3]).maps()
    assert (depth == index).all() and (species == prob[:, :3].argmax(axis=1)).all()
    # a cropped (non-contiguous) float64 batch: read as float32, the same answers
    wide = rng.random((2, 11, 300, 520))
    wide[:, 6, 120:140] = wide[:, 2, 120:140] = 1.5
    crop = wide[:, :, 5:290, 7:500]
    index, best = channel_max(crop)
    want = crop.astype(np.float32)
    assert best.dtype == np.float32 and best.shape == (2, 285, 493)
    assert (index == want.argmax(axis=1)).all() and (best == want.max(axis=1)).all()
    # a NaN is the maximum (as numpy's maximum) and leaves the index where it was
    prob[1, 5, 3, 4] = np.nan
    index, best = channel_max(prob)
    assert np.isnan(best[1, 3, 4]) and index[1, 3, 4] == 4  # channel 4 leads before the NaN
    with pytest.raises(ValueError, match="channels"):
        channel_max(np.zeros((1, 257, 2, 2), np.float32))


def test_graph_batches_are_powers_of_two_capped_at_max_batch():
    """The CUDA backend captures one graph per padded batch: 6 for max_batch 32, not 32."""
    sizes = [backends.graph_batch(b, 32) for b in range(1, 33)]
    assert sorted(set(sizes)) == [1, 2, 4, 8, 16, 32]
    assert all(b <= g < 2 * b for b, g in zip(range(1, 33), sizes))
    assert [backends.graph_batch(b, 24) for b in (16, 17, 24)] == [16, 24, 24]
    for bad in (0, 33):
        with pytest.raises(ValueError, match="outside"):
            backends.graph_batch(bad, 32)


def test_cuda_padded_batches_match_torch_cpu_and_warm_captures_each_once(loaded, frames, reference):
    """Five frames at max_batch 8 run as a batch of 8 (three zero frames), the answers sliced
    back; warm() captured that graph beforehand, so inference adds none."""
    reason = backends.unavailable_reason("torch-cuda")
    if reason:
        pytest.skip(f"torch-cuda unavailable here: {reason}")
    backend = backends.create("torch-cuda", loaded, max_batch=8)
    backend.warm(frames.shape[1:])
    captured = set(backend._graphs)
    assert sorted(s[0] for s in captured) == [1, 2, 4, 8]
    out = backend.infer(frames)
    assert set(backend._graphs) == captured
    assert out.depth_prob.shape == reference.depth_prob.shape
    assert (out.depth_prob.argmax(1) == reference.depth_prob.argmax(1)).mean() >= 0.995
