"""``segdepth evaluate --suite robustness``: a model judged off its training distribution.

Each row of the suite steps away from the training set along one axis — in-plane orientation,
optics at and beyond the training ranges, facet family, dose, a thick carbon film, a specimen
tilted beyond the training libraries' range, and the legacy `segdepth simulate` slabs — and
reports, at the row's dose: column-level accuracy (exact, ±1, found, false columns;
training.metrics.ColumnMetrics), the paper's pixel metrics,
the expected calibration error on truth column pixels and on the pixels the model calls a
column (what a user reads off the confidence map), and a per-frame out-of-distribution
score with its ROC AUC against the in-distribution row: :func:`turn_scores` (a frame against its
90° turn, two passes: the engine's turn check) and :func:`uncertainty_scores` (one pass).
With ``tta`` every model is read a second time with test-time augmentation (the 8 flips and
quarter turns averaged, as ``serve --tta``), a reading of its own beside the plain one, which
adds a third score, the 8 views' :func:`training.inference.spread_scores`.

The suite's test structures come from exit-wave libraries of their own seeds (built by
:func:`build_suite` when missing), never the training libraries' (:func:`check_disjoint`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sim_source.microscope import OpticsDraw, OpticsRanges
from sim_source.noise import add_poisson_noise
from sim_source.particle import ParticleConfig
from streamer.domain import PAPER_DOSE_E_PER_PX
from training.data import LabelledSet, file_seed, load_set
from training.inference import (
    predict_batches,
    turn_scores,
    turned_probabilities,
    uncertainty_scores,
)
from training.labels import TargetConfig
from training.library_data import RenderConfig, load_library, render_set
from training.metrics import Calibration, ColumnMetrics, DepthMetrics, centre_mask
from training.model import file_sha256, load_model

log = logging.getLogger(__name__)

#: the paper's microscope (section III-B2) at mid defocus: the rows' nominal optics
NOMINAL = OpticsDraw(C10_A=50.0)


@dataclass(frozen=True)
class SuiteFile:
    """A test file of the suite: an exit-wave library (``particle`` set) or a legacy image set."""

    name: str
    seed: int
    count: int
    particle: ParticleConfig | None = None
    #: specimen tilt range (mrad) of a library file
    tilt_mrad: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Row:
    """One row: which file, which microscope (None = drawn from the training ranges), the
    in-plane angle range (deg), dose λ, the axis it probes, and whether it lies outside every
    range the robust training draws from (``outside``: what an out-of-distribution score
    should flag; the orientation, facet and in-range dose rows are inside them)."""

    name: str
    axis: str
    file: str
    optics: OpticsDraw | None = NOMINAL
    angles_deg: tuple[float, float] = (0.0, 0.0)
    dose: float = PAPER_DOSE_E_PER_PX
    outside: bool = False


def suite_files(scale: float = 1.0) -> list[SuiteFile]:
    """The suite's test files (seeds 3003-3401, apart from any training seed we use)."""
    n = max(2, int(round(48 * scale)))
    m = max(2, int(round(16 * scale)))
    no_film = ParticleConfig(carbon_probability=0.0)
    return [
        SuiteFile("mixed", 3003, n, ParticleConfig()),
        *(
            SuiteFile(f"facet_{f}", 3100 + k, m, replace(no_film, facets=(f,)))
            for k, f in enumerate(("110", "100", "111"))
        ),
        SuiteFile(
            "carbon",
            3201,
            m,
            ParticleConfig(carbon_probability=1.0, carbon_thickness_A=(30.0, 60.0)),
        ),
        SuiteFile("legacy", 3301, m),
        SuiteFile("tilt", 3401, m, ParticleConfig(), (10.0, 10.0)),
    ]


