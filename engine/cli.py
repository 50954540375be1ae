"""Engine subcommands: ``segdepth export``, ``segdepth quantize``, ``segdepth serve``,
``segdepth bench engine`` and ``segdepth bench parity``. Defaults are the config dataclasses'
(engine.serve.ServeConfig, engine.export.PlanProfile, engine.openvino_qat.QATConfig,
engine.bench.BenchConfig, engine.hmm.HMMConfig), read through
streamer.cli_support; the heavy modules are imported only to run a command or show its help."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.hmm import HMMConfig
from streamer import sockets
from streamer.cli_support import (
    config_option,
    endpoint,
    given,
    input_file,
    list_of,
    non_negative_int,
    positive_int,
)
from training.cli import suite_files_options

#: where serve post-processes (engine.serve.POSTPROCESS; kept here so --help needs no torch)
POSTPROCESS_CHOICES = ("auto", "device", "host")
#: the scores serve's warning can read (engine.serve.OOD_WARN_ON; kept here for the same reason)
OOD_WARN_ON_CHOICES = ("one-pass", "turn")
#: backend names, fastest first (engine.backends.PREFERENCE; kept here so --help needs no torch).
BACKEND_NAMES = (
    "tensorrt",
    "torch-cuda",
    "torch-cpu-bf16",
    "openvino-int8",
    "onnxruntime-int8",
    "openvino",
    "onnxruntime",
    "torch-cpu",
)
SERVE = "engine.serve:ServeConfig"
PROFILE = "engine.export:PlanProfile"
BENCH = "engine.bench:BenchConfig"
COLUMNS = "engine.columns:ColumnConfig"
PARITY = "engine.parity:ParityConfig"
QAT = "engine.openvino_qat:QATConfig"
E2E = "engine.bench_e2e:E2EConfig"


def _export(args: argparse.Namespace) -> int:
    from engine import export
    from engine.model_io import load

    if args.format == "tensorrt":
        reason = export.tensorrt_unavailable_reason()
        if reason:
            print(f"tensorrt export skipped: {reason}", file=sys.stderr)
            return 0
    loaded = load(args.model)
    out = Path(args.out)
    if args.format == "onnx":
        import onnx

        path = export.export_onnx(loaded, out, half=args.precision == "fp16")
        onnx.checker.check_model(str(path))
        info = {
            "format": "onnx",
            "path": str(path),
            "precision": args.precision,
            "opset": export.OPSET,
            "dynamic_axes": ["batch", "height", "width"],
        }
    else:
        profile = plan_profile(args)
        path = export.build_tensorrt_plan(loaded, out, profile)
        info = {"format": "tensorrt", "path": str(path), "profile": asdict(profile)}
    info.update(
        model=str(loaded.path),
        model_id=loaded.model_id,
        model_sha256=loaded.sha256,
        input=export.INPUT_NAME,
        outputs=list(export.OUTPUT_NAMES),
    )
    (out / f"{path.stem}.export.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {path}")
    return 0


def plan_profile(args: argparse.Namespace):
    """The TensorRT profile of ``export`` (opt batch capped at max batch; optimised for the
    smallest side)."""
    from engine.export import PlanProfile

    profile = PlanProfile(**given(args, "max_batch", "opt_batch", "min_side", "max_side"))
    return PlanProfile(
        max_batch=profile.max_batch,
        opt_batch=min(profile.opt_batch, profile.max_batch),
        min_side=profile.min_side,
        opt_side=profile.min_side,
        max_side=profile.max_side,
    )


def serve_config(args: argparse.Namespace):
    """The engine.serve.ServeConfig of a ``serve`` command line."""
    from engine.columns import ColumnConfig
    from engine.serve import ServeConfig

    viewer = {"viewer": None} if args.viewer == "none" else given(args, "viewer")
    return ServeConfig(
        columns=ColumnConfig(**given(args, "reference_frames")),
        hmm=hmm_config(args),
        **viewer,
        **given(
            args,
            "frames",
            "results",
            "model",
            "backend",
            "max_batch",
            "max_wait_ms",
            "mode",
            "queue_frames",
            "receive_hwm",
            "exit_on_eos",
            "tta",
            "ood_check_every",
            "ood_warn_on",
            "postprocess",
            "max_frame_px",
            "max_batch_px",
            "ignore_parity",
            "warm",
        ),
        **overlap_of(args),
    )


def frame_shape(text: str) -> tuple[int, int]:
    """``HxW`` (or ``N`` for N x N) in px, each >= 1."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW or N (px), got {text!r}")
    return h, w


