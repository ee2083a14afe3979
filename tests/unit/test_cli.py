"""CLI: every subcommand has --help; user errors exit non-zero with one line, no traceback."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from asnn_dist.cli import BENCHES, build_parser, main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "digits-lenet-hybrid.yaml")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asnn_dist.cli", *args], capture_output=True, text=True, timeout=120)


def test_every_subcommand_and_benchmark_parses_help(capsys):
    """``--help`` of every subcommand and benchmark exits 0 (argparse formats every option's
    help: a stray '%' or a bad default raises there) under the name a user typed."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = [[name] for name in subparsers.choices] + [["bench", name] for name in sorted(BENCHES)]
    assert {"demo", "train", "tune", "config", "shards", "models", "evaluate", "predict", "bench"} <= set(subparsers.choices)
    for command in [[], *commands]:
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0, command
        assert capsys.readouterr().out.startswith(" ".join(["usage: asnn-dist", *command])), command


def test_bench_passes_its_arguments_to_the_benchmark(monkeypatch):
    """``asnn-dist bench NAME ARGS`` calls that benchmark's ``main(ARGS)`` (``--debug`` taken
    out anywhere) and returns its exit code."""
    import asnn_dist.bench.neurons as neurons

    seen = []
    monkeypatch.setattr(neurons, "main", lambda argv: seen.append(list(argv)) or 3)
    assert main(["bench", "neurons", "--steps", "8", "--debug", "--repeats", "1"]) == 3
    assert seen == [["--steps", "8", "--repeats", "1"]]


def test_config_check_ok():
    r = cli("config", "check", DEMO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: ") and "global batch 64" in r.stdout


def test_config_show_applies_overrides():
    r = cli("config", "show", DEMO, "--set", "optim.lr=0.01", "encoding.num_steps=6")
    assert r.returncode == 0, r.stderr
    assert "lr: 0.01" in r.stdout and "num_steps: 6" in r.stdout


def test_bad_config_one_line_error():
    r = cli("config", "check", DEMO, "--set", "encoding.schme=rate")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("asnn-dist: error: invalid config: encoding.schme: unknown key")
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback():
    r = cli("--debug", "config", "check", DEMO, "--set", "optim.lr=-1")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_missing_config_file():
    r = cli("train", "/nonexistent/x.yaml")
    assert r.returncode == 2
    assert "config file '/nonexistent/x.yaml' not found" in r.stderr


def test_usage_error_exit_code():
    r = cli("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_models_list():
    r = cli("models")
    assert r.returncode == 0
    assert "lenet_asnn" in r.stdout.split()


# --- argument order: --set before or after CONFIG, --debug anywhere, bench usage lines ---------

def _config_commands() -> list[str]:
    """Every subcommand that takes CONFIG and --set (a new one, e.g. tune, is picked up here)."""
    from asnn_dist.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(name for name, p in sub.choices.items() if p.get_default("_config_parser") is not None)


def _argv(command: str, tmp_path: Path) -> list[str]:
    return {"config": ["config", "check"], "demo": ["demo", "--workdir", str(tmp_path)]}.get(command, [command])


def test_config_commands_found():
    assert {"config", "demo", "train"} <= set(_config_commands())


@pytest.mark.parametrize("command", _config_commands())
@pytest.mark.parametrize("set_first", [True, False])
def test_set_before_or_after_config(command, set_first, tmp_path, capsys):
    """A bad option key fails at config load, before any work: the override reached the config
    read from DEMO whichever side of it --set stood."""
    sets = ["--set", "optim.lr=0.5", "model.options.widthz=3"]
    argv = _argv(command, tmp_path) + (sets + [DEMO] if set_first else [DEMO] + sets)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["asnn-dist: error: invalid config: model.options.widthz: unknown key of model 'lenet_asnn'; "
                   "did you mean 'model.options.widths'? (allowed keys: hidden, widths)"]


def test_config_show_same_either_order(capsys):
    outputs = []
    for argv in (["config", "show", DEMO, "--set", "optim.lr=0.01", "encoding.num_steps=6"],
                 ["config", "show", "--set", "optim.lr=0.01", "encoding.num_steps=6", DEMO],
                 ["config", "show", "--set", "optim.lr=0.01", DEMO, "--set", "encoding.num_steps=6"]):
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "lr: 0.01" in outputs[0] and "num_steps: 6" in outputs[0]


@pytest.mark.parametrize("argv", [["config", "check", DEMO, "--set", "optim.lr"],
                                  ["config", "check", "--set", "optim.lr=1", DEMO, "extra"],
                                  ["train", "--set", "optim.lr=1"]])
def test_set_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: asnn-dist" in err and ("--set expects KEY=VALUE" in err or "required: config" in err)


@pytest.mark.parametrize("argv", [
    ["--debug", "config", "check", DEMO, "--set", "optim.lr=-1"],
    ["config", "--debug", "check", DEMO, "--set", "optim.lr=-1"],
    ["config", "check", DEMO, "--debug", "--set", "optim.lr=-1"],
    ["config", "check", DEMO, "--set", "optim.lr=-1", "--debug"],
    ["config", "check", "--set", "optim.lr=-1", "--debug", DEMO],
])
def test_debug_anywhere(argv):
    from asnn_dist.errors import ConfigError

    assert main([a for a in argv if a != "--debug"]) == 2
    with pytest.raises(ConfigError, match="optim.lr: bad value -1"):
        main(argv)


def test_debug_after_subcommand_shows_traceback():
    r = cli("config", "check", DEMO, "--set", "optim.lr=-1", "--debug")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ConfigError" in r.stderr
