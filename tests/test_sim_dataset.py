"""Dataset files: layout, determinism by seed, resume after an interruption, the CLI."""

import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from sim_source.dataset import DatasetConfig, run_inline, write_dataset

DATASETS = (
    "images",
    "depth",
    "species",
    "columns",
    "defocus_nm",
    "structure_index",
    "shape",
    "thickness_atoms",
    "wedge_width_A",
    "surface_x_A",
)


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in DATASETS}, dict(f.attrs)


def _assert_same(a, b):
    for key in DATASETS:
        assert np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.h5"
    cfg = DatasetConfig(count=10, size=64, seed=4, defocus_per_structure=3)
    assert write_dataset(path, cfg, progress=False) == 10
    return cfg, path


def test_layout_and_attributes(reference):
    cfg, path = reference
    data, attrs = _read(path)
    assert data["images"].shape == (10, 64, 64) and data["images"].dtype == np.float32
    assert data["depth"].dtype == np.uint8 and data["species"].dtype == np.uint8
    assert set(data["columns"].dtype.names) == {"image", "x_px", "y_px", "species", "depth"}
    assert attrs["n_complete"] == 10 and attrs["count"] == 10
    assert attrs["pixel_size_pm"] == pytest.approx(5.3, rel=0.02)
    assert attrs["C3_um"] == -9.0 and attrs["C5_mm"] == 5.0 and attrs["voltage_kV"] == 300.0
    assert "row" in attrs["axis_convention"] and attrs["seed"] == 4
    assert np.all((data["defocus_nm"] >= 1) & (data["defocus_nm"] <= 9))
    # labels and images share one grid: every listed column centre carries its depth
    cols = data["columns"]
    r, c = np.round(cols["y_px"]).astype(int), np.round(cols["x_px"]).astype(int)
    ok = (r >= 0) & (r < 64) & (c >= 0) & (c < 64)
    assert np.array_equal(data["depth"][cols["image"][ok], r[ok], c[ok]], cols["depth"][ok])
    # groups of 3 images share a structure (same labels), with different defocus
    assert np.array_equal(data["depth"][0], data["depth"][2])
    assert len(set(data["defocus_nm"][:3])) == 3


def test_same_seed_same_file_other_seed_differs(reference, tmp_path):
    cfg, path = reference
    again = tmp_path / "again.h5"
    write_dataset(
        again, DatasetConfig(count=4, size=64, seed=4, defocus_per_structure=3), progress=False
    )
    a, _ = _read(path)
    b, _ = _read(again)
    assert np.array_equal(a["images"][:4], b["images"])
    assert np.array_equal(a["depth"][:4], b["depth"])
    other = tmp_path / "other.h5"
    write_dataset(
        other, DatasetConfig(count=4, size=64, seed=5, defocus_per_structure=3), progress=False
    )
    assert not np.array_equal(a["images"][:4], _read(other)[0]["images"])


def test_resume_after_an_exception_equals_an_uninterrupted_run(reference, tmp_path):
    cfg, path = reference
    part = tmp_path / "part.h5"

    def failing(cfg_, groups):
        for k, records in enumerate(run_inline(cfg_, groups)):
            if k == 2:
                raise RuntimeError("worker lost")
            yield records

    with pytest.raises(RuntimeError):
        write_dataset(part, cfg, failing, progress=False)
    with h5py.File(part, "r") as f:
        assert f.attrs["n_complete"] == 6
        assert f["columns"]["image"].max() == 5
    assert write_dataset(part, cfg, resume=True, progress=False) == 10
    _assert_same(_read(part)[0], _read(path)[0])


def test_resume_refuses_another_config(reference, tmp_path):
    cfg, path = reference
    part = tmp_path / "p.h5"
    write_dataset(part, DatasetConfig(count=3, size=64, seed=4), progress=False)
    with pytest.raises(ValueError, match="another config"):
        write_dataset(part, DatasetConfig(count=3, size=64, seed=5), resume=True, progress=False)


def test_cli_sigint_leaves_a_valid_file_and_resume_completes_it(tmp_path, segdepth_cmd):
    out = tmp_path / "cli.h5"
    cmd = [
        *segdepth_cmd,
        "simulate",
        "--out",
        str(out),
        "--count",
        "60",
        "--size",
        "64",
        "--seed",
        "3",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen, buf = 0, b""
    deadline = time.monotonic() + 60
    while seen < 5 and time.monotonic() < deadline:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        buf += chunk
        seen = max([int(n) for n in re.findall(rb"(\d+)/60", buf)] or [0])
    assert 5 <= seen < 60, buf.decode(errors="replace")[-500:]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    with h5py.File(out, "r") as f:
        done = int(f.attrs["n_complete"])
        assert 5 <= done < 60
        assert np.all(f["images"][done - 1] > 0)
    subprocess.run([*cmd, "--resume"], check=True, capture_output=True, timeout=120)
    whole = tmp_path / "whole.h5"
    write_dataset(whole, DatasetConfig(count=60, size=64, seed=3), progress=False)
    data, attrs = _read(out)
    assert attrs["n_complete"] == 60
    _assert_same(data, _read(whole)[0])


@pytest.mark.slow
def test_dask_local_cluster_and_scheduler_address_equal_in_process(tmp_path, segdepth_cmd):
    from distributed import LocalCluster

    inline = tmp_path / "inline.h5"
    write_dataset(inline, DatasetConfig(count=8, size=64, seed=0), progress=False)
    args = ["simulate", "--count", "8", "--size", "64", "--seed", "0"]
    out = tmp_path / "local.h5"
    subprocess.run(
        [*segdepth_cmd, *args, "--out", str(out), "--workers", "2"],
        check=True,
        capture_output=True,
        timeout=170,
    )
    _assert_same(_read(out)[0], _read(inline)[0])
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster:
        remote = tmp_path / "remote.h5"
        subprocess.run(
            [*segdepth_cmd, *args, "--out", str(remote), "--scheduler", cluster.scheduler_address],
            check=True,
            capture_output=True,
            timeout=170,
        )
    _assert_same(_read(remote)[0], _read(inline)[0])


def test_cli_bad_input_is_a_clear_error(tmp_path, segdepth_cmd):
    out = tmp_path / "bad.h5"
    r = subprocess.run(
        [*segdepth_cmd, "simulate", "--out", str(out), "--size", "15", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "even number of pixels" in r.stderr
    assert "--size 15" in r.stderr and "use 16" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()  # checked before the file is created
    r = subprocess.run(
        [*segdepth_cmd, "simulate", "--session", "--out", str(out), "--dose", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "must be > 0" in r.stderr
