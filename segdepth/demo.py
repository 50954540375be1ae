"""``segdepth demo``: a simulated in-situ session through the whole live pipeline, scored.

1. A simulated frame series with known column dynamics and drift: by default
   ``sim_source.session.EVALUATION`` (thickness gradient, 1- and 2-atom events on O and Ce
   columns, one never regained), or with ``--scenario flat`` the original flat 6-atom slab
   (``segdepth simulate --session``).
2. ``segdepth record`` (frames + results -> HDF5), ``segdepth serve`` (the engine, bundled
   model, replay mode: lossless) and, when a display exists, the viewer -- each its own process
   on loopback ports -- then ``segdepth replay`` publishes the session to engine and recorder.
3. A summary from the recording and the engine's statistics: frames processed, throughput,
   latency percentiles, frames lost, and per oxygen column the accuracy of the estimated depth
   against the simulated truth (engine columns matched to truth columns by position after
   drift), single-frame and HMM-filtered, and the event scores of ``segdepth
   evaluate-session`` (legacy filter, filter, smoother, constant baseline) with its plots.
   It is printed and saved as ``summary.json`` beside the recording.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.cli import BACKEND_NAMES
from segdepth.evaluate import load_recording, load_truth, match_columns, result_rows
from streamer.cli_support import config_option, given, input_file, positive_int
from streamer.domain import SPECIES_O
from streamer.sockets import free_tcp_endpoint

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Settings of one demo run (saved beside its outputs). Sizes in px, times in s."""

    frames: int = 120
    size: int = 512
    out: str = "demo_output"
    headless: bool = False
    seed: int = 0
    model: str | None = None
    backend: str | None = None  # None: the engine's default (engine.serve.ServeConfig)
    max_batch: int | None = None  # None: the engine's default
    match_A: float = 0.5
    timeout_s: float = 1800.0
    scenario: str = "evaluation"
    #: surface models the class prior is estimated from (engine.model_io); 0: uniform prior
    prior_structures: int = 200


# --- scoring ------------------------------------------------------------------------------
def column_accuracy(recording: Path, session: Path, match_A: float = 0.5) -> dict[str, Any]:
    """Per truth oxygen column: the engine column that follows it and its depth accuracy.

    An engine column follows a truth column when its mean distance to the truth position
    (frame-0 position + drift of that frame) over the frames where both exist is at most
    ``match_A`` Å; the nearest one wins. Accuracy: fraction of those frames whose depth
    (argmax of the disk-averaged probabilities; filtered: the HMM's) equals the truth.
    """
    truth, rec = load_truth(session), load_recording(recording)
    rows = result_rows(truth, rec, with_result=False)
    frames = rec["sequence"][rows]
    matched_columns = match_columns(truth, rec, rows, match_A)
    per_column, n_o = [], int((truth["species"] == SPECIES_O).sum())
    for k in np.flatnonzero(truth["species"] == SPECIES_O):
        if k not in matched_columns:
            per_column.append(
                {
                    "truth_id": int(truth["id"][k]),
                    "matched": False,
                    "vacancy_event": int(truth["id"][k]) in truth["event_ids"],
                    "truth_depths": sorted({int(d) for d in truth["depth"][frames, k]}),
                }
            )
            continue
        j, distance_A = matched_columns[int(k)]
        seen = np.isfinite(rec["x_px"][rows, j])
        true_depth = truth["depth"][frames[seen], k]
        est = rec["depth"][rows[seen], j].astype(int)
        filt = rec["depth_filtered"][rows[seen], j].astype(int)
        per_column.append(
            {
                "truth_id": int(truth["id"][k]),
                "matched": True,
                "vacancy_event": int(truth["id"][k]) in truth["event_ids"],
                "engine_id": int(rec["ids"][j]),
                "engine_species": int(rec["species"][j]),
                "frames": int(seen.sum()),
                "distance_A": distance_A,
                "truth_depths": sorted({int(d) for d in true_depth}),
                "accuracy": float((est == true_depth).mean()),
                "accuracy_filtered": float((filt == true_depth).mean()),
                "mae_expected": float(
                    np.abs(rec["expected_depth"][rows[seen], j] - true_depth).mean()
                ),
                "mae_expected_filtered": float(
                    np.abs(rec["expected_filtered"][rows[seen], j] - true_depth).mean()
                ),
            }
        )
    matched = [c for c in per_column if c["matched"]]

    def mean_of(key: str) -> float | None:
        return float(np.mean([c[key] for c in matched])) if matched else None

    return {
        "oxygen_columns": n_o,
        "matched": len(matched),
        "detection_rate": len(matched) / n_o if n_o else None,
        "accuracy": mean_of("accuracy"),
        "accuracy_filtered": mean_of("accuracy_filtered"),
        "mae_expected": mean_of("mae_expected"),
        "mae_expected_filtered": mean_of("mae_expected_filtered"),
        "match_A": match_A,
        "columns": per_column,
    }


