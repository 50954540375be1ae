"""Model export: ONNX (dynamic batch, height, width) and a serialized TensorRT plan.

ONNX files are named by model hash and precision, so a cache directory can hold many. The
FP16 ONNX graph (the model cast to half precision between float32 input/output casts) is what
TensorRT builds from: TensorRT 11 networks are strongly typed and take their precision from the
graph; on TensorRT 10 the FP16 builder flag is set as well. A plan is specific to its GPU and
TensorRT version, so its file name is a hash of model hash + GPU name and compute capability +
TensorRT version + optimisation profile; an existing plan with that key is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.model_io import LoadedModel

log = logging.getLogger(__name__)

INPUT_NAME = "frames"
OUTPUT_NAMES = ("depth_prob", "species_prob")
OPSET = 17
#: version of the exported graph's form (2: the channel softmax of engine.model_io); part of every
#: cache name and plan key, so a cache written by an older engine is never reused
EXPORT_VERSION = 2


def default_cache_dir() -> Path:
    """Where exported graphs and plans are cached: $SEGDEPTH_CACHE or ~/.cache/segdepth/engine."""
    return Path(os.environ.get("SEGDEPTH_CACHE", Path.home() / ".cache" / "segdepth" / "engine"))


def export_onnx(loaded: LoadedModel, out_dir: Path, half: bool = False) -> Path:
    """Write (or reuse) ``<hash>_<fp32|fp16>_v<EXPORT_VERSION>.onnx`` in ``out_dir``; batch, H,
    W are dynamic."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{loaded.sha256[:16]}_{'fp16' if half else 'fp32'}_v{EXPORT_VERSION}.onnx"
    if path.is_file():
        return path
    head = loaded.head(half=half)
    side = 2 * max(loaded.size_multiple, 32)
    example = torch.ones(2, 1, side, side)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent exporters do not collide
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            head,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                **{n: {0: "batch", 2: "height", 3: "width"} for n in OUTPUT_NAMES},
            },
        )
    tmp.replace(path)
    log.info("exported %s", path)
    return path


@dataclass(frozen=True)
class PlanProfile:
    """TensorRT optimisation profile: batch 1..max_batch, frame sides min_side..max_side px
    (multiples of the model's size multiple), optimised for opt_batch at opt_side."""

    max_batch: int = 32
    opt_batch: int = 8
    min_side: int = 512
    opt_side: int = 512
    max_side: int = 1024


def tensorrt_unavailable_reason() -> str | None:
    """Why a TensorRT plan cannot be built or run here, or None if it can."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'segdepth-live[gpu]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA device (TensorRT needs an NVIDIA GPU)"
    return None


def plan_key(loaded: LoadedModel, profile: PlanProfile) -> str:
    """Cache key: model hash + export version + GPU + TensorRT version + profile."""
    import tensorrt as trt

    props = torch.cuda.get_device_properties(0)
    ident = {
        "model": loaded.sha256,
        "export": EXPORT_VERSION,
        "gpu": props.name,
        "cc": f"{props.major}.{props.minor}",
        "tensorrt": trt.__version__,
        "profile": asdict(profile),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def build_tensorrt_plan(loaded: LoadedModel, out_dir: Path, profile: PlanProfile) -> Path:
    """Build (or reuse) the serialized TensorRT plan for ``loaded``; returns its path."""
    reason = tensorrt_unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot build a TensorRT plan: {reason}")
    import tensorrt as trt

    out_dir = Path(out_dir)
    key = plan_key(loaded, profile)
    plan_path = out_dir / f"segdepth_{key}.plan"
    if plan_path.is_file():
        log.info("reusing cached TensorRT plan %s", plan_path)
        return plan_path
    onnx_path = export_onnx(loaded, out_dir, half=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 10; 11 is strongly typed (FP16 graph)
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    opt.set_shape(
        INPUT_NAME,
        (1, 1, profile.min_side, profile.min_side),
        (profile.opt_batch, 1, profile.opt_side, profile.opt_side),
        (profile.max_batch, 1, profile.max_side, profile.max_side),
    )
    config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the plan (see its log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    (plan_path.with_suffix(".json")).write_text(
        json.dumps(
            {
                "model_id": loaded.model_id,
                "model_sha256": loaded.sha256,
                "onnx": onnx_path.name,
                "tensorrt": trt.__version__,
                "gpu": torch.cuda.get_device_name(0),
                "profile": asdict(profile),
            },
            indent=2,
        )
    )
    log.info("built TensorRT plan %s", plan_path)
    return plan_path
