"""``segdepth bench parity``: a reduced-precision backend against FP32 on the robustness suite.

Each suite row (training.robustness: orientations, optics, facets, doses, carbon film, legacy
slabs) is evaluated twice through the engine's own backends -- the FP32 onnxruntime graph and
the candidate (INT8 or BF16) -- with the same noisy frames, and the column-level accuracies are
compared. A row is drawn once per seed of :attr:`ParityConfig.seeds` (other frames, other
noise; the legacy row's 16 slabs get new noise only) and its column counts are pooled over the
draws: one draw of the legacy row scores 532 columns, so a single column read differently moves
it by 0.19 points and the 0.5-point bound would sit inside one draw's noise. Each row's
difference also gets a 95 % interval from a paired bootstrap over the structures its frames
show (:func:`training.robustness.paired_exact_difference`): how far it could move on other
frames; the bound is judged on the difference itself. Each row also counts the columns the
candidate reads as another count than FP32 (``read_differently``, right or wrong): a figure of
the candidate alone, free of the truth's noise, and what sets the difference's noise (OpenVINO
FP32 reads none of 24,000 columns differently from onnxruntime; the shipped INT8 graph about
2 %, 2026-11-28). The record,
written beside the model as ``<stem>.<record>.json`` (the backend's ``parity_record``), is
what :func:`refusal` reads: the candidate is offered only when no row moves by more than
:data:`PARITY_BOUND_POINTS` percentage points, and only for the model file and the form of
the candidate (its :meth:`engine.backends.Backend.parity_form`) the record was measured on.
(Heavy imports sit in the functions, so that the CLI reads :class:`ParityConfig` without torch.)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.cli_support import default_of
from training.robustness import SuiteConfig

log = logging.getLogger(__name__)

#: the figures compared per row (training.metrics.ColumnMetrics), in [0, 1]
COMPARED = ("column_exact", "column_within_one", "column_found")
#: largest drop (or rise) of column-level exact accuracy against FP32, in percentage points,
#: on any robustness-suite row, for a reduced-precision backend to be offered (issue #13)
PARITY_BOUND_POINTS = 0.5


def record_path(model_path: Path, record: str) -> Path:
    """Where a model's parity record ``record`` (a backend's ``parity_record``: "int8",
    "int8-openvino", "bf16") lies: beside it, ``<stem>.<record>.json``."""
    return Path(model_path).with_suffix(f".{record}.json")


def refusal(loaded, candidate: str, record_name: str, form: dict[str, Any]) -> str | None:
    """Why backend ``candidate``, whose parity record is ``record_name``, is not offered for
    ``loaded`` (no record, another model's or another ``form``'s, or a failed check), or None
    when its parity record passes."""
    path = record_path(loaded.path, record_name)
    label = record_name.upper()
    fix = f"run `segdepth bench parity --model {loaded.path} --candidate {candidate}`"
    if not path.is_file():
        return f"no {label} parity record for this model ({path}): {fix}"
    record: dict[str, Any] = json.loads(path.read_text())
    if record.get("model_sha256") != loaded.sha256:
        return f"{path} was measured on another model file: {fix}"
    if record.get("form") != form:
        return f"{path} was measured on another form of the {label} backend: {fix}"
    if not record.get("passed"):
        return (
            f"{label} changed column accuracy by {record.get('max_abs_diff_points')} points "
            f"on the robustness suite (bound {PARITY_BOUND_POINTS}; {path})"
        )
    return None


def as_network(backend):
    """An engine backend seen by training's evaluation code as a network (torch module): it
    returns the log of the backend's (already temperature-scaled) probabilities, so softmax at
    temperature 1 gives them back exactly."""
    import torch

    class BackendAsNetwork(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pred = backend.infer(x[:, 0].numpy())
            return (
                torch.from_numpy(pred.depth_prob).clamp_min(1e-30).log(),
                torch.from_numpy(pred.species_prob).clamp_min(1e-30).log(),
            )

    return BackendAsNetwork()


@dataclass
class ParityConfig:
    """What a parity record is a function of (saved in it). ``samples`` frames of ``crop`` px
    per row; ``suite_dir`` holds the suite's test libraries (built when missing)."""

    model: str | None = None
    candidate: str = "onnxruntime-int8"
    # the suite's own defaults (training.robustness.SuiteConfig): the same files, built alike
    suite_dir: str = default_of(SuiteConfig, "directory")
    samples: int = default_of(SuiteConfig, "samples")
    crop: int = default_of(SuiteConfig, "crop")
    scale: float = default_of(SuiteConfig, "scale")
    gpts: int = default_of(SuiteConfig, "gpts")
    #: one draw of every row per seed (row k of seed s: frames and noise of seed s + k), pooled
    seeds: tuple[int, ...] = (0, 1, 2)
    out: str | None = None  # default: beside the model (engine.parity.record_path)


