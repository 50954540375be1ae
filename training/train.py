"""Training loop (section III-C): continuous noise sampling, weighted cross-entropy (eq. 6), Adam
with a warm-up + cosine learning-rate schedule (over the epochs, or over the time limit when that
comes first), early stopping on the validation loss, resumable
checkpoints; DistributedDataParallel when started by ``torchrun`` with several processes.

A run directory holds ``config.json`` (this TrainConfig), ``metrics.jsonl`` (one line per epoch),
``checkpoint.pt`` (latest state, for ``--resume``), ``best.pt`` and the final ``model.pt``
(:func:`training.model.save_model`: weights of the best epoch, config, data hashes, metrics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sim_source.wave_library import is_library
from streamer.cli_support import check_image_side, machine_info
from streamer.domain import PAPER_DOSE_E_PER_PX
from training.data import CropDataset, LabelledSet, file_seed, load_set, noisy
from training.device_render import DeviceBatches, DeviceRenderer
from training.labels import TargetConfig
from training.library_data import (
    MicroscopeDataset,
    RenderConfig,
    collate_views,
    load_library,
    render_set,
)
from training.loss import segdepth_loss
from training.metrics import DepthMetrics, centre_mask
from training.model import SegDepthUNet, UNetConfig, load_model, save_model
from training.precision import autocast, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything a training run is a function of (saved as RUN/config.json)."""

    data: str
    out: str
    val: str | None = None
    val_fraction: float = 0.1  # held out of ``data`` when no ``val`` file is given
    model: UNetConfig = field(default_factory=UNetConfig)
    targets: TargetConfig = field(default_factory=TargetConfig)
    noise_lambda: float = PAPER_DOSE_E_PER_PX  # mean vacuum counts per pixel (eq. 1)
    epochs: int = 30
    crop: int | None = 128  # px; None = whole images
    batch_size: int = 8
    accumulate: int = 1  # batches whose gradients are summed per optimiser step
    freeze_bn: bool = False  # BatchNorm layers normalise with their running statistics, kept
    lr: float = 2e-3
    warmup: float = 0.05  # fraction of the run with a linear learning-rate warm-up
    weight_decay: float = 0.0
    species_weight: float = 0.5
    patience: int = 8  # epochs without a better validation loss before stopping
    time_limit_min: float | None = None  # stop (keeping the best model) after this wall time
    val_limit: int | None = None  # validation images used per epoch (None: all)
    limit: int | None = None  # training images used (None: all)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    #: "fp32", "bf16" (forward and loss under bfloat16 autocast) or "auto" (training.precision)
    precision: str = "auto"
    seed: int = 0
    # exit-wave libraries (``data``/``val`` written by `segdepth simulate --waves`):
    dose_range: tuple[float, float] | None = None  # λ log-uniform per sample (None: noise_lambda)
    views_per_wave: int = 4  # crops rendered per optics draw
    val_count: int = 64  # validation samples rendered from the ``val`` library
    render_workers: int = 1  # DataLoader processes rendering library samples
    render_on_device: bool = False  # render library samples on the training device instead
    init: str | None = None  # model file whose weights start the run (warm start)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        raw = json.loads(text)
        raw["model"] = UNetConfig(**raw["model"])
        raw["targets"] = TargetConfig(**raw["targets"])
        if raw.get("dose_range"):
            raw["dose_range"] = tuple(raw["dose_range"])
        raw.setdefault("precision", "fp32")  # runs from before the option trained in float32
        return cls(**raw)

    @property
    def render(self) -> RenderConfig:
        """How library samples are drawn (training and validation alike)."""
        dose = self.dose_range or (self.noise_lambda, self.noise_lambda)
        return RenderConfig(
            crop=self.crop or 128, views_per_wave=self.views_per_wave, dose=(dose[0], dose[1])
        )


