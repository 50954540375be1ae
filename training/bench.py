"""``segdepth bench train``: training samples/s (one Adam step per noisy image, batch 1) and
inference frames/s (batch 1) of the UNet at each size, per backend present on this machine:
torch-cpu FP32 always, torch-cpu with BF16 autocast in the same run (BF16 matrix kernels where
the CPU has them, e.g. AVX512-BF16 or AMX; emulated and slower elsewhere), torch-cuda FP32 when
a GPU exists (training, inference), onnxruntime (CPU execution provider, inference only) when
installed. Prints a table and writes JSON.
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from streamer.cli_support import check_image_side, machine_info, write_json
from streamer.domain import PAPER_DOSE_E_PER_PX
from training.loss import segdepth_loss
from training.model import SegDepthUNet, UNetConfig, bundled_model_path, load_model
from training.precision import autocast

log = logging.getLogger(__name__)


def _timed(fn, repeats: int, sync=lambda: None) -> float:
    """Seconds per call of ``fn`` (one untimed warm-up call, then the mean of ``repeats``)."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def train_rate(
    model: torch.nn.Module,
    size: int,
    device: str,
    repeats: int,
    precision: str = "fp32",
) -> float:
    """Training samples/s: noise, forward, weighted loss, backward, Adam step at size² px
    (forward and loss in ``precision``, as ``segdepth train --precision`` runs them)."""
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    clean = torch.ones(1, 1, size, size, device=device)
    labels = torch.zeros(1, size, size, dtype=torch.long, device=device)
    weights = torch.ones(1, size, size, device=device)

    def step():
        x = torch.poisson(PAPER_DOSE_E_PER_PX * clean) / PAPER_DOSE_E_PER_PX
        with autocast(precision, torch.device(device)):
            depth, species = model(x)
            loss, _ = segdepth_loss(
                depth.float(), species.float(), labels, labels.clamp(max=2), weights
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return 1.0 / _timed(step, repeats, sync)


def torch_infer_rate(
    model: torch.nn.Module,
    size: int,
    device: str,
    repeats: int,
    precision: str = "fp32",
) -> float:
    model = model.to(device).eval()
    x = torch.ones(1, 1, size, size, device=device)

    def run():
        with (
            torch.no_grad(),
            autocast(precision, torch.device(device)),
        ):
            model(x)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return 1.0 / _timed(run, repeats, sync)


def onnxruntime_infer_rate(
    model: torch.nn.Module, size: int, repeats: int, threads: int | None
) -> float:
    """Frames/s of the model exported to ONNX (fixed shape) on onnxruntime's CPU provider."""
    import onnxruntime as ort

    x = torch.ones(1, 1, size, size)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "unet.onnx"
        torch.onnx.export(
            model.cpu().eval(),
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["depth_logits", "species_logits"],
        )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"image": x.numpy()}
    return 1.0 / _timed(lambda: session.run(None, feed), repeats)


