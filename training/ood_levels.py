"""Warning levels of the engine's out-of-distribution scores, measured on whole frames, per dose.

Both scores (the one-pass :func:`training.inference.uncertainty_scores` and the turn check's
:func:`training.inference.turn_scores`) are means over the pixels a frame's answer calls a
column, so their level and spread depend on how much of the field is particle (the robustness
suite's 192² crops, a particle edge in most, score higher and scatter more than 512² session
frames) and on the dose (fewer counts, less certain answers). The levels the engine compares
live frames with are therefore taken on simulated in-distribution sessions (`segdepth simulate
--session`) at the frame size served, at each dose of :data:`DOSES`: the given percentile of
their per-frame scores. A session recorded at dose D serves every dose d <= D: its counts are
thinned (each count kept with probability d / D), which gives exactly Poisson counts at d.
The engine interpolates the levels in log dose (:func:`warning_level`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch

from training.inference import (
    predict_batches,
    turn_scores,
    turned_probabilities,
    uncertainty_scores,
)

PERCENTILE = 95.0  #: in-distribution frames that stay below a level, %
DOSES = (0.5, 1.0, 2.5, 5.0, 10.0)  #: e⁻ per vacuum pixel: the training range, log-spaced
CHECKS_PER_VERDICT = 3  #: the engine warns on the median of a session's last this many checks


def running_medians(scores: np.ndarray, window: int = CHECKS_PER_VERDICT) -> np.ndarray:
    """Per score of a session's checks (in order), the median of it and up to ``window`` - 1
    before it: the session score the engine's warning reads after each check."""
    scores = np.asarray(scores, np.float64)
    return np.array([np.median(scores[max(0, k - window + 1) : k + 1]) for k in range(len(scores))])


