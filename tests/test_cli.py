"""The one ``segdepth`` program exposes every subcommand the design names, each with --help."""

import os
import subprocess

import pytest

COMMANDS = [
    "simulate",
    "train",
    "evaluate",
    "predict",
    "export",
    "serve",
    "replay",
    "record",
    "watch",
    "demo",
]
BENCHES = ["simulate", "train", "transport", "record", "engine", "view"]


def run(cmd, *args):
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command(segdepth_cmd):
    out = run(segdepth_cmd, "--help")
    assert out.returncode == 0, out.stderr
    for name in COMMANDS + ["view", "bench"]:
        assert name in out.stdout


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help(segdepth_cmd, name):
    out = run(segdepth_cmd, name, "--help")
    assert out.returncode == 0, out.stderr
    assert "usage: segdepth " + name in out.stdout


@pytest.mark.parametrize("name", BENCHES)
def test_bench_help(segdepth_cmd, name):
    out = run(segdepth_cmd, "bench", name, "--help")
    assert out.returncode == 0, out.stderr
    assert "--json" in out.stdout


def test_unknown_command_fails(segdepth_cmd):
    out = run(segdepth_cmd, "no-such-command")
    assert out.returncode != 0
    assert "invalid choice" in out.stderr


def test_viewer_options_pass_through(segdepth_cmd):
    out = subprocess.run(
        [*segdepth_cmd, "view", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "QT_QPA_PLATFORM": "offscreen"},
    )
    assert out.returncode == 0, out.stderr
    assert "--screenshot" in out.stdout
