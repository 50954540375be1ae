"""Where the engine's post-processing spends its time per frame, on any backend.

Runs what ``serve``'s publish stage runs on each batch (``Prediction.maps``, the one-pass score,
then ``SessionAnalysis.update_series`` of the batch's frames, each frame's result table and
buffers) on a drifting series of noisy frames, and prints the stage's ms per frame while the
column reference grows (the first ``ColumnConfig.reference_frames``) and after, and,
profiled by cProfile after it, the functions that took the most time. With a CUDA backend the
waits for the GPU show up in the calls that copy to the host or wait for it (``Tensor.cpu``,
``Stream.synchronize``).
Inference itself is outside the profile.

    PYTHONPATH=. python3 scripts/profile_post.py --backend torch-cuda \
        --frames-from .devframes/e2e_512.h5        # a GPU machine without the project installed
    python scripts/profile_post.py --backend torch-cpu --size 256 --frames 16   # here
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch
from scipy import ndimage

from engine import backends, model_io
from engine.bench_e2e import E2EConfig, clean_frames, noisy_frames
from engine.occupancy import SessionAnalysis
from sim_source.hrtem import make_grid


def drifting(clean: np.ndarray, count: int, dose: float, seed: int) -> np.ndarray:
    """``count`` noisy frames (count, H, W) of the first clean frame, drifting 0.3 px per frame
    along both axes (counts at ``dose`` e-/px, divided by the dose as ``serve`` does)."""
    shifted = np.stack(
        [ndimage.shift(clean[0], (0.3 * i, 0.3 * i), order=1, mode="nearest") for i in range(count)]
    )
    counts = noisy_frames(shifted, dose, count, np.random.default_rng(seed))
    return counts.astype(np.float32) / np.float32(dose)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="auto")
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--size", type=int, default=512, help="frame side, px")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dose", type=float, default=2.5, help="e-/px")
    p.add_argument("--postprocess", choices=("device", "host"), default="device")
    p.add_argument("--frames-from", nargs="*", default=[], help="dataset files (no abTEM)")
    p.add_argument("--top", type=int, default=25, help="functions listed")
    args = p.parse_args(argv)

    loaded = model_io.load(args.model)
    backend = backends.create(
        args.backend, loaded, max_batch=args.batch, device_maps=args.postprocess == "device"
    )
    clean = clean_frames(args.size, E2EConfig(frames_from=args.frames_from))
    frames = drifting(clean, args.frames, args.dose, seed=0)
    backend.warm(frames.shape[1:])
    preds = [backend.infer(frames[i : i + args.batch]) for i in range(0, len(frames), args.batch)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # inference done: the profile holds post-processing alone

    analysis = SessionAnalysis(pixel_size_pm=make_grid(args.size).pixel_size_pm)
    profile = cProfile.Profile()
    spent = {"reference": [0.0, 0], "steady": [0.0, 0]}  # s, frames
    columns = 0
    for k, pred in enumerate(preds):
        # the batch's share of the per-batch reductions goes to the phase its first frame is in
        phase = "steady" if analysis.tracker.reference_complete else "reference"
        t = time.perf_counter()
        if phase == "steady":
            profile.enable()
        depth, _, _ = pred.maps()
        pred.uncertainty_scores()
        seqs = [k * args.batch + i for i in range(len(depth))]
        series = analysis.update_series(
            [pred.frame(i) for i in range(len(depth))], seqs, [None] * len(seqs)
        )
        for occ in series:
            occ.table()
            occ.buffers()
            columns = len(occ.columns.ids)
        profile.disable()
        spent[phase][0] += time.perf_counter() - t
        spent[phase][1] += len(depth)
    print(
        f"{backend.name}, {args.postprocess} post-processing, {args.size}² frames, batch "
        f"{args.batch}, {columns} columns: "
        + ", ".join(
            f"{phase} {1e3 * s / max(n, 1):.2f} ms per frame ({n} frames)"
            for phase, (s, n) in spent.items()
        )
        + " (the column reference grows over the first frames; steady: profiled)"
    )
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