def suite_rows() -> list[Row]:
    """The rows, in the order of the table."""
    beyond = {
        "defocus 12 nm": replace(NOMINAL, C10_A=120.0),
        "astigmatism 3 nm + coma 150 nm": replace(
            NOMINAL, C12_A=30.0, phi12_rad=0.7, C21_A=1500.0, phi21_rad=2.0
        ),
        "focal spread 70 Å, no aperture": replace(NOMINAL, focal_spread_A=70.0, aperture_mrad=None),
        "C3 −20 µm, C5 12 mm": replace(NOMINAL, C3_um=-20.0, C5_mm=12.0),
    }
    return [
        Row("in distribution", "reference", "mixed", None, (0.0, 360.0)),
        *(
            Row(f"turned {a:g}°", "orientation", "mixed", NOMINAL, (a, a))
            for a in (0.0, 15.0, 30.0, 45.0, 90.0)
        ),
        *(
            Row(name, "optics beyond training", "mixed", optics, (0.0, 360.0), outside=True)
            for name, optics in beyond.items()
        ),
        *(
            Row(f"{{{f}}} facets", "facet", f"facet_{f}", None, (0.0, 360.0))
            for f in ("110", "100", "111")
        ),
        *(
            Row(f"λ = {d:g}", "dose", "mixed", None, (0.0, 360.0), d, outside=d > 10.0)
            for d in (0.5, 1.0, 10.0, 50.0)
        ),
        # training films are 0.5-3 nm thick (ParticleConfig); the legacy slabs come from
        # another generator at fixed optics
        Row("carbon film 3-6 nm", "support", "carbon", None, (0.0, 360.0), outside=True),
        Row("legacy simulate slabs", "legacy", "legacy", outside=True),
        # twice the largest tilt of the training libraries (LibraryConfig.tilt_mrad), in a
        # direction drawn per structure
        Row("specimen tilt 10 mrad", "tilt", "tilt", None, (0.0, 360.0), outside=True),
    ]


def build_suite(
    directory: str | Path, scale: float = 1.0, gpts: int = 768, legacy_size: int = 256
) -> dict[str, Path]:
    """Write the suite's missing test files into ``directory``; returns name → path."""
    from sim_source.dataset import DatasetConfig, write_dataset
    from sim_source.wave_library import LibraryConfig, write_library

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for spec in suite_files(scale):
        path = paths[spec.name] = directory / f"{spec.name}.h5"
        if spec.particle is None:
            cfg = DatasetConfig(count=spec.count, size=legacy_size, seed=spec.seed)
            if not _complete(path, cfg.to_json()):
                write_dataset(path, cfg, progress=False)
        else:
            lib = LibraryConfig(
                count=spec.count,
                gpts=gpts,
                seed=spec.seed,
                particle=spec.particle,
                tilt_mrad=spec.tilt_mrad,
            )
            if not _complete(path, lib.to_json()):
                write_library(path, lib, progress=False)
    return paths


def _complete(path: Path, config_json: str) -> bool:
    if not path.exists():
        return False
    with h5py.File(path, "r") as f:
        return f.attrs.get("config") == config_json and int(f.attrs.get("n_complete", -1)) == int(
            f.attrs.get("count", len(f["images"]) if "images" in f else -2)
        )


def check_disjoint(meta: dict, paths: list[str | Path]) -> None:
    """Refuse test files that share a seed or bytes with the model's training/validation files
    (as recorded in the model's meta)."""
    used = meta.get("data_files") or [
        {"sha256": meta.get(k)} for k in ("data_sha256", "val_sha256")
    ]
    seeds = {d.get("seed") for d in used} - {None}
    hashes = {d.get("sha256") for d in used} - {None}
    for path in paths:
        seed = file_seed(path)
        if seed is not None and seed in seeds:
            raise ValueError(
                f"{path} shares seed {seed} with the model's training or "
                f"validation data; simulate the test set with another --seed"
            )
        if file_sha256(path) in hashes:
            raise ValueError(f"{path} is one of the model's training or validation files")


