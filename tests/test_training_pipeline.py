"""Training on a tiny synthetic dataset file, and the train / evaluate / predict CLI as
subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import free_port
from engine_support import write_synthetic_session

from engine import backends
from engine.model_io import load as load_engine_model
from engine.ood import checked_scores
from training import precision
from training.bundle import bundle
from training.data import CropDataset, load_set
from training.inference import predict_batches, uncertainty_scores
from training.labels import TargetConfig
from training.model import SegDepthUNet, UNetConfig, load_model, save_model
from training.ood_levels import session_levels
from training.train import TrainConfig, train

PIXEL_PM = 5.3
COLUMN_DTYPE = np.dtype(
    [("image", "<i4"), ("x_px", "<f4"), ("y_px", "<f4"), ("species", "u1"), ("depth", "u1")]
)


def write_synthetic_set(path, n: int = 4, size: int = 64, seed: int = 0) -> None:
    """A dataset file in the contract layout: a lattice of Gaussian columns (Ce dark, O bright,
    contrast ∝ depth) on vacuum 1, label disks of 5 px, random depths 1-6 per column."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices((size, size))
    images = np.ones((n, size, size), np.float32)
    depth = np.zeros((n, size, size), np.uint8)
    species = np.zeros((n, size, size), np.uint8)
    table = []
    for i in range(n):
        for r in range(8, size, 16):
            for c in range(8, size, 16):
                s = 1 + ((r + c) // 16) % 2
                d = int(rng.integers(1, 7))
                r2 = (rows - r) ** 2 + (cols - c) ** 2
                sign = -1.0 if s == 1 else 1.0
                images[i] += sign * 0.08 * d * np.exp(-r2 / (2 * 2.5**2))
                disk = r2 <= 25
                depth[i][disk], species[i][disk] = d, s
                table.append((i, c, r, s, d))
    with h5py.File(path, "w") as f:
        f["images"], f["depth"], f["species"] = images, depth, species
        f["columns"] = np.array(table, COLUMN_DTYPE)
        f.attrs.update(pixel_size_pm=PIXEL_PM, n_complete=n)


@pytest.fixture
def synthetic(tmp_path):
    path = tmp_path / "syn.h5"
    write_synthetic_set(path)
    return path


def test_crops_and_flips_keep_image_and_targets_aligned(synthetic):
    data = load_set(synthetic, TargetConfig(), progress=False)
    assert len(data.centres[0]) == 16 and data.pixel_size_pm == PIXEL_PM
    ds = CropDataset(data, crop=32, seed=1)
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        image, labels, species, weights = ds[0]
        assert image.shape == (1, 32, 32) and labels.shape == weights.shape == (32, 32)
        # column pixels are dark (Ce) or bright (O) exactly where the labels say so
        col = (species == 1).numpy()
        assert image[0].numpy()[col].mean() < image[0].numpy()[species.numpy() == 0].mean()
        assert np.all(weights.numpy()[col] > 0.5)
        seen.add(image.numpy().tobytes())
    assert len(seen) > 1  # a different crop/flip per epoch
    ds.set_epoch(0)
    assert np.array_equal(ds[0][0].numpy(), CropDataset(data, 32, seed=1)[0][0].numpy())


def tiny_run(tmp_path, n: int, **kw) -> TrainConfig:
    """A run in tmp_path/run on n synthetic whole images (trained and validated on), batch 2."""
    data = tmp_path / "tiny.h5"
    write_synthetic_set(data, n=n)
    path = str(data)
    return TrainConfig(
        data=path, val=path, out=str(tmp_path / "run"), crop=None, batch_size=2, **kw
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_overfits_a_tiny_set(tmp_path, precision):
    """In bfloat16 autocast too: its convolutions run in bfloat16, its weights stay float32."""
    cfg = tiny_run(
        tmp_path,
        8,
        model=UNetConfig(base_channels=8, max_channels=32),
        noise_lambda=1000.0,
        epochs=30,
        lr=1e-2,
        patience=100,
        seed=0,
        warmup=0.05,
        precision=precision,
    )
    conv_dtypes: set[torch.dtype] = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, _, out: (
            conv_dtypes.add(out.dtype)
            if isinstance(module, torch.nn.Conv2d) and module.training
            else None
        )
    )
    try:
        train(cfg, progress=False)
    finally:
        hook.remove()
    assert conv_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    log = [json.loads(line) for line in metrics.splitlines()]
    assert len(log) == 30
    first, last = log[0], log[-1]
    assert last["train_loss"] < 0.3 * first["train_loss"]
    best = min(log, key=lambda r: r["val_loss"])
    assert best["pixelwise_accuracy"] > max(first["pixelwise_accuracy"] + 0.3, 0.85)
    assert best["centre_accuracy"] > first["centre_accuracy"] + 0.3
    model, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["validation"]["epoch"] == best["epoch"] and len(meta["data_sha256"]) == 64
    assert meta["train_config"]["precision"] == precision
    assert all(p.dtype == torch.float32 for p in model.parameters())


def run_cli(cmd, *args, timeout=120):
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cli_train_resume_evaluate(synthetic, tmp_path, segdepth_cmd):
    run = tmp_path / "run"
    common = (
        "train",
        "--data",
        synthetic,
        "--out",
        run,
        "--base-channels",
        "4",
        "--max-channels",
        "8",
        "--crop",
        "32",
        "--batch-size",
        "2",
        "--no-progress",
    )
    run_cli(segdepth_cmd, *common, "--epochs", "2")
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["base_channels"] == 4 and saved["noise_lambda"] == 2.5
    run_cli(segdepth_cmd, *common, "--epochs", "3", "--resume")
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # resumed at epoch 3, not restarted
    _, meta = load_model(run / "model.pt")
    assert meta["epochs_run"] == 3 and meta["train_config"]["epochs"] == 3

    report_dir = tmp_path / "report"
    refused = subprocess.run(
        [
            *segdepth_cmd,
            "evaluate",
            "--model",
            str(run / "model.pt"),
            "--data",
            str(synthetic),
            "--out",
            str(report_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode == 2 and "training or validation" in refused.stderr
    test_file = tmp_path / "test.h5"
    write_synthetic_set(test_file, seed=1)
    run_cli(
        segdepth_cmd,
        "evaluate",
        "--model",
        run / "model.pt",
        "--data",
        test_file,
        "--out",
        report_dir,
        "--sweep",
        "1",
        "10",
    )
    report = json.loads((report_dir / "report.json").read_text())
    for key in ("pixelwise_accuracy", "centre_accuracy", "detection_rate", "hallucination_rate"):
        assert 0 <= report["metrics"][key] <= 1
    assert np.array(report["confusion"]).sum() == 4 * 64 * 64
    assert [r["noise_lambda"] for r in report["noise_sweep"]] == [1.0, 10.0]
    assert report["calibration"]["temperature"] > 0
    for name in report["figures"].values():
        assert (report_dir / name).read_bytes()[:4] == b"\x89PNG"

    shipped = tmp_path / "models" / "segdepth_base16.pt"
    record = bundle(
        run / "model.pt",
        report_dir / "report.json",
        "segdepth train ...",
        "segdepth evaluate ...",
        shipped,
    )
    model, meta = load_model(shipped)
    assert meta["temperature"] == report["calibration"]["temperature"]
    assert meta["test"]["metrics"] == report["metrics"] == record["test"]["metrics"]
    assert json.loads(shipped.with_suffix(".json").read_text())["model_id"] == meta["model_id"]
    assert record["training"]["epochs_run"] == 3 and record["training"]["wall_s"] > 0

    # warning levels from in-distribution sessions: at their own dose, the 95th percentiles of
    # the scores the engine itself publishes for those frames (its backend, its turn check)
    sessions = [write_synthetic_session(tmp_path / f"s{k}.h5", 5, 64, seed=k) for k in (1, 2)]
    bundle(
        run / "model.pt",
        report_dir / "report.json",
        "t",
        "e",
        shipped,
        None,
        None,
        sessions,
        ood_doses=(20.0, 5.0),
    )
    _, meta = load_model(shipped)
    engine_model = load_engine_model(shipped)
    backend = backends.create("torch-cpu", engine_model)
    one_pass, turn = [], []
    for path in sessions:
        with h5py.File(path) as f:
            x = f["frames"][:].astype(np.float32) / np.float32(f.attrs["dose_e_per_px"])
        pred = backend.infer(x)
        depth, confidence, _ = pred.maps()
        one_pass.append(uncertainty_scores(depth, confidence))
        turn.append(checked_scores(backend.infer, x, pred, list(range(len(x)))))
    levels = meta["ood_levels"]
    assert levels["dose_e_per_px"] == [20.0, 5.0] and levels["frames_per_dose"] == 10
    assert levels["one_pass"][0] == pytest.approx(np.percentile(one_pass, 95), rel=1e-4)
    assert levels["turn"][0] == pytest.approx(np.percentile(turn, 95), rel=1e-3)
    assert levels["one_pass"][1] != levels["one_pass"][0]  # thinned to 5: other frames
    with pytest.raises(ValueError, match="lower dose"):
        session_levels(engine_model.model, 1.0, sessions, doses=(40.0,))


def tiny_model_file(path):
    torch.manual_seed(0)
    save_model(path, SegDepthUNet(UNetConfig(base_channels=4, max_channels=8)))
    return path


def test_cli_predict_handles_odd_sizes(tmp_path, segdepth_cmd):
    model_path = tiny_model_file(tmp_path / "m.pt")
    odd = tmp_path / "odd.h5"
    rng = np.random.default_rng(3)
    images = rng.poisson(2.5, (2, 97, 130)).astype(np.float32) / 2.5
    with h5py.File(odd, "w") as f:
        f["images"] = images
        f.attrs["pixel_size_pm"] = PIXEL_PM
    out = tmp_path / "pred.h5"
    run_cli(segdepth_cmd, "predict", odd, out, "--model", model_path, "--probabilities")
    model, _ = load_model(model_path)
    ((_, expected),) = predict_batches(model, images, batch_size=2)
    with h5py.File(out, "r") as f:
        assert f["depth"].shape == (2, 97, 130) and f["depth"].dtype == np.uint8
        assert f["species"].shape == (2, 97, 130) and f["species"].dtype == np.uint8
        assert f["confidence"].dtype == np.float32
        assert f["probabilities"].shape == (2, 11, 97, 130)
        conf = f["confidence"][:]
        assert conf.min() >= 0 and conf.max() <= 1
        assert np.array_equal(f["depth"][:], expected.depth)
        assert np.allclose(f["probabilities"][:], expected.probabilities, atol=1e-5)
        assert f.attrs["model_id"] == load_model(model_path)[1]["model_id"]


def test_predict_rejects_a_file_without_images(tmp_path, segdepth_cmd):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["frames"] = np.zeros((1, 8, 8), np.float32)
    model = tiny_model_file(tmp_path / "m.pt")
    proc = subprocess.run(
        [*segdepth_cmd, "predict", str(bad), str(tmp_path / "o.h5"), "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "needs an `images` dataset" in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_train_with_ddp(synthetic, tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "segdepth",
            "train",
            "--data",
            str(synthetic),
            "--out",
            str(run),
            "--base-channels",
            "4",
            "--max-channels",
            "8",
            "--crop",
            "32",
            "--batch-size",
            "2",
            "--epochs",
            "2",
            "--threads",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, meta = load_model(run / "model.pt")
    assert meta["hardware"]["world_size"] == 2 and meta["epochs_run"] == 2
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]  # written once, by rank 0


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_that_runs_it_natively(tmp_path, monkeypatch, native):
    """``auto`` resolves per machine, and the run's config and model record what it resolved
    to; on CUDA it stays fp32; a config from before the option reads as fp32."""
    monkeypatch.setattr(
        precision, "native_bf16_reason", lambda: None if native else "no AMX or AVX512-BF16"
    )
    assert precision.resolve_precision("auto", torch.device("cuda")) == "fp32"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        precision.resolve_precision("fp16", torch.device("cpu"))
    cfg = tiny_run(tmp_path, 2, model=UNetConfig(base_channels=4, max_channels=8), epochs=1)
    assert cfg.precision == "auto"
    train(cfg, progress=False)
    expected = "bf16" if native else "fp32"
    saved = TrainConfig.from_json((tmp_path / "run" / "config.json").read_text())
    assert saved.precision == expected
    assert load_model(tmp_path / "run" / "model.pt")[1]["train_config"]["precision"] == expected
    old = json.loads(saved.to_json())
    del old["precision"]
    assert TrainConfig.from_json(json.dumps(old)).precision == "fp32"