def overlap_of(args: argparse.Namespace) -> dict[str, Any]:
    """``overlap`` as a config keyword from ``--overlap`` (nothing when not given)."""
    return {} if args.overlap is None else {"overlap": OVERLAP[args.overlap]}


def _serve(args: argparse.Namespace) -> int:
    from engine.host_memory import reexec_with_malloc_settings

    # the process's own command again, with malloc settings that keep freed memory
    # (engine.host_memory); not for a command run in-process (main() given its arguments)
    if getattr(args, "command_line", None) is not None:
        reexec_with_malloc_settings(["-m", "segdepth", *args.command_line])
    from engine.serve import serve

    return serve(serve_config(args), Path(args.stats) if args.stats else None)


def hmm_config(args: argparse.Namespace) -> HMMConfig:
    """The temporal model from the ``--filter``, ``--change-rate-per-s``, ``--jump-decay``,
    ``--event-threshold`` and ``--class-prior`` options (:func:`hmm_options`)."""
    from dataclasses import replace

    from engine.hmm import FILTERS

    config = FILTERS[args.filter]
    if args.filter == "rate":
        config = replace(
            config, change_rate_per_s=args.change_rate_per_s, jump_decay=args.jump_decay
        )
    if args.class_prior == "simulator":
        from engine.model_io import class_prior_from_simulator

        prior = class_prior_from_simulator()
    elif args.class_prior is not None:
        prior = tuple(float(v) for v in args.class_prior.split(","))
    else:
        prior = None
    return replace(config, event_threshold=args.event_threshold, class_prior=prior)


def hmm_options(p: argparse.ArgumentParser) -> None:
    """Options of the temporal model (engine.hmm; defaults: engine.hmm.HMMConfig)."""
    p.add_argument(
        "--filter",
        choices=["rate", "legacy"],
        default="rate",
        help="rate: prior-corrected evidence, multi-atom jumps, rates per second; "
        "legacy: the filter before issue 10 (+-1 atom, 0.02 per frame)",
    )
    config_option(
        p,
        "--change-rate-per-s",
        HMMConfig,
        type=float,
        help="expected depth changes per column per second",
    )
    config_option(
        p,
        "--jump-decay",
        HMMConfig,
        type=float,
        help="probability ratio of a (k+1)- to a k-atom change",
    )
    config_option(
        p,
        "--event-threshold",
        HMMConfig,
        type=float,
        help="filtered probability a new depth needs to count as an event (false alarms vs delay)",
    )
    p.add_argument(
        "--class-prior",
        default=None,
        help="depth-class prior the network was trained under, divided out of "
        "its posteriors: 11 comma-separated frequencies, or 'simulator' "
        "(estimated from 400 simulated surface models' loss-weighted labels "
        "at 256^2, ~30 s; engine.model_io.class_prior_from_simulator); "
        "default: the model meta's class_prior, else uniform (no correction)",
    )


def bench_config(args: argparse.Namespace):
    """The engine.bench.BenchConfig of a ``bench engine`` command line."""
    from engine.bench import BenchConfig

    return BenchConfig(
        model=args.model,
        **given(args, "backends", "sizes", "batches", "iterations", "max_seconds", "seed"),
    )


def e2e_config(args: argparse.Namespace):
    """The engine.bench_e2e.E2EConfig of a ``bench engine --e2e`` command line (``--backends
    all``: every backend available here but torch-cpu)."""
    from engine import backends
    from engine.bench_e2e import E2EConfig

    chosen: dict[str, Any] = {}
    if args.backends == "all":
        chosen["backends"] = [
            n for n in BACKEND_NAMES if n != "torch-cpu" and backends.unavailable_reason(n) is None
        ]
    elif args.backends is not None:
        chosen["backends"] = [n.strip() for n in args.backends.split(",") if n.strip()]
    return E2EConfig(
        model=args.model,
        **chosen,
        **given(
            args,
            "sizes",
            "seed",
            "e2e_frames",
            "warmup",
            "paced_frames",
            "rate_fps",
            "max_batch",
            "postprocess",
            "frames_from",
            "ignore_parity",
            "tta",
        ),
        **overlap_of(args),
    )