@dataclass
class RowResult:
    """Accumulated figures of one model on one row: ``ood`` the turn-disagreement scores of
    :func:`turn_scores`, ``uncertainty`` the one-pass :func:`uncertainty_scores` and, read with
    test-time augmentation, ``spread`` the views' :func:`spread_scores`, per frame."""

    pixels: DepthMetrics = field(default_factory=DepthMetrics)
    columns: ColumnMetrics = field(default_factory=ColumnMetrics)
    #: confidence against correctness on the truth's column pixels (missed ones included)
    calibration: Calibration = field(default_factory=Calibration)
    #: the same on the pixels the model calls a column (what a user reads off the map)
    called_calibration: Calibration = field(default_factory=Calibration)
    ood: list[float] = field(default_factory=list)
    uncertainty: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    #: per frame its true columns and how many of them were read exactly
    frame_columns: list[int] = field(default_factory=list)
    frame_exact: list[int] = field(default_factory=list)
    #: per frame the structure it shows, where several frames show one (frames of one structure
    #: are not independent draws; set by :func:`evaluate_row`); empty: each frame its own
    frame_structures: list[int] = field(default_factory=list)

    @property
    def errors(self) -> list[float]:
        """Per frame the fraction of its true columns whose count was read wrong (NaN: none)."""
        return [
            1 - exact / n if n else float("nan")
            for n, exact in zip(self.frame_columns, self.frame_exact)
        ]

    def add(
        self,
        depth: np.ndarray,
        confidence: np.ndarray,
        data: LabelledSet,
        i: int,
        column_depths: np.ndarray,
    ) -> None:
        """One sample's predicted depth (H, W) and confidence (H, W) against sample ``i`` of
        ``data`` (its true column depths ``column_depths``)."""
        truth = data.depth[i]
        self.pixels.update(
            depth,
            truth,
            centre_mask(truth.shape, data.centres[i], data.centre_species[i], data.pixel_size_pm),
        )
        columns, exact = self.columns.columns, self.columns.exact
        self.columns.update(depth, data.centres[i], column_depths, data.pixel_size_pm)
        self.frame_columns.append(self.columns.columns - columns)
        self.frame_exact.append(self.columns.exact - exact)
        correct = depth == truth
        column, called = truth > 0, depth > 0
        self.calibration.update(confidence[column], correct[column])
        self.called_calibration.update(confidence[called], correct[called])

    def summary(self) -> dict:
        return {
            **self.columns.summary(),
            **{k: v for k, v in self.pixels.summary().items() if "pixels" not in k},
            "ece_column_pixels": self.calibration.ece(),
            "ece_called_column_pixels": self.called_calibration.ece(),
            "ood_score_mean": float(np.mean(self.ood)) if self.ood else float("nan"),
            "uncertainty_mean": (
                float(np.mean(self.uncertainty)) if self.uncertainty else float("nan")
            ),
            "spread_mean": float(np.mean(self.spread)) if self.spread else float("nan"),
        }


def evaluate_row(
    model,
    temperature: float,
    data: LabelledSet,
    column_depths: list[np.ndarray],
    dose: float,
    seed: int,
    scores: bool = True,
    structures: list[int] | None = None,
    tta: bool = False,
) -> RowResult:
    """One model on one row's clean samples at dose λ (noise from ``seed``). ``scores``: the
    per-frame OOD and uncertainty scores too (the OOD score costs a second, turned pass, or
    comes from the augmented passes with ``tta``). ``structures``: the structure each sample
    shows (default: each its own). ``tta``: read with test-time augmentation (8 passes)."""
    noisy = add_poisson_noise(data.images, dose, np.random.default_rng([seed, int(dose * 1000)]))
    result = RowResult()
    turned = turned_probabilities(model, noisy, temperature) if scores and not tta else None
    for sl, p in predict_batches(model, noisy, 8, temperature, tta=tta):
        if scores:
            result.uncertainty.extend(uncertainty_scores(p.depth, p.confidence))
            if p.turn is not None and p.spread is not None:
                result.ood.extend(p.turn)
                result.spread.extend(p.spread)
            elif turned is not None:
                result.ood.extend(turn_scores(p.probabilities, turned[sl]))
        for j, i in enumerate(range(sl.start, sl.stop)):
            result.add(p.depth[j], p.confidence[j], data, i, column_depths[i])
    result.frame_structures = list(structures or [])
    return result