def pipeline_figures(
    recording: Path, engine_stats: dict[str, Any], frames_sent: int
) -> dict[str, Any]:
    """Frames processed, throughput, latency percentiles and losses of one run."""
    rec = load_recording(recording)
    lat = rec["latency_ms"][rec["has_result"] == 1]
    lat = lat[np.isfinite(lat)]
    stats = engine_stats.get("stats", {})
    recorded = int(len(rec["sequence"]))
    with_result = int(rec["has_result"].sum())
    return {
        "frames_sent": frames_sent,
        "frames_recorded": recorded,
        "frames_processed": with_result,
        "frames_lost": frames_sent - with_result,
        "engine_skipped": stats.get("skipped"),
        "throughput_frames_per_s": stats.get("throughput_frames_per_s"),
        "backend": stats.get("backend"),
        "model_id": stats.get("model_id"),
        "latency_ms": {
            f"p{q}": float(np.percentile(lat, q)) if len(lat) else None for q in (50, 90, 99)
        },
        # an in-distribution session: warnings here are false alarms
        "ood": {
            "frames_warned": int((rec["ood_warning"] == 1).sum()),
            "frames_turn_checked": int(np.isfinite(rec["ood_turn_score"]).sum()),
        },
    }


# --- orchestration ------------------------------------------------------------------------
def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


