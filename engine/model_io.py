"""The trained model as the engine sees it: loading, identity (hash), and a probability head.

The engine runs ``ProbabilityHead``: the SegDepth UNet followed by the softmax of each output,
so every backend (and every exported graph) returns probabilities, never logits. Frames whose
sides are not multiples of the model's ``size_multiple`` are replicate-padded and the outputs
cropped back.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.domain import N_DEPTHS
from training.model import file_sha256


def exportable_median(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """training.model.median_filter2d (k x k lower median, replicate padding) written with
    slices and TopK, which ONNX and TensorRT support (``unfold`` with a dynamic size does not
    export)."""
    before = (kernel - 1) // 2
    after = kernel - 1 - before
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (before, after, before, after), mode="replicate")
    windows = torch.stack(
        [padded[..., i:, j:][..., :h, :w] for i in range(kernel) for j in range(kernel)], dim=-1
    )
    lower = (kernel * kernel - 1) // 2  # torch.median's choice for an even count
    return torch.topk(windows, lower + 1, dim=-1, largest=False).values[..., -1]


def channel_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the channels (dim 1) of (B, C, H, W), written as max, exp, sum and divide:
    the same numbers as ``x.softmax(dim=1)`` (to float rounding), but onnxruntime's CPU
    Softmax over a non-last axis transposes internally and measured 6x slower at 11 x 512^2
    (333 vs 53 ms), a fifth of the whole network's time."""
    e = (x - x.amax(dim=1, keepdim=True)).exp()
    return e / e.sum(dim=1, keepdim=True)


class Float32Module(torch.nn.Module):
    """``module`` run in float32 inside an autocast region (its inputs cast to float32)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


#: the SegDepthUNet's output convolutions (training.model), run in float32 under BF16
OUTPUT_HEADS = ("depth_head", "species_head")


def _ends_in_float32(model: torch.nn.Module) -> None:
    """Wrap ``model``'s first Conv2d (in registration order: the one that reads the input) and
    its :data:`OUTPUT_HEADS` in :class:`Float32Module`."""
    first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    for name in (first, *OUTPUT_HEADS):
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, Float32Module(getattr(owner, attr)))


class ProbabilityHead(torch.nn.Module):
    """(B, 1, H, W) frames (vacuum = 1) -> depth (B, 11, H, W) and species (B, 3, H, W)
    probabilities. ``half``: run the model in FP16 between float32 input and output casts
    (the graph exported for TensorRT, which takes its precision from the graph). ``bf16``: run
    the network channels-last under ``torch.autocast`` to bfloat16 (its convolutions on oneDNN's
    AMX / AVX512-BF16 kernels on the CPU, the rest -- batch norm, skip concatenation,
    upsampling -- as autocast leaves it) except the first convolution, which reads the noisy
    frame, and the 1 x 1 output heads, which write the logits (:func:`_ends_in_float32`), and
    the softmax in float32: bfloat16's 8-bit mantissa would make near-equal probabilities tie.
    Column pixels whose depth class differs from FP32 on the bundled model (six 512² frames,
    λ = 2.5): 4.8 % with the network wholly in bfloat16, 2.4 % under autocast, 0.65 % with the
    first convolution in float32 (deeper, 1,499 pixels against 824 shallower), 0.58 % with the
    heads too (883 against 1,173). Those layers are a few percent of the FLOPs.
    ``temperature``: depth probabilities are softmax(logits / temperature), the calibration
    fitted in training (paper Fig. 7; ``meta["temperature"]`` of the model file).

    A model with a median filter over its depth logits (``config.median_kernel`` > 1) runs
    with that step replaced by :func:`exportable_median` (the same numbers); ``model`` is
    changed in place, so pass a copy of a model used elsewhere.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        half: bool = False,
        temperature: float = 1.0,
        bf16: bool = False,
    ):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if half and bf16:
            raise ValueError("half and bf16 exclude each other")
        self.temperature = float(temperature)
        config: Any = getattr(model, "config", None)
        self.median_kernel = int(getattr(config, "median_kernel", 0) or 0)
        if self.median_kernel > 1:
            model.config = dataclasses.replace(config, median_kernel=0)
        if bf16:
            # Module.to(memory_format=...) works (it forwards to every tensor) but is not in
            # torch's type stubs for Module.to
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            _ends_in_float32(model)
        self.model = model.half() if half else model
        self.fp16 = half
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp16:
            x = x.half()
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.model(x.contiguous(memory_format=torch.channels_last))
            depth_logits, species_logits = (t.float().contiguous() for t in logits)
        else:
            depth_logits, species_logits = self.model(x)
        if self.median_kernel > 1:
            depth_logits = exportable_median(depth_logits, self.median_kernel)
        if self.temperature != 1.0:
            depth_logits = depth_logits / self.temperature
        depth, species = channel_softmax(depth_logits), channel_softmax(species_logits)
        if self.fp16:
            depth, species = depth.float(), species.float()
        return depth, species


