"""``segdepth quantize`` on a tiny library: the distillation fit moves the INT8
student towards the FP32 answers, the OpenVINO graph written beside the model carries the fit,
its fit record ties it to the model file, and a library of the robustness suite's seeds is
refused."""

import json
import shutil

import h5py
import numpy as np
import pytest
from engine_support import save_random_model

from engine import backends
from engine.model_io import default_model_path, load
from engine.openvino_qat import (
    QATConfig,
    fit_record_path,
    graph_path,
    graph_sha256,
    quantize,
    unavailable_reason,
)
from engine.parity import record_path
from engine.quantize import CalibrationConfig
from sim_source.wave_library import LibraryConfig, write_library
from training.robustness import suite_files

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Two structures, a 6.8 Å field, a seed of neither suite nor model."""
    path = tmp_path_factory.mktemp("qat") / "waves.h5"
    write_library(path, LibraryConfig(count=2, gpts=256, seed=31), progress=False)
    return path


def _config(library, model, tmp_path, **kw) -> QATConfig:
    small = CalibrationConfig(structures=0, slab_frames=2, size=64)
    settings = dict(views=8, crop=64, batch=2, calibration=small, cache_dir=str(tmp_path))
    return QATConfig(library=str(library), model=str(model), **{**settings, **kw})


def _kl_of_graph(xml, model_path, frames) -> float:
    """KL divergence of the OpenVINO graph's probabilities from the FP32 model's, summed over
    both heads' classes, mean over pixels (the fit record's measure)."""
    import torch

    from engine.openvino_graph import CompiledShapes

    head = load(model_path).head()
    with torch.no_grad():
        want = [t.numpy() for t in head(torch.from_numpy(frames))]
    got = CompiledShapes(xml, threads=2).run(frames)
    pixels = frames.shape[0] * frames.shape[2] * frames.shape[3]
    return sum(
        float((w * (np.log(np.maximum(w, 1e-30)) - np.log(np.maximum(g, 1e-30)))).sum() / pixels)
        for w, g in zip(want, got)
    )


@pytest.mark.slow
def test_quantize_fits_the_int8_graph_and_writes_it_beside_the_model(library, tmp_path):
    model = tmp_path / "model.pt"
    shutil.copy(default_model_path(), model)  # a random model's answers are too flat to fit
    unfitted = quantize(_config(library, model, tmp_path, steps=0))
    assert unfitted["kl_after"] == unfitted["kl_before"] > 0  # no step, no change
    unfitted_graph = tmp_path / "unfitted.xml"
    shutil.copy(graph_path(model), unfitted_graph)
    shutil.copy(graph_path(model).with_suffix(".bin"), unfitted_graph.with_suffix(".bin"))

    fitted = quantize(_config(library, model, tmp_path, steps=20))
    assert fitted["kl_after"] < 0.7 * fitted["kl_before"]
    assert fitted["kl_before"] == pytest.approx(unfitted["kl_before"])  # same start, same views
    loaded = load(model)
    record = json.loads(fit_record_path(model).read_text())
    assert record["model_sha256"] == loaded.sha256
    assert record["library_seed"] == 31 and record["config"]["steps"] == 20
    assert record["graph_sha256"] == graph_sha256(graph_path(model)) != graph_sha256(unfitted_graph)
    # the converted graph carries the fit: closer to FP32 than the unfitted graph on new frames
    rng = np.random.default_rng(5)
    frames = rng.poisson(5.0, (2, 1, 64, 64)).astype(np.float32) / 5.0
    assert _kl_of_graph(graph_path(model), model, frames) < _kl_of_graph(
        unfitted_graph, model, frames
    )
    # and the engine runs it, once a parity record measured on it passes
    cls = backends.BACKENDS["openvino-int8"]
    assert "no INT8-OPENVINO parity record" in cls.refusal(loaded)
    record_path(model, cls.parity_record).write_text(
        json.dumps({"model_sha256": loaded.sha256, "form": cls.parity_form(loaded), "passed": True})
    )
    assert cls.refusal(loaded) is None
    pred = backends.create("openvino-int8", loaded).infer(frames[:, 0])
    assert pred.depth_prob.shape == (2, 11, 64, 64)
    np.testing.assert_allclose(pred.depth_prob.sum(1), 1.0, atol=1e-4)


def test_quantize_refuses_a_library_of_the_robustness_suite(library, tmp_path):
    model = save_random_model(tmp_path / "model.pt")
    suite_seeded = tmp_path / "suite_seeded.h5"
    shutil.copy(library, suite_seeded)
    with h5py.File(suite_seeded, "r+") as f:
        f.attrs["seed"] = suite_files()[0].seed
    with pytest.raises(ValueError, match="shares seed 3003 with a robustness-suite file"):
        quantize(_config(suite_seeded, model, tmp_path, steps=0))
    assert not graph_path(model).exists()


def test_bench_engine_lists_openvino_int8_as_not_run_for_a_model_without_its_graph(
    tmp_path, capsys
):
    """The benchmark times what runs and says why the INT8 graph's backend could not."""
    from engine.bench import BenchConfig, run_bench

    model = save_random_model(tmp_path / "model.pt")
    cfg = BenchConfig(
        model=str(model), backends="openvino-int8,openvino", sizes=[64], batches=[1], iterations=1
    )
    report = run_bench(cfg, tmp_path / "bench.json")
    rows = {r["backend"]: r for r in report["rows"]}
    assert rows["openvino"]["status"] == "ok" and rows["openvino"]["frames_per_s"] > 0
    assert rows["openvino-int8"]["status"].startswith("not run")
    assert "no OpenVINO INT8 graph" in rows["openvino-int8"]["status"]
    assert "no OpenVINO INT8 graph" in capsys.readouterr().out
