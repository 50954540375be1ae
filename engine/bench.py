"""``segdepth bench engine``: throughput and latency of each backend vs PyTorch eager FP32.

For every backend, frame side and batch size: one warm-up call, then up to ``iterations`` timed
calls of ``Backend.infer`` on a batch of Poisson frames (dose 20 e-/px, normalised), stopping
early after ``max_seconds``. Reported: frames/s (frames / total time of the timed calls) and the
latency of one batch call (p50, p99, ms; frames wait for the whole batch). The baseline is
PyTorch eager FP32 on the same device (on a CPU machine that is the ``torch-cpu`` backend
itself). Also timed: the serve loop's CPU work per frame after inference (maps, columns, drift,
HMM, encoding), which bounds the engine's frame rate whatever the backend: with numpy on the
host, and with maps, column averages and drift in torch on each device present. Speed does not
depend on the weights: without the bundled model a randomly initialised
default SegDepthUNet is timed. GPU backends absent here are listed as not run, with the reason.
Each row also gives the network's arithmetic rate (frames/s x GFLOP per frame, engine.flops) and
its fraction of the machine's dense FP32 matrix-product rate measured in the same run; a
backend that runs here but is not offered for the model (INT8 without a passing parity record)
is timed and marked.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine import backends
from engine.flops import gemm_ceiling_gflops, model_gflop
from engine.model_io import LoadedModel, load
from streamer.cli_support import machine_info
from streamer.domain import N_DEPTHS, N_SPECIES_CLASSES

#: aims of the design for a base-16 model on one H100 (frames/s), not measurable without a GPU.
GPU_AIMS_FPS = {512: 1500, 1024: 400}
DOSE = 20.0


class TorchEagerCUDAFP32(backends.Backend):
    """Baseline on a GPU machine: PyTorch eager, FP32, on CUDA (no graphs, no half precision)."""

    name, precision = "torch-eager-cuda-fp32", "fp32"
    device_maps_default = False  # the maps from host copies, as before device-side maps

    def __init__(self, loaded: LoadedModel, max_batch: int = 32, **kw):
        super().__init__(loaded, max_batch, **kw)
        self._head = loaded.head().cuda()

    def _run(self, x: np.ndarray) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return tuple(self._head(torch.from_numpy(x).cuda()))


@dataclass
class BenchConfig:
    """Settings of one benchmark run (saved in its JSON)."""

    model: str | None = None
    backends: str = "all"
    sizes: list[int] = field(default_factory=lambda: [512, 1024])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    iterations: int = 5
    max_seconds: float = 20.0
    seed: int = 0


def _model(config: BenchConfig, workdir: Path) -> tuple[LoadedModel, str]:
    from engine.model_io import default_model_path

    if config.model is not None:
        return load(config.model), "given"
    try:
        return load(default_model_path()), "bundled"
    except FileNotFoundError:
        from training.model import SegDepthUNet, UNetConfig, save_model

        torch.manual_seed(config.seed)
        path = workdir / "random_default_unet.pt"
        save_model(path, SegDepthUNet(UNetConfig()), {"model_id": "random-default-unet"})
        return load(path), "random weights (default UNetConfig; speed only)"


def time_cell(
    backend: backends.Backend, frames: np.ndarray, iterations: int, max_seconds: float
) -> dict[str, float]:
    """Frames/s and batch-call latency percentiles of ``backend.infer(frames).maps()``: the
    network and the per-pixel depth, confidence and species maps the engine publishes, on the
    host (reduced on the device where the backend keeps its outputs there)."""
    backend.infer(frames).maps()  # warm-up: graph capture, plan load, allocator
    times = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        backend.infer(frames).maps()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds:
            break
    t = np.asarray(times)
    return {
        "frames_per_s": len(frames) * len(t) / t.sum(),
        "latency_ms_p50": float(np.percentile(t, 50) * 1e3),
        "latency_ms_p99": float(np.percentile(t, 99) * 1e3),
        "calls": len(t),
    }


def time_postprocess(
    side: int, rng: np.random.Generator, n_frames: int = 16, device: str | None = None
) -> float:
    """ms per frame of the serve loop's work after inference (depth/confidence/species maps,
    column tracking with drift, HMM, result encoding) on random probability maps, once the
    column reference is complete (random maps give ~5x more "columns" than a real frame).
    ``device``: the probabilities as torch tensors there, maps, column averages and drift
    computed there (engine.device_maps); None: numpy on the host."""
    from engine.device_maps import DevicePrediction
    from engine.occupancy import SessionAnalysis
    from engine.prediction import Prediction
    from streamer.protocol import encode, make_header

    def softmax(logits: np.ndarray) -> np.ndarray:
        e = np.exp(logits - logits.max(axis=0))
        return (e / e.sum(axis=0)).astype(np.float32)

    depth = softmax(rng.normal(0, 2, (N_DEPTHS, side, side)))[None]
    species = softmax(rng.normal(0, 2, (N_SPECIES_CLASSES, side, side)))[None]
    pred = (
        Prediction(depth, species)
        if device is None
        else DevicePrediction(*(torch.from_numpy(p).to(device) for p in (depth, species)))
    )
    analysis = SessionAnalysis(pixel_size_pm=5.3)
    while not analysis.tracker.reference_complete:  # session start-up, not steady state
        analysis.update_maps(pred.frame(0))
    t0 = time.perf_counter()
    for i in range(n_frames):
        occ = analysis.update_maps(pred.frame(0))
        d, c, sp = pred.maps()
        maps = {"depth": d[0], "confidence": c[0], "species": sp[0], **occ.buffers()}
        encode(
            make_header(
                "result",
                session="bench",
                seq=i,
                source="bench",
                model_id="m",
                backend="b",
                batch_size=1,
                latency_ms=0.0,
                columns=occ.table(),
            ),
            maps,
        )
    return (time.perf_counter() - t0) / n_frames * 1e3


def _candidates(config: BenchConfig) -> list[type[backends.Backend]]:
    names = (
        list(backends.BACKENDS)
        if config.backends == "all"
        else [n.strip() for n in config.backends.split(",") if n.strip()]
    )
    unknown = [n for n in names if n not in backends.BACKENDS]
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {sorted(backends.BACKENDS)}")
    classes = [backends.BACKENDS[n] for n in names]
    if torch.cuda.is_available():
        classes.append(TorchEagerCUDAFP32)
    elif backends.TorchCPUBackend not in classes:
        classes.append(backends.TorchCPUBackend)  # the eager FP32 baseline on this machine
    return classes


def run_bench(config: BenchConfig, json_path: Path) -> dict[str, Any]:
    """Run the benchmark, print a table, write JSON to ``json_path``; return the report."""
    rng = np.random.default_rng(config.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        loaded, provenance = _model(config, Path(tmp))
        baseline = (
            TorchEagerCUDAFP32 if torch.cuda.is_available() else backends.TorchCPUBackend
        ).name
        classes = _candidates(config)
        cells = [
            (c, s, b)
            for c in classes
            if c.unavailable_reason() is None
            for s in config.sizes
            for b in config.batches
        ]
        for cls in classes:
            reason = cls.unavailable_reason()
            if reason:
                rows.append({"backend": cls.name, "status": f"not run on real hardware: {reason}"})
        made: dict[str, backends.Backend] = {}
        gflop = {side: model_gflop(loaded, side) for side in config.sizes}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # each path against the dense matrix product of its own precision where one is measured
        # here (BF16 on the CPU: AMX / AVX512-BF16), else against FP32's
        ceilings = {"fp32": gemm_ceiling_gflops(device=device)}
        if any(c.precision == "bf16" for c, _, _ in cells):
            ceilings["bf16"] = gemm_ceiling_gflops(device=device, dtype=torch.bfloat16)
        failed: set[str] = set()
        for cls, side, batch in tqdm(cells, desc="bench engine", unit="cell"):
            if cls.name in failed:
                continue
            if cls.name not in made:
                try:
                    made[cls.name] = cls(
                        loaded, max_batch=max(config.batches), cache_dir=Path(tmp) / "cache"
                    )
                except RuntimeError as e:  # e.g. openvino-int8 for a model without its graph
                    failed.add(cls.name)
                    rows.append({"backend": cls.name, "status": f"not run: {e}"})
                    continue
            frames = (rng.poisson(DOSE, (batch, side, side)) / DOSE).astype(np.float32)
            cell = time_cell(made[cls.name], frames, config.iterations, config.max_seconds)
            ceiling = cls.precision if cls.precision in ceilings else "fp32"
            rows.append(
                {
                    "backend": cls.name,
                    "precision": cls.precision,
                    "size": side,
                    "batch": batch,
                    "status": "ok",
                    "baseline": cls.name == baseline,
                    "offered": cls.refusal(loaded) is None,
                    **cell,
                    "gflop_per_s": cell["frames_per_s"] * gflop[side],
                    "ceiling": ceiling,
                    "fraction_of_gemm_ceiling": cell["frames_per_s"]
                    * gflop[side]
                    / ceilings[ceiling],
                }
            )
    postprocess = {str(side): time_postprocess(side, rng) for side in config.sizes}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    postprocess_on_device = {
        device: {str(side): time_postprocess(side, rng, device=device) for side in config.sizes}
        for device in devices
    }
    for row in rows:
        if row["status"] == "ok":
            base = next(
                (
                    r
                    for r in rows
                    if r.get("baseline") and r["size"] == row["size"] and r["batch"] == row["batch"]
                ),
                None,
            )
            row["speedup_vs_eager_fp32"] = (
                row["frames_per_s"] / base["frames_per_s"] if base else None
            )
    report = {
        "config": asdict(config),
        "model_id": loaded.model_id,
        "model_sha256": loaded.sha256,
        "model_provenance": provenance,
        "baseline": baseline,
        "machine": machine_info(),
        "gpu_aims_frames_per_s": {str(k): v for k, v in GPU_AIMS_FPS.items()},
        "gpu_aims_status": "measured"
        if torch.cuda.is_available()
        else "not run on real hardware (no CUDA device here)",
        "postprocess_ms_per_frame": postprocess,
        "postprocess_on_device_ms_per_frame": postprocess_on_device,
        "model_gflop_per_frame": {str(k): v for k, v in gflop.items()},
        "gemm_ceiling_gflops": ceilings["fp32"],
        "gemm_ceiling_gflops_bf16": ceilings.get("bf16"),
        "rows": rows,
    }
    print(format_table(report))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {json_path}")
    return report


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"engine benchmark, model {report['model_id']} ({report['model_provenance']}), "
        f"baseline {report['baseline']}",
        f"{'backend':<24}{'prec':<6}{'size':>6}{'batch':>6}{'frames/s':>11}"
        f"{'p50 ms':>10}{'p99 ms':>10}{'vs eager':>10}{'GFLOP/s':>9}{'of ceil':>9}",
    ]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<24}{r['status']}")
            continue
        speed = r.get("speedup_vs_eager_fp32")
        lines.append(
            f"{r['backend']:<24}{r['precision']:<6}{r['size']:>6}{r['batch']:>6}"
            f"{r['frames_per_s']:>11.2f}{r['latency_ms_p50']:>10.1f}"
            f"{r['latency_ms_p99']:>10.1f}"
            f"{'' if speed is None else f'{speed:.2f}x':>10}"
            f"{r['gflop_per_s']:>9.1f}{100 * r['fraction_of_gemm_ceiling']:>8.0f}%"
            f"{'' if r['offered'] else '  (not offered: see bench parity)'}"
        )
    gflop = report["model_gflop_per_frame"]
    lines.append(
        f"model: {', '.join(f'{k}^2 {v:.1f}' for k, v in gflop.items())}"
        f" GFLOP/frame; ceiling: dense FP32 matrix product "
        f"{report['gemm_ceiling_gflops']:.0f} GFLOP/s on this machine"
        + (
            f" (BF16 {report['gemm_ceiling_gflops_bf16']:.0f}: the bf16 rows' ceiling)"
            if report.get("gemm_ceiling_gflops_bf16")
            else ""
        )
    )
    lines.append(
        "serve-loop work per frame after inference, steady state (ms), numpy on the host: "
        + ", ".join(f"{side}^2 {ms:.1f}" for side, ms in report["postprocess_ms_per_frame"].items())
    )
    for device, per_side in report.get("postprocess_on_device_ms_per_frame", {}).items():
        lines.append(
            f"  the same with maps, column averages and drift in torch on {device}: "
            + ", ".join(f"{side}^2 {ms:.1f}" for side, ms in per_side.items())
        )
    lines.append(
        f"GPU aims (frames/s, base-16): {report['gpu_aims_frames_per_s']} -- "
        f"{report['gpu_aims_status']}"
    )
    return "\n".join(lines)