def _bench(args: argparse.Namespace) -> int:
    if args.e2e:
        from engine.bench_e2e import run_e2e

        run_e2e(e2e_config(args), Path(args.json or "benchmarks/engine_e2e.json"))
        return 0
    from engine.bench import run_bench

    run_bench(bench_config(args), Path(args.json or "benchmarks/engine.json"))
    return 0


def _parity(args: argparse.Namespace) -> int:
    from engine.parity import ParityConfig, run_parity

    record = run_parity(
        ParityConfig(
            model=args.model,
            out=args.out,
            **given(args, "candidate", "suite_dir", "samples", "crop", "seeds", "scale", "gpts"),
        )
    )
    return 0 if record["passed"] else 1


def _quantize(args: argparse.Namespace) -> int:
    from engine.openvino_qat import QATConfig, graph_path, quantize, unavailable_reason

    reason = unavailable_reason()
    if reason:
        print(f"quantize: {reason}", file=sys.stderr)
        return 1
    record = quantize(
        QATConfig(
            library=args.library,
            model=args.model,
            cache_dir=args.cache_dir,
            **given(
                args,
                *("steps", "lr", "batch", "crop", "views", "nominal_fraction"),
                *("dose_min", "dose_max", "seed"),
            ),
        )
    )
    print(
        f"wrote {graph_path(record['model'])}: KL divergence to FP32 on held-out views "
        f"{record['kl_before']:.5f} before the fit, {record['kl_after']:.5f} after; check it "
        f"with `segdepth bench parity --model {record['model']} --candidate openvino-int8`"
    )
    return 0


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model file (.pt from training.model.save_model); default: the "
        "bundled model training/models/segdepth_base16.pt",
    )


def _add_export(commands) -> None:
    p = commands.add_parser(
        "export",
        help="export the model to ONNX or a TensorRT plan",
        description="Export the model: ONNX with dynamic batch, height and width axes, or a "
        "serialized TensorRT plan (FP16, optimisation profile over batch), cached "
        "by model hash + GPU + TensorRT version. Without TensorRT and a CUDA GPU "
        "the tensorrt format is skipped with the reason (exit code 0).",
    )
    p.add_argument(
        "--format",
        choices=["onnx", "tensorrt"],
        default="onnx",
        help="onnx: a .onnx graph; tensorrt: a .plan for this GPU",
    )
    _model_option(p)
    p.add_argument("--out", default="exported", help="output directory")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="ONNX precision (fp16: the graph TensorRT builds from)",
    )
    config_option(
        p,
        "--max-batch",
        PROFILE,
        type=positive_int,
        help="largest batch (frames) of the TensorRT profile",
    )
    config_option(
        p, "--opt-batch", PROFILE, type=positive_int, help="batch (frames) TensorRT optimises for"
    )
    config_option(
        p,
        "--min-side",
        PROFILE,
        type=positive_int,
        help="smallest frame side in px of the TensorRT profile; also the side it optimises for",
    )
    config_option(
        p,
        "--max-side",
        PROFILE,
        type=positive_int,
        help="largest frame side in px of the TensorRT profile",
    )
    p.set_defaults(func=_export)


