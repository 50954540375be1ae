"""``segdepth train``, ``segdepth evaluate``, ``segdepth predict`` and ``segdepth bench train``."""
from __future__ import annotations

import argparse
import functools
import sys


def _clear_errors(handler):
    """Bad input (missing file, wrong layout) ends with one readable line and exit code 2."""
    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FileNotFoundError, ValueError, OSError) as exc:
            print(f"segdepth {args.command}: error: {exc}", file=sys.stderr)
            return 2
    return run


@_clear_errors
def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.labels import TargetConfig
    from training.model import UNetConfig
    from training.train import TrainConfig, train

    config_path = Path(args.out) / "config.json"
    if args.resume and config_path.exists():
        cfg = TrainConfig.from_json(config_path.read_text())
        if args.epochs is not None:
            cfg.epochs = args.epochs  # extending a finished run is the one allowed change
    else:
        cfg = TrainConfig(
            data=args.data, val=args.val, out=args.out,
            model=UNetConfig(base_channels=args.base_channels, max_channels=args.max_channels,
                             upsampling=args.upsampling, extra_blocks=args.extra_blocks,
                             median_kernel=args.median_kernel),
            targets=TargetConfig(ring_width_pm=args.ring_width_pm,
                                 weight_sigma_pm=args.weight_sigma_pm,
                                 background_weight=args.background_weight),
            noise_lambda=args.noise_lambda, epochs=args.epochs or 30,
            crop=args.crop or None, batch_size=args.batch_size, lr=args.lr,
            patience=args.patience, time_limit_min=args.time_limit_min,
            val_limit=args.val_limit, limit=args.limit, threads=args.threads, seed=args.seed,
            dose_range=tuple(args.dose_range) if args.dose_range else None,
            views_per_wave=args.views_per_wave, val_count=args.val_count, init=args.init)
    train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0


@_clear_errors
def _evaluate(args: argparse.Namespace) -> int:
    if args.suite:
        return _suite(args)
    if not args.data or not args.out:
        raise ValueError("--data and --out are needed (or --suite robustness)")
    from training.evaluate import EvaluateConfig, evaluate

    evaluate(EvaluateConfig(model=args.model, data=args.data, out=args.out, val=args.val,
                            noise_lambda=args.noise_lambda, sweep_lambdas=args.sweep,
                            limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                            threads=args.threads))
    return 0


def _suite(args: argparse.Namespace) -> int:
    from training.model import bundled_model_path
    from training.robustness import SuiteConfig, markdown_table, run_suite

    models = [args.model or str(bundled_model_path()), *args.compare]
    report = run_suite(SuiteConfig(models=models, directory=args.suite_dir,
                                   out=args.out or "training/models/robustness",
                                   samples=args.limit or 48, scale=args.suite_scale,
                                   gpts=args.suite_gpts, crop=args.suite_crop, seed=args.seed,
                                   threads=args.threads))
    print(markdown_table(report), end="")
    return 0


@_clear_errors
def _predict(args: argparse.Namespace) -> int:
    from training.predict import predict_file

    predict_file(args.input, args.output, args.model, args.probabilities, args.batch_size,
                 args.temperature, args.tta)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from training.bench import run_bench

    run_bench(args.sizes, args.json, args.model, args.repeats, args.threads, args.library,
              args.library_crop, args.library_batches)
    return 0