@dataclass
class Dist:
    """Process group facts (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on GPUs, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


def split_holdout(data: LabelledSet, fraction: float, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """Random split of one set into (train, validation) when no validation file exists."""
    order = np.random.default_rng(seed).permutation(len(data))
    n_val = max(1, int(round(fraction * len(data))))
    if n_val >= len(data):
        raise ValueError(f"{data.path}: {len(data)} images cannot be split for validation")

    def take(idx):
        idx = np.sort(idx)
        return dataclasses.replace(
            data,
            images=data.images[idx],
            depth=data.depth[idx],
            species=data.species[idx],
            labels=data.labels[idx],
            weights=data.weights[idx],
            centres=[data.centres[i] for i in idx],
            centre_species=[data.centre_species[i] for i in idx],
        )

    return take(order[n_val:]), take(order[:n_val])


def lr_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1] of the run: linear warm-up over the
    first ``warmup`` fraction, then cosine decay to 2 %."""
    if progress < warmup:
        return 0.05 + 0.95 * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p))


def run_progress(
    epoch: int, batch: int, n_batches: int, elapsed_s: float, cfg: TrainConfig
) -> float:
    """Fraction of the run done: by epochs, or by wall time when a time limit is nearer."""
    progress = (epoch + batch / max(1, n_batches)) / cfg.epochs
    if cfg.time_limit_min:
        progress = max(progress, elapsed_s / (60 * cfg.time_limit_min))
    return min(1.0, progress)


@torch.no_grad()
def validate(
    model: torch.nn.Module, val: LabelledSet, cfg: TrainConfig, device: torch.device
) -> dict[str, float]:
    """Loss and the four metrics on the validation images with fixed noise (seeded)."""
    model.eval()
    n = min(len(val), cfg.val_limit or len(val))
    gen = torch.Generator(device).manual_seed(cfg.seed + 7919)
    metrics, loss_sum = DepthMetrics(), 0.0
    for start in range(0, n, cfg.batch_size):
        sl = slice(start, min(start + cfg.batch_size, n))
        clean = torch.from_numpy(val.images[sl])[:, None].to(device)
        x = noisy(clean, cfg.noise_lambda, gen)
        depth_logits, species_logits = model(x)
        loss, _ = segdepth_loss(
            depth_logits,
            species_logits,
            torch.from_numpy(val.labels[sl].astype(np.int64)).to(device),
            torch.from_numpy(val.species[sl].astype(np.int64)).to(device),
            torch.from_numpy(val.weights[sl]).to(device),
            cfg.species_weight,
        )
        loss_sum += float(loss) * (sl.stop - sl.start)
        estimate = depth_logits.argmax(1).cpu().numpy()
        for j, i in enumerate(range(sl.start, sl.stop)):
            mask = centre_mask(
                val.depth[i].shape, val.centres[i], val.centre_species[i], val.pixel_size_pm
            )
            metrics.update(estimate[j], val.depth[i], mask)
    out = {k: v for k, v in metrics.summary().items() if "pixels" not in k}
    return {"val_loss": loss_sum / n, **out}


def _datasets(cfg: TrainConfig, progress: bool, device: torch.device):
    """(training dataset, validation set, provenance for the model card): image datasets are
    cropped and flipped; exit-wave libraries render a new microscope per sample (on
    ``device`` with ``render_on_device``)."""
    dataset: MicroscopeDataset | CropDataset | DeviceRenderer
    sources: list[tuple[str, str, int | None]]  # path, SHA-256, seed
    if is_library(cfg.data):
        if not cfg.val or not is_library(cfg.val):
            raise ValueError(
                "training on an exit-wave library needs --val, another library (own seed)"
            )
        library, val_library = load_library(cfg.data, cfg.limit), load_library(cfg.val)
        if val_library.seed == library.seed:
            raise ValueError(f"{cfg.val} and {cfg.data} share seed {library.seed}")
        val_set = render_set(val_library, cfg.val_count, cfg.seed + 1, cfg.render, cfg.targets)
        dataset = (
            DeviceRenderer(library, cfg.render, cfg.targets, cfg.seed, device)
            if cfg.render_on_device
            else MicroscopeDataset(library, cfg.render, cfg.targets, cfg.seed)
        )
        sources = [
            (cfg.data, library.sha256, library.seed),
            (cfg.val, val_library.sha256, val_library.seed),
        ]
    else:
        if cfg.render_on_device:
            raise ValueError("--render-on-device needs an exit-wave library as --data")
        train_set = load_set(cfg.data, cfg.targets, cfg.limit, progress)
        if cfg.val:
            val_set = load_set(cfg.val, cfg.targets, None, progress)
        else:
            train_set, val_set = split_holdout(train_set, cfg.val_fraction, cfg.seed)
        dataset = CropDataset(train_set, cfg.crop, cfg.seed)
        sources = [(cfg.data, train_set.sha256, file_seed(cfg.data))]
        if cfg.val:
            sources.append((cfg.val, val_set.sha256, file_seed(cfg.val)))
    provenance = {
        "data": cfg.data,
        "data_sha256": sources[0][1],
        "val": cfg.val,
        "val_sha256": sources[1][1] if len(sources) > 1 else None,
        "data_files": [{"path": p, "sha256": h, "seed": s} for p, h, s in sources],
    }
    return dataset, val_set, provenance


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


