"""Fine-tuning options of `segdepth train`: gradients accumulated over batches (--accumulate)
and BatchNorm statistics kept (--freeze-bn)."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from training import train as train_module
from training.model import SegDepthUNet, UNetConfig
from training.train import Dist, TrainConfig, _train_epoch

SIZE = 32


def batches(n: int, size: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``n`` random training batches of ``size`` samples (clean image, depth labels, species,
    unit weights) at 32² px."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        clean = 1 + 0.3 * torch.rand(size, 1, SIZE, SIZE, generator=gen)
        labels = torch.randint(0, 11, (size, SIZE, SIZE), generator=gen)
        species = torch.randint(0, 3, (size, SIZE, SIZE), generator=gen)
        out.append((clean, labels, species, torch.ones(size, SIZE, SIZE)))
    return out


def net() -> SegDepthUNet:
    torch.manual_seed(0)
    return SegDepthUNet(UNetConfig(base_channels=4, max_channels=8))


def config(**kw) -> TrainConfig:
    """Float32: these tests compare optimiser steps to float32 rounding."""
    return TrainConfig(
        data="x.h5", out="nowhere", epochs=1, warmup=0.0, noise_lambda=50.0, precision="fp32", **kw
    )


def epoch(model, loader, optimiser, cfg) -> None:
    _train_epoch(model, loader, optimiser, cfg, Dist(), 0, time.monotonic(), False)


def batchnorm_stats(model) -> list[torch.Tensor]:
    return [
        t.clone()
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
        for t in (m.running_mean, m.running_var)
    ]


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_keeps_running_statistics_while_the_rest_learns(freeze):
    model = net()
    before_stats = batchnorm_stats(model)
    before = copy.deepcopy(model.state_dict())
    cfg = config(freeze_bn=freeze)
    epoch(model, batches(3, 2), torch.optim.Adam(model.parameters(), lr=1e-2), cfg)

    same = [torch.equal(a, b) for a, b in zip(before_stats, batchnorm_stats(model))]
    assert all(same) if freeze else not any(same)
    # the weights (convolutions and BatchNorm scales alike) learn either way; a ReLU that is
    # dead for these few random samples may leave one tensor unchanged
    weights = [n for n in before if n.endswith(".weight")]
    changed = [n for n in weights if not torch.equal(model.state_dict()[n], before[n])]
    assert len(changed) >= 0.9 * len(weights)
    # the next epoch's train mode freezes them again after validation's eval mode
    model.eval()
    train_module.train_mode(model, freeze)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training is not freeze for m in norms) and model.training


def test_accumulate_steps_once_per_group_of_batches():
    model = net()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch(model, batches(5, 2), optimiser, config(accumulate=2))
    steps = {int(s["step"]) for s in optimiser.state.values()}
    assert steps == {3}  # after batches 2 and 4, and the epoch's last one


def test_accumulated_small_batches_give_the_big_batch_step(monkeypatch):
    """With BatchNorm frozen each sample's output is independent of its batch, so two batches
    of 2 accumulated must move the weights exactly as one batch of the same 4 samples."""
    monkeypatch.setattr(train_module, "noisy", lambda clean, dose, gen: clean)
    monkeypatch.setattr(train_module, "lr_factor", lambda progress, warmup: 1.0)
    halves = batches(2, 2, seed=1)
    whole = [tuple(torch.cat(parts) for parts in zip(*halves))]

    moved = []
    for loader, accumulate in ((whole, 1), (halves, 2)):
        model = net()
        start = [p.detach().clone() for p in model.parameters()]
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        epoch(model, loader, optimiser, config(accumulate=accumulate, freeze_bn=True, lr=0.1))
        moved.append(torch.cat([(p - s).flatten() for p, s in zip(model.parameters(), start)]))
    assert moved[0].abs().max() > 1e-4
    torch.testing.assert_close(moved[1], moved[0], rtol=1e-4, atol=1e-7)
