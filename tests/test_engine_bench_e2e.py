"""``segdepth bench engine --e2e`` runs a real serve process over loopback sockets and reports
throughput, latency and each stage's time; a backend that cannot run, or is not offered for the
model, is listed with why."""

import json

from engine_support import save_random_model

from engine.bench_e2e import E2EConfig, run_e2e


def test_e2e_bench_through_a_serve_process(tmp_path, capsys):
    model = save_random_model(tmp_path / "random.pt")
    cfg = E2EConfig(
        model=str(model),
        backends=["onnxruntime", "tensorrt", "onnxruntime-int8"],
        sizes=[64],
        e2e_frames=4,
        paced_frames=3,
        warmup=1,
        rate_fps=20.0,
        max_batch=2,
    )
    report = run_e2e(cfg, tmp_path / "e2e.json")
    ok, missing, refused = report["rows"]
    assert ok["backend"] == "onnxruntime" and ok["size"] == 64 and ok["tta"] is False
    assert ok["results_sent"] == 1 + 4 + 3  # every frame answered through the process
    assert ok["frames_per_s"] > 0 and 0 < ok["latency_ms_p50"] <= ok["latency_ms_p99"]
    for stages in (ok["stage_ms_per_frame"], ok["stage_ms_per_frame_p50"]):
        assert set(stages) == {"prepare", "infer", "postprocess", "publish"}
        assert all(v is not None and v >= 0 for v in stages.values())
    assert 0 < ok["postprocess_share"] < 10
    assert missing["backend"] == "tensorrt" and missing["status"].startswith("not run")
    assert refused["status"].startswith("not offered") and "parity" in refused["status"]
    assert json.loads((tmp_path / "e2e.json").read_text())["rows"][0]["results_sent"] == 8
    assert "onnxruntime" in capsys.readouterr().out


def test_e2e_bench_with_test_time_augmentation_runs_serve_with_it(tmp_path, capsys):
    """`bench engine --e2e --tta` times serve --tta: the serve process itself says it averaged
    the 8 views, and every frame is answered."""
    from engine.cli import e2e_config
    from segdepth.cli import build_parser

    model = save_random_model(tmp_path / "random.pt")
    args = build_parser().parse_args(
        ["bench", "engine", "--e2e", "--tta", "--backends", "onnxruntime", "--model", str(model)]
    )
    cfg = e2e_config(args)
    assert cfg.tta and not e2e_config(build_parser().parse_args(["bench", "engine"])).tta
    cfg.sizes, cfg.e2e_frames, cfg.paced_frames, cfg.warmup, cfg.rate_fps = [64], 3, 2, 1, 20.0
    (row,) = run_e2e(cfg, tmp_path / "e2e.json")["rows"]
    assert row["tta"] is True and row["results_sent"] == 1 + 3 + 2
    assert "--tta (8 passes a frame)" in capsys.readouterr().out


def test_e2e_frames_from_dataset_files_pick_the_file_of_each_side(tmp_path):
    """Where abTEM is missing (a GPU machine), `--frames-from` gives the clean frames: the
    first four images of the file of that side, and a clear error when no file has it."""
    import h5py
    import numpy as np
    import pytest

    from engine.bench_e2e import clean_frames
    from engine.cli import e2e_config
    from segdepth.cli import build_parser

    rng = np.random.default_rng(0)
    paths = []
    for side in (32, 64):
        path = tmp_path / f"d{side}.h5"
        with h5py.File(path, "w") as f:
            f["images"] = rng.uniform(0.5, 1.5, (5, side, side)).astype(np.float32)
        paths.append(str(path))
    args = build_parser().parse_args(["bench", "engine", "--e2e", "--frames-from", *paths])
    cfg = e2e_config(args)
    assert cfg.frames_from == paths
    with h5py.File(paths[1]) as f:
        np.testing.assert_array_equal(clean_frames(64, cfg), f["images"][:4])
    with pytest.raises(ValueError, match="holds 128² images"):
        clean_frames(128, cfg)


def test_noisy_frames_are_poisson_counts_of_each_clean_frame_in_turn():
    """The bench's frames are drawn before timing: Poisson counts at the dose, one clean frame
    after another, each draw new (a frame cycle long enough that no two sends repeat soon)."""
    import numpy as np

    from engine.bench_e2e import noisy_frames

    clean = np.stack([np.full((64, 64), v, np.float32) for v in (0.5, 1.0, 2.0)])
    pool = noisy_frames(clean, 20.0, 6, np.random.default_rng(0))
    assert pool.shape == (6, 64, 64) and pool.dtype == np.uint16
    means = pool.reshape(6, -1).mean(axis=1)
    np.testing.assert_allclose(means, [10, 20, 40, 10, 20, 40], rtol=0.05)
    variances = pool.reshape(6, -1).astype(float).var(axis=1)
    np.testing.assert_allclose(variances, means, rtol=0.15)  # Poisson: variance = mean
    assert not np.array_equal(pool[0], pool[3])
