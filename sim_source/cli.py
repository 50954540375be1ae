"""``segdepth simulate`` (training sets and simulated sessions) and ``segdepth bench simulate``."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


_INTERRUPTED = threading.Event()


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: remember it (polled between structures) and raise KeyboardInterrupt now."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _optics(args: argparse.Namespace):
    from sim_source.hrtem import Optics
    return Optics(focal_spread_A=args.focal_spread_A, aperture_mrad=args.aperture_mrad)


def _particle(args: argparse.Namespace):
    from sim_source.particle import FACET_NORMALS_DEG, ParticleConfig
    facets = tuple(f for f in args.facets.replace(",", " ").split() if f)
    unknown = set(facets) - set(FACET_NORMALS_DEG)
    if unknown or not facets:
        raise ValueError(f"--facets: choose from {', '.join(FACET_NORMALS_DEG)}, got "
                         f"{args.facets!r}")
    return ParticleConfig(facets=facets, carbon_probability=args.carbon_probability,
                          carbon_thickness_A=tuple(args.carbon_thickness_A))


def _dataset(args: argparse.Namespace) -> int:
    from sim_source import dataset, wave_library
    if args.waves:
        count = args.count or 8
        cfg = wave_library.LibraryConfig(count=count, gpts=args.gpts, seed=args.seed,
                                         particle=_particle(args))
        module, write, unit = wave_library, wave_library.write_library, "exit waves"
        task = wave_library.simulate_wave
    else:
        paper = args.preset == "paper"
        count = args.count or (dataset.PAPER_TRAIN + dataset.PAPER_VALIDATION if paper else 8)
        size = args.size or (1024 if paper else 512)
        cfg = dataset.DatasetConfig(count=count, size=size, seed=args.seed, optics=_optics(args))
        module, write, unit = dataset, dataset.write_dataset, f"images of {size}^2 px"
        task = dataset.simulate_group
    client = cluster = None
    if args.scheduler or args.workers > 1:
        from distributed import Client, LocalCluster
        logging.getLogger("distributed").setLevel(logging.WARNING)
        if not args.scheduler:  # long-lived workers: JIT and FFT plans paid once per worker
            cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                   processes=True, dashboard_address=None)
        client = Client(args.scheduler or cluster)
        runner = dataset.run_dask(client, task)
    else:
        runner = module.run_inline
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        done = write(args.out, cfg, runner, resume=args.resume,
                     interrupted=lambda: _INTERRUPTED.is_set())
    except KeyboardInterrupt:
        import h5py
        done = 0
        if os.path.exists(args.out):
            with h5py.File(args.out, "r") as f:
                done = int(f.attrs.get("n_complete", 0))
        log.warning("interrupted: %s holds %d of %d; complete it with --resume",
                    args.out, done, count)
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
    from sim_source.session import SessionConfig, write_session
    cfg = SessionConfig(frames=args.frames, seed=args.seed, size=args.size or 512,
                        dose_e_per_px=args.dose, frame_interval_s=args.frame_interval_s,
                        optics=_optics(args))
    write_session(args.out, cfg)
    log.info("wrote session %s: %d frames of %d^2 px", args.out, cfg.frames, cfg.size)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    try:
        return _session(args) if args.session else _dataset(args)
    except ValueError as exc:  # bad sizes, a resume of a file with another config
        log.error("%s", exc)
        return 2


def _bench(args: argparse.Namespace) -> int:
    from sim_source.bench import BenchConfig, run_bench
    run_bench(BenchConfig(size=args.size, structures=args.structures, defocus=args.defocus),
              args.json)
    return 0


def register(commands, bench) -> None:
    p = commands.add_parser(
        "simulate", help="simulate a training set or a session (abTEM multislice, HDF5)",
        description="Simulate CeO2 [110] surface images with depth labels (HDF5 'Dataset "
                    "file'), or with --session a noisy drifting frame series with known column "
                    "occupancy ('Session file'). Pixel size ≈ 5.3 pm (simulated at ≈ 2.65 pm "
                    "and binned 2x); 300 kV, C3 = -9 µm, C5 = 5 mm, defocus 1-9 nm (C10 = +defocus). "
                    "Ctrl-C leaves a valid file (attribute n_complete); --resume completes it.")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--seed", type=int, default=0, help="random seed (the file is a function of "
                   "seed, count, size, preset and optics; default 0)")
    p.add_argument("--size", type=_positive_int, default=None,
                   help="output image size in pixels at ≈ 5.3 pm/px (default 512; 1024 with "
                        "--preset paper)")
    p.add_argument("--count", type=_positive_int, default=None,
                   help="number of images (default 8; 9000 with --preset paper)")
    p.add_argument("--workers", type=_positive_int, default=min(4, os.cpu_count() or 1),
                   help="local Dask worker processes (1: simulate in this process; default "
                        "min(4, CPU cores))")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask.distributed scheduler (overrides --workers)")
    p.add_argument("--resume", action="store_true",
                   help="complete an interrupted file (same seed/count/size) instead of "
                        "overwriting it")
    p.add_argument("--preset", choices=["paper"],
                   help="paper: 1024 px, 9000 images (first 7000 training, last 2000 "
                        "validation)")
    w = p.add_argument_group("exit-wave library (--waves): optics, orientation and dose are "
                             "drawn later, on the fly, by `segdepth train`")
    w.add_argument("--waves", action="store_true",
                   help="write an exit-wave library of random faceted particles ({110}, {100}, "
                        "{111} facets, steps, wedges, vacancies of both species, frozen-phonon "
                        "snapshot, optional amorphous carbon film) instead of images")
    w.add_argument("--gpts", type=_positive_int, default=768,
                   help="simulated pixels per side at 2.65 pm (default 768 = 20.4 Å field)")
    w.add_argument("--facets", default="110,100,111",
                   help="facet families the particle cuts are drawn from (default 110,100,111)")
    w.add_argument("--carbon-probability", type=float, default=0.5,
                   help="chance that a structure sits on an amorphous carbon film (default 0.5)")
    w.add_argument("--carbon-thickness-A", type=float, nargs=2, default=(5.0, 30.0),
                   metavar=("LO", "HI"), help="film thickness range in Å (default 5 30)")
    o = p.add_argument_group("partial coherence (quasi-coherent envelopes of abTEM's CTF)")
    o.add_argument("--focal-spread-A", type=float, default=20.0,
                   help="focal spread in Å (1/e half-width, abTEM's definition; 0 = coherent; "
                        "default 20)")
    o.add_argument("--aperture-mrad", type=float, default=40.0,
                   help="objective aperture semi-angle in mrad (soft edge; default 40)")
    s = p.add_argument_group("simulated session (--session)")
    s.add_argument("--session", action="store_true",
                   help="write a session file: frames of one structure whose surface O "
                        "columns lose and regain atoms, with drift and Poisson noise")
    s.add_argument("--frames", type=_positive_int, default=120, help="number of frames (default 120)")
    s.add_argument("--dose", type=_positive_float, default=2.5,
                   help="dose λ: mean counts of a vacuum pixel per frame (e-/px; default 2.5)")
    s.add_argument("--frame-interval-s", type=_positive_float, default=0.13,
                   help="time between frames in s (default 0.13, the paper's K3 rate)")
    p.set_defaults(func=_simulate)

    b = bench.add_parser(
        "simulate", help="simulated images/s, exit-wave reuse vs. abTEM per (structure, "
                         "defocus) pair", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Images per second of our path (one multislice per structure, a CTF per "
                    "defocus) against running abTEM's full pipeline once per (structure, "
                    "defocus) pair, in the same run. Prints a table, writes JSON.")
    b.add_argument("--size", type=_positive_int, default=1024,
                   help="output pixels per side (simulated at twice that)")
    b.add_argument("--structures", type=_positive_int, default=2, help="structures")
    b.add_argument("--defocus", type=_positive_int, default=3, help="defocus values per "
                   "structure")
    b.add_argument("--json", default="benchmarks/simulate.json", help="JSON output path")
    b.set_defaults(func=_bench)
