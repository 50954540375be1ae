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
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sim_source.wave_library import is_library
from streamer.domain import PAPER_DOSE_E_PER_PX
from training.data import CropDataset, LabelledSet, file_seed, load_set, noisy
from training.labels import TargetConfig
from training.library_data import (MicroscopeDataset, RenderConfig, collate_views, load_library,
                                   render_set)
from training.loss import segdepth_loss
from training.metrics import DepthMetrics, centre_mask
from training.model import SegDepthUNet, UNetConfig, load_model, save_model

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
    lr: float = 2e-3
    warmup: float = 0.05  # fraction of the run with a linear learning-rate warm-up
    weight_decay: float = 0.0
    species_weight: float = 0.5
    patience: int = 8  # epochs without a better validation loss before stopping
    time_limit_min: float | None = None  # stop (keeping the best model) after this wall time
    val_limit: int | None = None  # validation images used per epoch (None: all)
    limit: int | None = None  # training images used (None: all)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    seed: int = 0
    # exit-wave libraries (``data``/``val`` written by `segdepth simulate --waves`):
    dose_range: tuple[float, float] | None = None  # λ log-uniform per sample (None: noise_lambda)
    views_per_wave: int = 4  # crops rendered per optics draw
    val_count: int = 64  # validation samples rendered from the ``val`` library
    init: str | None = None  # model file whose weights start the run (warm start)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        raw = json.loads(text)
        raw["model"] = UNetConfig(**raw["model"])
        raw["targets"] = TargetConfig(**raw["targets"])
        if raw.get("dose_range"):
            raw["dose_range"] = tuple(raw["dose_range"])
        return cls(**raw)

    @property
    def render(self) -> RenderConfig:
        """How library samples are drawn (training and validation alike)."""
        dose = self.dose_range or (self.noise_lambda, self.noise_lambda)
        return RenderConfig(crop=self.crop or 128, views_per_wave=self.views_per_wave,
                            dose=tuple(dose))


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
            data, images=data.images[idx], depth=data.depth[idx], species=data.species[idx],
            labels=data.labels[idx], weights=data.weights[idx],
            centres=[data.centres[i] for i in idx],
            centre_species=[data.centre_species[i] for i in idx])
    return take(order[n_val:]), take(order[:n_val])