def register(commands, bench) -> None:
    """Add train / evaluate / predict to ``segdepth`` and ``train`` to ``segdepth bench``."""
    p = commands.add_parser(
        "train", help="train the SegDepth UNet on a simulated dataset file",
        description="Train the UNet (paper III-C): fresh Poisson noise every epoch, weighted "
                    "cross-entropy on smoothed labels, Adam + warm-up/cosine schedule, early "
                    "stopping on the validation loss. Writes RUN/config.json, metrics.jsonl, "
                    "checkpoint.pt and model.pt. Several GPUs: torchrun --nproc-per-node N "
                    "-m segdepth train ...")
    p.add_argument("--data", required=True,
                   help="training dataset file, or an exit-wave library (segdepth simulate "
                        "--waves): then every sample gets a new microscope, angle and dose")
    p.add_argument("--val", help="validation dataset file (default: hold out 10%% of --data); "
                                 "with a library, another library of its own seed")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--base-channels", type=int, default=16,
                   help="channels of the first scale (doubled per scale) (default 16)")
    p.add_argument("--max-channels", type=int, default=128,
                   help="cap on channels at the coarse scales (default 128)")
    p.add_argument("--upsampling", choices=("bilinear", "transposed"), default="bilinear",
                   help="decoder upsampling (default bilinear)")
    p.add_argument("--extra-blocks", action="store_true",
                   help="two extra double-conv blocks before the heads (section III-C)")
    p.add_argument("--median-kernel", type=int, default=0,
                   help="median filter over depth logits, px (paper: 4; default 0 = off)")
    p.add_argument("--noise-lambda", type=float, default=2.5,
                   help="dose λ: mean counts per vacuum pixel of the training noise (default 2.5)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 30)")
    p.add_argument("--crop", type=int, default=128,
                   help="random crop side in px, a multiple of 32; 0 = whole images (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step and process (default 8)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (default 2e-3)")
    p.add_argument("--patience", type=int, default=8,
                   help="epochs without a better validation loss before stopping (default 8)")
    p.add_argument("--time-limit-min", type=float, default=None,
                   help="stop after this many minutes of wall time, keeping the best epoch")
    p.add_argument("--ring-width-pm", type=float, default=0.0,
                   help="width of the smoothed-label rings around each column (Fig. 4), pm; "
                        "e.g. 16; 0 = off: rings count as hallucinations against disk labels "
                        "(default 0)")
    p.add_argument("--weight-sigma-pm", type=float, default=60.0,
                   help="Gaussian σ of the loss weights around column centres, pm (default 60)")
    p.add_argument("--background-weight", type=float, default=0.2,
                   help="loss weight far from any column (default 0.2)")
    p.add_argument("--val-limit", type=int, default=None,
                   help="validation images used per epoch (default all)")
    p.add_argument("--limit", type=int, default=None, help="training images used (default all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    w = p.add_argument_group("exit-wave library training")
    w.add_argument("--dose-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="draw λ log-uniformly in [LO, HI] counts per vacuum pixel per sample "
                        "(e.g. 0.5 10; default: --noise-lambda for all)")
    w.add_argument("--views-per-wave", type=int, default=4,
                   help="crops rendered per optics draw of one structure (default 4)")
    w.add_argument("--val-count", type=int, default=64,
                   help="validation samples rendered from the --val library (default 64)")
    w.add_argument("--init", default=None,
                   help="model file whose weights start the run (same architecture)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN/checkpoint.pt with RUN/config.json (--epochs may extend it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = commands.add_parser(
        "evaluate", help="paper metrics, confusion, calibration, gradients, noise sweep",
        description="Evaluate a model on a test dataset file at a noise level: the four metrics "
                    "of section IV-A, confusion matrix (Fig. 6), reliability diagram + ECE and "
                    "temperature scaling (Fig. 7), input gradients (eq. 7, Fig. 8) and a sweep "
                    "over λ (Fig. 9). Writes REPORT/report.json and PNG figures.")
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--data", help="test dataset file (segdepth simulate)")
    p.add_argument("--val", default=None,
                   help="validation file to fit the temperature on (default: first half of --data "
                        "is used for the fit and reported separately)")
    p.add_argument("--out", help="report directory (suite default: training/models/robustness)")
    p.add_argument("--noise-lambda", type=float, default=2.5,
                   help="dose λ of the test noise, counts per vacuum pixel (default 2.5)")
    r = p.add_argument_group("robustness suite (--suite robustness): rows off the training "
                             "distribution; JSON, Markdown and PNG")
    r.add_argument("--suite", choices=["robustness"], default=None,
                   help="run the robustness suite instead of the single-file report")
    r.add_argument("--compare", nargs="*", default=[],
                   help="further model files in the same table (e.g. the previous model)")
    r.add_argument("--suite-dir", default="data/suite",
                   help="where the suite's test files are read, or built when missing "
                        "(default data/suite)")
    r.add_argument("--suite-scale", type=float, default=1.0,
                   help="fraction of the suite's structures simulated (default 1: 48 mixed, "
                        "16 per facet/film/legacy file)")
    r.add_argument("--suite-gpts", type=int, default=768,
                   help="simulated pixels per side of the suite's exit waves (default 768)")
    r.add_argument("--suite-crop", type=int, default=192,
                   help="side of each evaluated view, px (default 192)")
    p.add_argument("--sweep", type=float, nargs="*", default=[0.5, 1.0, 2.5, 5.0, 10.0, 50.0],
                   help="λ values of the noise-generalisation sweep (default 0.5 1 2.5 5 10 50)")
    p.add_argument("--limit", type=int, default=None,
                   help="test images used (default all; suite: samples per row, default 48)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the test noise (default 0)")
    p.set_defaults(func=_evaluate)

    p = commands.add_parser(
        "predict", help="depth / confidence / species maps for the images of an HDF5 file",
        description="Run a model on IN.h5 (`images` (N,H,W) float32, vacuum mean 1, attribute "
                    "pixel_size_pm) and write OUT.h5 with `depth` (N,H,W) uint8, `confidence` "
                    "(N,H,W) float32, `species` (N,H,W) uint8 (0 bg, 1 Ce, 2 O) and optionally "
                    "`probabilities` (N,11,H,W) float32. Any H, W.")
    p.add_argument("input", help="input HDF5 file")
    p.add_argument("output", help="output HDF5 file")
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--probabilities", action="store_true",
                   help="also write the 11 depth probabilities per pixel")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--temperature", type=float, default=None,
                   help="softmax temperature (default: the model's fitted one, else 1)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average over the 8 flips and quarter turns "
                        "(8x the inference cost)")
    p.set_defaults(func=_predict)

    p = bench.add_parser(
        "train", help="training samples/s and inference frames/s per backend",
        description="Training samples/s and inference frames/s of the UNet at each size per "
                    "backend on this machine (torch-cpu FP32, torch-cuda, onnxruntime when "
                    "installed). Prints a table, writes JSON.")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024],
                   help="square image sides, px (default 512 1024)")
    p.add_argument("--model", default=None,
                   help="model file (default: bundled model, else an untrained base-16 UNet)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--library", default=None,
                   help="exit-wave library: also time training with on-the-fly optics against "
                        "pre-rendered images of it (batch 8), in the same run")
    p.add_argument("--library-crop", type=int, default=128, help="crop side, px (default 128)")
    p.add_argument("--library-batches", type=int, default=10,
                   help="timed batches per data path (default 10)")
    p.add_argument("--json", default="benchmarks/train.json",
                   help="JSON output path (default benchmarks/train.json)")
    p.set_defaults(func=_bench)
