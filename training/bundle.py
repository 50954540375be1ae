"""Ship a trained run as the bundled model: ``training/models/segdepth_base16.pt`` (float16
weights, meta with the fitted temperature and test metrics) and a JSON record beside it saying
how it was trained (commands, data, hardware, wall time) and how it scored.

Usage: ``python -m training.bundle --model RUN/model.pt --report REPORT/report.json
--train-command "..." --evaluate-command "..."``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from streamer.cli_support import machine_info
from training.labels import TargetConfig, class_prior
from training.library_data import load_or_render
from training.model import bundled_model_path, load_model, save_model
from training.ood_levels import DOSES, session_levels


def bundle(
    model_path: str | Path,
    report_path: str | Path,
    train_command: str,
    evaluate_command: str,
    out: str | Path | None = None,
    simulate_commands: list[str] | None = None,
    robustness_path: str | Path | None = None,
    ood_sessions: list[str] | None = None,
    ood_doses: Sequence[float] = DOSES,
) -> dict:
    """Write the bundled model and its record; returns the record. The OOD warning levels
    come from ``ood_sessions`` (in-distribution session files recorded at a dose of at least
    every one of ``ood_doses``, :mod:`training.ood_levels`) where given, else from the
    robustness suite."""
    out = Path(out) if out else bundled_model_path()
    model, meta = load_model(model_path)
    model = model.half().float()  # the float16 weights it ships with, for the levels below
    report = json.loads(Path(report_path).read_text())
    if meta.get("val"):  # the prior the weighted loss taught, for the engine's temporal model
        val = load_or_render(meta["val"], TargetConfig(), None, seed=1)
        meta["class_prior"] = class_prior(val.labels, val.weights).tolist()
    robustness = json.loads(Path(robustness_path).read_text()) if robustness_path else None
    meta["temperature"] = report["calibration"]["temperature"]
    if ood_sessions:  # the engine's out-of-distribution warning levels for this model
        meta["ood_levels"] = session_levels(model, meta["temperature"], ood_sessions, ood_doses)
        meta.pop("ood_threshold", None)  # the suite's single one-pass level: superseded
    elif robustness:
        meta["ood_threshold"] = robustness["ood_threshold"][meta["model_id"]]
    meta.update(
        test={
            "data": report["data"],
            "noise_lambda": report["noise_lambda"],
            "metrics": report["metrics"],
        },
    )
    meta = save_model(out, model, meta)
    record = {
        "model_file": out.name,
        "model_id": meta["model_id"],
        "bytes": out.stat().st_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": meta["config"],
        "weights_dtype": "float16",
        "commands": {
            "simulate": simulate_commands or [],
            "train": train_command,
            "evaluate": evaluate_command,
        },
        "training": {
            "data": meta.get("data"),
            "data_sha256": meta.get("data_sha256"),
            "val": meta.get("val"),
            "val_sha256": meta.get("val_sha256"),
            "data_files": meta.get("data_files"),
            "dose_range": meta.get("dose_range"),
            "init": (meta.get("train_config") or {}).get("init"),
            "noise_lambda": meta.get("noise_lambda"),
            "pixel_size_pm": meta.get("pixel_size_pm"),
            "epochs_run": meta.get("epochs_run"),
            "wall_s": meta.get("wall_s"),
            "best_validation": meta.get("validation"),
            "hardware": meta.get("hardware"),
            "train_config": meta.get("train_config"),
        },
        "test": {
            "data": report["data"],
            "noise_lambda": report["noise_lambda"],
            "metrics": report["metrics"],
            "targets": report["targets"],
            "paper_best_row": report["paper_best_row"],
            "calibration": {
                "temperature": report["calibration"]["temperature"],
                "fit_on": report["calibration"]["temperature_fit_on"],
                "ece": report["calibration"]["ece"],
            },
            "noise_sweep": [
                {
                    k: r[k]
                    for k in (
                        "noise_lambda",
                        "pixelwise_accuracy",
                        "centre_accuracy",
                        "detection_rate",
                        "hallucination_rate",
                    )
                }
                for r in report["noise_sweep"]
            ],
        },
        "robustness": None
        if robustness is None
        else {
            "report": str(robustness_path),
            "rows": {r["row"]: r["models"][meta["model_id"]] for r in robustness["rows"]},
        },
        "ood_levels": {k: meta.get(k) for k in ("ood_threshold", "ood_levels")},
        "bundled_with": machine_info(),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the run's model.pt")
    p.add_argument("--report", required=True, help="report.json of `segdepth evaluate`")
    p.add_argument("--train-command", required=True, help="the exact training command line")
    p.add_argument("--evaluate-command", required=True, help="the exact evaluation command line")
    p.add_argument(
        "--simulate-command",
        action="append",
        default=[],
        help="an exact `segdepth simulate` command behind the data (repeatable)",
    )
    p.add_argument("--out", default=None, help="model path (default: the bundled model path)")
    p.add_argument(
        "--robustness",
        default=None,
        help="robustness.json of `segdepth evaluate --suite robustness` with this "
        "model: its rows go into the record (and its OOD warning levels into the meta "
        "unless --ood-sessions)",
    )
    p.add_argument(
        "--ood-sessions",
        nargs="+",
        default=None,
        help="in-distribution session files (segdepth simulate --session --dose 10) at the "
        "frame size the engine serves: the OOD warning levels are the 95th percentiles of "
        "their frames' scores, thinned to each dose of the training range",
    )
    args = p.parse_args(argv)
    record = bundle(
        args.model,
        args.report,
        args.train_command,
        args.evaluate_command,
        args.out,
        args.simulate_command,
        args.robustness,
        args.ood_sessions,
    )
    print(json.dumps(record["test"]["metrics"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
