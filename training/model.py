"""The SegDepth UNet (paper appendix): depth logits (0-10 atoms) and species logits per pixel.

Six resolution scales; channels start at ``base_channels`` and double per scale up to
``max_channels``; 2x2 max-pool down, bilinear (or transposed-conv) up, skip concatenation; every
block is a double 3x3 conv with replication padding, batch norm and ReLU. Options from section
III-C: ``extra_blocks`` (two more double-conv blocks at full resolution before the heads) and
``median_kernel`` (median filter over the depth logits; the paper uses 4, 0 disables).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamer.domain import N_DEPTHS, N_SPECIES_CLASSES

MODEL_FORMAT = "segdepth-unet-v1"


@dataclass
class UNetConfig:
    """Architecture of :class:`SegDepthUNet` (saved with every model file)."""

    base_channels: int = 16
    max_channels: int = 128
    scales: int = 6
    upsampling: str = "bilinear"  # "bilinear" | "transposed"
    extra_blocks: bool = False
    median_kernel: int = 0  # 0: off; the paper's value is 4
    n_depth_classes: int = N_DEPTHS
    n_species_classes: int = N_SPECIES_CLASSES

    def __post_init__(self) -> None:
        if self.scales < 1 or self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError(f"invalid UNetConfig {self}")
        if self.upsampling not in ("bilinear", "transposed"):
            raise ValueError(
                f"upsampling must be 'bilinear' or 'transposed', not {self.upsampling!r}"
            )
        if self.median_kernel < 0:
            raise ValueError("median_kernel must be >= 0")

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this many px (one halving per coarser scale)."""
        return 2 ** (self.scales - 1)

    def channels(self) -> list[int]:
        """Feature channels at each scale, finest first."""
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(self.scales)]


class DoubleConv(nn.Sequential):
    """(3x3 conv, replication padding, batch norm, ReLU) twice."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="replicate", bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode="replicate", bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Upsample by 2, concatenate the skip features, double conv."""

    def __init__(self, c_low: int, c_skip: int, c_out: int, mode: str):
        super().__init__()
        self.transposed = (
            nn.ConvTranspose2d(c_low, c_low, 2, stride=2) if mode == "transposed" else None
        )
        self.conv = DoubleConv(c_low + c_skip, c_out)

    def forward(self, low: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.transposed is not None:
            up = self.transposed(low)
        else:
            up = F.interpolate(low, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([up, skip], dim=1))


def median_filter2d(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-channel median over a ``kernel``x``kernel`` window, replicate-padded, same size."""
    if kernel <= 1:
        return x
    before = (kernel - 1) // 2
    after = kernel - 1 - before
    padded = F.pad(x, (before, after, before, after), mode="replicate")
    windows = padded.unfold(2, kernel, 1).unfold(3, kernel, 1)
    return windows.reshape(*windows.shape[:4], -1).median(dim=-1).values


class SegDepthUNet(nn.Module):
    """UNet: (B,1,H,W) images (vacuum = 1) -> (depth_logits (B,11,H,W),
    species_logits (B,3,H,W))."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config or UNetConfig()
        ch = self.config.channels()
        self.size_multiple = self.config.size_multiple
        self.inc = DoubleConv(1, ch[0])
        self.downs = nn.ModuleList(DoubleConv(ch[i - 1], ch[i]) for i in range(1, len(ch)))
        self.ups = nn.ModuleList(
            Up(ch[i], ch[i - 1], ch[i - 1], self.config.upsampling)
            for i in range(len(ch) - 1, 0, -1)
        )
        self.extra = (
            nn.Sequential(DoubleConv(ch[0], ch[0]), DoubleConv(ch[0], ch[0]))
            if self.config.extra_blocks
            else nn.Identity()
        )
        self.depth_head = nn.Conv2d(ch[0], self.config.n_depth_classes, 1)
        self.species_head = nn.Conv2d(ch[0], self.config.n_species_classes, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"input {h}x{w} is not a multiple of {self.size_multiple}; pad it "
                f"(training.model.pad_to_multiple)"
            )
        feats = [self.inc(x)]
        for down in self.downs:
            feats.append(down(F.max_pool2d(feats[-1], 2)))
        y = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1])):
            y = up(y, skip)
        y = self.extra(y)
        depth = median_filter2d(self.depth_head(y), self.config.median_kernel)
        return depth, self.species_head(y)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad (B,C,H,W) at bottom/right to multiples of ``multiple``;
    returns (padded, (H, W))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def bundled_model_path() -> Path:
    """Path of the trained model shipped with the package (may not exist in a fresh checkout)."""
    return Path(__file__).resolve().parent / "models" / "segdepth_base16.pt"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_id_for(config: UNetConfig, state: dict[str, torch.Tensor]) -> str:
    """Short stable identity: base channels plus a hash of the weights."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return f"segdepth-b{config.base_channels}-{digest.hexdigest()[:10]}"


def save_model(
    path: str | Path, model: SegDepthUNet, meta: dict[str, Any] | None = None, half: bool = True
) -> dict[str, Any]:
    """Write model + meta (config, model_id — the given one, else a weights hash — and anything
    given: data hash, metrics). Floating
    weights are stored as float16 when ``half`` (small files). Returns the meta written."""
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = {
        k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
        for k, v in module.state_dict().items()
    }
    meta = dict(meta or {})
    meta["config"] = dataclasses.asdict(module.config)
    meta.setdefault("model_id", model_id_for(module.config, state))
    meta["format"] = MODEL_FORMAT
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": MODEL_FORMAT, "state_dict": state, "meta_json": json.dumps(meta)}, tmp)
    tmp.replace(path)
    return meta


def load_model(path: str | Path) -> tuple[SegDepthUNet, dict[str, Any]]:
    """Read a file written by :func:`save_model`: (model in eval mode on CPU, FP32; meta)."""
    not_a_model = ValueError(
        f"{path} is not a SegDepth model file ({MODEL_FORMAT}): give a .pt "
        f"written by `segdepth train`, or no --model for the bundled one"
    )
    try:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise not_a_model from exc
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise not_a_model
    meta = json.loads(blob["meta_json"])
    model = SegDepthUNet(UNetConfig(**meta["config"]))
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    )
    return model.eval(), meta
