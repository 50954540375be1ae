"""Every command-line default is its config dataclass's default: the config a command builds
from a command line without options equals the dataclass built with its defaults."""

from __future__ import annotations

import argparse
import importlib

import pytest

from segdepth.cli import build_parser

EXISTING = "README.md"  # a file that exists, for options that must name one


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_engine_defaults():
    from engine import cli
    from engine.bench import BenchConfig
    from engine.export import PlanProfile
    from engine.serve import ServeConfig

    assert cli.serve_config(_parse("serve")) == ServeConfig()
    assert cli.bench_config(_parse("bench", "engine")) == BenchConfig()
    assert cli.plan_profile(_parse("export")) == PlanProfile()


def test_simulation_defaults():
    from sim_source import cli
    from sim_source.dataset import DatasetConfig
    from sim_source.session import SessionConfig
    from sim_source.wave_library import LibraryConfig

    args = _parse("simulate", "--out", "x.h5")
    assert cli.dataset_config(args) == DatasetConfig()
    assert cli.library_config(args) == LibraryConfig()
    assert cli.session_config(args) == SessionConfig()


def test_training_defaults():
    from training import cli
    from training.bench import BenchConfig
    from training.evaluate import EvaluateConfig
    from training.model import bundled_model_path
    from training.robustness import SuiteConfig
    from training.train import TrainConfig

    args = _parse("train", "--data", EXISTING, "--out", "nowhere/run")
    assert cli.train_config(args) == TrainConfig(data=EXISTING, out="nowhere/run")
    args = _parse("evaluate", "--data", EXISTING, "--out", "report")
    assert cli.evaluate_config(args) == EvaluateConfig(data=EXISTING, out="report")
    assert cli.suite_config(_parse("evaluate", "--suite", "robustness")) == SuiteConfig(
        models=[str(bundled_model_path())]
    )
    assert cli.bench_config(_parse("bench", "train")) == BenchConfig()


def test_streamer_defaults(tmp_path):
    from streamer import cli
    from streamer.recorder import RecorderConfig
    from streamer.replay import ReplayConfig
    from streamer.watcher import WatchConfig

    out = str(tmp_path / "s.h5")
    assert cli.record_config(_parse("record", "--out", out)) == RecorderConfig(out=out)
    assert cli.watch_config(_parse("watch", "folder")) == WatchConfig(folder="folder")
    replay = _parse("replay", "s.h5")
    assert cli.source_outputs(replay, ReplayConfig) == ReplayConfig("s.h5").outputs


def test_application_defaults():
    from segdepth.demo import DemoConfig, demo_config

    assert demo_config(_parse("demo")) == DemoConfig()


def _actions(parser: argparse.ArgumentParser, prog: str = "segdepth"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{prog} {name}")
        else:
            yield prog, action


def test_help_texts_state_no_default_of_their_own():
    """Help shows defaults through the one formatter: a help text that writes its own
    "(default N)" next to an option with a default could drift from the value."""
    from streamer.cli_support import default_of

    def effective(action):
        lazy = getattr(action, "config_default", None)
        if not lazy:
            return action.default
        module, _, name = lazy[0].partition(":")
        return default_of(getattr(importlib.import_module(module), name), lazy[1])

    own = [
        f"{prog} {a.option_strings[0]}"
        for prog, a in _actions(build_parser())
        if a.option_strings
        and a.help
        and "(default" in a.help
        and effective(a) is not None
        and effective(a) is not False
    ]
    assert own == []


@pytest.mark.parametrize(
    "argv",
    [("bench", "engine", "--sizes", "512,1024"), ("bench", "engine", "--sizes", "512", "1024")],
)
def test_list_options_take_both_forms(argv):
    assert _parse(*argv).sizes == [512, 1024]


def test_every_numeric_train_option_reaches_the_config():
    """A `train` option that is parsed but never copied into TrainConfig is silently ignored
    (as --render-workers once was on a GPU machine): set each to a non-default value."""
    import dataclasses

    from training import cli
    from training.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    train = next(
        sub
        for a in build_parser()._actions
        if isinstance(a, argparse._SubParsersAction)
        for name, sub in a.choices.items()
        if name == "train"
    )
    numeric = [
        a
        for a in train._actions
        if a.dest in fields
        and a.dest != "crop"  # 0 means whole images: tested in the training tests
        and a.nargs is None
        and (a.type in (int, float) or getattr(a.type, "__name__", "") == "positive_int")
    ]
    assert {"render_workers", "views_per_wave", "val_count", "epochs"} <= {a.dest for a in numeric}
    base = TrainConfig(data=EXISTING, out="nowhere/run")
    for action in numeric:
        value = 3 if action.type is not float else 0.375
        args = _parse(
            "train",
            "--data",
            EXISTING,
            "--out",
            "nowhere/run",
            action.option_strings[0],
            str(value),
        )
        got = getattr(cli.train_config(args), action.dest)
        assert got == value != getattr(base, action.dest), action.option_strings[0]


def test_postprocess_option_reaches_serve_and_the_e2e_bench():
    from engine import cli, serve

    assert cli.POSTPROCESS_CHOICES == tuple(serve.POSTPROCESS)
    assert cli.OOD_WARN_ON_CHOICES == serve.OOD_WARN_ON

    assert cli.serve_config(_parse("serve", "--postprocess", "device")).postprocess == "device"
    assert cli.serve_config(_parse("serve")).ood_warn_on == "one-pass"
    assert cli.serve_config(_parse("serve", "--ood-warn-on", "turn")).ood_warn_on == "turn"
    args = _parse("bench", "engine", "--e2e", "--postprocess", "host")
    assert cli.e2e_config(args).postprocess == "host"
    assert cli.serve_config(_parse("serve")).ood_check_every is None  # the backend decides
    assert cli.serve_config(_parse("serve", "--ood-check-every", "4")).ood_check_every == 4
    e2e = cli.e2e_config(_parse("bench", "engine", "--e2e", "--warmup", "8"))
    assert e2e.warmup == 8 != cli.e2e_config(_parse("bench", "engine", "--e2e")).warmup
    with pytest.raises(SystemExit):
        _parse("serve", "--postprocess", "gpu")
