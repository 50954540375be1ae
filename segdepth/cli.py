"""The ``segdepth`` command line: one program, one subcommand per job.

Each package contributes its subcommands through a ``register(commands, bench)`` function in its
``cli`` module (``commands`` and ``bench`` are argparse sub-parser collections; every parser sets
``func(args) -> int``). The viewer is never imported here: ``segdepth view`` and
``segdepth bench view`` run it as its own process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys

from streamer.cli_support import HelpFormatter, one_line_errors

#: modules with a ``register(commands, bench)`` function, in help order.
REGISTRARS = (
    "sim_source.cli",
    "training.cli",
    "engine.cli",
    "streamer.replay",
    "streamer.cli",
    "segdepth.demo",
    "segdepth.evaluate",
)


#: argv prefixes handed over whole to a viewer process (which parses its own options).
VIEWER_COMMANDS = {("view",): "viewer", ("bench", "view"): "viewer.bench"}


def _run_viewer(module: str, viewer_args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", module, *viewer_args])


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's parser: one help formatter, which shows each option's default, and
    one-line usage errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="segdepth",
        description="SegDepth Live: atomic-column depth (0-10 atoms) in noisy in-situ HRTEM "
        "frames of CeO2 [110], live.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    bench_parser = commands.add_parser(
        "bench",
        help="benchmarks: print a table and write JSON",
        description="Benchmarks that print a table of figures and write them as JSON.",
    )
    bench = bench_parser.add_subparsers(
        dest="bench", metavar="WHAT", required=True, parser_class=_Parser
    )
    for name in REGISTRARS:
        importlib.import_module(name).register(commands, bench)
    # listed for --help only: main() hands these over to the viewer's own parser.
    commands.add_parser(
        "view", add_help=False, help="live viewer (pyqtgraph); `segdepth view --help` for options"
    )
    bench.add_parser(
        "view", add_help=False, help="viewer display rate at 1024^2 while receiving 100 frames/s"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a ``segdepth`` command: ``argv`` (default: this process's command line, which a
    command may then run again in a new environment, as ``serve`` does)."""
    own_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    for prefix, module in VIEWER_COMMANDS.items():
        if tuple(argv[: len(prefix)]) == prefix:
            return _run_viewer(module, argv[len(prefix) :])
    args = build_parser().parse_args(argv)
    args.command_line = argv if own_command_line else None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return int(one_line_errors(args.func)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