class Processes:
    """Child processes of the demo, each logging to its own file; all stopped on exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        logfile = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT)
        logfile.close()
        self.running[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def _failed(self, name: str, why: str) -> RuntimeError:
        tail = (self.log_dir / f"{name}.log").read_text()[-2000:]
        return RuntimeError(f"{name} {why}; end of its log:\n{tail}")

    def wait_all(self, names: tuple[str, ...], timeout_s: float) -> None:
        """Wait until every child in ``names`` has exited with code 0. Fails at once when one
        exits with an error, and when the last one (the consumer) has been gone for 20 s while
        others still run (in replay mode they would wait for it forever)."""
        deadline = time.monotonic() + timeout_s
        consumer_done: float | None = None
        while True:
            codes = {n: self.running[n].poll() for n in names}
            for name, code in codes.items():
                if code not in (None, 0):
                    raise self._failed(name, f"exited with code {code}")
            if all(code == 0 for code in codes.values()):
                return
            if codes[names[-1]] == 0:
                consumer_done = consumer_done or time.monotonic()
                if time.monotonic() - consumer_done > 20:  # room to close sockets and exit
                    waiting = [n for n, c in codes.items() if c is None]
                    raise self._failed(names[-1], f"finished while {waiting} still run")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"still running after {timeout_s} s: "
                    f"{[n for n, c in codes.items() if c is None]}"
                )
            time.sleep(0.2)

    def stop_all(self, keep: tuple[str, ...] = ()) -> None:
        """SIGINT (then SIGKILL after 10 s) every child still running, except ``keep``."""
        for name, proc in self.running.items():
            if proc.poll() is None and name not in keep:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop on SIGINT: killing it", name)
                    proc.kill()
                    proc.wait()


def _resolve_model(config: DemoConfig, out: Path) -> str:
    if config.model:
        return config.model
    from training.model import bundled_model_path

    bundled = Path(bundled_model_path())
    if bundled.is_file():
        return str(bundled)
    import torch

    from training.model import SegDepthUNet, UNetConfig, save_model

    log.warning(
        "no bundled model at %s: using a RANDOMLY INITIALISED model, so the depth "
        "accuracies below are meaningless (the pipeline figures are not)",
        bundled,
    )
    torch.manual_seed(config.seed)
    path = out / "random_model.pt"
    save_model(path, SegDepthUNet(UNetConfig()), {"model_id": f"random-seed{config.seed}"})
    return str(path)


def simulate_session(config: DemoConfig, session: Path) -> float:
    """The session of ``config.scenario`` (flat: ``segdepth simulate --session`` as a
    subprocess); returns its wall time in s."""
    t0 = time.monotonic()
    if config.scenario == "flat":
        subprocess.run(
            [
                sys.executable,
                "-m",
                "segdepth",
                "simulate",
                "--session",
                "--out",
                str(session),
                "--frames",
                str(config.frames),
                "--size",
                str(config.size),
                "--seed",
                str(config.seed),
            ],
            check=True,
        )
    else:
        from dataclasses import replace

        from sim_source.session import EVALUATION, write_session

        write_session(
            session, replace(EVALUATION, frames=config.frames, size=config.size, seed=config.seed)
        )
    return time.monotonic() - t0


def class_prior(config: DemoConfig) -> list[str]:
    """``--class-prior`` options for serve and evaluate-session (none: uniform prior)."""
    if config.prior_structures <= 0:
        return []
    from engine.model_io import class_prior_from_simulator

    prior = class_prior_from_simulator(structures=config.prior_structures)
    return ["--class-prior", ",".join(f"{v:.6g}" for v in prior)]


def _engine_options(config: DemoConfig) -> list[str]:
    """``segdepth serve`` options the demo's config sets (else the engine's defaults apply); the
    engine readies the session's frame shape before it reads (a compiling backend's first
    frame would otherwise count tens of seconds against the throughput)."""
    return [
        *("--warm", f"{config.size}x{config.size}"),
        *(["--backend", config.backend] if config.backend else []),
        *(["--max-batch", str(config.max_batch)] if config.max_batch else []),
    ]


def run_pipeline(
    config: DemoConfig, session: Path, model: str, hmm_options: Sequence[str] = ()
) -> dict[str, Any]:
    """Replay ``session`` through engine and recorder (and viewer) processes; score it.
    ``hmm_options``: extra ``segdepth serve`` options of the temporal model.

    Writes recording.h5, engine_stats.json, summary.json and logs/ into ``config.out``.
    """
    out = Path(config.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "segdepth"]
    recording, engine_stats = out / "recording.h5", out / "engine_stats.json"
    for stale in (recording, engine_stats):
        stale.unlink(missing_ok=True)
    import h5py

    with h5py.File(session, "r") as f:
        frames_sent = int(f["frames"].shape[0])
    ep = {
        name: free_tcp_endpoint()
        for name in ("engine", "recorder", "results", "viewer_results", "viewer_frames")
    }
    show = has_display() and not config.headless
    procs = Processes(out / "logs")
    try:
        # the recorder stops on the engine's eos; its grace period only matters if the
        # engine dies, and must exceed the time of one batch on a slow CPU
        procs.start(
            "recorder",
            [
                *cli,
                "record",
                "--out",
                str(recording),
                "--frames",
                ep["recorder"],
                "--results",
                ep["results"],
                "--grace-s",
                "120",
            ],
        )
        procs.start(
            "engine",
            [
                *cli,
                "serve",
                "--frames",
                ep["engine"],
                "--results",
                ep["results"],
                "--viewer",
                ep["viewer_results"] if show else "none",
                "--model",
                model,
                *_engine_options(config),
                "--mode",
                "replay",
                "--exit-on-eos",
                "--stats",
                str(engine_stats),
                *hmm_options,
            ],
        )
        if show:
            procs.start(
                "viewer",
                [
                    sys.executable,
                    "-m",
                    "viewer",
                    "--results",
                    ep["viewer_results"],
                    "--frames",
                    ep["viewer_frames"],
                ],
            )
        t0 = time.monotonic()
        procs.start(
            "replay",
            [
                *cli,
                "replay",
                str(session),
                "--to-engine",
                ep["engine"],
                "--to-recorder",
                ep["recorder"],
                "--to-viewer",
                ep["viewer_frames"] if show else "none",
                "--mode",
                "replay",
                "--max-rate",
            ],
        )
        procs.wait_all(("replay", "engine", "recorder"), config.timeout_s)
        pipeline_s = time.monotonic() - t0
    except BaseException:
        procs.stop_all()
        raise
    procs.stop_all(keep=("viewer",))  # the viewer stays open until its window is closed
    summary = {
        "config": asdict(config),
        "model": model,
        "session": str(session),
        "recording": str(recording),
        "pipeline_wall_s": pipeline_s,
        **pipeline_figures(recording, json.loads(engine_stats.read_text()), frames_sent),
        "oxygen_occupancy": column_accuracy(recording, session, config.match_A),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Simulate a session, run the pipeline on it, print and return the summary."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(config), indent=2))
    model = _resolve_model(config, out)
    session = out / "session.h5"
    simulate_s = simulate_session(config, session)
    prior = class_prior(config)
    summary = run_pipeline(config, session, model, prior)
    summary["simulate_s"] = simulate_s
    subprocess.run(
        [
            sys.executable,
            "-m",
            "segdepth",
            "evaluate-session",
            str(session),
            str(out / "recording.h5"),
            "--out",
            str(out / "evaluation"),
            *prior,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    summary["events"] = json.loads((out / "evaluation" / "evaluation.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    occ = s["oxygen_occupancy"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    lat = s["latency_ms"]
    lines = [
        "SegDepth Live demo",
        f"  model                 {s['model_id']} ({s['backend']})",
        f"  frames processed      {s['frames_processed']} of {s['frames_sent']} "
        f"(lost: {s['frames_lost']}, recorded: {s['frames_recorded']})",
        f"  throughput            {s['throughput_frames_per_s'] or float('nan'):.1f} frames/s"
        f" (pipeline wall time {s['pipeline_wall_s']:.1f} s)",
        "  latency ms            "
        + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} n/a" for k, v in lat.items())
        + " (receipt -> result; a max-rate replay queues frames at the engine)",
        f"  OOD warnings          {s['ood']['frames_warned']} frames "
        f"({s['ood']['frames_turn_checked']} turn-checked; the session is in distribution)",
        f"  oxygen columns        {occ['matched']} of {occ['oxygen_columns']} found",
        f"  occupancy accuracy    single-frame {pct(occ['accuracy'])}, "
        f"HMM-filtered {pct(occ['accuracy_filtered'])} (mean over the O columns found)",
    ]
    for c in occ["columns"]:
        if c["vacancy_event"]:
            lines.append(
                f"    O column {c['truth_id']:>4} (vacancy event, truth depths "
                f"{c['truth_depths']}): "
                + (
                    f"single-frame {pct(c['accuracy'])}, filtered {pct(c['accuracy_filtered'])}"
                    if c["matched"]
                    else "not found"
                )
            )
    if "events" in s:
        from segdepth.evaluate import format_report

        lines += [
            "  events and accuracy by reading (segdepth evaluate-session):",
            *("    " + line for line in format_report(s["events"]).splitlines()),
        ]
    lines += [f"  summary               {Path(s['recording']).with_name('summary.json')}"]
    return "\n".join(lines)


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The DemoConfig of a ``demo`` command line."""
    return DemoConfig(
        **given(
            args,
            "frames",
            "size",
            "out",
            "headless",
            "seed",
            "model",
            "backend",
            "max_batch",
            "scenario",
            "prior_structures",
        )
    )


