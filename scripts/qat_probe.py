"""Does quantization-aware training close openvino-int8's accuracy gap? A probe, not the product.

The shipped ``openvino-int8`` form (post-training quantization, :mod:`engine.openvino_graph`)
loses up to 0.9 points of column exact at high dose (its parity record). This script quantizes a
copy of the model with NNCF's torch backend (the same float32 layers: the full-resolution level
and the heads), fine-tunes the fake-quantized student to match the FP32 model's depth and
species probabilities (distillation: no labels, the FP32 answer is the target) on noisy views of
an exit-wave library outside the suite and the calibration (doses 0.5-50), converts it to
OpenVINO and reads six suite rows beside FP32 on the same frames (draws of seeds 100-102, not the
parity record's), with its 512² rate.

    segdepth simulate --waves --out /tmp/qat_waves.h5 --count 48 --seed 424242   # 2.3 min
    python scripts/qat_probe.py --library /tmp/qat_waves.h5 --steps 300           # 13 min

2026-11-27, 2-core AMD EPYC (AVX2), bundled v7, column exact difference to FP32 in points on
in distribution / turned 0° / λ 0.5 / λ 10 / λ 50 / carbon film, and 512² frames/s:
``--steps 0`` (NNCF torch quantization alone) −0.18 / +0.28 / −0.80 / −1.68 / −4.41 / −1.72,
5.84; ``--steps 300`` (6 min of distillation) +0.12 / −0.54 / −0.14 / −0.08 / −0.23 / +0.14,
5.90–5.95 in two runs (the network alone in FP32 on OpenVINO: 4.42).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import training.robustness as suite
from engine.quantize import CalibrationConfig, calibration_frames
from sim_source.noise import add_poisson_noise
from training.labels import TargetConfig
from training.library_data import RenderConfig, load_library, render_set
from training.model import bundled_model_path, load_model

#: the float32 layers of the shipped form, by their names in NNCF's torch graph
FLOAT_LAYERS = [
    "inc/0/conv2d/0",
    "inc/3/conv2d/0",
    "conv/0/conv2d/4",
    "conv/3/conv2d/4",
    "depth_head/conv2d/0",
    "species_head/conv2d/0",
]
ROWS = ("in distribution", "turned 0°", "λ = 0.5", "λ = 10", "λ = 50", "carbon film 3-6 nm")
OV_CONFIG = {
    "INFERENCE_NUM_THREADS": 2,
    "INFERENCE_PRECISION_HINT": "f32",
    "PERFORMANCE_HINT": "LATENCY",
}


def student_of(teacher: torch.nn.Module, cache: Path) -> torch.nn.Module:
    """A fake-quantized copy of ``teacher`` (MIXED preset), calibrated on the engine's frames."""
    import nncf

    frames = calibration_frames(CalibrationConfig(), cache)
    return nncf.quantize(
        copy.deepcopy(teacher),
        nncf.Dataset([torch.from_numpy(f[None]) for f in frames]),
        subset_size=len(frames),
        preset=nncf.QuantizationPreset.MIXED,
        ignored_scope=nncf.IgnoredScope(names=FLOAT_LAYERS),
    )


def distil(student, teacher, temperature: float, library: str, steps: int, lr: float) -> None:
    """Fit the student's depth and species probabilities to the teacher's on noisy 128² views
    (batch 8, dose log-uniform 0.5-50), BatchNorm statistics frozen."""
    data = render_set(load_library(library), 384, 11, RenderConfig(crop=128), TargetConfig())
    rng = np.random.default_rng(3)
    student.train()
    for module in student.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    started = time.monotonic()
    for step in range(steps):
        pick = rng.integers(0, len(data.images), 8)
        dose = np.exp(rng.uniform(np.log(0.5), np.log(50), 8))
        noisy = add_poisson_noise(data.images[pick], dose[:, None, None], rng)
        x = torch.from_numpy(noisy.astype(np.float32))[:, None]
        with torch.no_grad():
            want = teacher(x)
        got = student(x)
        loss = sum(
            F.kl_div(
                F.log_softmax(g / t, 1), F.log_softmax(w / t, 1), log_target=True, reduction="sum"
            )
            / x.numel()
            for g, w, t in zip(got, want, (temperature, 1.0))
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.5f}, {time.monotonic() - started:.0f} s")
    student.eval()


class OpenVINONet(torch.nn.Module):
    """An OpenVINO model as the torch module :func:`training.robustness.evaluate_row` reads,
    compiled once per input shape."""

    size_multiple = 32

    def __init__(self, model):
        import openvino as ov

        super().__init__()
        self.core, self.model, self.compiled = ov.Core(), model, {}

    def compiled_for(self, shape: tuple[int, ...]):
        if shape not in self.compiled:
            model = self.model.clone()
            model.reshape(list(shape))
            self.compiled[shape] = self.core.compile_model(model, "CPU", OV_CONFIG)
        return self.compiled[shape]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.compiled_for(tuple(x.shape))(x.numpy())
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", required=True, help="exit-wave library (not the suite's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--suite-dir", default="data/suite")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    import openvino as ov

    teacher, meta = load_model(str(bundled_model_path()))
    teacher.eval()
    temperature = float(meta["temperature"])
    student = student_of(teacher, Path(args.suite_dir) / "engine_cache")
    distil(student, teacher, temperature, args.library, args.steps, args.lr)
    net = OpenVINONet(ov.convert_model(student, example_input=torch.rand(1, 1, 192, 192)))
    frame = torch.rand(1, 1, 512, 512)
    net(frame)
    started = time.monotonic()
    for _ in range(5):
        net(frame)
    print(f"openvino, quantization-aware: {5 / (time.monotonic() - started):.2f} frames/s at 512²")
    paths = suite.build_suite(args.suite_dir, 1.0, 768)
    for k, row in enumerate(suite.suite_rows()):
        if row.name not in ROWS:
            continue
        exact = {"fp32": 0, "int8": 0}
        columns = 0
        for seed in (100, 101, 102):
            data, depths, shown = suite.row_data(row, paths, 48, 192, seed + k)
            for name, model in (("fp32", teacher), ("int8", net)):
                result = suite.evaluate_row(
                    model, temperature, data, depths, row.dose, seed + k, False, shown
                )
                exact[name] += result.columns.exact
            columns += result.columns.columns
        fp32, int8 = exact["fp32"] / columns, exact["int8"] / columns
        print(
            f"{row.name}: column exact FP32 {fp32:.3f}, INT8 {int8:.3f} "
            f"({100 * (int8 - fp32):+.2f} points)"
        )


if __name__ == "__main__":
    main()