def _add_serve(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="the inference engine: frames in, depth/occupancy results out",
        description="Receive frames, batch them (up to --max-batch frames or --max-wait-ms), "
        "divide by the dose (header dose_e_per_px, e-/px/frame; without it the "
        "running mean count of the session's frames), infer, track the atomic "
        "columns and publish one result per frame. Ctrl-C stops it.",
    )
    _serve_endpoints(p)
    _model_option(p)
    config_option(
        p,
        "--backend",
        SERVE,
        choices=["auto", *BACKEND_NAMES],
        help="inference backend; auto: the fastest available and offered for the model",
    )
    _ignore_parity_option(p, SERVE)
    _overlap_option(p, SERVE)
    config_option(
        p,
        "--warm",
        SERVE,
        nargs="+",
        type=frame_shape,
        metavar="HxW",
        help="frame shapes to ready the backend for at start-up, before the first frame "
        "(torch-cpu-bf16 compiles each shape, about 35 s the first time on 2 cores); "
        "otherwise a session's first frame of a new shape waits for it",
    )
    config_option(
        p,
        "--postprocess",
        SERVE,
        choices=POSTPROCESS_CHOICES,
        help="where the maps, column averages and drift are computed: device (torch on the "
        "backend's device, copying back only maps and column values; torch backends only), "
        "host (numpy); auto: device for torch-cuda and tensorrt, host otherwise",
    )
    _serve_batching(p)
    config_option(
        p,
        "--reference-frames",
        COLUMNS,
        type=positive_int,
        help="aligned frames averaged into the column reference",
    )
    hmm_options(p)
    config_option(
        p,
        "--tta",
        SERVE,
        action="store_true",
        help="test-time augmentation: average the depth probabilities over the 8 "
        "flips and quarter turns of each frame (8x the inference cost; every frame turn-checked "
        "at no extra cost; its one-pass score is its unturned pass's, the score the model's "
        "warning levels were measured on)",
    )
    config_option(
        p,
        "--ood-check-every",
        SERVE,
        type=non_negative_int,
        help="infer every N-th frame of a session a second time, turned by 90°, for the "
        "turn score (published; the warning with --ood-warn-on turn; 1/N more inference; "
        "0: never; with --tta every frame, at no extra cost); when not given: every 16th on a "
        "GPU or with --ood-warn-on turn, never on the CPU, where each check costs a whole "
        "inference",
    )
    config_option(
        p,
        "--ood-warn-on",
        SERVE,
        choices=OOD_WARN_ON_CHOICES,
        help="the score the out-of-distribution warning reads: the frame's one-pass score "
        "(it tracks a frame's errors better for the bundled model) or the session's turn "
        "score (the median of its last 3 turn checks)",
    )
    config_option(
        p,
        "--exit-on-eos",
        SERVE,
        action="store_true",
        help="exit after forwarding the first end-of-stream message",
    )
    p.add_argument(
        "--stats",
        default=None,
        help="write counters, latency percentiles and the config as JSON here on exit",
    )
    p.set_defaults(func=_serve)


def _ignore_parity_option(p: argparse.ArgumentParser, config: str) -> None:
    config_option(
        p,
        "--ignore-parity",
        config,
        action="store_true",
        help="run an INT8 or BF16 backend named with --backend although the model's parity "
        "record (segdepth bench parity) does not offer it: logged, and the serve statistics "
        "say why it was not offered; auto never picks such a backend",
    )


#: --overlap's words -> ServeConfig.overlap
OVERLAP = {"auto": None, "on": True, "off": False}


def _overlap_option(p: argparse.ArgumentParser, config: str) -> None:
    p.add_argument(
        "--overlap",
        choices=list(OVERLAP),
        default=None,
        help="run inference and post-processing at the same time (on) or in turn (off); "
        "auto (the default): at the same time only when the network runs on a GPU (on the "
        "2-core CPU taking turns measured faster for BF16 at 512², 10.7-13.1 against 8.1-11.5 "
        "frames/s, and no slower for FP32)",
    )


def _serve_endpoints(p: argparse.ArgumentParser) -> None:
    config_option(p, "--frames", SERVE, type=endpoint, help="endpoint the frame source binds")
    config_option(p, "--results", SERVE, type=endpoint, help="endpoint to bind for the recorder")
    config_option(
        p, "--viewer", SERVE, type=endpoint, help="endpoint to bind for viewers (PUB), or 'none'"
    )


