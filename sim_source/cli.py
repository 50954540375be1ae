"""``segdepth simulate`` (training sets and simulated sessions) and ``segdepth bench simulate``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from streamer.cli_support import (
    add_json_option,
    config_option,
    given,
    input_file,
    list_of,
    output_file,
    positive_float,
    positive_int,
)

log = logging.getLogger(__name__)

DATASET = "sim_source.dataset:DatasetConfig"
LIBRARY = "sim_source.wave_library:LibraryConfig"
PARTICLE = "sim_source.particle:ParticleConfig"
OPTICS = "sim_source.hrtem:Optics"
SESSION = "sim_source.session:SessionConfig"
BENCH = "sim_source.bench:BenchConfig"


_INTERRUPTED = threading.Event()


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: remember it (polled between structures) and raise KeyboardInterrupt now."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _optics(args: argparse.Namespace):
    from sim_source.hrtem import Optics

    return Optics(**given(args, "focal_spread_A", "aperture_mrad"))


def _particle(args: argparse.Namespace):
    from sim_source.particle import FACET_NORMALS_DEG, ParticleConfig

    unknown = set(args.facets or ()) - set(FACET_NORMALS_DEG)
    if unknown:
        raise ValueError(
            f"--facets: choose from {', '.join(FACET_NORMALS_DEG)}, got "
            f"{', '.join(sorted(unknown))}"
        )
    settings = given(args, "facets", "carbon_probability", "carbon_thickness_A")
    for name in ("facets", "carbon_thickness_A"):  # lists on the command line
        if name in settings:
            settings[name] = tuple(settings[name])
    return ParticleConfig(**settings)


def dataset_config(args: argparse.Namespace):
    """The sim_source.dataset.DatasetConfig of a ``simulate`` command line (--preset paper:
    1024 px, 9000 images)."""
    from sim_source import dataset

    preset = (
        {"count": dataset.PAPER_TRAIN + dataset.PAPER_VALIDATION, "size": 1024}
        if args.preset == "paper"
        else {}
    )
    return dataset.DatasetConfig(
        optics=_optics(args), **{**preset, **given(args, "count", "size", "seed")}
    )


def library_config(args: argparse.Namespace):
    """The sim_source.wave_library.LibraryConfig of a ``simulate --waves`` command line."""
    from sim_source.wave_library import LibraryConfig

    settings = given(args, "count", "gpts", "seed", "tilt_mrad")
    if "tilt_mrad" in settings:  # a list on the command line
        settings["tilt_mrad"] = tuple(settings["tilt_mrad"])
    return LibraryConfig(particle=_particle(args), **settings)


def session_config(args: argparse.Namespace):
    """The sim_source.session.SessionConfig of a ``simulate --session`` command line."""
    from sim_source.session import SessionConfig

    return SessionConfig(
        optics=_optics(args),
        **given(args, "frames", "seed", "size", "dose_e_per_px", "frame_interval_s", "thermal"),
    )


def _dataset(args: argparse.Namespace) -> int:
    from sim_source import dataset, wave_library

    cfg: Any
    module: ModuleType
    write: Callable[..., int]
    task: Callable[..., Any]
    if args.waves:
        cfg = library_config(args)
        module, write, unit = wave_library, wave_library.write_library, "exit waves"
        task = wave_library.simulate_wave
    else:
        cfg = dataset_config(args)
        module, write, unit = dataset, dataset.write_dataset, f"images of {cfg.size}^2 px"
        task = dataset.simulate_group
    count = cfg.count
    client = cluster = None
    if args.scheduler or args.workers > 1:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.WARNING)
        if not args.scheduler:  # long-lived workers: JIT and FFT plans paid once per worker
            cluster = LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
            )
        client = Client(args.scheduler or cluster)
        runner = dataset.run_dask(client, task)
    else:
        runner = module.run_inline
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        done = write(
            args.out, cfg, runner, resume=args.resume, interrupted=lambda: _INTERRUPTED.is_set()
        )
    except KeyboardInterrupt:
        import h5py

        done = 0
        if os.path.exists(args.out):
            with h5py.File(args.out, "r") as f:
                done = int(f.attrs.get("n_complete", 0))
        log.warning(
            "interrupted: %s holds %d of %d; complete it with --resume", args.out, done, count
        )
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        _INTERRUPTED.clear()
        for closable in (client, cluster):
            if closable is not None:
                closable.close()
    log.info("wrote %s: %d %s", args.out, done, unit)
    return 0


def _session(args: argparse.Namespace) -> int:
    from sim_source.session import write_session

    cfg = session_config(args)
    write_session(args.out, cfg)
    log.info("wrote session %s: %d frames of %d^2 px", args.out, cfg.frames, cfg.size)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    return _session(args) if args.session else _dataset(args)


def _bench(args: argparse.Namespace) -> int:
    from sim_source.bench import BenchConfig, run_bench

    run_bench(BenchConfig(**given(args, "size", "structures", "defocus")), args.json)
    return 0


def register(commands, bench) -> None:
    """Add ``simulate`` to ``segdepth`` and ``simulate`` to ``segdepth bench``."""
    p = commands.add_parser(
        "simulate",
        help="simulate a training set or a session (abTEM multislice, HDF5)",
        description="Simulate CeO2 [110] surface images with depth labels (HDF5 'Dataset "
        "file'), or with --session a noisy drifting frame series with known column "
        "occupancy ('Session file'). Pixel size ≈ 5.3 pm (simulated at ≈ 2.65 pm "
        "and binned 2x); 300 kV, C3 = -9 µm, C5 = 5 mm, defocus 1-9 nm "
        "(C10 = +defocus). "
        "Ctrl-C leaves a valid file (attribute n_complete); --resume completes it.",
    )
    _dataset_options(p)
    _library_options(p)
    o = p.add_argument_group("partial coherence (quasi-coherent envelopes of abTEM's CTF)")
    config_option(
        o,
        "--focal-spread-A",
        OPTICS,
        type=float,
        help="focal spread in Å (1/e half-width, abTEM's definition; 0 = coherent)",
    )
    config_option(
        o,
        "--aperture-mrad",
        OPTICS,
        type=float,
        help="objective aperture semi-angle in mrad (soft edge)",
    )
    _session_options(p)
    p.set_defaults(func=_simulate)
    _add_band_limit(commands)
    _add_bench(bench)


def _band_limit(args: argparse.Namespace) -> int:
    from sim_source.wave_library import write_band_limited

    n = write_band_limited(args.input, args.output, args.k_max_inv_A)
    log.info("wrote %s: %d structures band-limited to %g 1/Å", args.output, n, args.k_max_inv_A)
    return 0


def _add_band_limit(commands) -> None:
    p = commands.add_parser(
        "band-limit",
        help="a small copy of an exit-wave library, cut to the spatial frequencies imaged",
        description="Copy an exit-wave library (simulate --waves) keeping each wave's Fourier "
        "coefficients up to --k-max-inv-A along each axis, as float16: about 1/40 of the "
        "size, to carry to a GPU machine for training. Images from the copy match the "
        "original wherever aperture or focal spread cut the CTF below the limit (3 1/Å: "
        "every draw of the training optics except no aperture with a focal spread under "
        "about 5 Å); the float16 coefficients add about 1e-3 of the vacuum intensity.",
    )
    p.add_argument("input", type=input_file, help="exit-wave library (HDF5)")
    p.add_argument("output", type=output_file, help="band-limited copy (HDF5)")
    p.add_argument(
        "--k-max-inv-A",
        type=positive_float,
        default=3.0,
        help="band limit per axis in 1/Å (3.0 is 59 mrad at 300 kV)",
    )
    p.set_defaults(func=_band_limit)


def _dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=output_file, help="output HDF5 file")
    config_option(
        p,
        "--seed",
        DATASET,
        type=int,
        help="random seed (the file is a function of seed, count, size, preset and optics)",
    )
    p.add_argument(
        "--size",
        type=positive_int,
        default=None,
        help="output image size in pixels at ≈ 5.3 pm/px (default: 512, the "
        "dataset's and the session's; 1024 with --preset paper)",
    )
    p.add_argument(
        "--count",
        type=positive_int,
        default=None,
        help="number of images or exit waves (default: 8; 9000 with --preset paper)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=min(4, os.cpu_count() or 1),
        help="local Dask worker processes (1: simulate in this process; default min(4, CPU cores))",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask.distributed scheduler (overrides --workers)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="complete an interrupted file (same seed/count/size) instead of overwriting it",
    )
    p.add_argument(
        "--preset",
        choices=["paper"],
        help="paper: 1024 px, 9000 images (first 7000 training, last 2000 validation)",
    )


def _library_options(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group(
        "exit-wave library (--waves): optics, orientation and dose are "
        "drawn later, on the fly, by `segdepth train`"
    )
    w.add_argument(
        "--waves",
        action="store_true",
        help="write an exit-wave library of random faceted particles ({110}, {100}, "
        "{111} facets, steps, wedges, vacancies of both species, frozen-phonon "
        "snapshot, optional amorphous carbon film) instead of images",
    )
    config_option(
        w,
        "--gpts",
        LIBRARY,
        type=positive_int,
        help="simulated pixels per side at 2.65 pm (768 = 20.4 Å field)",
    )
    config_option(
        w,
        "--tilt-mrad",
        LIBRARY,
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="specimen tilt off the zone axis, mrad: magnitude drawn in this range per "
        "structure, in a random direction (labels follow the columns' tilted images)",
    )
    config_option(
        w,
        "--facets",
        PARTICLE,
        **list_of(str),
        help="facet families the particle cuts are drawn from (comma- or space-separated)",
    )
    config_option(
        w,
        "--carbon-probability",
        PARTICLE,
        type=float,
        help="chance that a structure sits on an amorphous carbon film",
    )
    config_option(
        w,
        "--carbon-thickness-A",
        PARTICLE,
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="film thickness range in Å",
    )


def _session_options(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("simulated session (--session)")
    s.add_argument(
        "--session",
        action="store_true",
        help="write a session file: frames of one structure whose surface O "
        "columns lose and regain atoms, with drift and Poisson noise",
    )
    config_option(s, "--frames", SESSION, type=positive_int, help="number of frames")
    config_option(
        s,
        "--dose",
        SESSION,
        dest="dose_e_per_px",
        type=positive_float,
        metavar="DOSE",
        help="dose λ: mean counts of a vacuum pixel per frame (e-/px)",
    )
    config_option(
        s,
        "--frame-interval-s",
        SESSION,
        type=positive_float,
        help="time between frames in s (0.13: the paper's K3 rate)",
    )
    s.add_argument(
        "--static-lattice",
        dest="thermal",
        action="store_const",
        const=False,
        default=None,
        help="atoms on a static lattice (default: one frozen-phonon snapshot, as in training)",
    )


def _add_bench(bench) -> None:
    b = bench.add_parser(
        "simulate",
        help="simulated images/s, exit-wave reuse vs. abTEM per (structure, defocus) pair",
        description="Images per second of our path (one multislice per structure, a CTF per "
        "defocus) against running abTEM's full pipeline once per (structure, "
        "defocus) pair, in the same run. Prints a table, writes JSON.",
    )
    config_option(
        b,
        "--size",
        BENCH,
        type=positive_int,
        help="output pixels per side (simulated at twice that)",
    )
    config_option(b, "--structures", BENCH, type=positive_int, help="structures")
    config_option(b, "--defocus", BENCH, type=positive_int, help="defocus values per structure")
    add_json_option(b, "benchmarks/simulate.json")
    b.set_defaults(func=_bench)
