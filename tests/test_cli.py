"""The one ``segdepth`` program exposes every subcommand the design names, each with --help."""
import subprocess

import pytest

COMMANDS = ["simulate", "train", "evaluate", "predict", "export", "serve", "replay", "record",
            "watch", "demo"]
BENCHES = ["simulate", "train", "transport", "record", "engine"]


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


@pytest.mark.parametrize("prefix", [["view"], ["bench", "view"]])
def test_viewer_commands_pass_options_through(segdepth_cmd, prefix):
    out = subprocess.run([*segdepth_cmd, *prefix, "--help"], capture_output=True, text=True,
                         timeout=120, env={**__import__("os").environ,
                                           "QT_QPA_PLATFORM": "offscreen"})
    assert out.returncode == 0, out.stderr
    assert "--screenshot" in out.stdout or "--json" in out.stdout