def _serve_batching(p: argparse.ArgumentParser) -> None:
    config_option(
        p,
        "--max-batch",
        SERVE,
        type=positive_int,
        help="largest batch in frames; unset: the backend's preferred batch (1 on the CPU, "
        "where batching measured slower; 8 on a GPU)",
    )
    config_option(
        p,
        "--max-wait-ms",
        SERVE,
        type=float,
        help="longest wait in ms after a batch's first frame for more",
    )
    config_option(
        p,
        "--max-frame-px",
        SERVE,
        type=positive_int,
        help="largest frame side in px accepted (larger frames are refused and "
        "counted before any allocation)",
    )
    config_option(
        p,
        "--max-batch-px",
        SERVE,
        type=positive_int,
        help="most pixels in one batch (a larger frame is served alone); with "
        "--max-frame-px it bounds the engine's memory: onnxruntime peaks at about "
        "750 bytes per pixel of a batch (1.0 GB for one 1024^2 frame)",
    )
    config_option(
        p,
        "--mode",
        SERVE,
        choices=["auto", *sockets.MODES],
        help="replay: serve every frame, wait for the recorder; live: bounded queue, "
        "skip the oldest frames under overload; auto: each frame's mode header "
        "(live if absent)",
    )
    config_option(
        p,
        "--queue-frames",
        SERVE,
        type=int,
        help="frames held waiting at most (live mode; 0: 4 x max-batch)",
    )
    config_option(
        p,
        "--receive-hwm",
        SERVE,
        type=positive_int,
        help="messages the frame socket may hold beyond the queue; a replay source "
        "that exits while frames are still queued on its side loses them after "
        "its linger (up to 120 s in replay mode), so for a slow engine raise it "
        "to the session's frame count",
    )


def _add_bench_engine(bench) -> None:
    p = bench.add_parser(
        "engine",
        help="engine throughput and latency per backend vs PyTorch eager FP32",
        description="Frames/s and per-batch latency (p50/p99, ms) of every backend at each "
        "frame size and batch, beside PyTorch eager FP32 in the same run. Backends "
        "absent here are listed with the reason (GPU: not run on real hardware).",
    )
    _model_option(p)
    config_option(p, "--backends", BENCH, help="comma-separated backends, or all")
    config_option(
        p,
        "--sizes",
        BENCH,
        **list_of(positive_int),
        help="frame sides in px (comma- or space-separated)",
    )
    config_option(
        p,
        "--batches",
        BENCH,
        **list_of(positive_int),
        help="batch sizes in frames (comma- or space-separated)",
    )
    config_option(
        p,
        "--iterations",
        BENCH,
        type=positive_int,
        help="timed calls per cell after one warm-up call",
    )
    config_option(
        p,
        "--max-seconds",
        BENCH,
        type=float,
        help="stop timing a cell after this many seconds (at least one call)",
    )
    config_option(p, "--seed", BENCH, type=int, help="seed of the random frames and weights")
    p.add_argument(
        "--json",
        default=None,
        help="where to write the figures (default benchmarks/engine.json, with "
        "--e2e benchmarks/engine_e2e.json)",
    )
    p.add_argument(
        "--e2e",
        action="store_true",
        help="end to end instead: a `segdepth serve` process per backend and size "
        "fed over loopback TCP -- frames/s at max rate, latency p50/p99 at "
        "--rate-fps, each stage's ms per frame (--backends all: every backend "
        "available here but torch-cpu; --sizes default 512)",
    )
    config_option(
        p, "--e2e-frames", E2E, type=positive_int, help="with --e2e: frames timed at max rate"
    )
    config_option(
        p,
        "--warmup",
        E2E,
        type=non_negative_int,
        help="with --e2e: frames whose results are awaited before the timed burst (model "
        "load, graph builds); 8 or more also leaves the session's column reference, grown "
        "over its first 8 frames on the host, out of the timing",
    )
    config_option(
        p,
        "--paced-frames",
        E2E,
        type=positive_int,
        help="with --e2e: frames sent at --rate-fps for the latency",
    )
    config_option(
        p,
        "--rate-fps",
        E2E,
        type=float,
        help="with --e2e: camera rate of the paced phase (the paper's 0.13 s/frame)",
    )
    config_option(p, "--max-batch", E2E, type=positive_int, help="with --e2e: serve's --max-batch")
    config_option(
        p,
        "--postprocess",
        E2E,
        choices=POSTPROCESS_CHOICES,
        help="with --e2e: serve's --postprocess (where maps, column averages and drift run)",
    )
    _ignore_parity_option(p, E2E)
    _overlap_option(p, E2E)
    config_option(
        p,
        "--tta",
        E2E,
        action="store_true",
        help="with --e2e: serve --tta (the 8 flips and quarter turns averaged, 8 passes a frame)",
    )
    p.add_argument(
        "--frames-from",
        nargs="+",
        type=input_file,
        metavar="FILE",
        help="with --e2e: the first 4 clean images of the dataset file (segdepth simulate) of "
        "each frame side, instead of simulating them here (a GPU machine without abTEM)",
    )
    p.set_defaults(func=_bench)