def paired_exact_difference(
    a: RowResult, b: RowResult, rng: np.random.Generator, draws: int = 2000
) -> dict[str, Any]:
    """Column exact of ``a`` minus that of ``b``, two models read on the same frames, with a
    95 % interval from a paired bootstrap over the structures the frames show (a frame's
    columns share its noise, optics and structure, and the views of one structure share it:
    structures, not columns or frames, are the independent draws)."""
    columns, other = np.asarray(a.frame_columns), np.asarray(b.frame_columns)
    if not np.array_equal(columns, other) or a.frame_structures != b.frame_structures:
        raise ValueError("paired difference of results on different frames")
    shown = a.frame_structures or list(range(len(columns)))
    _, structure = np.unique(np.asarray(shown, np.int64), return_inverse=True)
    gained = np.bincount(structure, np.asarray(a.frame_exact) - np.asarray(b.frame_exact))
    columns = np.bincount(structure, columns)
    n = len(columns)
    if columns.sum() == 0:
        return {"difference": float("nan"), "ci95": [float("nan")] * 2, "structures": n}
    pick = rng.integers(0, n, (draws, n))
    resampled = gained[pick].sum(axis=1) / np.maximum(columns[pick].sum(axis=1), 1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {
        "difference": float(gained.sum() / columns.sum()),
        "ci95": [float(low), float(high)],
        "structures": n,
        "frames": len(a.frame_columns),
    }


def exact_differences(
    results: dict, rows: list[Row], paths: list[str], ids: list[str], seed: int
) -> list[dict[str, Any]]:
    """The first model's column exact against each other model's, row by row
    (:func:`paired_exact_difference`), and on how many rows its interval lies wholly above
    or below zero."""
    rng = np.random.default_rng(seed)
    out = []
    for path, model_id in zip(paths[1:], ids[1:]):
        per_row = {
            row.name: paired_exact_difference(
                results[(row.name, paths[0])], results[(row.name, path)], rng
            )
            for row in rows
        }
        out.append(
            {
                "model": ids[0],
                "against": model_id,
                "rows": per_row,
                "higher": sum(d["ci95"][0] > 0 for d in per_row.values()),
                "lower": sum(d["ci95"][1] < 0 for d in per_row.values()),
            }
        )
    return out


def roc_auc(negatives: list[float], positives: list[float]) -> float:
    """Probability that a positive (shifted) frame scores above a negative (in-distribution)
    one, ties counting half (the Mann-Whitney form of the ROC AUC)."""
    neg, pos = np.asarray(negatives), np.asarray(positives)
    if not len(neg) or not len(pos):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def rank_correlation(scores: list[float], errors: list[float]) -> float:
    """Spearman's rank correlation of per-frame scores with the frames' column error rates
    (frames without columns left out): 1 when a higher score always means more errors."""
    from scipy.stats import spearmanr

    if not len(scores):  # a reading without this score (the spread needs augmentation)
        return float("nan")
    x, y = np.asarray(scores, np.float64), np.asarray(errors, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3:
        return float("nan")
    return float(spearmanr(x[keep], y[keep]).statistic)


def pooled(results: dict, rows: list[Row], path: str, name: str) -> list[float]:
    """The per-frame values ``name`` ("ood", "uncertainty", "errors") of one model's
    :class:`RowResult` on each of ``rows``, in row order."""
    return [v for row in rows for v in getattr(results[(row.name, path)], name)]


def row_data(
    row: Row, paths: dict[str, Path], samples: int, crop: int, seed: int
) -> tuple[LabelledSet, list[np.ndarray], list[int]]:
    """(clean labelled set, per-sample true column depths, per-sample structure index) of a
    row (each legacy image is its own structure)."""
    targets = TargetConfig()
    if row.file == "legacy":
        data = load_set(paths["legacy"], targets, samples, progress=False)
        with h5py.File(paths["legacy"], "r") as f:
            cols = f["columns"][:]
        depths = [
            cols[(cols["image"] == i) & (cols["depth"] > 0)]["depth"] for i in range(len(data))
        ]
        return data, depths, list(range(len(data)))
    library = load_library(paths[row.file])
    render = RenderConfig(
        crop=crop,
        angles_deg=row.angles_deg,
        mirror_probability=0.0 if row.angles_deg[0] == row.angles_deg[1] else 0.5,
        optics=OpticsRanges(),
    )
    data, rendered = render_set(
        library, samples, seed, render, targets, row.optics, with_rendered=True
    )
    return data, [r.column_depth for r in rendered], [r.structure for r in rendered]


@dataclass
class SuiteConfig:
    """What a suite report is a function of (saved in the report)."""

    models: list[str]
    directory: str = "data/suite"
    out: str = "training/models/robustness"
    samples: int = 48
    crop: int = 192
    scale: float = 1.0
    gpts: int = 768
    seed: int = 0
    threads: int | None = None
    #: also read every model with test-time augmentation (8 passes per frame)
    tta: bool = False


@dataclass
class Reading:
    """One model file read one way: plainly, or with test-time augmentation (``tta``)."""

    path: str
    model: torch.nn.Module
    meta: dict
    tta: bool = False

    @property
    def key(self) -> str:
        """What names its results."""
        return f"{self.path}#tta" if self.tta else self.path

    @property
    def label(self) -> str:
        """Its column in the report: the model id, "+TTA" when read with augmentation."""
        label = str(self.meta.get("model_id", self.path))
        return f"{label}+TTA" if self.tta else label


def readings(cfg: SuiteConfig, paths: dict[str, Path]) -> list[Reading]:
    """The models of ``cfg``, each checked disjoint from the suite's files, in order; with
    ``cfg.tta`` each read with test-time augmentation first and then plainly, so that the
    report's first difference is the augmentation's gain."""
    out = []
    for path in cfg.models:
        model, meta = load_model(path)
        check_disjoint(meta, list(paths.values()))
        if cfg.tta:
            out.append(Reading(path, model, meta, tta=True))
        out.append(Reading(path, model, meta))
    return out


SCORES = ("ood", "uncertainty", "spread")


def run_suite(cfg: SuiteConfig) -> dict:
    """Build missing test files, evaluate every model on every row, write JSON + Markdown +
    PNG into ``cfg.out``; returns the report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    paths = build_suite(cfg.directory, cfg.scale, cfg.gpts)
    loaded = readings(cfg, paths)
    rows, results = suite_rows(), {}
    for k, row in enumerate(rows):
        data, depths, structures = row_data(row, paths, cfg.samples, cfg.crop, cfg.seed + k)
        for r in loaded:
            results[(row.name, r.key)] = evaluate_row(
                r.model,
                float(r.meta.get("temperature", 1.0)),
                data,
                depths,
                row.dose,
                cfg.seed + k,
                structures=structures,
                tta=r.tta,
            )
        log.info("suite row %s done (%d samples)", row.name, len(data))
    report: dict[str, Any] = {
        "config": cfg.__dict__,
        "files": {k: str(v) for k, v in paths.items()},
        "models": [
            {"path": r.path, "model_id": r.meta.get("model_id"), "tta": r.tta} for r in loaded
        ],
        "rows": [],
    }
    for row in rows:
        entry: dict[str, Any] = {
            "row": row.name,
            "axis": row.axis,
            "dose": row.dose,
            "outside_training": row.outside,
            "models": {},
        }
        for r in loaded:
            result = results[(row.name, r.key)]
            summary = result.summary()
            reference = results[(rows[0].name, r.key)]
            for score in SCORES:
                summary[f"{score}_auc_vs_in_distribution"] = roc_auc(
                    getattr(reference, score), getattr(result, score)
                )
                summary[f"{score}_error_correlation"] = rank_correlation(
                    getattr(result, score), result.errors
                )
            entry["models"][r.label] = summary
        report["rows"].append(entry)
    # how well each score tells the frames of every row outside training from in-distribution
    # ones (pooled; a model trained on other ranges has other rows outside, read per row then)
    report["auc_outside_training"] = {
        r.label: {
            score: roc_auc(
                getattr(results[(rows[0].name, r.key)], score),
                pooled(results, [row for row in rows if row.outside], r.key, score),
            )
            for score in SCORES
        }
        for r in loaded
    }
    # whether a score tells a frame read badly from one read well, wherever the frame comes from;
    # at the in-distribution row's dose only, as the engine's levels are per dose (at a lower
    # dose both errors and scores rise, which would flatter a score)
    same_dose = [row for row in rows if row.dose == rows[0].dose]
    report["scores_against_errors"] = {
        r.label: {
            score: rank_correlation(
                pooled(results, same_dose, r.key, score),
                pooled(results, same_dose, r.key, "errors"),
            )
            for score in SCORES
        }
        for r in loaded
    }
    # the engine's warning level: 95 % of in-distribution frames stay below it
    report["ood_threshold"] = {
        r.label: float(np.percentile(results[(rows[0].name, r.key)].uncertainty, 95))
        for r in loaded
    }
    report["exact_differences"] = exact_differences(
        results, rows, [r.key for r in loaded], [r.label for r in loaded], cfg.seed
    )
    report["wall_s"] = time.monotonic() - started
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=2))
    (out / "robustness.md").write_text(markdown_table(report))
    plot_suite(report, out / "robustness.png")
    return report


def markdown_table(report: dict) -> str:
    """The suite as one Markdown table: a line per row and model."""
    lines = [
        "| row | model | exact | ±1 | found | false columns | centre acc. | ECE (columns)"
        " | ECE (called columns) | AUC turn | AUC uncertainty |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in report["rows"]:
        for model_id, s in entry["models"].items():
            lines.append(
                f"| {entry['row']} | {model_id} | {s['column_exact']:.3f} | "
                f"{s['column_within_one']:.3f} | {s['column_found']:.3f} | "
                f"{s['false_column_rate']:.3f} | {s['centre_accuracy']:.3f} | "
                f"{s['ece_column_pixels']:.3f} | {s['ece_called_column_pixels']:.3f} | "
                f"{s['ood_auc_vs_in_distribution']:.2f} | "
                f"{s['uncertainty_auc_vs_in_distribution']:.2f} |"
            )
    outside = ", ".join(e["row"] for e in report["rows"] if e.get("outside_training"))
    for model_id, auc in report.get("auc_outside_training", {}).items():
        lines.append(
            f"\n{model_id}: ROC AUC of the rows outside the training ranges ({outside}) pooled "
            f"against in distribution: turn score {auc['ood']:.2f}, uncertainty score "
            f"{auc['uncertainty']:.2f}{_spread(auc)}."
        )
    for pair in report.get("exact_differences", []):
        lines += [
            f"\nColumn exact of {pair['model']} minus {pair['against']}, with a 95 % interval "
            "from a paired bootstrap over the structures of each row's frames:\n",
            "| row | difference | 95 % interval |",
            "| --- | --- | --- |",
        ]
        for name, d in pair["rows"].items():
            low, high = d["ci95"]
            lines.append(f"| {name} | {d['difference']:+.3f} | {low:+.3f} … {high:+.3f} |")
        rest = len(pair["rows"]) - pair["higher"] - pair["lower"]
        lines.append(
            f"\nAbove zero on {pair['higher']} rows, below on {pair['lower']}, "
            f"zero inside the interval on {rest}."
        )
    dose = report["rows"][0]["dose"] if report["rows"] else float("nan")
    for model_id, rho in report.get("scores_against_errors", {}).items():
        lines.append(
            f"\n{model_id}: rank correlation (Spearman) of each frame's score with the fraction "
            f"of its columns read wrong, the frames of all rows at λ = {dose:g} pooled: turn "
            f"score {rho['ood']:.2f}, uncertainty score {rho['uncertainty']:.2f}{_spread(rho)}."
        )
    return "\n".join(lines) + "\n"


def _spread(figures: dict) -> str:
    """ ", TTA spread score x.xx" where a reading with test-time augmentation has one."""
    value = figures.get("spread", float("nan"))
    return f", TTA spread score {value:.2f}" if np.isfinite(value) else ""


def plot_suite(report: dict, path: Path) -> str:
    """Bar chart: column-level exact accuracy per row and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["row"] for e in report["rows"]]
    models = list(report["rows"][0]["models"])
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(models)
    for k, model_id in enumerate(models):
        values = [e["models"][model_id]["column_exact"] for e in report["rows"]]
        ax.bar(np.arange(len(names)) + k * width, values, width, label=model_id)
    ax.axhline(0.9, color="k", lw=0.8, ls="--", label="aim 0.90")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=40, ha="right")
    ax.set_ylabel("column-level exact atom count")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name