#: files of a run directory that a fresh run would overwrite or append to.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "model.pt")


@dataclass
class _Progress:
    """Where a run stands (saved in RUN/checkpoint.pt): the next epoch to run (0-based), best
    validation loss so far, its weights and metrics, epochs since it, wall time used (s)."""

    epoch: int = 0
    best_loss: float = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    since_best: int = 0
    wall_s: float = 0.0


def _prepare_run_directory(cfg: TrainConfig, resume: bool, force: bool) -> None:
    """Refuse to overwrite an existing run unless resuming or forced (then its checkpoint and
    metrics log go); write RUN/config.json."""
    out = Path(cfg.out)
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not (resume or force):
        raise FileExistsError(
            f"{out} already holds a training run ({', '.join(existing)}): "
            f"continue it with --resume, or start afresh with --force"
        )
    if force and not resume:
        for name in ("metrics.jsonl", "checkpoint.pt"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())


def check_image_sizes(cfg: TrainConfig, multiple: int) -> None:
    """Before any loading: crops, and the whole images validated (and trained on without a crop)
    of a dataset file, must be multiples of the network's ``multiple`` px."""
    if cfg.crop:
        check_image_side(cfg.crop, multiple, multiple, f"--crop {cfg.crop}")
    if is_library(cfg.data):
        return  # rendered at the crop size
    whole = [cfg.val] if cfg.val else [cfg.data]
    if cfg.val and not cfg.crop:
        whole.append(cfg.data)
    for path in whole:
        with h5py.File(path, "r") as f:
            h, w = f["images"].shape[1:]
        for side in (h, w):
            check_image_side(
                side, multiple, multiple, f"{path}: {h}x{w} px images (used whole for validation)"
            )


def _restore_checkpoint(
    path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer
) -> _Progress:
    """Load weights and optimiser state of RUN/checkpoint.pt (tensors and numbers only)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    optimiser.load_state_dict(saved["optimiser"])
    return _Progress(
        epoch=saved["epoch"] + 1,
        best_loss=saved["best_loss"],
        best_state=saved["best_state"],
        best_metrics=saved["best_metrics"],
        since_best=saved["since_best"],
        wall_s=saved["wall_s"],
    )


def _save_checkpoint(
    path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, done: _Progress
) -> None:
    """Write RUN/checkpoint.pt atomically (its ``epoch``: the last one finished)."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": _state(model),
            "optimiser": optimiser.state_dict(),
            "epoch": done.epoch - 1,
            "best_loss": done.best_loss,
            "best_state": done.best_state,
            "since_best": done.since_best,
            "best_metrics": done.best_metrics,
            "wall_s": done.wall_s,
        },
        tmp,
    )
    tmp.replace(path)