def _add_quantize(commands) -> None:
    p = commands.add_parser(
        "quantize",
        help="fit the model's INT8 graph for openvino-int8 (quantization-aware distillation)",
        description="Quantize a copy of the model to INT8 with NNCF (full-resolution level and "
        "output heads in float32), fit it to the FP32 model's probabilities on noisy views of "
        "an exit-wave library, and write it as OpenVINO IR beside the model "
        "(<stem>.int8-openvino.xml/.bin, what it was fitted from in <stem>.int8-openvino.fit."
        "json). openvino-int8 is offered once `segdepth bench parity --candidate "
        "openvino-int8` passes on that graph.",
    )
    _model_option(p)
    p.add_argument(
        "--library",
        required=True,
        type=input_file,
        help="exit-wave library (segdepth simulate --waves) with a seed of neither the "
        "model's data nor the robustness suite",
    )
    config_option(p, "--steps", QAT, type=non_negative_int, help="Adam steps of the fit")
    config_option(p, "--lr", QAT, type=float, help="first Adam step size (cosine decay to 0)")
    config_option(p, "--batch", QAT, type=positive_int, help="noisy views per step")
    config_option(p, "--crop", QAT, type=positive_int, help="view side in px")
    config_option(p, "--views", QAT, type=positive_int, help="clean views rendered for the fit")
    config_option(
        p,
        "--nominal-fraction",
        QAT,
        type=float,
        help="share of the views imaged by the nominal microscope (the rest: microscopes drawn "
        "over the training ranges)",
    )
    config_option(p, "--dose-min", QAT, type=float, help="lowest dose of a view, e-/px")
    config_option(p, "--dose-max", QAT, type=float, help="highest dose of a view, e-/px")
    config_option(p, "--seed", QAT, type=non_negative_int, help="seed of the views and noise")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where the calibration frames are simulated once (default: $SEGDEPTH_CACHE or "
        "~/.cache/segdepth/engine)",
    )
    p.set_defaults(func=_quantize)


def _add_bench_parity(bench) -> None:
    p = bench.add_parser(
        "parity",
        help="INT8 or BF16 against FP32 on the robustness suite: is the candidate offered?",
        description="Column-level accuracy of the candidate backend (default INT8) against "
        "the FP32 onnxruntime graph on every robustness-suite row, same frames. "
        "Writes <model>.<record>.json (int8, int8-openvino, bf16) beside the model; the "
        "candidate is "
        "offered only when no row's column-exact accuracy, pooled over the draws, moves by "
        "more than 0.5 points "
        "(exit code 1 when it does).",
    )
    _model_option(p)
    config_option(
        p,
        "--candidate",
        PARITY,
        choices=["onnxruntime-int8", "openvino-int8", "torch-cpu-bf16"],
        help="backend checked against FP32",
    )
    config_option(p, "--samples", PARITY, type=positive_int, help="frames per row")
    config_option(p, "--crop", PARITY, type=positive_int, help="frame side in px")
    config_option(
        p,
        "--seeds",
        PARITY,
        nargs="+",
        type=non_negative_int,
        help="one draw of every row per seed (other frames and noise), column counts pooled",
    )
    suite_files_options(p, PARITY, dir_field="suite_dir")
    p.add_argument(
        "--out",
        default=None,
        help="record path (default: beside the model, <stem>.<precision>.json)",
    )
    p.set_defaults(func=_parity)


def register(commands, bench) -> None:
    """Add ``export``, ``quantize``, ``serve``, ``bench engine`` and ``bench parity`` to
    ``segdepth``."""
    _add_export(commands)
    _add_quantize(commands)
    _add_serve(commands)
    _add_bench_engine(bench)
    _add_bench_parity(bench)
