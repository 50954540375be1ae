"""PNG figures of the evaluation report (matplotlib, Agg): Figs. 6-9 of the paper and examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_confusion(confusion: np.ndarray, path: Path) -> str:
    """Row-normalised confusion matrix, true depth vs estimated depth (Fig. 6)."""
    rows = confusion.sum(axis=1, keepdims=True)
    norm = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    k = len(confusion)
    for t in range(k):
        for e in range(k):
            if norm[t, e] >= 0.01:
                ax.text(
                    e,
                    t,
                    f"{norm[t, e]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="w" if norm[t, e] < 0.6 else "k",
                )
    ax.set(
        xlabel="estimated depth (atoms)",
        ylabel="true depth (atoms)",
        xticks=range(k),
        yticks=range(k),
        title="confusion (rows normalised)",
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_reliability(tables: dict[str, dict], eces: dict[str, float], path: Path) -> str:
    """Accuracy vs confidence per bin, one line per calibration (Fig. 7)."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    for name, table in tables.items():
        conf, acc = np.array(table["confidence"]), np.array(table["accuracy"])
        seen = np.isfinite(conf) & np.isfinite(acc)
        ax.plot(conf[seen], acc[seen], "o-", ms=3, label=f"{name} (ECE {eces[name]:.3f})")
    ax.set(
        xlabel="confidence (eq. 5)",
        ylabel="accuracy",
        xlim=(0, 1),
        ylim=(0, 1),
        title="reliability diagram",
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def _show_magnitude(ax, g: np.ndarray) -> None:
    """|g| on a square-root scale clipped at its 99.9th percentile (small values stay visible)."""
    mag = np.abs(g)
    top = float(np.percentile(mag, 99.9)) or float(mag.max()) or 1.0
    ax.imshow(mag, cmap="inferno", norm=matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=top))


def plot_gradients(
    image: np.ndarray,
    estimate: np.ndarray,
    pixels: dict[str, tuple[int, int]],
    grads: dict[str, dict[int, np.ndarray]],
    sweep: dict[float, np.ndarray],
    sweep_pixel: tuple[int, int],
    path: Path,
) -> str:
    """(a) |∇_y F(y)_i[d]| for a column and a background pixel at several d; (b) the column
    pixel's gradient magnitude at several noise levels λ (Fig. 8)."""
    n_d = max(len(g) for g in grads.values())
    ncols = max(n_d, len(sweep)) + 1
    fig, axes = plt.subplots(3, ncols, figsize=(2.2 * ncols, 6.8))
    for ax in axes.ravel():
        ax.axis("off")
    colours = {name: c for name, c in zip(pixels, ("r", "lime"))}
    axes[0, 0].imshow(estimate, cmap="magma", vmin=0, vmax=10)
    axes[0, 0].set_title("depth estimate", fontsize=8)
    for name, (r, c) in pixels.items():
        axes[0, 0].plot(c, r, "o", color=colours[name], ms=4)
    for row, name in enumerate(pixels):
        for k, (d, g) in enumerate(grads[name].items()):
            ax = axes[row, k + 1]
            _show_magnitude(ax, g)
            ax.plot(pixels[name][1], pixels[name][0], "o", color=colours[name], ms=3)
            ax.set_title(f"{name}: |g| d={d}", fontsize=8)
    axes[1, 0].imshow(image, cmap="gray")
    axes[1, 0].set_title("noisy input", fontsize=8)
    axes[2, 0].text(0.0, 0.5, "(b) column pixel,\nvarying λ", fontsize=9)
    for k, (lam, g) in enumerate(sweep.items()):
        ax = axes[2, k + 1]
        _show_magnitude(ax, g)
        ax.plot(sweep_pixel[1], sweep_pixel[0], "o", color="r", ms=3)
        ax.set_title(f"λ = {lam:g}", fontsize=8)
    return _save(fig, path)


def plot_sweep(
    lambdas: list[float], rows: list[dict[str, float]], train_lambda: float | None, path: Path
) -> str:
    """The four metrics against the test noise level λ (Fig. 9)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key in ("pixelwise_accuracy", "centre_accuracy", "detection_rate", "hallucination_rate"):
        ax.plot(lambdas, [r[key] for r in rows], "o-", ms=4, label=key.replace("_", " "))
    if train_lambda:
        ax.axvline(train_lambda, color="k", ls=":", lw=1, label=f"training λ = {train_lambda:g}")
    ax.set(
        xscale="log",
        xlabel="test noise λ (counts per vacuum pixel)",
        ylabel="metric",
        ylim=(0, 1),
        title="generalisation across noise levels",
    )
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_examples(
    noisy: np.ndarray, truth: np.ndarray, estimate: np.ndarray, confidence: np.ndarray, path: Path
) -> str:
    """Rows of (noisy input, true depth, estimated depth, confidence)."""
    n = len(noisy)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    styles: tuple[dict[str, Any], ...] = (
        {"cmap": "gray"},
        {"cmap": "magma", "vmin": 0, "vmax": 10},
        {"cmap": "magma", "vmin": 0, "vmax": 10},
        {"cmap": "viridis", "vmin": 0, "vmax": 1},
    )
    for i in range(n):
        for ax, img, title, kw in zip(
            axes[i],
            (noisy[i], truth[i], estimate[i], confidence[i]),
            ("noisy input", "true depth", "estimated depth", "confidence"),
            styles,
        ):
            ax.imshow(img, **kw)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _save(fig, path)
