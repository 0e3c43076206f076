"""`--help` and argument errors answer without loading torch (seconds under load): the command parser and the
checks of each subcommand import the heavy stages only inside the work itself. Each case runs as a user runs it,
in a fresh interpreter, and reports which heavy modules ended up loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefill_router.cli import SUBCOMMAND_MODULES

HEAVY = ("torch", "transformers", "sklearn")
# Runs the command in-process, then prints the heavy modules it loaded as the last line of stdout.
RUNNER = f"""
import sys
from prefill_router.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("loaded:" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(code)
"""

HELP = [["--help"], ["--version"], *([name, "--help"] for name in SUBCOMMAND_MODULES), ["data", "stats", "--help"]]
# (arguments, a piece of the one-line error)
BAD = [
    (["train", "--pca", "x", "--out", "o"], "argument --pca"),
    (["train", "--out", "o"], "--features and --dataset are required"),
    (["train", "--features", "missing", "--dataset", "mmlu-pro", "--out", "o"], "--features: missing does not exist"),
    (["train", "--add-target", "new", "--out", "o"], "--add-target needs --from"),
    (["train", "--feedback", "fb", "--out", "o"], "--feedback needs --from"),
    (["extract", "--dataset", "mmlu-pro", "--layers", "x", "--out", "o"], "--layers"),
    (["evaluate", "--dataset", "mmlu-pro", "--contenders", "nope"], "unknown contender(s) ['nope']"),
    (["pipeline", "--pools", "nope"], "unknown pool(s) ['nope']"),
    (["probe", "--features", "missing", "--dataset", "mmlu-pro", "--out", "o"], "--features: missing does not exist"),
    (["no-such-command"], "invalid choice"),
]


def run_command(args: list[str], cwd) -> tuple[subprocess.CompletedProcess, list[str]]:
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), done.stdout + done.stderr
    return done, [m for m in last.removeprefix("loaded:").split(",") if m]


@pytest.mark.parametrize("args", HELP, ids=" ".join)
def test_help_answers_without_torch(args, tmp_path):
    done, loaded = run_command(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout or "prefill-router" in done.stdout
    assert loaded == [], f"`prefill-router {' '.join(args)}` imported {loaded}"


@pytest.mark.parametrize("args,names", BAD, ids=[" ".join(a[:2]) for a, _ in BAD])
def test_argument_errors_answer_without_torch(args, names, tmp_path):
    done, loaded = run_command(args, tmp_path)
    assert done.returncode == 2
    assert names in done.stderr
    assert loaded == [], f"`prefill-router {' '.join(args)}` imported {loaded} before answering: {done.stderr}"
    assert not (tmp_path / "o").exists()


def test_the_runner_sees_a_heavy_import(tmp_path):
    """The check above could pass by never seeing anything: a command that does load the router reports torch."""
    done, loaded = run_command(["train", "--features", str(tmp_path), "--dataset", "mmlu-pro", "--out", "o"],
                               tmp_path)
    assert done.returncode == 2  # an empty folder is no feature store
    assert "torch" in loaded
