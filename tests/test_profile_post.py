"""scripts/profile_post.py, the post-processing profiler run on lent GPU machines, here on the CPU:
it runs in a real process on a dataset file's frames and reports both phases and the profile."""

import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_profile_post_reports_both_phases_and_the_profile(tmp_path):
    # a vacuum-normalised 64² lattice of dark dots: the tracker finds columns in the answer or not,
    # the script must run either way
    y, x = np.mgrid[:64, :64]
    image = 1.0 - 0.3 * (np.cos(2 * np.pi * x / 8) * np.cos(2 * np.pi * y / 8) > 0.7)
    frames = tmp_path / "frames.h5"
    with h5py.File(frames, "w") as f:
        f.create_dataset("images", data=np.stack([image] * 4).astype(np.float32))
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "profile_post.py"),
            "--backend",
            "torch-cpu",
            "--postprocess",
            "host",
            "--size",
            "64",
            "--frames",
            "12",
            "--batch",
            "4",
            "--frames-from",
            str(frames),
            "--top",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    head = re.search(
        r"reference ([\d.]+) ms per frame \((\d+) frames\), steady ([\d.]+) ms per frame "
        r"\((\d+) frames\)",
        out.stdout,
    )
    assert head, out.stdout
    assert int(head[2]) + int(head[4]) == 12 and int(head[4]) > 0
    assert float(head[3]) > 0
    assert "Ordered by: internal time" in out.stdout