def _demo(args: argparse.Namespace) -> int:
    run_demo(demo_config(args))
    return 0


def register(commands, bench) -> None:
    """Add ``segdepth demo``."""
    p = commands.add_parser(
        "demo",
        help="simulated session -> engine -> recorder (+ viewer), with a scored summary",
        description="Simulate an in-situ session with known column dynamics, replay it "
        "losslessly through the engine (bundled model) into the recorder and, when "
        "a display exists, the viewer -- each a real process on loopback ports -- "
        "then print and save (summary.json) frames processed, throughput, latency "
        "percentiles, frames lost, per-oxygen-column occupancy accuracy and the "
        "event scores of segdepth evaluate-session (with plots in evaluation/).",
    )
    config_option(p, "--frames", DemoConfig, type=positive_int, help="frames to simulate")
    config_option(p, "--size", DemoConfig, type=positive_int, help="frame side in px")
    config_option(
        p, "--out", DemoConfig, help="output directory: session, recording, summary, logs"
    )
    config_option(p, "--headless", DemoConfig, action="store_true", help="never start the viewer")
    config_option(p, "--seed", DemoConfig, type=int, help="seed of the simulated session")
    config_option(
        p,
        "--model",
        DemoConfig,
        type=input_file,
        help="model file (default: the bundled model; without one, a random model and a warning)",
    )
    config_option(
        p,
        "--backend",
        DemoConfig,
        choices=["auto", *BACKEND_NAMES],
        help="engine backend (default: the engine's, see segdepth serve --help)",
    )
    config_option(
        p,
        "--max-batch",
        DemoConfig,
        type=positive_int,
        help="engine batch size limit in frames (default: the engine's)",
    )
    config_option(
        p,
        "--scenario",
        DemoConfig,
        choices=["evaluation", "flat"],
        help="evaluation: thickness gradient, 1- and 2-atom events on O and Ce "
        "columns, one never regained; flat: the original flat 6-atom slab "
        "with three 2-atom O events",
    )
    config_option(
        p,
        "--prior-structures",
        DemoConfig,
        type=int,
        help="simulated surface models the network's class prior is estimated "
        "from (0: uniform prior, no correction; 200: ~15 s)",
    )
    p.set_defaults(func=_demo)
