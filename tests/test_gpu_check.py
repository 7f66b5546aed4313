"""Specification of benchmarks/gpu_check.sh, the one call a session lent a GPU runs: every command it
would run names a file that exists and passes it flags its argument parser accepts, so the script
still runs the day it first meets a GPU. Runs its --dry-run (commands printed, nothing run)."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")
STEPS = ["preflight.py", "test_static_decode.py", "parity_real_size.py", "bench_generate.py", "bench_grpo_step.py",
         "bench_grpo_step.py"]


def dry_run(*flags) -> list[list[str]]:
    """The commands `gpu_check.sh --dry-run` prints, one argv per step, `timeout SECONDS` included."""
    out = subprocess.run(["bash", SCRIPT, "--dry-run", *flags], capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


def load_script(path: str):
    """Import a benchmark script by file name (not run: its main is behind __name__)."""
    name = "gpu_check_" + os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_is_valid_bash_and_rejects_an_unknown_flag():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    bad = subprocess.run(["bash", SCRIPT, "--gpu"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument --gpu" in bad.stderr


@pytest.mark.parametrize("flags", [(), ("--cpu",)], ids=["gpu", "cpu"])
def test_the_dry_run_lists_every_step_in_order_each_under_a_time_limit(flags):
    commands = dry_run(*flags)
    assert len(commands) == len(STEPS)
    for argv, step in zip(commands, STEPS):
        assert argv[0] == "timeout" and int(argv[1]) > 0
        assert re.fullmatch(r"python3?", os.path.basename(argv[2])), argv
        assert any(os.path.basename(a) == step for a in argv[3:]), (step, argv)


@pytest.mark.parametrize("flags", [(), ("--cpu",)], ids=["gpu", "cpu"])
def test_every_benchmark_command_names_an_existing_script_whose_parser_accepts_its_flags(flags):
    for argv in dry_run(*flags):
        args = argv[3:]
        if args[:2] == ["-m", "pytest"]:
            continue  # the next test
        script = os.path.join(REPO, args[0])
        assert os.path.isfile(script), f"gpu_check.sh runs {args[0]}, which does not exist"
        module = load_script(script)
        if hasattr(module, "build_parser"):
            module.build_parser().parse_args(args[1:])  # SystemExit (test failure) on a flag it lacks
        else:
            assert args[1:] == [], f"{args[0]} takes no arguments, gpu_check.sh passes {args[1:]}"


@pytest.mark.parametrize("flags", [(), ("--cpu",)], ids=["gpu", "cpu"])
def test_the_graph_test_step_selects_existing_tests(flags):
    """pytest --collect-only with the step's own arguments: at least the three CUDA graph tests are
    selected (on a machine without CUDA they are collected, then skip)."""
    argv = next(a for a in dry_run(*flags) if a[3:5] == ["-m", "pytest"])
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *argv[5:]], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    selected = [line for line in out.stdout.splitlines() if "::" in line]
    assert sum("cuda" in line for line in selected) >= 3, out.stdout


def test_both_grpo_step_benchmarks_run_at_toy_sizes():
    """The --cpu check's two bench_grpo_step.py commands run to their last line: the whole step
    (its rollout's prompt width read from the Rollout) and --compare-shared (both ways, the ratios)."""
    commands = [a for a in dry_run("--cpu") if os.path.basename(a[3]) == "bench_grpo_step.py"]
    assert len(commands) == 2
    env = {**os.environ, "PYTHONPATH": REPO}
    for argv in commands:
        out = subprocess.run([sys.executable, *argv[3:]], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        last = out.stdout.strip().splitlines()[-1]
        assert ("unshared / shared" in last) if "--compare-shared" in argv else ("checkpointing on / off" in last)
