"""``segdepth evaluate``: the paper's section IV on a test dataset file.

At the test noise level λ: the four metrics (IV-A), species accuracy, confusion matrix (Fig. 6),
reliability diagram and ECE before/after temperature scaling (Fig. 7), input gradients (eq. 7,
Fig. 8); then the four metrics over a sweep of λ (Fig. 9). Noise is drawn from ``seed`` and λ,
so a report is reproducible. Writes REPORT/report.json, REPORT/config.json and PNG figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sim_source.noise import add_poisson_noise
from streamer.domain import PAPER_DOSE_E_PER_PX, pixel_size_mismatch
from training import figures
from training.calibration import fit_temperature, sample_pixels
from training.data import LabelledSet
from training.gradients import gradient_spread_px, input_gradients
from training.inference import predict_batches
from training.labels import TargetConfig
from training.library_data import load_or_render
from training.metrics import Calibration, DepthMetrics, centre_mask
from training.model import bundled_model_path, load_model
from training.robustness import check_disjoint

log = logging.getLogger(__name__)

#: the paper's best row of Table I (64 base channels, λ = 2.5): the targets of issue #3.
PAPER_BEST = {
    "pixelwise_accuracy": 0.939,
    "centre_accuracy": 0.847,
    "detection_rate": 0.956,
    "hallucination_rate": 0.0233,
}
TARGETS = {
    "pixelwise_accuracy": (">=", 0.94),
    "centre_accuracy": (">=", 0.85),
    "detection_rate": (">=", 0.956),
    "hallucination_rate": ("<=", 0.0233),
}


@dataclass
class EvaluateConfig:
    """What an evaluation report is a function of (saved as REPORT/config.json)."""

    data: str
    out: str
    model: str | None = None  # None: the bundled model
    val: str | None = None  # temperature fit set; None: first half of ``data``
    noise_lambda: float = PAPER_DOSE_E_PER_PX
    sweep_lambdas: list[float] = field(
        default_factory=lambda: [0.5, 1.0, PAPER_DOSE_E_PER_PX, 5.0, 10.0, 50.0]
    )
    limit: int | None = None
    batch_size: int = 4
    seed: int = 0
    threads: int | None = None
    calibration_pixels: int = 400_000  # random pixels kept for the temperature fit / calibrated ECE
    n_bins: int = 20


def noisy_images(clean: np.ndarray, noise_lambda: float, seed: int) -> np.ndarray:
    """Eq. 1 noise for a whole set, reproducible from (seed, λ)."""
    rng = np.random.default_rng([seed, int(round(noise_lambda * 1000))])
    return add_poisson_noise(clean, noise_lambda, rng)


@dataclass
class Pass:
    """Results of one model pass over a set at one λ."""

    metrics: DepthMetrics
    calibration: Calibration
    species_accuracy: float
    sample_logits: np.ndarray
    sample_labels: np.ndarray
    sample_image: np.ndarray  # image index of each sampled pixel
    examples: dict


def run_pass(
    model, data: LabelledSet, noisy: np.ndarray, cfg: EvaluateConfig, desc: str, n_examples: int = 0
) -> Pass:
    """Metrics, calibration and a pixel sample of the model on ``noisy`` images of ``data``."""
    metrics, calib = DepthMetrics(), Calibration(cfg.n_bins)
    rng = np.random.default_rng(cfg.seed)
    per_image = max(1, cfg.calibration_pixels // len(data))
    logits, labels, image_idx = [], [], []
    species_ok = species_n = 0
    examples: dict[str, list[np.ndarray]] = {
        "noisy": [],
        "truth": [],
        "estimate": [],
        "confidence": [],
    }
    for sl, p in tqdm(
        predict_batches(model, noisy, cfg.batch_size),
        desc=desc,
        unit="batch",
        total=-(-len(noisy) // cfg.batch_size),
    ):
        truth = data.depth[sl]
        for j, i in enumerate(range(sl.start, sl.stop)):
            metrics.update(
                p.depth[j],
                truth[j],
                centre_mask(
                    truth[j].shape, data.centres[i], data.centre_species[i], data.pixel_size_pm
                ),
            )
            if i < n_examples:
                for key, arr in (
                    ("noisy", noisy[i]),
                    ("truth", truth[j]),
                    ("estimate", p.depth[j]),
                    ("confidence", p.confidence[j]),
                ):
                    examples[key].append(arr)
        calib.update(p.confidence, p.depth == truth)
        species_ok += int((p.species == data.species[sl]).sum())
        species_n += p.species.size
        for j in range(len(truth)):
            lg, lb = sample_pixels(
                p.depth_logits[j : j + 1], truth[j : j + 1].astype(np.int64), per_image, rng
            )
            logits.append(lg)
            labels.append(lb)
            image_idx.append(np.full(len(lb), sl.start + j))
    return Pass(
        metrics,
        calib,
        species_ok / species_n,
        np.concatenate(logits),
        np.concatenate(labels),
        np.concatenate(image_idx),
        examples,
    )


def calibration_of(
    logits: np.ndarray, labels: np.ndarray, temperature: float, n_bins: int
) -> Calibration:
    """Reliability counts of sampled pixels under softmax(logits / T)."""
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    calib = Calibration(n_bins)
    calib.update(p.max(axis=1), p.argmax(axis=1) == labels)
    return calib


def gradient_analysis(model, data: LabelledSet, cfg: EvaluateConfig, out: Path) -> dict:
    """Eq. 7 for the deepest column's centre pixel and a background pixel of one test image,
    and for the column pixel across λ; |g|-weighted spread (px) of each map (Fig. 8)."""
    depths_per_image = [float(d.max()) for d in data.depth]
    i = int(np.argmax(depths_per_image))
    truth = data.depth[i]
    centres = (
        np.round(data.centres[i]).astype(int) if len(data.centres[i]) else np.argwhere(truth > 0)
    )
    inside = [
        tuple(c) for c in centres if 0 <= c[0] < truth.shape[0] and 0 <= c[1] < truth.shape[1]
    ]
    column = max(inside, key=lambda rc: truth[rc])
    background = tuple(np.argwhere(truth == 0)[len(np.argwhere(truth == 0)) // 2])
    noisy = noisy_images(data.images[i : i + 1], cfg.noise_lambda, cfg.seed + 1)[0]
    ((_, pred),) = predict_batches(model, noisy[None], 1)
    pixels = {"column": column, "background": background}
    grads, spread = {}, {}
    for name, rc in pixels.items():
        d0 = int(truth[rc])
        depths = sorted({max(0, d0 - 1), d0, min(10, d0 + 1)})
        g = input_gradients(model, noisy, rc, depths)
        grads[name] = dict(zip(depths, g))
        spread[name] = {str(d): gradient_spread_px(gd, rc) for d, gd in zip(depths, g)}
    sweep_maps, sweep_spread = {}, {}
    d_col = int(truth[column])
    for lam in cfg.sweep_lambdas:
        y = noisy_images(data.images[i : i + 1], lam, cfg.seed + 1)[0]
        g = input_gradients(model, y, column, [d_col])[0]
        sweep_maps[lam] = g
        sweep_spread[str(lam)] = gradient_spread_px(g, column)
    name = figures.plot_gradients(
        noisy, pred.depth[0], pixels, grads, sweep_maps, column, out / "gradients.png"
    )
    return {
        "image": i,
        "pixels": {k: [int(v[0]), int(v[1])] for k, v in pixels.items()},
        "true_depth": {k: int(truth[v]) for k, v in pixels.items()},
        "spread_px": spread,
        "spread_px_vs_lambda": sweep_spread,
        "figure": name,
    }


@dataclass
class _Calibrated:
    """Temperature scaling of one evaluation: the fitted temperature, where it was fitted, and
    ECE and reliability tables of all pixels (T=1) and of the held-out sample (T=1, fitted T)."""

    temperature: float
    fit_on: str
    eces: dict[str, float]
    tables: dict[str, Any]


def _load_test_set(cfg: EvaluateConfig, meta: dict[str, Any], targets: TargetConfig):
    """The test images (warning when their pixel size is not the model's)."""
    test = load_or_render(cfg.data, targets, cfg.limit, cfg.seed)
    trained_pixel = meta.get("pixel_size_pm")
    if trained_pixel and pixel_size_mismatch(test.pixel_size_pm, trained_pixel):
        log.warning(
            "test pixel size %.2f pm differs from training %.2f pm",
            test.pixel_size_pm,
            trained_pixel,
        )
    return test


def _calibrate(
    model, main: Pass, test: LabelledSet, cfg: EvaluateConfig, targets: TargetConfig
) -> _Calibrated:
    """Fit the temperature on validation pixels (``cfg.val``, else the first half of the test
    images) and report ECE on held-out test pixels."""
    if cfg.val:
        val = load_or_render(cfg.val, targets, cfg.limit, cfg.seed + 1)
        fit = run_pass(
            model,
            val,
            noisy_images(val.images, cfg.noise_lambda, cfg.seed + 2),
            cfg,
            "validation (temperature)",
        )
        fit_logits, fit_labels = fit.sample_logits, fit.sample_labels
        held = np.ones(len(main.sample_labels), bool)
        fit_on = cfg.val
    else:
        first = main.sample_image < len(test) // 2
        fit_logits, fit_labels = main.sample_logits[first], main.sample_labels[first]
        held = ~first
        fit_on = f"first half of {cfg.data} (images < {len(test) // 2}); ECE on the rest"
    temperature = fit_temperature(fit_logits, fit_labels)
    before = calibration_of(main.sample_logits[held], main.sample_labels[held], 1.0, cfg.n_bins)
    after = calibration_of(
        main.sample_logits[held], main.sample_labels[held], temperature, cfg.n_bins
    )
    fitted = f"held-out sample, T={temperature:.2f}"
    return _Calibrated(
        temperature,
        fit_on,
        eces={
            "all pixels, T=1": main.calibration.ece(),
            "held-out sample, T=1": before.ece(),
            fitted: after.ece(),
        },
        tables={
            "all pixels, T=1": main.calibration.table(),
            "held-out sample, T=1": before.table(),
            fitted: after.table(),
        },
    )


def _noise_sweep(model, main: Pass, test: LabelledSet, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """The four metrics and species accuracy at every λ of the sweep (Fig. 9)."""
    sweep = []
    for lam in cfg.sweep_lambdas:
        p = (
            main
            if lam == cfg.noise_lambda
            else run_pass(
                model, test, noisy_images(test.images, lam, cfg.seed), cfg, f"sweep λ={lam:g}"
            )
        )
        sweep.append(
            {"noise_lambda": lam, **p.metrics.summary(), "species_accuracy": p.species_accuracy}
        )
    return sweep


def _targets_met(summary: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each metric against the paper's best row (:data:`TARGETS`)."""
    return {
        k: {
            "target": f"{op} {v}",
            "value": summary[k],
            "met": bool(summary[k] >= v if op == ">=" else summary[k] <= v),
            "shortfall": float(v - summary[k] if op == ">=" else summary[k] - v),
        }
        for k, (op, v) in TARGETS.items()
    }


def evaluate(cfg: EvaluateConfig) -> dict:
    """Write the report for ``cfg``; returns the report dict."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    model_path = Path(cfg.model) if cfg.model else bundled_model_path()
    model, meta = load_model(model_path)
    check_disjoint(meta, [cfg.data])  # the temperature may be fitted on validation data
    targets = TargetConfig()
    test = _load_test_set(cfg, meta, targets)
    noisy = noisy_images(test.images, cfg.noise_lambda, cfg.seed)
    main = run_pass(model, test, noisy, cfg, f"test λ={cfg.noise_lambda:g}", n_examples=3)
    summary = main.metrics.summary()
    calibrated = _calibrate(model, main, test, cfg, targets)
    figs = {
        "confusion": figures.plot_confusion(main.metrics.confusion, out / "confusion.png"),
        "reliability": figures.plot_reliability(
            calibrated.tables, calibrated.eces, out / "reliability.png"
        ),
        "examples": figures.plot_examples(
            np.stack(main.examples["noisy"]),
            np.stack(main.examples["truth"]),
            np.stack(main.examples["estimate"]),
            np.stack(main.examples["confidence"]),
            out / "examples.png",
        ),
    }
    gradients = gradient_analysis(model, test, cfg, out)
    figs["gradients"] = gradients.pop("figure")
    sweep = _noise_sweep(model, main, test, cfg)
    figs["noise_sweep"] = figures.plot_sweep(
        cfg.sweep_lambdas, sweep, meta.get("noise_lambda"), out / "noise_sweep.png"
    )
    report = {
        "model": {
            "path": str(model_path),
            "model_id": meta.get("model_id"),
            "config": meta.get("config"),
            "data_sha256": meta.get("data_sha256"),
            "noise_lambda": meta.get("noise_lambda"),
        },
        "data": {
            "path": cfg.data,
            "sha256": test.sha256,
            "images": len(test),
            "pixel_size_pm": test.pixel_size_pm,
        },
        "noise_lambda": cfg.noise_lambda,
        "metrics": {**summary, "species_accuracy": main.species_accuracy},
        "targets": _targets_met(summary),
        "paper_best_row": PAPER_BEST,
        "confusion": main.metrics.confusion.tolist(),
        "calibration": {
            "ece": calibrated.eces,
            "temperature": calibrated.temperature,
            "temperature_fit_on": calibrated.fit_on,
            "reliability": calibrated.tables,
        },
        "gradients": gradients,
        "noise_sweep": sweep,
        "figures": figs,
        "wall_s": time.monotonic() - started,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    ece = list(calibrated.eces.values())
    log.info(
        "λ=%g: pixelwise %.4f centre %.4f detection %.4f hallucination %.4f; ECE %.4f -> "
        "%.4f at T=%.2f; wrote %s",
        cfg.noise_lambda,
        summary["pixelwise_accuracy"],
        summary["centre_accuracy"],
        summary["detection_rate"],
        summary["hallucination_rate"],
        ece[1],
        ece[2],
        calibrated.temperature,
        out / "report.json",
    )
    return report