def run_parity(cfg: ParityConfig) -> dict[str, Any]:
    """Evaluate FP32 and the candidate on every suite row; write and return the record."""
    from engine import backends
    from engine.model_io import load
    from training.robustness import build_suite, check_disjoint, suite_rows

    started = time.monotonic()
    loaded = load(cfg.model)
    paths = build_suite(cfg.suite_dir, cfg.scale, cfg.gpts)
    check_disjoint(loaded.meta, list(paths.values()))
    cache = Path(cfg.suite_dir) / "engine_cache"
    # the candidate is built directly: its own refusal (no record yet) is what this writes
    candidate = backends.BACKENDS[cfg.candidate]
    nets = {
        name: as_network(backends.BACKENDS[name](loaded, max_batch=8, cache_dir=cache))
        for name in ("onnxruntime", cfg.candidate)
    }
    rows = [_row_parity(row, k, paths, cfg, nets) for k, row in enumerate(suite_rows())]
    diffs = [r["column_exact_diff_points"] for r in rows]
    worst = max(abs(d) for d in diffs)
    record = {
        "model": str(loaded.path),
        "model_id": loaded.model_id,
        "model_sha256": loaded.sha256,
        "candidate": cfg.candidate,
        "form": candidate.parity_form(loaded),
        "config": asdict(cfg),
        "bound_points": PARITY_BOUND_POINTS,
        "max_abs_diff_points": worst,
        "passed": bool(worst <= PARITY_BOUND_POINTS),
        "rows": rows,
        "wall_s": time.monotonic() - started,
    }
    out = Path(cfg.out) if cfg.out else record_path(loaded.path, candidate.parity_record)
    out.write_text(json.dumps(record, indent=2))
    print(format_parity(record))
    print(f"wrote {out}")
    return record


def _row_parity(row, k: int, paths, cfg: ParityConfig, nets: dict) -> dict[str, Any]:
    """One suite row: FP32 and the candidate on the same frames, one draw per seed, column
    counts pooled over the draws (each draw's own figures kept in ``draws``)."""
    from training.robustness import RowResult, evaluate_row, paired_exact_difference, row_data

    pooled = {name: RowResult() for name in nets}  # the column counts and frames of all draws
    draws, samples = [], 0
    for seed in cfg.seeds:
        data, depths, structures = row_data(row, paths, cfg.samples, cfg.crop, seed + k)
        samples += len(data)
        draw: dict[str, Any] = {"seed": seed + k}
        results = {}
        for name, net in nets.items():
            result = results[name] = evaluate_row(
                net, 1.0, data, depths, row.dose, seed + k, scores=False, structures=structures
            )
            _pool(pooled[name], result)
            columns = result.columns
            draw[name] = {"columns": int(columns.columns), "exact": int(columns.exact)}
        draw["read_differently"] = results["onnxruntime"].columns.read_differently(
            results[cfg.candidate].columns
        )
        draws.append(draw)
    fp32, candidate = (
        {key: pooled[name].columns.summary()[key] for key in COMPARED}
        for name in ("onnxruntime", cfg.candidate)
    )
    diff = 100.0 * (candidate["column_exact"] - fp32["column_exact"])
    # how far the difference could move on other frames: a paired bootstrap over the
    # structures shown (the views of one structure, in every draw, are not independent)
    spread = paired_exact_difference(
        pooled[cfg.candidate], pooled["onnxruntime"], np.random.default_rng(k)
    )
    scored = int(pooled["onnxruntime"].columns.columns)
    log.info(
        "parity row %s: column exact FP32 %.3f, %s %.3f (%+.2f points, %d columns)",
        row.name,
        fp32["column_exact"],
        cfg.candidate,
        candidate["column_exact"],
        diff,
        scored,
    )
    return {
        "row": row.name,
        "dose": row.dose,
        "samples": samples,
        "columns": scored,
        # columns whose count the candidate reads otherwise than FP32 (right or wrong): each
        # one can move the difference by one column either way, so they set its noise
        "read_differently": sum(d["read_differently"] for d in draws),
        "fp32": fp32,
        "candidate": candidate,
        "column_exact_diff_points": diff,
        "column_exact_diff_ci95_points": [100.0 * v for v in spread["ci95"]],
        "structures": spread["structures"],
        "draws": draws,
    }


def _pool(into, result) -> None:
    """Add a draw's :class:`training.robustness.RowResult` (column counts, per-frame counts and
    structures) to ``into``."""
    into.columns += result.columns
    into.frame_columns += result.frame_columns
    into.frame_exact += result.frame_exact
    into.frame_structures += result.frame_structures


def format_parity(record: dict[str, Any]) -> str:
    """The record as a table: column exact per row, FP32 and candidate, and the difference."""
    lines = [
        f"{record['candidate']} vs FP32 onnxruntime, model {record['model_id']}: "
        f"largest change {record['max_abs_diff_points']:.2f} points (bound "
        f"{record['bound_points']}) -> {'offered' if record['passed'] else 'NOT offered'}",
        f"{'row':<32}{'columns':>8}{'fp32':>8}{'cand.':>8}{'diff pt':>9}"
        f"{'read diff.':>11}   95 % interval",
    ]
    for r in record["rows"]:
        low, high = r["column_exact_diff_ci95_points"]
        lines.append(
            f"{r['row']:<32}{r['columns']:>8}{r['fp32']['column_exact']:>8.3f}"
            f"{r['candidate']['column_exact']:>8.3f}{r['column_exact_diff_points']:>+9.2f}"
            f"{100 * r['read_differently'] / r['columns']:>10.2f}%   {low:+.2f} … {high:+.2f}"
        )
    mean = {
        k: np.mean([r[k]["column_exact"] for r in record["rows"]]) for k in ("fp32", "candidate")
    }
    lines.append(f"mean column exact: fp32 {mean['fp32']:.3f}, candidate {mean['candidate']:.3f}")
    differently = sum(r["read_differently"] for r in record["rows"])
    total = sum(r["columns"] for r in record["rows"])
    lines.append(f"columns read differently from FP32: {differently} of {total}")
    return "\n".join(lines)
