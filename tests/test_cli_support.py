"""The shared command-line conventions (streamer.cli_support)."""

from __future__ import annotations

import argparse

import pytest

from streamer.cli_support import (
    HelpFormatter,
    UserError,
    check_image_side,
    config_option,
    endpoint,
    list_of,
    machine_info,
    one_line_errors,
    positive_int,
)


def test_list_options_accept_commas_spaces_and_both():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default=[512], **list_of(positive_int))
    assert p.parse_args([]).sizes == [512]
    assert p.parse_args(["--sizes", "512,1024"]).sizes == [512, 1024]
    assert p.parse_args(["--sizes", "512", "1024"]).sizes == [512, 1024]
    assert p.parse_args(["--sizes", "256,512", "1024"]).sizes == [256, 512, 1024]
    with pytest.raises(SystemExit):
        p.parse_args(["--sizes", "0"])


def test_endpoint_needs_a_scheme_and_says_how():
    assert endpoint("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert endpoint("none") == "none"
    with pytest.raises(argparse.ArgumentTypeError, match="tcp://localhost:6655"):
        endpoint("localhost:6655")


def test_help_shows_the_dataclass_default_once():
    from engine.hmm import HMMConfig

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    config_option(p, "--jump-decay", HMMConfig, type=float, help="ratio")
    config_option(p, "--max-wait-ms", "engine.serve:ServeConfig", type=float, help="ms")
    text = " ".join(p.format_help().split())
    assert f"ratio (default: {HMMConfig().jump_decay})" in text
    assert "ms (default: 10.0)" in text
    assert p.parse_args([]).max_wait_ms is None  # the dataclass's own default applies


def _run(handler, capsys, **args):
    code = one_line_errors(handler)(argparse.Namespace(command="x", **args))
    return code, capsys.readouterr().err


def test_user_mistakes_end_in_one_line_and_bugs_keep_their_traceback(capsys):
    def mistake(_args):
        raise UserError("bad thing; do this")

    code, err = _run(mistake, capsys)
    assert code == 2 and err == "segdepth x: error: bad thing; do this\n"

    def missing(_args):
        open("/nonexistent/dir/file.h5")

    code, err = _run(missing, capsys)
    assert code == 2 and "/nonexistent/dir/file.h5" in err and err.count("\n") == 1

    def bug(_args):
        return {}["key"]

    with pytest.raises(KeyError):
        one_line_errors(bug)(argparse.Namespace(command="x"))
    with pytest.raises(UserError):  # -v: the developer gets the traceback
        one_line_errors(mistake)(argparse.Namespace(command="x", verbose=True))


def test_one_image_size_check_suggests_valid_sides():
    check_image_side(512, 32, 32, "--crop 512")
    with pytest.raises(UserError, match="--size 37: .*use 36 or 38"):
        check_image_side(37, 2, 16, "--size 37")
    with pytest.raises(UserError, match="224 or 256"):
        check_image_side(250, 32, 32, "--crop 250")


def test_machine_info_has_one_set_of_keys():
    info = machine_info()
    assert {"platform", "cpu", "cpus", "python"} <= set(info) and info["cpus"] >= 1


def test_machine_info_names_the_cpu_and_the_extensions_its_backends_use():
    """On Linux the CPU model and its relevant extensions are recorded; the extensions are the
    ones /proc/cpuinfo lists (AVX2 at least on the x86-64 machines this project runs on)."""
    import platform
    from pathlib import Path

    info = machine_info()
    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo here")
    assert info["cpu_model"]
    flags = Path("/proc/cpuinfo").read_text().split()
    assert all(f in flags for f in info["cpu_extensions"])
    if platform.machine() == "x86_64":
        assert "avx2" in info["cpu_extensions"]
