"""A user's mistake ends in one line that names the file or port and says the fix (issue 11)."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess

import h5py
import numpy as np
import pytest
import torch


def _fails(cmd: list[str], *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``segdepth ARGS``; it must exit 2 with exactly one line on stderr, returned."""
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stderr


def _images(path, side: int) -> str:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.ones((2, side, side), np.float32))
    return str(path)


def test_endpoint_without_a_scheme(segdepth_cmd):
    err = _fails(segdepth_cmd, "serve", "--frames", "localhost:6655")
    assert "localhost:6655" in err and "tcp://localhost:6655" in err


def test_port_already_in_use(segdepth_cmd, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        endpoint = f"tcp://127.0.0.1:{holder.getsockname()[1]}"
        err = _fails(
            segdepth_cmd, "watch", str(tmp_path), "--to-engine", endpoint, "--to-viewer", "none"
        )
    assert endpoint in err and "already in use" in err


def test_output_in_a_missing_folder(segdepth_cmd):
    err = _fails(segdepth_cmd, "simulate", "--out", "nodir/x.h5")
    assert "nodir/x.h5" in err and "mkdir -p nodir" in err


def test_a_file_that_is_not_a_model(segdepth_cmd, tmp_path):
    err = _fails(segdepth_cmd, "export", "--model", "README.md", "--out", str(tmp_path))
    assert "README.md is not a SegDepth model file" in err and "segdepth train" in err


def test_predict_names_an_input_that_is_not_hdf5(segdepth_cmd, tmp_path):
    err = _fails(segdepth_cmd, "predict", "README.md", str(tmp_path / "out.h5"))
    assert "README.md is not an HDF5 file" in err


def test_viewer_without_a_display_points_to_the_screenshot(segdepth_cmd):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")
    }
    err = _fails(segdepth_cmd, "view", env=env)
    assert "--screenshot" in err and "QT_QPA_PLATFORM=offscreen" in err


def test_train_checks_image_sizes_before_loading(segdepth_cmd, tmp_path):
    data = _images(tmp_path / "250.h5", 250)
    err = _fails(segdepth_cmd, "train", "--data", data, "--out", str(tmp_path / "run"))
    assert "250x250 px" in err and "224 or 256" in err
    assert not (tmp_path / "run").exists()
    err = _fails(
        segdepth_cmd,
        "train",
        "--data",
        _images(tmp_path / "256.h5", 256),
        "--out",
        str(tmp_path / "run"),
        "--crop",
        "100",
    )
    assert "--crop 100" in err and "96 or 128" in err


def test_train_refuses_to_overwrite_a_run(segdepth_cmd, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n')
    err = _fails(
        segdepth_cmd, "train", "--data", _images(tmp_path / "256.h5", 256), "--out", str(run)
    )
    assert str(run) in err and "--resume" in err and "--force" in err
    assert (run / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_resume_loads_tensors_and_numbers_only(tmp_path):
    from training.train import _restore_checkpoint

    model = torch.nn.Linear(2, 2)
    optimiser = torch.optim.Adam(model.parameters())
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "optimiser": optimiser.state_dict(),
            "epoch": 0,
            "best_loss": 1.0,
            "best_state": None,
            "since_best": 0,
            "best_metrics": {},
            "wall_s": 1.0,
            "smuggled": _Smuggled(),
        },
        path,
    )  # a class instance: not weights
    with pytest.raises(pickle.UnpicklingError):
        _restore_checkpoint(path, model, optimiser)


class _Smuggled:
    """An object that pickles but is neither a tensor nor a number."""
