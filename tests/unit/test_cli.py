"""CLI: every subcommand has --help; user errors exit non-zero with one line, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "digits-lenet-hybrid.yaml")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asnn_dist.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("sub", [[], ["demo"], ["train"], ["config"], ["shards"], ["models"], ["bench"], ["evaluate"], ["predict"]])
def test_help(sub):
    r = cli(*sub, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: asnn-dist" in r.stdout
    assert len(r.stdout.splitlines()) > 4


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
