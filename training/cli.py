"""``segdepth train``, ``segdepth evaluate``, ``segdepth predict`` and ``segdepth bench train``.

Defaults are the config dataclasses' (training.train.TrainConfig, training.model.UNetConfig,
training.labels.TargetConfig, training.evaluate.EvaluateConfig, training.robustness.SuiteConfig,
training.bench.BenchConfig, training.predict.predict_file), read through streamer.cli_support;
torch is imported only to run a command or show its help."""

from __future__ import annotations

import argparse

from streamer.cli_support import (
    add_json_option,
    config_option,
    given,
    input_file,
    list_of,
    output_file,
    positive_int,
)

TRAIN = "training.train:TrainConfig"
UNET = "training.model:UNetConfig"
TARGETS = "training.labels:TargetConfig"
EVALUATE = "training.evaluate:EvaluateConfig"
SUITE = "training.robustness:SuiteConfig"
PREDICT = "training.predict:predict_file"
BENCH = "training.bench:BenchConfig"


def train_config(args: argparse.Namespace):
    """The training.train.TrainConfig of a ``train`` command line (``--resume``: the run's saved
    config, whose epochs alone ``--epochs`` may extend)."""
    from pathlib import Path

    from training.labels import TargetConfig
    from training.model import UNetConfig
    from training.train import TrainConfig

    config_path = Path(args.out) / "config.json"
    if args.resume and config_path.exists():
        cfg = TrainConfig.from_json(config_path.read_text())
        if args.epochs is not None:
            cfg.epochs = args.epochs  # extending a finished run is the one allowed change
        if args.render_workers is not None:
            cfg.render_workers = args.render_workers  # a machine's, not the run's, property
        return cfg
    options = given(
        args,
        "val",
        "noise_lambda",
        "epochs",
        "batch_size",
        "accumulate",
        "freeze_bn",
        "lr",
        "patience",
        "time_limit_min",
        "val_limit",
        "limit",
        "threads",
        "precision",
        "seed",
        "views_per_wave",
        "val_count",
        "init",
        "render_workers",
        "render_on_device",
    )
    if args.crop is not None:
        options["crop"] = args.crop or None  # 0: whole images
    if args.dose_range:
        options["dose_range"] = tuple(args.dose_range)
    return TrainConfig(
        data=args.data,
        out=args.out,
        model=UNetConfig(
            **given(
                args, "base_channels", "max_channels", "upsampling", "extra_blocks", "median_kernel"
            )
        ),
        targets=TargetConfig(
            **given(args, "ring_width_pm", "weight_sigma_pm", "background_weight")
        ),
        **options,
    )


def _train(args: argparse.Namespace) -> int:
    from training.train import train

    train(train_config(args), resume=args.resume, progress=not args.no_progress, force=args.force)
    return 0


def evaluate_config(args: argparse.Namespace):
    """The training.evaluate.EvaluateConfig of an ``evaluate`` command line."""
    from training.evaluate import EvaluateConfig

    return EvaluateConfig(
        data=args.data,
        out=args.out,
        **given(
            args,
            "model",
            "val",
            "noise_lambda",
            "sweep_lambdas",
            "limit",
            "batch_size",
            "seed",
            "threads",
        ),
    )


def suite_config(args: argparse.Namespace):
    """The training.robustness.SuiteConfig of an ``evaluate --suite robustness`` command line
    (``--limit``: samples per row)."""
    from training.model import bundled_model_path
    from training.robustness import SuiteConfig

    models = [args.model or str(bundled_model_path()), *args.compare]
    options = given(args, "out", "directory", "scale", "gpts", "crop", "seed", "threads", "tta")
    if args.limit is not None:
        options["samples"] = args.limit
    return SuiteConfig(models=models, **options)


def _evaluate(args: argparse.Namespace) -> int:
    if args.suite:
        from training.robustness import markdown_table, run_suite

        print(markdown_table(run_suite(suite_config(args))), end="")
        return 0
    if not args.data or not args.out:
        raise ValueError("--data and --out are needed (or --suite robustness)")
    from training.evaluate import evaluate

    evaluate(evaluate_config(args))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from training.predict import predict_file

    predict_file(
        args.input,
        args.output,
        **given(args, "model_path", "probabilities", "batch_size", "temperature", "tta"),
    )
    return 0


