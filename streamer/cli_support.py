"""Command-line conventions every package's ``cli.py`` and ``bench.py`` share.

- :func:`one_line_errors` wraps a subcommand handler: a user mistake ends with one line
  ``segdepth CMD: error: WHAT (FIX)`` on stderr and exit code 2, never a traceback.
- Typed argument parsers: :func:`positive_int`, :func:`positive_float`, :func:`endpoint`,
  :func:`output_file`, :func:`input_file`, and
  :func:`list_of` for list options that accept both ``--sizes 512,1024`` and
  ``--sizes 512 1024``.
- Defaults are declared once, in the config dataclasses: :func:`config_option` reads them
  (:func:`given` hands the options set back to the dataclass), and :class:`HelpFormatter`
  appends ``(default: X)`` to every option's help.
- :func:`add_json_option`, :func:`write_json` and :func:`machine_info` for benchmarks;
  :func:`install_stop_signals` for long-running commands; :func:`check_image_side` is the one
  image-size check of every command.

Imports nothing of the project at module level (the lowest layer: any package may use it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


class UserError(ValueError):
    """A mistake of the user's: the message names the file, port or option and says the fix."""


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help where it has a default worth showing; for a
    :func:`config_option` declared by module path, X is read from the dataclass (imported only
    now, so that parsing stays light)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        lazy = getattr(action, "config_default", None)
        default = _config_default(*lazy) if lazy else action.default
        if (
            "default" in text
            or any(default is v for v in (None, False, argparse.SUPPRESS))
            or default in ([], "")
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def default_of(config: Any, name: str) -> Any:
    """The declared default of field ``name`` of the dataclass ``config`` (a class or instance),
    or of parameter ``name`` of the function ``config``; ``a.b``: field ``b`` of field ``a``'s
    default."""
    if "." in name:
        outer, _, inner = name.partition(".")
        return getattr(default_of(config, outer), inner)
    if not dataclasses.is_dataclass(config):
        default = inspect.signature(config).parameters[name].default
        if default is inspect.Parameter.empty:
            raise ValueError(f"{name} of {config} has no default")
        return default
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{f.name} of {config} has no default")
    raise AttributeError(f"{config} has no field {name!r}")


def _config_default(config: str, name: str) -> Any:
    module, _, cls = config.partition(":")
    return default_of(getattr(importlib.import_module(module), cls), name)


def config_option(
    parser: Any, flag: str, config: Any, *, field: str | None = None, **kwargs: Any
) -> argparse.Action:
    """Add option ``flag`` whose default is declared once, as field ``field`` (default: the
    option's dest) of the dataclass ``config`` (or a parameter of a function). ``config`` is the
    class, or ``"module:Class"`` for
    a module too heavy to import for parsing: the option then parses to None unless given, help
    imports the class to show the default, and :func:`given` leaves the option out so that the
    dataclass's own default applies."""
    name = field or kwargs.get("dest") or flag.lstrip("-").replace("-", "_")
    if isinstance(config, str):
        action = parser.add_argument(flag, default=None, **kwargs)
        action.config_default = (config, name)  # read by HelpFormatter
    else:
        action = parser.add_argument(flag, default=default_of(config, name), **kwargs)
    return action


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The options ``names`` the command line set (not None), as keyword arguments of a config."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


# --- typed parsers -----------------------------------------------------------------------------
def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint with its scheme (streamer.security.split_endpoint's rule), or ``none``."""
    from streamer.security import EndpointError, split_endpoint

    if text.lower() != "none":
        try:
            split_endpoint(text)
        except EndpointError:
            raise argparse.ArgumentTypeError(
                f"endpoint {text!r} has no scheme: write it as tcp://{text} (or ipc://PATH)"
            ) from None
    return text


def output_file(text: str) -> str:
    """A file to write, in a folder that exists."""
    folder = Path(text).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(
            f"cannot write {text}: folder {folder} does not exist (create it: mkdir -p {folder})"
        )
    return text


def input_file(text: str) -> str:
    """A file to read, which exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


class _ListAction(argparse.Action):
    """Collects ``--opt a,b`` and ``--opt a b`` (and ``--opt a,b c``) into one flat list."""

    def __init__(self, *args: Any, item_type: Callable[[str], Any] = str, **kwargs: Any):
        self.item_type = item_type
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = [v for text in values for v in re.split(r"[,\s]+", str(text)) if v]
        try:
            parsed = [self.item_type(v.strip()) for v in items]
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        if not parsed:
            raise argparse.ArgumentError(self, "expected at least one value")
        setattr(namespace, self.dest, parsed)


def list_of(item_type: Callable[[str], Any]) -> dict[str, Any]:
    """Keyword arguments of a list option taking comma- or space-separated values
    (``--sizes 512,1024`` or ``--sizes 512 1024``), each parsed by ``item_type``."""
    return {"nargs": "+", "action": _ListAction, "item_type": item_type}


def add_json_option(parser: Any, default: str) -> None:
    """``--json PATH``: where a benchmark writes its figures."""
    parser.add_argument("--json", default=default, help="where to write the figures (JSON)")


# --- running -----------------------------------------------------------------------------------
def _message(exc: BaseException) -> str | None:
    """One line for a user mistake, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, (UserError, ValueError)):
        return str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file or directory"
    if isinstance(exc, OSError):  # streamer.sockets names the endpoint of a failed bind
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    return None


def one_line_errors(handler: Handler) -> Handler:
    """Wrap a subcommand handler: user mistakes end with one line on stderr and exit code 2
    (with ``-v``/``--verbose``: the full traceback, for a developer)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except Exception as exc:  # re-raised unless it is a user mistake
            message = _message(exc)
            if message is None or getattr(args, "verbose", False):
                raise
            print(f"segdepth {getattr(args, 'command', '')}: error: {message}", file=sys.stderr)
            return 2

    return run


def install_stop_signals(
    stop: threading.Event | None = None, on_stop: Callable[[int], None] | None = None
) -> threading.Event:
    """SIGINT and SIGTERM set ``stop`` (a new event when None; returned) and call
    ``on_stop(signum)`` instead of killing the process; a no-op outside the main thread
    (signals go to the main thread)."""
    stop = threading.Event() if stop is None else stop
    if threading.current_thread() is not threading.main_thread():
        return stop

    def handle(signum: int, _frame: Any) -> None:
        stop.set()
        if on_stop is not None:
            on_stop(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    return stop


def check_image_side(side_px: int, multiple: int, minimum: int, what: str) -> None:
    """The one image-size check of every command: ``side_px`` must be a multiple of ``multiple``
    and at least ``minimum`` px; raises :class:`UserError` starting with ``what`` (the option or
    file) and naming the nearest valid sides."""
    if side_px >= minimum and side_px % multiple == 0:
        return
    below = max(minimum, side_px // multiple * multiple)
    above = max(minimum, -(-side_px // multiple) * multiple)
    choices = " or ".join(str(v) for v in sorted({below, above}))
    unit = "an even number of pixels" if multiple == 2 else f"a multiple of {multiple} px"
    raise UserError(f"{what}: image sides must be {unit}, at least {minimum} px; use {choices}")


def cpu_model() -> tuple[str | None, list[str]]:
    """The CPU's model name and which of its instruction-set extensions matter to the engine's
    CPU paths (AVX2, AVX-512, VNNI, BF16, AMX), from /proc/cpuinfo (None, [] elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    name = next(
        (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
        None,
    )
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return name, [f for f in wanted if f in flags]


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on: platform, CPU (model and the extensions that set the
    CPU backends' speed), core count, Python and, where torch is already imported, its
    version, threads and CUDA device."""
    model, extensions = cpu_model()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": model,
        "cpu_extensions": extensions,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        )
    return info


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """Write a benchmark's figures (parents created) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str))
    print(f"wrote {out}")
    return out