def lr_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at ``progress`` ∈ [0, 1] of the run: linear warm-up over the
    first ``warmup`` fraction, then cosine decay to 2 %."""
    if progress < warmup:
        return 0.05 + 0.95 * progress / warmup
    p = min(1.0, (progress - warmup) / max(1e-9, 1 - warmup))
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p))


def run_progress(epoch: int, batch: int, n_batches: int, elapsed_s: float,
                 cfg: "TrainConfig") -> float:
    """Fraction of the run done: by epochs, or by wall time when a time limit is nearer."""
    progress = (epoch + batch / max(1, n_batches)) / cfg.epochs
    if cfg.time_limit_min:
        progress = max(progress, elapsed_s / (60 * cfg.time_limit_min))
    return min(1.0, progress)


@torch.no_grad()
def validate(model: torch.nn.Module, val: LabelledSet, cfg: TrainConfig,
             device: torch.device) -> dict[str, float]:
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
        loss, _ = segdepth_loss(depth_logits, species_logits,
                                torch.from_numpy(val.labels[sl].astype(np.int64)).to(device),
                                torch.from_numpy(val.species[sl].astype(np.int64)).to(device),
                                torch.from_numpy(val.weights[sl]).to(device), cfg.species_weight)
        loss_sum += float(loss) * (sl.stop - sl.start)
        estimate = depth_logits.argmax(1).cpu().numpy()
        for j, i in enumerate(range(sl.start, sl.stop)):
            mask = centre_mask(val.depth[i].shape, val.centres[i], val.centre_species[i],
                               val.pixel_size_pm)
            metrics.update(estimate[j], val.depth[i], mask)
    out = {k: v for k, v in metrics.summary().items() if "pixels" not in k}
    return {"val_loss": loss_sum / n, **out}


def _datasets(cfg: TrainConfig, progress: bool):
    """(training dataset, validation set, provenance for the model card): image datasets are
    cropped and flipped; exit-wave libraries render a new microscope per sample."""
    if is_library(cfg.data):
        if not cfg.val or not is_library(cfg.val):
            raise ValueError("training on an exit-wave library needs --val, another library "
                             "(own seed)")
        library, val_library = load_library(cfg.data, cfg.limit), load_library(cfg.val)
        if val_library.seed == library.seed:
            raise ValueError(f"{cfg.val} and {cfg.data} share seed {library.seed}")
        val_set = render_set(val_library, cfg.val_count, cfg.seed + 1, cfg.render, cfg.targets)
        dataset = MicroscopeDataset(library, cfg.render, cfg.targets, cfg.seed)
        sources = [(cfg.data, library.sha256, library.seed), (cfg.val, val_library.sha256,
                                                              val_library.seed)]
    else:
        train_set = load_set(cfg.data, cfg.targets, cfg.limit, progress)
        if cfg.val:
            val_set = load_set(cfg.val, cfg.targets, None, progress)
        else:
            train_set, val_set = split_holdout(train_set, cfg.val_fraction, cfg.seed)
        dataset = CropDataset(train_set, cfg.crop, cfg.seed)
        sources = [(cfg.data, train_set.sha256, file_seed(cfg.data))]
        if cfg.val:
            sources.append((cfg.val, val_set.sha256, file_seed(cfg.val)))
    provenance = {"data": cfg.data, "data_sha256": sources[0][1], "val": cfg.val,
                  "val_sha256": sources[1][1] if len(sources) > 1 else None,
                  "data_files": [{"path": p, "sha256": h, "seed": s} for p, h, s in sources]}
    return dataset, val_set, provenance


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run training as configured; returns the path of the final model file (RUN/model.pt)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dd = setup_distributed()
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(cfg.to_json())
    torch.manual_seed(cfg.seed)

    dataset, val_set, provenance = _datasets(cfg, progress and dd.main)

    model = SegDepthUNet(cfg.model).to(dd.device)
    if cfg.init and not (resume and ckpt_path.exists()):
        model.load_state_dict(load_model(cfg.init)[0].float().state_dict())
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, best_loss, best_state, since_best, wall_before = 0, math.inf, None, 0, 0.0
    best_metrics: dict[str, float] = {}
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        optimiser.load_state_dict(ck["optimiser"])
        start_epoch, best_loss, since_best = ck["epoch"] + 1, ck["best_loss"], ck["since_best"]
        best_state, best_metrics, wall_before = ck["best_state"], ck["best_metrics"], ck["wall_s"]
        if dd.main:
            log.info("resumed %s at epoch %d (best val loss %.4f)", ckpt_path, start_epoch, best_loss)
    elif resume:
        log.warning("--resume: no checkpoint at %s, starting fresh", ckpt_path)
    net = (torch.nn.parallel.DistributedDataParallel(model) if dd.world > 1 else model)

    sampler = (torch.utils.data.distributed.DistributedSampler(dataset, seed=cfg.seed)
               if dd.world > 1 else None)
    rendered = isinstance(dataset, MicroscopeDataset)
    per_item = cfg.views_per_wave if rendered else 1
    items = max(1, cfg.batch_size // per_item)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=items, shuffle=sampler is None, sampler=sampler,
        drop_last=len(dataset) >= items * dd.world,
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_views if rendered else None,
        # rendering (a CTF and a few crops per item) overlaps the network in one worker
        num_workers=1 if rendered else 0, persistent_workers=rendered)
    started = time.monotonic() - wall_before
    epochs_done = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.time_limit_min is not None and time.monotonic() - started > 60 * cfg.time_limit_min:
            break
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader.generator.manual_seed(cfg.seed * 100003 + epoch)
        gen = torch.Generator(dd.device).manual_seed(cfg.seed * 1_000_003 + epoch * dd.world + dd.rank)
        net.train()
        losses, seen, t0 = [], 0, time.monotonic()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=not (progress and dd.main), leave=False)
        over_time = False
        for b, batch in enumerate(bar):
            elapsed = time.monotonic() - started
            for group in optimiser.param_groups:
                group["lr"] = cfg.lr * lr_factor(run_progress(epoch, b, len(loader), elapsed, cfg),
                                                 cfg.warmup)
            over_time = cfg.time_limit_min is not None and elapsed > 60 * cfg.time_limit_min
            if dd.world > 1:  # every rank must leave the epoch at the same step
                flag = torch.tensor([float(over_time)], device=dd.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                over_time = bool(flag.item())
            if over_time:
                break  # finish this epoch early: validate, save, stop
            clean, labels, species, weights = (t.to(dd.device) for t in batch[:4])
            dose = batch[4] if len(batch) > 4 else cfg.noise_lambda  # per sample when rendered
            depth_logits, species_logits = net(noisy(clean, dose, gen))
            loss, _ = segdepth_loss(depth_logits, species_logits, labels, species, weights,
                                    cfg.species_weight)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
            seen += len(clean)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        train_s = time.monotonic() - t0
        stop = torch.zeros(1)
        if dd.main:
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                      "lr": optimiser.param_groups[0]["lr"],
                      "train_samples_per_s": seen * dd.world / max(train_s, 1e-9),
                      **validate(model, val_set, cfg, dd.device)}
            record["wall_s"] = time.monotonic() - started
            if record["val_loss"] < best_loss:
                best_loss, best_state, since_best = record["val_loss"], _state(model), 0
                best_metrics = {k: v for k, v in record.items() if k.startswith("val") or
                                k in ("pixelwise_accuracy", "centre_accuracy", "detection_rate",
                                      "hallucination_rate", "epoch")}
                save_model(out / "best.pt", model, {"best_epoch": epoch + 1}, half=False)
            else:
                since_best += 1
            record["best_val_loss"] = best_loss
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info("epoch %d: train %.4f val %.4f pixelwise %.3f centre %.3f detect %.3f "
                     "halluc %.4f (%.1f samples/s)", epoch + 1, record["train_loss"] or 0,
                     record["val_loss"], record["pixelwise_accuracy"], record["centre_accuracy"],
                     record["detection_rate"], record["hallucination_rate"],
                     record["train_samples_per_s"])
            torch.save({"model": _state(model), "optimiser": optimiser.state_dict(),
                        "epoch": epoch,
                        "best_loss": best_loss, "best_state": best_state, "since_best": since_best,
                        "best_metrics": best_metrics, "wall_s": record["wall_s"]},
                       out / "checkpoint.tmp")
            (out / "checkpoint.tmp").replace(ckpt_path)
            if since_best >= cfg.patience or over_time:
                log.info("stopping after epoch %d (%s)", epoch + 1,
                         "time limit" if over_time else "early stopping")
                stop[0] = 1
        epochs_done = epoch + 1
        if dd.world > 1:
            dist.broadcast(stop, 0)
        if stop[0]:
            break

    final = out / "model.pt"
    if dd.main:
        if best_state is not None:
            model.load_state_dict(best_state)
        save_model(final, model, {
            **provenance, "noise_lambda": cfg.noise_lambda, "dose_range": cfg.dose_range,
            "pixel_size_pm": val_set.pixel_size_pm,
            "train_config": json.loads(cfg.to_json()), "validation": best_metrics,
            "epochs_run": epochs_done, "wall_s": time.monotonic() - started,
            "hardware": {"device": str(dd.device), "world_size": dd.world,
                         "threads": torch.get_num_threads(), "cpu": platform.processor() or
                         platform.machine(), "torch": torch.__version__}})
        log.info("wrote %s", final)
    if dd.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return final
