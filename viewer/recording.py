"""Start and stop a ``segdepth record`` subprocess from the viewer (the recorder is its own
process, so recording never depends on the viewer staying up)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def record_command(out: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """The recorder's argv: ``segdepth record --out OUT`` plus ``extra_args`` (endpoints...)."""
    return [sys.executable, "-m", "segdepth", "record", "--out", str(out), *extra_args]


class RecordingProcess:
    """One ``segdepth record`` subprocess at a time, writing into ``folder``."""

    def __init__(self, folder: str | Path = ".", extra_args: Sequence[str] = ()):
        self.folder = Path(folder)
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self.path: Path | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Path:
        """Start recording to a new time-stamped file; return its path."""
        if self.running:
            raise RuntimeError(f"already recording to {self.path}")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / time.strftime("session-%Y%m%d-%H%M%S.h5")
        self.process = subprocess.Popen(record_command(self.path, self.extra_args))
        return self.path

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Ask the recorder to finish (SIGINT: it closes its file), wait, then force it."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.process = None
        return proc.returncode
