"""``segdepth bench view``: the frame rate the viewer displays at 1024² while receiving 100/s.

A publisher process sends synthetic results (depth, confidence, species maps, ~1200 columns)
and raw frames at ``rate_hz`` on loopback PUB sockets; the viewer runs offscreen in this
process with pinned columns, and we count its display updates per second over ``duration_s``.
The comparison is the obvious alternative: receiving in the GUI thread and drawing every
message as it comes with pyqtgraph's defaults (auto levels on every image).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass

from streamer.cli_support import (
    HelpFormatter,
    add_json_option,
    config_option,
    given,
    machine_info,
    positive_float,
    positive_int,
    write_json,
)
from streamer.sockets import free_tcp_endpoint


@dataclass(frozen=True)
class BenchConfig:
    """``size`` px (square frames), ``rate_hz`` results (and frames) sent per second,
    ``duration_s`` of measurement after the first display, ``refresh_hz`` of the viewer."""

    size: int = 1024
    rate_hz: float = 100.0
    duration_s: float = 10.0
    refresh_hz: float = 30.0
    spacing_px: int = 40
    pins: int = 3
    send_frames: bool = True
    baseline: bool = True
    seed: int = 0


def _publish(results_ep: str, frames_ep: str, cfg: BenchConfig, stop, ready) -> None:
    """Publisher process: results (and frames) at ``cfg.rate_hz`` until ``stop`` is set."""
    from streamer.sockets import Publisher
    from viewer.synthetic import SceneConfig, SyntheticScene

    scene = SyntheticScene(
        SceneConfig(shape=(cfg.size, cfg.size), spacing_px=cfg.spacing_px, seed=cfg.seed)
    )
    res, frames = Publisher(results_ep), Publisher(frames_ep) if cfg.send_frames else None
    ready.set()
    seq, period = 0, 1.0 / cfg.rate_hz
    next_t = time.monotonic()
    try:
        while not stop.is_set():
            if frames is not None:
                frames.send(scene.frame_parts(seq, session="bench"))
            res.send(scene.result_parts(seq, session="bench"))
            seq += 1
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # behind: do not burst to catch up
    finally:
        res.close()
        if frames is not None:
            frames.close()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(step, shown, received, duration_s: float, wait_s: float = 30.0) -> dict:
    """Run ``step`` (one event-loop pass) until ``shown()`` counts a first display, then for
    ``duration_s``; display and receive rates (per s) and CPU use over that time."""
    deadline = time.monotonic() + wait_s
    while shown() == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing displayed within {wait_s:g} s")
        step()
    n0, r0, t0, c0 = shown(), received(), time.monotonic(), _cpu_s()
    while time.monotonic() - t0 < duration_s:
        step()
    elapsed = time.monotonic() - t0
    return {
        "displayed_per_s": (shown() - n0) / elapsed,
        "received_per_s": (received() - r0) / elapsed,
        "elapsed_s": elapsed,
        "viewer_cpu_percent": 100.0 * (_cpu_s() - c0) / elapsed,
    }


def measure_viewer(cfg: BenchConfig, results_ep: str, frames_ep: str) -> dict:
    """The viewer as shipped: worker thread, 30 Hz timer, fixed levels, pinned plots."""
    import pyqtgraph as pg

    from streamer.domain import SPECIES_O
    from viewer.window import ViewerConfig, ViewerWindow

    app = pg.mkQApp()
    window = ViewerWindow(
        ViewerConfig(
            results=[results_ep],
            frames=[frames_ep] if cfg.send_frames else [],
            refresh_hz=cfg.refresh_hz,
        )
    )
    window.resize(1600, 1000)
    window.show()
    window.connect_live()

    def step() -> None:
        app.processEvents()
        if not window.pins.pinned and window.result is not None:
            o_ids = window.table["id"][window.table["species"] == SPECIES_O]
            for cid in o_ids[: cfg.pins]:
                window.pins.pin(int(cid))
        time.sleep(0.002)

    feed = window.feed
    assert feed is not None  # connect_live() made it
    out = _measure(
        step, lambda: window.displayed, lambda: feed.stats().results_received, cfg.duration_s
    )
    stats = feed.stats()
    out.update(results_lost=stats.results_lost, frames_lost=stats.frames_lost)
    window.close()
    return out


def measure_naive(cfg: BenchConfig, results_ep: str, frames_ep: str) -> dict:
    """The obvious alternative on the same widgets: receive in the GUI thread and draw every
    message as it arrives, with auto levels on every frame (no worker thread, no timer)."""
    import pyqtgraph as pg

    from streamer.domain import SPECIES_O
    from streamer.sockets import Subscriber
    from viewer.window import ViewerConfig, ViewerWindow

    app = pg.mkQApp()
    window = ViewerWindow(ViewerConfig(refresh_hz=cfg.refresh_hz))
    window.resize(1600, 1000)
    window.show()
    results = Subscriber(results_ep, topics=("result",))
    frames = Subscriber(frames_ep, topics=("frame",)) if cfg.send_frames else None
    received = [0]

    def step() -> None:
        msg = results.recv(timeout_s=0.005)
        if msg is not None:
            received[0] += 1
            window.history.append(msg.header, msg.arrays)
            frame = frames.recv(timeout_s=0) if frames is not None else None
            window.show_data(msg, frame.arrays["frame"] if frame is not None else None)
            window.images.auto_levels()
            if not window.pins.pinned:
                for cid in window.table["id"][window.table["species"] == SPECIES_O][: cfg.pins]:
                    window.pins.pin(int(cid))
        app.processEvents()

    out = _measure(step, lambda: window.displayed, lambda: received[0], cfg.duration_s)
    out.update(
        results_lost=results.sequences["result"].lost,
        frames_lost=frames.sequences["frame"].lost if frames is not None else 0,
    )
    for sub in (results, frames):
        if sub is not None:
            sub.close()
    window.close()
    return out


def run(cfg: BenchConfig) -> dict:
    ctx = mp.get_context("spawn")
    rows = {}
    modes = [("viewer (worker thread + 30 Hz timer)", measure_viewer)]
    if cfg.baseline:
        modes.append(("naive (GUI-thread receive, draw every message)", measure_naive))
    for name, fn in modes:
        results_ep, frames_ep = free_tcp_endpoint(), free_tcp_endpoint()
        stop, ready = ctx.Event(), ctx.Event()
        pub = ctx.Process(
            target=_publish, args=(results_ep, frames_ep, cfg, stop, ready), daemon=True
        )
        pub.start()
        if not ready.wait(120):
            pub.kill()
            raise RuntimeError("the publisher process did not start")
        try:
            rows[name] = fn(cfg, results_ep, frames_ep)
        finally:
            stop.set()
            pub.join(10)
            if pub.is_alive():
                pub.kill()
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="segdepth bench view",
        description="Display rate of the viewer (offscreen) at SIZE² while a publisher process "
        "sends RATE results and frames per second on loopback; compared with "
        "drawing every message in the GUI thread. Prints a table, writes JSON.",
        formatter_class=HelpFormatter,
    )
    config_option(p, "--size", BenchConfig, type=positive_int, help="frame side, pixels")
    config_option(
        p,
        "--rate-hz",
        BenchConfig,
        type=positive_float,
        help="results (and frames) published per second",
    )
    config_option(
        p,
        "--duration-s",
        BenchConfig,
        type=positive_float,
        help="seconds measured per mode, after the first display",
    )
    config_option(
        p,
        "--refresh-hz",
        BenchConfig,
        type=positive_float,
        help="viewer display updates per second (at most 30)",
    )
    config_option(
        p,
        "--spacing-px",
        BenchConfig,
        type=positive_int,
        help="distance between Ce columns of the synthetic scene, pixels",
    )
    config_option(p, "--pins", BenchConfig, type=int, help="oxygen columns pinned (plots)")
    p.add_argument("--no-frames", action="store_true", help="publish results only")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive comparison")
    config_option(p, "--seed", BenchConfig, type=int, help="seed of the synthetic scene")
    add_json_option(p, "benchmarks/view.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    cfg = BenchConfig(
        send_frames=not args.no_frames,
        baseline=not args.no_baseline,
        **given(args, "size", "rate_hz", "duration_s", "refresh_hz", "spacing_px", "pins", "seed"),
    )
    rows = run(cfg)
    print(
        f"\nviewer display rate at {cfg.size}x{cfg.size}, publisher at {cfg.rate_hz:g}/s "
        f"({'results + frames' if cfg.send_frames else 'results'}), {cfg.duration_s:g} s "
        f"each, {os.cpu_count()} CPU cores"
    )
    header = f"{'mode':<50} {'displayed/s':>12} {'received/s':>11} {'lost':>7} {'CPU %':>7}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<50} {r['displayed_per_s']:>12.1f} {r['received_per_s']:>11.1f} "
            f"{r['results_lost']:>7} {r['viewer_cpu_percent']:>7.0f}"
        )
    write_json(
        args.json,
        {
            "config": asdict(cfg),
            "results": rows,
            "machine": {**machine_info(), "qt_platform": os.environ["QT_QPA_PLATFORM"]},
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