def data_rate(model: torch.nn.Module, loader, batches: int) -> float:
    """Training samples/s through ``loader`` (data preparation included): noise at each
    sample's dose, forward, weighted loss, backward, Adam step."""
    from training.data import noisy

    model = model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    seen, t0, it = 0, time.perf_counter(), iter(loader)  # t0 restarts after the first batch
    for b in range(batches + 1):
        batch = next(it)
        clean, labels, species, weights = batch[:4]
        dose = batch[4] if len(batch) > 4 else PAPER_DOSE_E_PER_PX
        depth, species_logits = model(noisy(clean, dose, gen))
        loss, _ = segdepth_loss(depth, species_logits, labels, species, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if b == 0:  # the first batch pays worker start-up
            t0 = time.perf_counter()
        else:
            seen += len(clean)
    return seen / (time.perf_counter() - t0)


def library_rows(model: torch.nn.Module, library_path: str, crop: int, batches: int) -> list[dict]:
    """On-the-fly microscopes (a CTF per structure, turned crops, dose) against the same number
    of pre-rendered images (random crops and flips of stored arrays), batch 8, same model."""
    from training.data import CropDataset
    from training.labels import TargetConfig
    from training.library_data import (
        MicroscopeDataset,
        RenderConfig,
        collate_views,
        load_library,
        render_set,
    )

    library = load_library(library_path)
    render = RenderConfig(crop=crop)
    rendered = MicroscopeDataset(library, render, TargetConfig(), seed=0)
    fly = torch.utils.data.DataLoader(
        rendered,
        batch_size=8 // render.views_per_wave,
        shuffle=True,
        collate_fn=collate_views,
        num_workers=1,
    )
    stored = render_set(library, 8 * (batches + 1), 0, RenderConfig(crop=2 * crop), TargetConfig())
    pre = torch.utils.data.DataLoader(CropDataset(stored, crop, seed=0), batch_size=8, shuffle=True)
    return [
        {
            "backend": f"torch-cpu FP32, {name}",
            "size": crop,
            "train_samples_per_s": data_rate(model, loader, batches),
            "infer_frames_per_s": None,
        }
        for name, loader in (("on-the-fly optics", fly), ("pre-rendered images", pre))
    ]


def bench_model(model_path: str | None) -> tuple[SegDepthUNet, str]:
    path = Path(model_path) if model_path else bundled_model_path()
    if path.exists():
        model, meta = load_model(path)
        return model, meta.get("model_id", path.stem)
    log.warning("no model file at %s: timing an untrained base-16 UNet", path)
    return SegDepthUNet(UNetConfig(base_channels=16)), "untrained-base16"


@dataclass
class BenchConfig:
    """Settings of ``segdepth bench train``: square image ``sizes`` (px), ``model`` (None: the
    bundled one), timed ``repeats``, torch CPU ``threads``; with an exit-wave ``library``, also
    ``library_batches`` batches of ``library_crop`` px crops per data path."""

    sizes: list[int] = field(default_factory=lambda: [512, 1024])
    model: str | None = None
    repeats: int = 3
    threads: int | None = None
    library: str | None = None
    library_crop: int = 128
    library_batches: int = 10


def run_bench(cfg: BenchConfig, out: str | Path) -> dict:
    """Measure every (backend, size); print the table; write JSON to ``out``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, model_id = bench_model(cfg.model)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    repeats, rows = cfg.repeats, []
    for size in cfg.sizes:
        check_image_side(size, model.size_multiple, model.size_multiple, f"--sizes {size}")
        for device in devices:
            backend = f"torch-{device} FP32"
            rows.append(
                {
                    "backend": backend,
                    "size": size,
                    "train_samples_per_s": train_rate(model, size, device, repeats),
                    "infer_frames_per_s": torch_infer_rate(model, size, device, repeats),
                }
            )
        rows.append(
            {
                "backend": "torch-cpu BF16 autocast",
                "size": size,
                "train_samples_per_s": train_rate(model, size, "cpu", repeats, "bf16"),
                "infer_frames_per_s": torch_infer_rate(model, size, "cpu", repeats, "bf16"),
            }
        )
        try:
            rate = onnxruntime_infer_rate(model, size, repeats, cfg.threads)
            rows.append(
                {
                    "backend": "onnxruntime-cpu FP32",
                    "size": size,
                    "train_samples_per_s": None,
                    "infer_frames_per_s": rate,
                }
            )
        except ImportError:
            log.info("onnxruntime not installed: skipped")
    if cfg.library:
        rows.extend(library_rows(model, cfg.library, cfg.library_crop, cfg.library_batches))
    print(f"{'backend':<44}{'size':>7}{'train samples/s':>18}{'infer frames/s':>17}")
    for r in rows:
        train = f"{r['train_samples_per_s']:.3f}" if r["train_samples_per_s"] else "-"
        infer = f"{r['infer_frames_per_s']:.3f}" if r["infer_frames_per_s"] else "-"
        print(f"{r['backend']:<44}{r['size']:>6}²{train:>18}{infer:>17}")
    result = {
        "benchmark": "segdepth bench train",
        "config": asdict(cfg),
        "model_id": model_id,
        "batch_size": 1,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "rows": rows,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(out, result)
    return result