def bench_config(args: argparse.Namespace):
    """The training.bench.BenchConfig of a ``bench train`` command line."""
    from training.bench import BenchConfig

    return BenchConfig(
        **given(
            args,
            "sizes",
            "model",
            "repeats",
            "threads",
            "library",
            "library_crop",
            "library_batches",
        )
    )


def _bench(args: argparse.Namespace) -> int:
    from training.bench import run_bench

    run_bench(bench_config(args), args.json)
    return 0


def _add_train(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train the SegDepth UNet on a simulated dataset file",
        description="Train the UNet (paper III-C): fresh Poisson noise every epoch, weighted "
        "cross-entropy on smoothed labels, Adam + warm-up/cosine schedule, early "
        "stopping on the validation loss. Writes RUN/config.json, metrics.jsonl, "
        "checkpoint.pt and model.pt. Several GPUs: torchrun --nproc-per-node N "
        "-m segdepth train ...",
    )
    p.add_argument(
        "--data",
        required=True,
        type=input_file,
        help="training dataset file, or an exit-wave library (segdepth simulate "
        "--waves): then every sample gets a new microscope, angle and dose",
    )
    p.add_argument(
        "--val",
        type=input_file,
        help="validation dataset file (default: hold out 10%% of --data); "
        "with a library, another library of its own seed",
    )
    p.add_argument("--out", required=True, help="run directory")
    _model_options(p)
    config_option(
        p,
        "--noise-lambda",
        TRAIN,
        type=float,
        help="dose λ: mean counts per vacuum pixel of the training noise",
    )
    config_option(p, "--epochs", TRAIN, type=positive_int, help="epochs")
    config_option(
        p,
        "--crop",
        TRAIN,
        type=int,
        help="random crop side in px, a multiple of 32; 0 = whole images",
    )
    config_option(p, "--batch-size", TRAIN, type=positive_int, help="images per step and process")
    config_option(
        p,
        "--accumulate",
        TRAIN,
        type=positive_int,
        help="batches whose gradients are summed per optimiser step (an effective batch of "
        "--batch-size × this, e.g. a GPU run's batch on a CPU)",
    )
    config_option(
        p,
        "--freeze-bn",
        TRAIN,
        action="store_true",
        help="BatchNorm layers keep the running statistics of --init and normalise with them "
        "(for fine-tuning at small batches)",
    )
    config_option(p, "--lr", TRAIN, type=float, help="peak Adam learning rate")
    config_option(
        p,
        "--patience",
        TRAIN,
        type=positive_int,
        help="epochs without a better validation loss before stopping",
    )
    config_option(
        p,
        "--time-limit-min",
        TRAIN,
        type=float,
        help="stop after this many minutes of wall time, keeping the best epoch",
    )
    _target_options(p)
    config_option(
        p,
        "--val-limit",
        TRAIN,
        type=positive_int,
        help="validation images used per epoch (default all)",
    )
    config_option(p, "--limit", TRAIN, type=positive_int, help="training images used (default all)")
    config_option(
        p, "--threads", TRAIN, type=positive_int, help="torch CPU threads (default torch's)"
    )
    config_option(
        p,
        "--precision",
        TRAIN,
        choices=["auto", "fp32", "bf16"],
        help="bf16: forward pass and loss under bfloat16 autocast (weights, optimiser and "
        "validation stay float32); auto: bf16 on a CPU with AMX or AVX512-BF16, else fp32",
    )
    config_option(p, "--seed", TRAIN, type=int, help="random seed")
    _library_training_options(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue RUN/checkpoint.pt with RUN/config.json (--epochs may extend it, "
        "--render-workers change)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start afresh in a run directory that already holds a run (its "
        "checkpoint and metrics log are replaced)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _model_options(p: argparse.ArgumentParser) -> None:
    config_option(
        p,
        "--base-channels",
        UNET,
        type=positive_int,
        help="channels of the first scale (doubled per scale)",
    )
    config_option(
        p, "--max-channels", UNET, type=positive_int, help="cap on channels at the coarse scales"
    )
    config_option(
        p, "--upsampling", UNET, choices=("bilinear", "transposed"), help="decoder upsampling"
    )
    config_option(
        p,
        "--extra-blocks",
        UNET,
        action="store_true",
        help="two extra double-conv blocks before the heads (section III-C)",
    )
    config_option(
        p,
        "--median-kernel",
        UNET,
        type=int,
        help="median filter over depth logits, px (paper: 4; 0 = off)",
    )


def _target_options(p: argparse.ArgumentParser) -> None:
    config_option(
        p,
        "--ring-width-pm",
        TARGETS,
        type=float,
        help="width of the smoothed-label rings around each column (Fig. 4), pm; "
        "e.g. 16; 0 = off: rings count as hallucinations against disk labels",
    )
    config_option(
        p,
        "--weight-sigma-pm",
        TARGETS,
        type=float,
        help="Gaussian σ of the loss weights around column centres, pm",
    )
    config_option(
        p, "--background-weight", TARGETS, type=float, help="loss weight far from any column"
    )


def _library_training_options(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("exit-wave library training")
    w.add_argument(
        "--dose-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="draw λ log-uniformly in [LO, HI] counts per vacuum pixel per sample "
        "(e.g. 0.5 10; default: --noise-lambda for all)",
    )
    config_option(
        w,
        "--views-per-wave",
        TRAIN,
        type=positive_int,
        help="crops rendered per optics draw of one structure",
    )
    config_option(
        w,
        "--val-count",
        TRAIN,
        type=positive_int,
        help="validation samples rendered from the --val library",
    )
    config_option(
        w,
        "--init",
        TRAIN,
        type=input_file,
        help="model file whose weights start the run (same architecture)",
    )
    config_option(
        w,
        "--render-workers",
        TRAIN,
        type=positive_int,
        help="processes rendering library samples for the network; on a GPU machine about "
        "its CPU count, since rendering then sets the pace",
    )
    config_option(
        w,
        "--render-on-device",
        TRAIN,
        action="store_true",
        help="render library samples on the training device (a GPU) in the training process "
        "instead: the same draws and images as the CPU path (--ring-width-pm 0 only)",
    )


def _add_evaluate(commands) -> None:
    p = commands.add_parser(
        "evaluate",
        help="paper metrics, confusion, calibration, gradients, noise sweep",
        description="Evaluate a model on a test dataset file at a noise level: the four metrics "
        "of section IV-A, confusion matrix (Fig. 6), reliability diagram + ECE and "
        "temperature scaling (Fig. 7), input gradients (eq. 7, Fig. 8) and a sweep "
        "over λ (Fig. 9). Writes REPORT/report.json and PNG figures.",
    )
    p.add_argument(
        "--model", default=None, type=input_file, help="model file (default: the bundled model)"
    )
    p.add_argument("--data", type=input_file, help="test dataset file (segdepth simulate)")
    p.add_argument(
        "--val",
        default=None,
        type=input_file,
        help="validation file to fit the temperature on (default: first half of --data "
        "is used for the fit and reported separately)",
    )
    p.add_argument("--out", help="report directory (suite default: training/models/robustness)")
    config_option(
        p,
        "--noise-lambda",
        EVALUATE,
        type=float,
        help="dose λ of the test noise, counts per vacuum pixel",
    )
    _suite_options(p)
    config_option(
        p,
        "--sweep",
        EVALUATE,
        dest="sweep_lambdas",
        **list_of(float),
        help="λ values of the noise-generalisation sweep (comma- or space-separated)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="test images used (default all; suite: samples per row, default 48)",
    )
    config_option(p, "--batch-size", EVALUATE, type=positive_int, help="images per forward pass")
    config_option(p, "--threads", EVALUATE, type=positive_int, help="torch CPU threads")
    config_option(p, "--seed", EVALUATE, type=int, help="seed of the test noise")
    p.set_defaults(func=_evaluate)


def _suite_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group(
        "robustness suite (--suite robustness): rows off the training "
        "distribution; JSON, Markdown and PNG"
    )
    r.add_argument(
        "--suite",
        choices=["robustness"],
        default=None,
        help="run the robustness suite instead of the single-file report",
    )
    r.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="further model files in the same table (e.g. the previous model)",
    )
    suite_files_options(r, SUITE, dir_field="directory")
    config_option(
        r,
        "--suite-crop",
        SUITE,
        dest="crop",
        type=positive_int,
        help="side of each evaluated view, px",
    )
    config_option(
        r,
        "--tta",
        SUITE,
        action="store_true",
        help="also read every model with test-time augmentation (the 8 flips and quarter turns "
        "averaged, as serve --tta; 8x the inference cost), beside the plain reading",
    )


def suite_files_options(p, config: str, dir_field: str) -> None:
    """``--suite-dir``, ``--suite-scale``, ``--suite-gpts``: where the robustness suite's test
    files are and how they are simulated when missing (fields ``dir_field``, ``scale`` and
    ``gpts`` of ``config``)."""
    config_option(
        p,
        "--suite-dir",
        config,
        dest=dir_field,
        help="where the suite's test files are read, or built when missing",
    )
    config_option(
        p,
        "--suite-scale",
        config,
        dest="scale",
        type=float,
        help="fraction of the suite's structures simulated (1: 48 mixed, 16 per "
        "facet/film/legacy file)",
    )
    config_option(
        p,
        "--suite-gpts",
        config,
        dest="gpts",
        type=positive_int,
        help="simulated pixels per side of the suite's exit waves",
    )


def _add_predict(commands) -> None:
    p = commands.add_parser(
        "predict",
        help="depth / confidence / species maps for the images of an HDF5 file",
        description="Run a model on IN.h5 (`images` (N,H,W) float32, vacuum mean 1, attribute "
        "pixel_size_pm) and write OUT.h5 with `depth` (N,H,W) uint8, `confidence` "
        "(N,H,W) float32, `species` (N,H,W) uint8 (0 bg, 1 Ce, 2 O) and optionally "
        "`probabilities` (N,11,H,W) float32. Any H, W.",
    )
    p.add_argument("input", type=input_file, help="input HDF5 file")
    p.add_argument("output", type=output_file, help="output HDF5 file")
    p.add_argument(
        "--model",
        dest="model_path",
        default=None,
        type=input_file,
        help="model file (default: the bundled model)",
    )
    config_option(
        p,
        "--probabilities",
        PREDICT,
        action="store_true",
        help="also write the 11 depth probabilities per pixel",
    )
    config_option(p, "--batch-size", PREDICT, type=positive_int, help="images per forward pass")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="softmax temperature (default: the model's fitted one, else 1)",
    )
    config_option(
        p,
        "--tta",
        PREDICT,
        action="store_true",
        help="test-time augmentation: average over the 8 flips and quarter turns "
        "(8x the inference cost)",
    )
    p.set_defaults(func=_predict)


def _add_bench(bench) -> None:
    p = bench.add_parser(
        "train",
        help="training samples/s and inference frames/s per backend",
        description="Training samples/s and inference frames/s of the UNet at each size per "
        "backend on this machine (torch-cpu FP32, torch-cuda, onnxruntime when "
        "installed). Prints a table, writes JSON.",
    )
    config_option(
        p,
        "--sizes",
        BENCH,
        **list_of(positive_int),
        help="square image sides, px (comma- or space-separated)",
    )
    config_option(
        p,
        "--model",
        BENCH,
        type=input_file,
        help="model file (default: bundled model, else an untrained base-16 UNet)",
    )
    config_option(p, "--repeats", BENCH, type=positive_int, help="timed repetitions")
    config_option(p, "--threads", BENCH, type=positive_int, help="torch CPU threads")
    config_option(
        p,
        "--library",
        BENCH,
        type=input_file,
        help="exit-wave library: also time training with on-the-fly optics against "
        "pre-rendered images of it (batch 8), in the same run",
    )
    config_option(p, "--library-crop", BENCH, type=positive_int, help="crop side, px")
    config_option(
        p, "--library-batches", BENCH, type=positive_int, help="timed batches per data path"
    )
    add_json_option(p, "benchmarks/train.json")
    p.set_defaults(func=_bench)


def register(commands, bench) -> None:
    """Add train / evaluate / predict to ``segdepth`` and ``train`` to ``segdepth bench``."""
    _add_train(commands)
    _add_evaluate(commands)
    _add_predict(commands)
    _add_bench(bench)
