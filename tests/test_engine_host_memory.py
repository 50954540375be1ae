"""The engine process runs with glibc malloc settings that keep freed memory for reuse
(engine.host_memory): ``segdepth serve`` runs itself again with them, and they do stop
large blocks freed and allocated again from being faulted in afresh."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_support import save_random_model, serve_argv

from engine.host_memory import MALLOC_SETTINGS, missing_malloc_settings

needs_glibc = pytest.mark.skipif(
    not missing_malloc_settings({}), reason="the settings are glibc's (Linux)"
)

#: minor page faults per block of 64 MB taken from malloc (as torch's CPU tensors are: numpy
#: asks for huge pages, which hide the effect), written and freed, 10 times over
FAULTS_SCRIPT = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def block():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
block()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    block()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
"""


def _without_settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}


@needs_glibc
def test_the_settings_keep_a_freed_large_block_for_reuse():
    def faults(env):
        run = subprocess.run(
            [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        return float(run.stdout)

    default = faults(_without_settings())
    kept = faults({**_without_settings(), **MALLOC_SETTINGS})
    assert default > 10_000  # 64 MB of fresh 4 kB pages each time
    assert kept < 100


@needs_glibc
def test_serve_runs_itself_again_with_the_settings(tmp_path, segdepth_cmd, endpoint_factory):
    model = save_random_model(tmp_path / "random.pt")
    ep = {"engine": endpoint_factory(), "results": endpoint_factory()}
    proc = subprocess.Popen(
        serve_argv(segdepth_cmd, ep, model), env=_without_settings(), stdout=subprocess.DEVNULL
    )
    try:
        environ: dict[str, str] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            raw = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            environ = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
            if all(environ.get(k) == v for k, v in MALLOC_SETTINGS.items()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "serve exited"
        assert {k: environ.get(k) for k in MALLOC_SETTINGS} == MALLOC_SETTINGS
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_value_already_set_is_kept():
    env = {"MALLOC_ARENA_MAX": "4"}
    assert "MALLOC_ARENA_MAX" not in missing_malloc_settings(env)
