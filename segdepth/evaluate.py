"""Offline re-analysis and scoring of recorded sessions: ``segdepth analyze`` and
``segdepth evaluate-session``.

``analyze`` runs the forward-backward smoother (:func:`engine.hmm.smooth`) over each column's
stored depth probabilities (no network) and writes the refined occupancy and its event table
(group ``analysis/``, docs/SESSION_FILE.md) into the recording or another file, plus CSV files
of the smoothed and the live events.

``evaluate-session SESSION REC`` scores a recording of a simulated session against its truth,
for four readings of the same stored probabilities: the single-frame argmax, the legacy filter
(before issue 10), the causal filter and the smoother. Engine columns are matched to truth
columns by position after drift. Per reading: per-frame depth accuracy on O columns and on
columns with events, with the best constant answer per column beside it; events matched to
the true changes within +-k frames (recall, precision, right size, multi-atom right size,
mean detection delay); false changes per 100 static column-frames; a sweep of the event
threshold; PNG plots of chosen columns over time with the truth (paper Figs. 10-12).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.hmm import LEGACY, EventDetector, HMMConfig, filter_sequence, likelihoods, smooth
from streamer.cli_support import config_option, given, input_file, positive_float, positive_int
from streamer.domain import SPECIES_NAME, SPECIES_O, px_per_angstrom
from streamer.session_file import events_table, write_events_csv

READINGS = ("single_frame", "legacy_filter", "filter", "smoother")
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


# --- reading files ----------------------------------------------------------------------
def load_truth(session: Path) -> dict[str, Any]:
    """Truth of a simulated session (docs/CONTRACTS.md "Session file")."""
    import h5py

    with h5py.File(session, "r") as f:
        cols = f["truth/columns"][:]
        events = json.loads(f["truth"].attrs.get("events", "[]"))
        return {
            "event_ids": {int(e["column_id"]) for e in events},
            "id": cols["id"].astype(np.int64),
            "x": cols["x_px"].astype(float),
            "y": cols["y_px"].astype(float),
            "species": cols["species"].astype(int),
            "depth": f["truth/depth"][:].astype(int),
            "drift": f["truth/drift_px"][:].astype(float),
            "pixel_size_pm": float(f.attrs["pixel_size_pm"]),
        }


def load_recording(recording: Path) -> dict[str, Any]:
    """The per-frame and per-column series of a recording (docs/SESSION_FILE.md)."""
    from streamer.session_file import open_session

    session = open_session(recording)
    f = session.file
    try:
        n = len(session)
        cols = f["columns"]
        out = {
            "sequence": f["sequence"][:n].astype(np.int64),
            "timestamps_s": f["timestamps_s"][:n],
            "has_result": f["results/has_result"][:n],
            "latency_ms": f["results/latency_ms"][:n],
            "ood_warning": f["results/ood_warning"][:n],
            # absent in recordings from before the turn check
            "ood_turn_score": (
                f["results/ood_turn_score"][:n]
                if "ood_turn_score" in f["results"]
                else np.full(n, np.nan, np.float32)
            ),
            "ids": cols["id"][:],
            "species": cols["species"][:],
            "probabilities": cols["column_probabilities"][:n],
            "events": f["events"][:] if "events" in f else None,
        }
        for name in (
            "x_px",
            "y_px",
            "depth",
            "depth_filtered",
            "expected_depth",
            "expected_filtered",
        ):
            out[name] = cols[name][:n]
        return out
    finally:
        session.close()


def intervals_s(timestamps_s: np.ndarray) -> np.ndarray:
    """Time since the previous row, s (the first row: the median step)."""
    dt = np.diff(timestamps_s, prepend=np.nan)
    dt[0] = np.nanmedian(dt[1:]) if len(dt) > 1 else 1.0
    return np.where(np.isfinite(dt) & (dt > 0), dt, np.nanmedian(dt))


def match_columns(
    truth: dict, rec: dict, rows: np.ndarray, match_A: float
) -> dict[int, tuple[int, float]]:
    """Truth column index -> (engine column index in file order, mean distance Å), for every
    truth column that an engine column follows: mean distance to the truth position (frame-0
    position + drift of the frame) over the frames where both exist at most ``match_A`` Å;
    the nearest wins."""
    px_per_A = px_per_angstrom(truth["pixel_size_pm"])
    frames = rec["sequence"][rows]
    ex, ey = rec["x_px"][rows], rec["y_px"][rows]  # (F, n_engine)
    matched = {}
    for k in range(len(truth["id"])):
        tx = truth["x"][k] + truth["drift"][frames, 1:2]
        ty = truth["y"][k] + truth["drift"][frames, 0:1]
        dist = np.hypot(ex - tx, ey - ty)
        present = np.isfinite(dist)
        counts = present.sum(axis=0)
        mean = np.where(
            counts > 0, np.where(present, dist, 0).sum(axis=0) / np.maximum(counts, 1), np.inf
        )
        if len(mean) and mean.min() <= match_A * px_per_A:
            matched[k] = (int(np.argmin(mean)), float(mean.min() / px_per_A))
    return matched


def result_rows(truth: dict, rec: dict, with_result: bool = True) -> np.ndarray:
    """Rows of a recording for a frame of the session (the replayer numbers frames 0, 1, ...
    in file order: a frame's seq is its truth index), with a result if ``with_result``."""
    seq = rec["sequence"]
    rows = (seq >= 0) & (seq < len(truth["depth"]))
    return np.flatnonzero(rows & (rec["has_result"] == 1) if with_result else rows)


# --- readings and events ----------------------------------------------------------------
def readings(probs: np.ndarray, dt: np.ndarray, config: HMMConfig) -> dict[str, np.ndarray]:
    """The four readings (posteriors (F, 11)) of one column's stored probabilities."""
    raw = np.nan_to_num(probs, nan=1.0 / probs.shape[1])
    return {
        "single_frame": raw / raw.sum(axis=1, keepdims=True),
        "legacy_filter": filter_sequence(probs, dt, LEGACY)[0],
        "filter": filter_sequence(probs, dt, config)[0],
        "smoother": smooth(probs, dt, config)[0],
    }


def detect(
    posterior: np.ndarray,
    probs: np.ndarray,
    frames: np.ndarray,
    times: np.ndarray,
    column_id: int,
    species: int,
    config: HMMConfig,
) -> list:
    """Events of one column from its posteriors (F, 11) (engine.hmm.EventDetector)."""
    det = EventDetector(config)
    like = likelihoods(probs, config)
    events = []
    for t in range(len(posterior)):
        events += det.update(
            int(frames[t]),
            float(times[t]),
            np.array([column_id]),
            np.array([species]),
            posterior[t : t + 1],
            like[t : t + 1],
        )
    return events


def true_changes(depth: np.ndarray, frames: np.ndarray) -> list[tuple[int, int, int]]:
    """(frame, before, after) of each change of a truth depth series over ``frames``."""
    d = depth[frames]
    return [
        (int(frames[t]), int(d[t - 1]), int(d[t])) for t in range(1, len(d)) if d[t] != d[t - 1]
    ]


def score_events(truth_events: list, found: list, k: int) -> list[tuple]:
    """Pairs (truth event, found event or None): a found event matches when its change point
    is within ``k`` frames of the truth and it was detected at most ``k`` frames after it."""
    free = list(found)
    pairs = []
    for frame, before, after in truth_events:
        hit = next(
            (e for e in free if abs(e.frame - frame) <= k and e.detected_frame - frame <= k), None
        )
        if hit is not None:
            free.remove(hit)
        pairs.append(((frame, before, after), hit))
    return pairs


# --- evaluate-session -------------------------------------------------------------------
def evaluate(
    session: Path, recording: Path, config: HMMConfig, k: int = 5, match_A: float = 0.5
) -> tuple[dict[str, Any], dict[int, dict]]:
    """Scores of every reading (module docstring) and per matched column its series."""
    truth, rec = load_truth(session), load_recording(recording)
    rows = result_rows(truth, rec)
    frames, times = rec["sequence"][rows], rec["timestamps_s"][rows]
    dt = intervals_s(times)
    matched = match_columns(truth, rec, rows, match_A)
    columns = {}
    for tk, (j, _) in matched.items():
        present = np.isfinite(rec["probabilities"][rows, j]).all(axis=1)
        probs = rec["probabilities"][rows, j]
        columns[tk] = {
            "engine": j,
            "present": present,
            "probs": probs,
            "truth": truth["depth"][frames, tk],
            "species": int(truth["species"][tk]),
            "changes": true_changes(truth["depth"][:, tk], frames),
            "readings": readings(probs, dt, config),
            "recorded_filtered": rec["depth_filtered"][rows, j],
        }
    n_frames = len(frames)

    def scores(name: str, threshold: float) -> dict[str, Any]:
        cfg = replace(config, event_threshold=threshold)
        correct: dict[str, list[bool]] = {
            "O": [],
            "O_constant": [],
            "event": [],
            "event_constant": [],
        }
        pairs, n_found, static_events, static_frames, static_flips = [], 0, 0, 0, 0
        for tk, c in columns.items():
            est = c["readings"][name].argmax(axis=1)[c["present"]]
            true = c["truth"][c["present"]]
            constant = np.bincount(true).argmax()
            groups = (["O"] if c["species"] == SPECIES_O else []) + (
                ["event"] if c["changes"] else []
            )
            for g in groups:
                correct[g] += list(est == true)
                correct[g + "_constant"] += list(true == constant)
            found = detect(
                c["readings"][name],
                c["probs"],
                frames,
                times,
                int(truth["id"][tk]),
                c["species"],
                cfg,
            )
            n_found += len(found)
            if c["changes"]:
                pairs += score_events(c["changes"], found, k)
            else:
                static_events += len(found)
                static_frames += n_frames
                static_flips += int((np.diff(est) != 0).sum())
        hits = [(t, e) for t, e in pairs if e is not None]
        multi = [(t, e) for t, e in pairs if abs(t[2] - t[1]) >= 2]
        out = {key: float(np.mean(v)) if v else None for key, v in correct.items()}
        out.update(
            true_events=len(pairs),
            detected_within_k=len(hits),
            recall=len(hits) / len(pairs) if pairs else None,
            right_size=sum(e.after - e.before == t[2] - t[1] for t, e in hits) / len(pairs)
            if pairs
            else None,
            multi_atom_events=len(multi),
            multi_atom_right_size=sum(
                e is not None and e.after - e.before == t[2] - t[1] for t, e in multi
            )
            / len(multi)
            if multi
            else None,
            mean_delay_frames=float(np.mean([e.detected_frame - t[0] for t, e in hits]))
            if hits
            else None,
            false_changes_per_100_static=100 * static_events / static_frames
            if static_frames
            else None,
            argmax_flips_per_100_static=100 * static_flips / static_frames
            if static_frames
            else None,
        )
        out["precision"] = len(hits) / n_found if n_found else None
        return out

    result = {
        "session": str(session),
        "recording": str(recording),
        "k_frames": k,
        "match_A": match_A,
        "config": asdict(config),
        "frames": n_frames,
        "truth_columns": len(truth["id"]),
        "matched_columns": len(columns),
        "event_columns": sum(bool(c["changes"]) for c in columns.values()),
        "readings": {name: scores(name, config.event_threshold) for name in READINGS},
        "threshold_sweep": {
            name: {str(th): scores(name, th) for th in THRESHOLDS}
            for name in ("filter", "smoother")
        },
        "recorded_vs_recomputed_filter": float(
            np.mean(
                [
                    (
                        c["recorded_filtered"][c["present"]]
                        == c["readings"]["filter"].argmax(axis=1)[c["present"]]
                    ).mean()
                    for c in columns.values()
                ]
            )
        )
        if columns
        else None,
    }
    return result, columns


def plot_columns(
    columns: dict[int, dict], truth_ids: np.ndarray, frames: np.ndarray, out: Path, n: int = 6
) -> list[Path]:
    """Figs. 10-12 style PNGs of up to ``n`` columns (event columns first): depth over time
    of every reading with the truth (occupancy.png) and the stored per-frame probabilities
    with the truth over them (probabilities.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = sorted(columns, key=lambda tk: (not columns[tk]["changes"], tk))[:n]
    if not chosen:
        return []
    styles = {
        "single_frame": dict(ls="", marker=".", color="0.6", ms=3),
        "legacy_filter": dict(color="tab:blue", lw=1),
        "filter": dict(color="tab:orange", lw=1.5),
        "smoother": dict(color="tab:green", lw=1.5, ls="--"),
    }
    paths = [out / "occupancy.png", out / "probabilities.png"]
    for path in paths:
        fig, axes = plt.subplots(
            len(chosen), 1, figsize=(8, 1.8 * len(chosen)), sharex=True, squeeze=False
        )
        for ax, tk in zip(axes[:, 0], chosen):
            c = columns[tk]
            if path.name == "occupancy.png":
                for name, style in styles.items():
                    ax.plot(frames, c["readings"][name].argmax(axis=1), label=name, **style)
            else:
                ax.imshow(
                    np.nan_to_num(c["probs"]).T,
                    origin="lower",
                    aspect="auto",
                    cmap="magma",
                    vmin=0,
                    vmax=1,
                    extent=(frames[0] - 0.5, frames[-1] + 0.5, -0.5, 10.5),
                )
            ax.step(
                frames,
                c["truth"],
                where="mid",
                color="k" if path.name == "occupancy.png" else "c",
                lw=1,
                label="truth",
            )
            ax.set_ylabel(f"{SPECIES_NAME[int(c['species'])]} {truth_ids[tk]}\natoms")
        axes[0, 0].legend(loc="upper right", fontsize=6, ncol=5)
        axes[-1, 0].set_xlabel("frame")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return paths


def format_report(r: dict[str, Any]) -> str:
    """The scores as a table, one line per reading."""

    def f(v, pct=True):
        return "   n/a" if v is None else (f"{100 * v:5.1f}%" if pct else f"{v:6.2f}")

    lines = [
        f"{r['matched_columns']} of {r['truth_columns']} truth columns matched, "
        f"{r['event_columns']} with events, {r['frames']} frames, k = {r['k_frames']}",
        "reading          O acc  O const  ev acc  ev const  recall  precis  size  "
        "multi  delay  false/100  flips/100",
    ]
    for name, s in r["readings"].items():
        lines.append(
            f"{name:15s} {f(s['O'])} {f(s['O_constant'])}  {f(s['event'])} "
            f"{f(s['event_constant'])}   {f(s['recall'])}  {f(s['precision'])} "
            f"{f(s['right_size'])} {f(s['multi_atom_right_size'])} "
            f"{f(s['mean_delay_frames'], False)} "
            f"{f(s['false_changes_per_100_static'], False)}    "
            f"{f(s['argmax_flips_per_100_static'], False)}"
        )
    return "\n".join(lines)


def _evaluate_session(args: argparse.Namespace) -> int:
    from engine.cli import hmm_config

    config = hmm_config(args)
    result, columns = evaluate(
        Path(args.session), Path(args.recording), config, **given(args, "k", "match_A")
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    truth = load_truth(Path(args.session))
    rec = load_recording(Path(args.recording))
    frames = rec["sequence"][result_rows(truth, rec)]
    result["plots"] = [str(p) for p in plot_columns(columns, truth["id"], frames, out)]
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    print(format_report(result))
    print(f"wrote {out / 'evaluation.json'} and {', '.join(result['plots'])}")
    return 0


# --- analyze ----------------------------------------------------------------------------
def analyze(recording: Path, out: Path | None, config: HMMConfig) -> dict[str, Any]:
    """Smooth every column of ``recording`` and write group ``analysis/`` (into ``out``, a
    new HDF5 file, or the recording itself when None) and the events as CSV beside it."""
    import h5py

    rec = load_recording(recording)
    dt = intervals_s(rec["timestamps_s"])
    n_rows, n_cols = rec["probabilities"].shape[:2]
    post = np.full((n_rows, n_cols, 11), np.nan, np.float32)
    change = np.full((n_rows, n_cols), np.nan, np.float32)
    events = []
    for j in range(n_cols):
        probs = rec["probabilities"][:, j]
        seen = np.flatnonzero(np.isfinite(probs).all(axis=1))
        if len(seen) == 0:
            continue
        span = slice(seen[0], seen[-1] + 1)
        p, ch = smooth(probs[span], dt[span], config)
        post[span, j], change[span, j] = p, ch
        events += detect(
            p,
            probs[span],
            rec["sequence"][span],
            rec["timestamps_s"][span],
            int(rec["ids"][j]),
            int(rec["species"][j]),
            config,
        )
    table = events_table([e.as_dict() for e in sorted(events, key=lambda e: e.frame)])
    target = out or recording
    with h5py.File(target, "r+" if out is None else "w") as f:
        if "analysis" in f:
            del f["analysis"]
        g = f.create_group("analysis")
        g.attrs["method"] = "forward-backward smoother (engine.hmm.smooth)"
        g.attrs["config"] = json.dumps(asdict(config))
        g.attrs["recording"] = str(recording)
        g.create_dataset("column_id", data=rec["ids"])
        g.create_dataset("probabilities", data=post).attrs["units"] = "P(0..10 atoms | all frames)"
        g.create_dataset(
            "depth",
            data=np.where(np.isnan(post[..., 0]), -1, np.nan_to_num(post).argmax(axis=2)).astype(
                "i1"
            ),
        )
        g["depth"].attrs["units"] = "atoms (-1: column absent)"
        g.create_dataset("expected", data=post @ np.arange(11, dtype=np.float32)).attrs["units"] = (
            "atoms"
        )
        g.create_dataset("change_probability", data=change).attrs["units"] = (
            "P(depth changed since the previous row | all frames)"
        )
        g.create_dataset("events", data=table)
    stem = target.with_suffix("")
    write_events_csv(f"{stem}_events_smoothed.csv", table)
    if rec["events"] is not None:
        write_events_csv(f"{stem}_events_live.csv", rec["events"])
    return {
        "file": str(target),
        "columns": n_cols,
        "rows": n_rows,
        "events": len(table),
        "csv": [f"{stem}_events_smoothed.csv"]
        + ([f"{stem}_events_live.csv"] if rec["events"] is not None else []),
    }


def _analyze(args: argparse.Namespace) -> int:
    from engine.cli import hmm_config

    info = analyze(Path(args.recording), Path(args.out) if args.out else None, hmm_config(args))
    print(json.dumps(info, indent=2))
    return 0


def register(commands, bench) -> None:
    """Add ``segdepth analyze`` and ``segdepth evaluate-session``."""
    from engine.cli import hmm_options

    p = commands.add_parser(
        "analyze",
        help="re-analyse a recording offline: smoothed occupancy + event table",
        description="Run the forward-backward smoother over every column's stored depth "
        "probabilities (no network) and write group analysis/ (docs/"
        "SESSION_FILE.md) into the recording, or into --out; events also as CSV "
        "beside it (STEM_events_smoothed.csv, STEM_events_live.csv).",
    )
    p.add_argument("recording", type=input_file, help="a recorded session (segdepth record)")
    p.add_argument(
        "--out",
        default=None,
        help="write the analysis to this new HDF5 file instead of the recording",
    )
    hmm_options(p)
    p.set_defaults(func=_analyze)

    p = commands.add_parser(
        "evaluate-session",
        help="score a recording against its simulated session's truth",
        description="Per-frame accuracy on O and event columns beside the best constant "
        "answer, event recall/precision within +-k frames, sizes, detection "
        "delay, false changes per 100 static column-frames -- for the single-"
        "frame argmax, the legacy filter, the filter and the smoother, all from "
        "the recording's stored probabilities; JSON and PNG plots in --out.",
    )
    p.add_argument("session", type=input_file, help="the simulated session file (with truth/)")
    p.add_argument("recording", type=input_file, help="its recording (segdepth record)")
    p.add_argument("--out", default="evaluation", help="output folder")
    config_option(
        p,
        "-k",
        evaluate,
        type=positive_int,
        help="an event counts as found within this many frames",
    )
    config_option(
        p,
        "--match-A",
        evaluate,
        type=positive_float,
        help="largest mean distance of an engine column to its truth column, Å",
    )
    hmm_options(p)
    p.set_defaults(func=_evaluate_session)