def _loader(dataset, cfg: TrainConfig, dd: Dist):
    """(DataLoader, DistributedSampler or None) of one process (DeviceBatches for samples
    rendered on the device)."""
    rendered = isinstance(dataset, (MicroscopeDataset, DeviceRenderer))
    items = max(1, cfg.batch_size // (cfg.views_per_wave if rendered else 1))
    if isinstance(dataset, DeviceRenderer):
        if dd.world > 1:
            raise ValueError("--render-on-device runs in one process (no torchrun)")
        return DeviceBatches(dataset, items), None
    sampler: torch.utils.data.DistributedSampler | None = (
        torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed)
        if dd.world > 1
        else None
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=items,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(dataset) >= items * dd.world,
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_views if rendered else None,
        # rendering (a CTF and a few crops per item) overlaps the network in worker processes
        num_workers=cfg.render_workers if rendered else 0,
        persistent_workers=rendered,
    )
    return loader, sampler


def _past_time_limit(cfg: TrainConfig, elapsed_s: float, dd: Dist) -> bool:
    """Whether the wall-time limit is reached, agreed by every rank (they must stop together)."""
    over = cfg.time_limit_min is not None and elapsed_s > 60 * cfg.time_limit_min
    if dd.world > 1:
        flag = torch.tensor([float(over)], device=dd.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        over = bool(flag.item())
    return over


def train_mode(net: torch.nn.Module, freeze_bn: bool) -> None:
    """``net`` in training mode; with ``freeze_bn`` its BatchNorm layers stay in eval mode, so
    that they normalise with (and keep) the running statistics of the run that made them while
    their scale and shift still learn: small-batch fine-tuning of a model trained at batch 32
    would otherwise replace those statistics with noisy ones."""
    net.train()
    if freeze_bn:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def _train_epoch(
    net: torch.nn.Module,
    loader,
    optimiser: torch.optim.Optimizer,
    cfg: TrainConfig,
    dd: Dist,
    epoch: int,
    started: float,
    progress: bool,
) -> tuple[list[float], int, bool]:
    """One epoch of steps (learning rate by run progress, fresh noise per step); returns (step
    losses, samples seen by this process, whether the time limit cut the epoch short)."""
    gen = torch.Generator(dd.device).manual_seed(cfg.seed * 1_000_003 + epoch * dd.world + dd.rank)
    train_mode(net, cfg.freeze_bn)
    losses: list[float] = []
    seen = 0
    mixed = autocast(cfg.precision, dd.device)
    optimiser.zero_grad(set_to_none=True)
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        disable=not (progress and dd.main),
        leave=False,
    )
    for step, batch in enumerate(bar):
        elapsed = time.monotonic() - started
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr * lr_factor(
                run_progress(epoch, step, len(loader), elapsed, cfg), cfg.warmup
            )
        if _past_time_limit(cfg, elapsed, dd):
            return losses, seen, True  # finish this epoch early: validate, save, stop
        clean, labels, species, weights = (t.to(dd.device) for t in batch[:4])
        dose = batch[4] if len(batch) > 4 else cfg.noise_lambda  # per sample when rendered
        x = noisy(clean, dose, gen)
        with mixed:
            depth_logits, species_logits = net(x)
            loss, _ = segdepth_loss(
                depth_logits, species_logits, labels, species, weights, cfg.species_weight
            )
        (loss / cfg.accumulate).backward()
        if (step + 1) % cfg.accumulate == 0 or step + 1 == len(loader):
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        seen += len(clean)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses, seen, False


def _end_epoch(record: dict[str, Any], model: SegDepthUNet, state: _Progress, out: Path) -> None:
    """Keep the best epoch (RUN/best.pt), append ``record`` to RUN/metrics.jsonl, log it."""
    epoch = record["epoch"]
    if record["val_loss"] < state.best_loss:
        state.best_loss, state.best_state, state.since_best = record["val_loss"], _state(model), 0
        state.best_metrics = {
            k: v
            for k, v in record.items()
            if k.startswith("val")
            or k
            in (
                "pixelwise_accuracy",
                "centre_accuracy",
                "detection_rate",
                "hallucination_rate",
                "epoch",
            )
        }
        save_model(out / "best.pt", model, {"best_epoch": epoch}, half=False)
    else:
        state.since_best += 1
    record["best_val_loss"] = state.best_loss
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info(
        "epoch %d: train %.4f val %.4f pixelwise %.3f centre %.3f detect %.3f "
        "halluc %.4f (%.1f samples/s)",
        epoch,
        record["train_loss"] or 0,
        record["val_loss"],
        record["pixelwise_accuracy"],
        record["centre_accuracy"],
        record["detection_rate"],
        record["hallucination_rate"],
        record["train_samples_per_s"],
    )


