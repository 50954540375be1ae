"""Engine subcommands: ``segdepth export``, ``segdepth serve`` and ``segdepth bench engine``."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from streamer import sockets

#: backend names, fastest first (engine.backends.PREFERENCE; kept here so --help needs no torch).
BACKEND_NAMES = ("tensorrt", "torch-cuda", "onnxruntime", "torch-cpu")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


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
        info = {"format": "onnx", "path": str(path), "precision": args.precision,
                "opset": export.OPSET, "dynamic_axes": ["batch", "height", "width"]}
    else:
        profile = export.PlanProfile(max_batch=args.max_batch,
                                     opt_batch=min(args.opt_batch, args.max_batch),
                                     min_side=args.min_side, opt_side=args.min_side,
                                     max_side=args.max_side)
        path = export.build_tensorrt_plan(loaded, out, profile)
        info = {"format": "tensorrt", "path": str(path), "profile": asdict(profile)}
    info.update(model=str(loaded.path), model_id=loaded.model_id, model_sha256=loaded.sha256,
                input=export.INPUT_NAME, outputs=list(export.OUTPUT_NAMES))
    (out / f"{path.stem}.export.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from engine.columns import ColumnConfig
    from engine.serve import ServeConfig, serve

    config = ServeConfig(frames=args.frames, results=args.results,
                         viewer=None if args.viewer == "none" else args.viewer,
                         model=args.model, backend=args.backend, max_batch=args.max_batch,
                         max_wait_ms=args.max_wait_ms, mode=args.mode,
                         queue_frames=args.queue_frames, receive_hwm=args.receive_hwm,
                         exit_on_eos=args.exit_on_eos, tta=args.tta,
                         columns=ColumnConfig(reference_frames=args.reference_frames),
                         hmm=hmm_config(args))
    return serve(config, Path(args.stats) if args.stats else None)


def hmm_config(args: argparse.Namespace):
    """The temporal model from the ``--filter``, ``--change-rate-per-s``, ``--jump-decay``,
    ``--event-threshold`` and ``--class-prior`` options (:func:`hmm_options`)."""
    from dataclasses import replace

    from engine.hmm import FILTERS

    config = FILTERS[args.filter]
    if args.filter == "rate":
        config = replace(config, change_rate_per_s=args.change_rate_per_s,
                         jump_decay=args.jump_decay)
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
    from engine.hmm import HMMConfig

    d = HMMConfig()
    p.add_argument("--filter", choices=["rate", "legacy"], default="rate",
                   help="rate: prior-corrected evidence, multi-atom jumps, rates per second; "
                        "legacy: the filter before issue 10 (+-1 atom, 0.02 per frame)")
    p.add_argument("--change-rate-per-s", type=float, default=d.change_rate_per_s,
                   help=f"expected depth changes per column per second "
                        f"(default {d.change_rate_per_s})")
    p.add_argument("--jump-decay", type=float, default=d.jump_decay,
                   help=f"probability ratio of a (k+1)- to a k-atom change (default "
                        f"{d.jump_decay})")
    p.add_argument("--event-threshold", type=float, default=d.event_threshold,
                   help=f"filtered probability a new depth needs to count as an event "
                        f"(false alarms vs delay; default {d.event_threshold})")
    p.add_argument("--class-prior", default=None,
                   help="depth-class prior the network was trained under, divided out of "
                        "its posteriors: 11 comma-separated frequencies, or 'simulator' "
                        "(estimated from 400 simulated surface models' loss-weighted labels "
                        "at 256^2, ~30 s; engine.model_io.class_prior_from_simulator); "
                        "default: the model meta's class_prior, else uniform (no correction)")


def _bench(args: argparse.Namespace) -> int:
    from engine.bench import BenchConfig, run_bench

    config = BenchConfig(model=args.model, backends=args.backends, sizes=args.sizes,
                         batches=args.batches, iterations=args.iterations,
                         max_seconds=args.max_seconds, seed=args.seed)
    run_bench(config, Path(args.json))
    return 0


def _model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model file (.pt from training.model.save_model); default: the "
                             "bundled model training/models/segdepth_base16.pt")


def register(commands, bench) -> None:
    """Add ``export``, ``serve`` and ``bench engine`` to the ``segdepth`` program."""
    backend_names = ["auto", *BACKEND_NAMES]
    p = commands.add_parser(
        "export", help="export the model to ONNX or a TensorRT plan",
        description="Export the model: ONNX with dynamic batch, height and width axes, or a "
                    "serialized TensorRT plan (FP16, optimisation profile over batch), cached "
                    "by model hash + GPU + TensorRT version. Without TensorRT and a CUDA GPU "
                    "the tensorrt format is skipped with the reason (exit code 0).")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx",
                   help="onnx: a .onnx graph; tensorrt: a .plan for this GPU (default: onnx)")
    _model_option(p)
    p.add_argument("--out", default="exported", help="output directory (default: exported/)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="ONNX precision (fp16: the graph TensorRT builds from; default fp32)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="largest batch (frames) of the TensorRT profile (default 32)")
    p.add_argument("--opt-batch", type=int, default=8,
                   help="batch (frames) TensorRT optimises for (default 8)")
    p.add_argument("--min-side", type=int, default=512,
                   help="smallest frame side in px of the TensorRT profile; also the side it "
                        "optimises for (default 512)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="largest frame side in px of the TensorRT profile (default 1024)")
    p.set_defaults(func=_export)

    p = commands.add_parser(
        "serve", help="the inference engine: frames in, depth/occupancy results out",
        description="Receive frames, batch them (up to --max-batch frames or --max-wait-ms), "
                    "divide by the dose (header dose_e_per_px, e-/px/frame; without it the "
                    "running mean count of the session's frames), infer, track the atomic "
                    "columns and publish one result per frame. Ctrl-C stops it.")
    p.add_argument("--frames", default=sockets.FRAMES_TO_ENGINE,
                   help=f"endpoint the frame source binds (default {sockets.FRAMES_TO_ENGINE})")
    p.add_argument("--results", default=sockets.RESULTS_TO_RECORDER,
                   help=f"endpoint to bind for the recorder (default "
                        f"{sockets.RESULTS_TO_RECORDER})")
    p.add_argument("--viewer", default=sockets.RESULTS_TO_VIEWER,
                   help=f"endpoint to bind for viewers (PUB), or 'none' (default "
                        f"{sockets.RESULTS_TO_VIEWER})")
    _model_option(p)
    p.add_argument("--backend", choices=backend_names, default="auto",
                   help="inference backend; auto: the fastest available (default auto)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="largest batch in frames (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="longest wait in ms after a batch's first frame for more (default 10)")
    p.add_argument("--mode", choices=["auto", "replay", "live"], default="auto",
                   help="replay: serve every frame, wait for the recorder; live: bounded queue, "
                        "skip the oldest frames under overload; auto: each frame's mode header "
                        "(live if absent) (default auto)")
    p.add_argument("--queue-frames", type=int, default=0,
                   help="frames held waiting at most (live mode; default 4 x max-batch)")
    p.add_argument("--receive-hwm", type=int, default=sockets.DEFAULT_HWM,
                   help=f"messages the frame socket may hold beyond the queue (default "
                        f"{sockets.DEFAULT_HWM}); a replay source that exits while frames are "
                        f"still queued on its side loses them after its linger (up to 120 s "
                        f"in replay mode), so for a slow engine raise it to the session's "
                        f"frame count")
    p.add_argument("--reference-frames", type=int, default=8,
                   help="aligned frames averaged into the column reference (default 8)")
    hmm_options(p)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the depth probabilities over the 8 "
                        "flips and quarter turns of each frame (8x the inference cost)")
    p.add_argument("--exit-on-eos", action="store_true",
                   help="exit after forwarding the first end-of-stream message")
    p.add_argument("--stats", default=None,
                   help="write counters, latency percentiles and the config as JSON here on exit")
    p.set_defaults(func=_serve)

    p = bench.add_parser(
        "engine", help="engine throughput and latency per backend vs PyTorch eager FP32",
        description="Frames/s and per-batch latency (p50/p99, ms) of every backend at each "
                    "frame size and batch, beside PyTorch eager FP32 in the same run. Backends "
                    "absent here are listed with the reason (GPU: not run on real hardware).")
    _model_option(p)
    p.add_argument("--backends", default="all",
                   help="comma-separated backends, or all (default all)")
    p.add_argument("--sizes", type=_int_list, default=[512, 1024],
                   help="frame sides in px, comma-separated (default 512,1024)")
    p.add_argument("--batches", type=_int_list, default=[1, 2, 4, 8, 16, 32],
                   help="batch sizes in frames, comma-separated (default 1,2,4,8,16,32)")
    p.add_argument("--iterations", type=int, default=5,
                   help="timed calls per cell after one warm-up call (default 5)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="stop timing a cell after this many seconds (at least one call; "
                        "default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random frames and weights")
    p.add_argument("--json", default="benchmarks/engine.json",
                   help="where to write the figures (default benchmarks/engine.json)")
    p.set_defaults(func=_bench)