def thinned(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Each count kept with probability ``fraction`` (binomial thinning: Poisson counts of
    mean m become exactly Poisson counts of mean ``fraction`` × m)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a session can only be thinned to a lower dose (fraction {fraction})")
    return rng.binomial(np.asarray(counts, np.int64), fraction).astype(np.float32)


def session_scores(
    model: torch.nn.Module,
    temperature: float,
    paths: Sequence[str | Path],
    dose: float | None = None,
    seed: int = 0,
    batch: int = 4,
) -> dict[str, np.ndarray]:
    """Per-frame scores {"uncertainty", "turn"} (frames of all files, in order) of session
    files, thinned to ``dose`` (None: each file's own), divided by the dose as the engine
    does."""
    scores: dict[str, list[np.ndarray]] = {"uncertainty": [], "turn": []}
    for k, path in enumerate(paths):
        with h5py.File(path, "r") as f:
            counts, recorded = f["frames"][:], float(f.attrs["dose_e_per_px"])
        if dose is None or dose == recorded:
            frames = counts.astype(np.float32) / np.float32(recorded)
        else:
            rng = np.random.default_rng([seed, k, int(round(dose * 1000))])
            frames = thinned(counts, dose / recorded, rng) / np.float32(dose)
        back = turned_probabilities(model, frames, temperature, batch)
        for sl, p in predict_batches(model, frames, batch, temperature):
            scores["uncertainty"].append(uncertainty_scores(p.depth, p.confidence))
            scores["turn"].append(turn_scores(p.probabilities, back[sl]))
    return {k: np.concatenate(v) for k, v in scores.items()}


def session_levels(
    model: torch.nn.Module,
    temperature: float,
    paths: Sequence[str | Path],
    doses: Sequence[float] = DOSES,
    percentile: float = PERCENTILE,
) -> dict:
    """The meta's ``ood_levels``: per dose (each at most every file's recorded dose) the
    percentile of the one-pass and of the turn scores of the sessions' frames, and how they
    were measured."""
    with h5py.File(paths[0], "r") as f:
        frame_px = list(f["frames"].shape[1:])
    one_pass, turn = [], []
    for dose in doses:
        scores = session_scores(model, temperature, paths, dose)
        one_pass.append(float(np.percentile(scores["uncertainty"], percentile)))
        turn.append(float(np.percentile(scores["turn"], percentile)))
    return {
        "dose_e_per_px": [float(d) for d in doses],
        "one_pass": one_pass,
        "turn": turn,
        "source": "in-distribution sessions, thinned to each dose",
        "files": [str(p) for p in paths],
        "frames_per_dose": int(len(scores["turn"])),
        "frame_px": frame_px,
        "percentile": percentile,
    }


def warning_level(meta: dict, kind: str, dose: float) -> float | None:
    """The model's warning level for score ``kind`` ("one_pass" or "turn") at ``dose``: its
    ``ood_levels`` interpolated in log dose (the end values beyond the measured doses), else,
    for the one-pass score, the single level of older model files (``ood_threshold``, from the
    robustness suite's crops), else None."""
    levels = meta.get("ood_levels") or {}
    if levels.get(kind):
        doses = np.log(np.asarray(levels["dose_e_per_px"], np.float64))
        return float(np.interp(np.log(max(dose, 1e-9)), doses, levels[kind]))
    single = meta.get("ood_threshold") if kind == "one_pass" else None
    return None if single is None else float(single)


def warning_rates(
    model: torch.nn.Module, temperature: float, levels: dict, paths: Sequence[str | Path]
) -> list[dict]:
    """Per session file, at its own dose: its frames' median scores, the fraction of its
    frames each level (interpolated at that dose) flags, and the fraction of frames the
    engine's session rule would warn on were every frame checked (``flagged_turn_session``:
    :func:`running_medians` of the turn scores against the level)."""
    meta = {"ood_levels": levels}
    rows = []
    for path in paths:
        with h5py.File(path, "r") as f:
            dose = float(f.attrs["dose_e_per_px"])
        scores = session_scores(model, temperature, [path])
        one, turn = warning_level(meta, "one_pass", dose), warning_level(meta, "turn", dose)
        assert one is not None and turn is not None
        rows.append(
            {
                "session": str(path),
                "dose_e_per_px": dose,
                "frames": int(len(scores["turn"])),
                "uncertainty_median": float(np.median(scores["uncertainty"])),
                "turn_median": float(np.median(scores["turn"])),
                "flagged_one_pass": float(np.mean(scores["uncertainty"] > one)),
                "flagged_turn": float(np.mean(scores["turn"] > turn)),
                "flagged_turn_session": float(np.mean(running_medians(scores["turn"]) > turn)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m training.ood_levels --model M [--levels-from S...] --check S...``: levels
    (the model's, or measured on in-distribution sessions), then how often they flag the
    frames of other sessions."""
    import argparse
    import json

    from training.model import load_model

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--levels-from",
        nargs="+",
        help="in-distribution sessions to measure levels on (default: the model's own levels)",
    )
    p.add_argument("--check", nargs="+", required=True, help="sessions to flag or not")
    p.add_argument("--out", help="JSON file for the levels and the table")
    args = p.parse_args(argv)
    model, meta = load_model(args.model)
    temperature = float(meta.get("temperature", 1.0))
    levels = (
        session_levels(model, temperature, args.levels_from)
        if args.levels_from
        else meta.get("ood_levels")
    )
    if not levels or "turn" not in levels:
        p.error(f"{args.model} has no warning levels per dose: give --levels-from")
    rows = warning_rates(model, temperature, levels, args.check)
    for d, one, turn in zip(levels["dose_e_per_px"], levels["one_pass"], levels["turn"]):
        print(f"levels at dose {d:g}: one pass {one:.4f}, turn {turn:.4f}")
    print(
        "| session | dose | frames | one-pass median | flagged | turn median | flagged "
        f"| flagged, median of {CHECKS_PER_VERDICT} |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {Path(r['session']).stem} | {r['dose_e_per_px']:g} | {r['frames']} | "
            f"{r['uncertainty_median']:.3f} | {r['flagged_one_pass']:.2f} | "
            f"{r['turn_median']:.3f} | {r['flagged_turn']:.2f} | {r['flagged_turn_session']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"levels": levels, "sessions": rows}, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