def _save_final(
    path: Path,
    model: SegDepthUNet,
    state: _Progress,
    cfg: TrainConfig,
    provenance: dict[str, Any],
    pixel_size_pm: float,
    epochs_run: int,
    wall_s: float,
    dd: Dist,
) -> None:
    """Write RUN/model.pt with the best epoch's weights and the model card."""
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    save_model(
        path,
        model,
        {
            **provenance,
            "noise_lambda": cfg.noise_lambda,
            "dose_range": cfg.dose_range,
            "pixel_size_pm": pixel_size_pm,
            "train_config": json.loads(cfg.to_json()),
            "validation": state.best_metrics,
            "epochs_run": epochs_run,
            "wall_s": wall_s,
            "hardware": {"device": str(dd.device), "world_size": dd.world, **machine_info()},
        },
    )
    log.info("wrote %s", path)


def train(
    cfg: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False
) -> Path:
    """Run training as configured; returns the path of the final model file (RUN/model.pt).
    An existing run in ``cfg.out`` is continued with ``resume`` or replaced with ``force``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = setup_distributed()
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, dd.device))
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if dd.main:
        check_image_sizes(cfg, cfg.model.size_multiple)
        _prepare_run_directory(cfg, resume, force)
    torch.manual_seed(cfg.seed)
    dataset, val_set, provenance = _datasets(cfg, progress and dd.main, dd.device)
    model = SegDepthUNet(cfg.model).to(dd.device)
    if cfg.init and not (resume and ckpt_path.exists()):
        model.load_state_dict(load_model(cfg.init)[0].float().state_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _Progress()
    if resume and ckpt_path.exists():
        state = _restore_checkpoint(ckpt_path, model, optimiser)
        if dd.main:
            log.info(
                "resumed %s at epoch %d (best val loss %.4f)",
                ckpt_path,
                state.epoch,
                state.best_loss,
            )
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting fresh", ckpt_path)
    net = torch.nn.parallel.DistributedDataParallel(model) if dd.world > 1 else model
    loader, sampler = _loader(dataset, cfg, dd)
    started = time.monotonic() - state.wall_s
    epochs_done = state.epoch
    for epoch in range(state.epoch, cfg.epochs):
        if cfg.time_limit_min is not None and time.monotonic() - started > 60 * cfg.time_limit_min:
            break
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader.generator.manual_seed(cfg.seed * 100003 + epoch)
        t0 = time.monotonic()
        losses, seen, over_time = _train_epoch(
            net, loader, optimiser, cfg, dd, epoch, started, progress
        )
        train_s = time.monotonic() - t0
        stop = torch.zeros(1)
        if dd.main:
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)) if losses else None,
                "lr": optimiser.param_groups[0]["lr"],
                "train_samples_per_s": seen * dd.world / max(train_s, 1e-9),
                **validate(model, val_set, cfg, dd.device),
            }
            record["wall_s"] = state.wall_s = time.monotonic() - started
            _end_epoch(record, model, state, out)
            state.epoch = epoch + 1
            _save_checkpoint(ckpt_path, model, optimiser, state)
            if state.since_best >= cfg.patience or over_time:
                log.info(
                    "stopping after epoch %d (%s)",
                    epoch + 1,
                    "time limit" if over_time else "early stopping",
                )
                stop[0] = 1
        epochs_done = epoch + 1
        if dd.world > 1:
            dist.broadcast(stop, 0)
        if stop[0]:
            break

    final = out / "model.pt"
    if dd.main:
        _save_final(
            final,
            model,
            state,
            cfg,
            provenance,
            val_set.pixel_size_pm,
            epochs_done,
            time.monotonic() - started,
            dd,
        )
    if dd.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final
