"""glibc's malloc settings for the engine process: keep freed memory for reuse.

The engine frees and allocates the same large activations every frame. By default glibc
returns a freed block above its mmap threshold (32 MB at most) to the kernel, and a thread's
own arena cannot hold such blocks either; each frame's buffers then come back as fresh pages
the kernel must fault in and zero. Measured on the BF16 backend (2-core Xeon, 2026-11-27):
150,000-180,000 minor page faults per 1024² frame (about 700 MB) and 14,000 per 512² frame;
with one arena, no mmap for large blocks and no trimming, 16 per frame, and through ``serve``
2.41 against 1.38 frames/s at 1024², 8.80 against 7.57 at 512² (onnxruntime, which keeps its
own arena, unchanged). The settings must be in the environment when the process starts (set
later with ``mallopt`` they left half the faults), so ``segdepth serve`` runs itself again
once with them (:func:`reexec_with_malloc_settings`). The price: memory the engine freed stays
with the process (its resident size stays at its peak).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

#: glibc tunables (environment variables read when a process starts)
MALLOC_SETTINGS = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**31 - 1),
    "MALLOC_TRIM_THRESHOLD_": str(2**32),
}


def missing_malloc_settings(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The :data:`MALLOC_SETTINGS` not in ``environ`` (a value set there is kept), on Linux
    with glibc; none elsewhere."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return {}
    return {k: v for k, v in MALLOC_SETTINGS.items() if k not in environ}


def reexec_with_malloc_settings(argv: Sequence[str]) -> None:
    """Replace this process by ``python argv...`` with the missing settings added to its
    environment (same process id, signals and open files); return at once when none is
    missing."""
    missing = missing_malloc_settings()
    if missing:
        os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **missing})
