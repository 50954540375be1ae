#!/usr/bin/env bash
# Set up SegDepth Live on a fresh machine: system libraries for Qt/HDF5 (Debian, when root),
# a virtual environment in .venv, torch (the CPU build where no NVIDIA GPU is present), and the
# project with its viewer and test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Qt (PyQt6 offscreen / xcb) needs a few shared libraries that slim images lack; a real window
# (xcb platform) also needs libxcb-cursor0 and the xcb helper libraries. Best effort: without
# root or apt-get, say what is missing and go on (offscreen rendering and --screenshot work).
QT_LIBS="libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3 libglib2.0-0 libxcb-cursor0
 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-shape0 libxcb-xinerama0 libxcb-randr0
 libxcb-render-util0 libxcb-image0"
need=()
if command -v dpkg >/dev/null 2>&1; then
    for pkg in $QT_LIBS; do
        dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
    done
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing system libraries for Qt: ${need[*]}"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null) \
            || echo "setup: warning: could not install ${need[*]}; a viewer window may not open (segdepth view --screenshot and QT_QPA_PLATFORM=offscreen still work)"
    else
        echo "setup: note: missing system libraries for a Qt window: ${need[*]}."
        echo "       Install them as root (sudo apt-get install ${need[*]}); until then use"
        echo "       segdepth view --screenshot PNG or QT_QPA_PLATFORM=offscreen."
    fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPIP=".venv/bin/python -m pip"
$VPIP install -q --upgrade pip >/dev/null

# torch: pinned release. Without an NVIDIA GPU we want the CPU build: on the project's machines
# `pip install torch==2.13.0` takes the CPU wheel from local disk; elsewhere set
# SEGDEPTH_TORCH_INDEX (e.g. PyTorch's CPU wheel index) to avoid the multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        $VPIP install -q "torch==2.13.0"
    elif [ -n "${SEGDEPTH_TORCH_INDEX:-}" ]; then
        $VPIP install -q "torch==2.13.0" --index-url "$SEGDEPTH_TORCH_INDEX"
    else
        $VPIP install -q "torch==2.13.0"
    fi
fi
$VPIP install -q -e ".[viewer,test]"
# compile the engine's numba kernels into their on-disk cache now (about 5 s once per checkout),
# not when the engine starts on its first frames
.venv/bin/python -c "import engine.columns, engine.prediction"
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