@dataclass
class LoadedModel:
    """A model file loaded for inference: the module (eval, CPU, FP32), its meta, path, hash."""

    model: torch.nn.Module
    meta: dict[str, Any]
    path: Path
    sha256: str

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model_id", self.path.stem))

    @property
    def temperature(self) -> float:
        """Calibration temperature of the depth logits (1: none fitted)."""
        return float(self.meta.get("temperature", 1.0))

    @property
    def class_prior(self) -> tuple[float, ...] | None:
        """Depth-class prior (11 values) the network was trained under, from the meta's
        ``class_prior`` (None when the model file has none: the HMM then assumes uniform)."""
        prior = self.meta.get("class_prior")
        return None if prior is None else tuple(float(v) for v in prior)

    def head(self, half: bool = False, bf16: bool = False) -> ProbabilityHead:
        """A probability head on a copy of the model (the copy may be moved, cast, changed)."""
        return ProbabilityHead(
            copy.deepcopy(self.model), half=half, temperature=self.temperature, bf16=bf16
        ).eval()

    @property
    def size_multiple(self) -> int:
        return int(getattr(self.model, "size_multiple", 1))


def default_model_path() -> Path:
    """The bundled trained model (training/models/), or a clear error when it is absent."""
    from training.model import bundled_model_path

    path = Path(bundled_model_path())
    if not path.is_file():
        raise FileNotFoundError(
            f"no bundled model at {path}: train one (`segdepth train`) and pass it with --model"
        )
    return path


def load(path: str | Path | None = None) -> LoadedModel:
    """Load a model file (default: the bundled model) with training.model.load_model."""
    from training.model import load_model

    path = Path(path) if path is not None else default_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    model, meta = load_model(path)
    model.eval()
    return LoadedModel(model=model, meta=dict(meta or {}), path=path, sha256=file_sha256(path))


def class_prior_from_simulator(
    size_px: int = 256, structures: int = 400, seed: int = 0, floor: float = 0.002
) -> tuple[float, ...]:
    """Estimate of the depth-class prior a network trained on ``segdepth simulate`` images of
    ``size_px`` learnt, from the labels alone (no image simulation): the frequency of each
    depth label 0..10 over the pixels of ``structures`` random surface models, each pixel
    weighted as the training loss weights it (training.labels: 1 at column centres, Gaussian
    decay to the background floor), plus ``floor`` (relative) so that no class has prior 0.
    Sums to 1."""
    from sim_source.hrtem import make_grid
    from sim_source.labels import label_maps
    from sim_source.structure import StructureConfig, build_columns
    from training.labels import (
        TargetConfig,
        column_centres,
        loss_weights,
        prior_from_counts,
        weighted_class_counts,
    )

    cfg, grid = TargetConfig(), make_grid(size_px)
    counts = np.zeros(N_DEPTHS)
    for group in range(structures):
        rng = np.random.default_rng(np.random.SeedSequence([seed, group]))
        table, _ = build_columns(
            rng, grid.fov_A, grid.n_cells_y, grid.crystal_end_x_A, StructureConfig()
        )
        depth = label_maps(table, grid).depth
        weights = loss_weights(
            depth.shape,
            column_centres(depth),
            grid.pixel_size_pm,
            cfg.weight_sigma_pm,
            cfg.background_weight,
        )
        counts += weighted_class_counts(depth, weights)
    return tuple(float(v) for v in prior_from_counts(counts, floor))


def padded_side(side: int, multiple: int) -> int:
    """A frame side (px) rounded up to the next multiple of ``multiple``: the side the
    backends run (:func:`pad_to_multiple`)."""
    return -(-side // multiple) * multiple


def pad_to_multiple(frames: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Replicate-pad (B, H, W) at the bottom/right so H and W are multiples (as
    training.model.pad_to_multiple does); return (padded, (H, W))."""
    h, w = frames.shape[-2:]
    ph, pw = padded_side(h, multiple) - h, padded_side(w, multiple) - w
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw)), mode="edge")
    return frames, (h, w)
