"""The GPU session scripts' commands parse on the CPU.

A lease has 15 minutes of device time in all; a flag renamed in a benchmark but not in
benchmarks/gpu_session.sh or gpu_char_lm.sh would spend a call on an argparse error. Every
``python benchmarks/*.py`` / ``python examples/*.py`` command of those scripts is parsed
here with the script's own parser (stopped right after parsing), and the test files the
session hands to pytest must exist.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("benchmarks/gpu_session.sh", "benchmarks/gpu_char_lm.sh", "benchmarks/gpu_extra.sh")
_COMMAND = re.compile(r"\bpython ((?:benchmarks|examples)/\w+\.py)((?:\s+(?!2>|>|\|)[^\s|>]+)*)")


def _logical_lines(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read().replace("\\\n", " ")
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def _expand(arguments, tmp):
    """Shell defaults as the script runs with no variables set; paths under ``tmp``."""
    arguments = arguments.replace('"$@"', "")  # the script's own arguments: none
    arguments = arguments.replace("${settings// /,}", "off,persistent")  # gpu_session.sh's TMA_SETTINGS default
    arguments = re.sub(r"\$\{\w+(?::-|-)([^}]*)\}", r"\1", arguments)  # ${NAME:-x} / ${NAME-x} -> x
    arguments = re.sub(r"\$\{?(\w+)\}?", lambda m: os.path.join(tmp, m.group(1).lower()), arguments)
    return shlex.split(arguments)


def commands():
    found = []
    for script in SCRIPTS:
        for line in _logical_lines(script):
            for match in _COMMAND.finditer(line):
                found.append((script, match.group(1), match.group(2)))
    return found


def test_the_scripts_have_commands():
    # The regular expression finds what the scripts run (guards the parametrization below).
    programs = {program for _, program, _ in commands()}
    assert {"benchmarks/gpu_diagnose.py", "benchmarks/kernels.py", "benchmarks/train_step.py",
            "benchmarks/inductor_copies.py", "benchmarks/gpu_host_probe.py", "examples/char_lm.py"} <= programs
    assert len(commands()) >= 8


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script,program,arguments", commands(),
                         ids=[f"{os.path.basename(s)}:{os.path.basename(p)}:{i}" for i, (s, p, _) in enumerate(commands())])
def test_command_parses(script, program, arguments, tmp_path, monkeypatch):
    argv = _expand(arguments, str(tmp_path))
    spec = importlib.util.spec_from_file_location(f"gpu_script_{os.path.basename(program)[:-3]}",
                                                  os.path.join(ROOT, program))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parsed = original(self, args, namespace)
        raise _Parsed(parsed)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [program] + argv)
    takes_argv = "argv" in module.main.__code__.co_varnames[:module.main.__code__.co_argcount]
    with pytest.raises(_Parsed):  # an unknown flag or a bad value is SystemExit(2) instead
        module.main(argv) if takes_argv else module.main()


def test_the_session_tests_exist():
    lines = " ".join(_logical_lines("benchmarks/gpu_session.sh"))
    named = re.findall(r"\btests/[\w/]+\.py\b", lines)
    assert len(named) >= 5
    missing = [path for path in named if not os.path.exists(os.path.join(ROOT, path))]
    assert missing == []


def _load(program, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, program))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Reached(BaseException):  # not caught by main's fallback (`except Exception`: rerun with opaque ops)
    pass


@pytest.fixture
def train_step_on_cuda(monkeypatch):
    """benchmarks/train_step.py as on a CUDA machine, up to its run(): argument checks only."""
    module = _load("benchmarks/train_step.py", "gpu_script_train_step_cuda")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # main's SIGTERM handler stays out of pytest
    # main() sets the op module's INLINE_KERNELS (False on its opaque rerun): put it back after
    # the test, or later tests in this process see opaque kernels (the pass key test did)
    op_module = importlib.import_module("agpe_compile.ops.sparse_linear")
    monkeypatch.setattr(op_module, "INLINE_KERNELS", op_module.INLINE_KERNELS)

    def reached(*args, **kwargs):
        raise _Reached(kwargs)

    monkeypatch.setattr(module, "run", reached)
    return module


TRAIN_STEP_COMMANDS = [c for c in commands() if c[1] == "benchmarks/train_step.py"]


@pytest.mark.parametrize("script,program,arguments", TRAIN_STEP_COMMANDS,
                         ids=[f"{os.path.basename(s)}:{i}" for i, (s, _, _) in enumerate(TRAIN_STEP_COMMANDS)])
def test_train_step_commands_pass_the_cuda_checks(script, program, arguments, train_step_on_cuda, tmp_path):
    # parse_args alone let the twenty-sixth session's plan through: its --profile line named
    # only graphed_block_sparse and had no --out (audit CW HIGH-1/2); check_args runs here
    argv = _expand(arguments, str(tmp_path))
    with pytest.raises(_Reached) as reached:
        train_step_on_cuda.main(argv)
    if "--profile" in argv:
        out = argv[argv.index("--out") + 1]
        assert reached.value.args[0]["profile_dir"] == os.path.dirname(os.path.abspath(out))


def test_gpu_extra_profiles_graphed_block_sparse_last():
    (profile,) = [a for s, p, a in commands() if s.endswith("gpu_extra.sh") and "--profile" in a]
    argv = _expand(profile, "/tmp")
    optimizers = argv[argv.index("--optimizers") + 1].split(",")
    assert optimizers[-1] == "graphed_block_sparse" and "graphed" in optimizers and "--out" in argv


def test_train_step_profile_needs_out(train_step_on_cuda, capsys):
    # without --out, --profile profiled nothing and said nothing (audit CW HIGH-2)
    with pytest.raises(SystemExit) as stopped:
        train_step_on_cuda.main(["--densities", "0.25", "--optimizers", "graphed,graphed_block_sparse",
                                 "--no-mask-update", "--schedule-steps", "0", "--profile"])
    assert stopped.value.code == 2
    assert "--profile: needs --out" in capsys.readouterr().err


def test_train_step_block_sparse_only_says_what_to_write(train_step_on_cuda, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_step_on_cuda.main(["--densities", "0.25", "--optimizers", "graphed_block_sparse", "--no-mask-update",
                                 "--schedule-steps", "0", "--profile", "--out", str(tmp_path / "ts.json")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--optimizers graphed,graphed_block_sparse" in err and "LAST" in err


@pytest.mark.parametrize("cut", [True, False], ids=["rerun-cut", "rerun-finished"])
def test_train_step_keeps_the_first_attempts_rows(train_step_on_cuda, tmp_path, monkeypatch, cut):
    # a failure mid-timing reruns everything with opaque ops; the rerun's run() replaced
    # PARTIAL["results"], so a time limit that cut the rerun lost the first attempt's rows
    # (audit CW MEDIUM-6)
    out = tmp_path / "ts.json"
    module = train_step_on_cuda
    calls = []

    def run(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) == 1:  # the inlined attempt: one row, then a compile fails
            module.PARTIAL["results"] = {"rows": [{"density": 0.5, "optimizer": "graphed", "tma": "off",
                                                   "agpe_step_s": 0.01}], "dense_optimizer": "graphed"}
            raise RuntimeError("the persistent setting's compile failed")
        module.PARTIAL["results"] = results = {"rows": [], "dense_optimizer": "graphed"}
        if cut:
            module._write_partial(str(out))  # what the SIGTERM handler does
        return results

    monkeypatch.setattr(module, "run", run)
    argv = ["--densities", "0.5", "--optimizers", "graphed", "--no-mask-update", "--schedule-steps", "0",
            "--out", str(out)]
    if cut:
        with pytest.raises(SystemExit):
            module.main(argv)
    else:
        module.main(argv)
    results = json.loads(out.read_text())
    assert results["first_attempt"]["rows"][0]["agpe_step_s"] == 0.01
    assert "compile failed" in results["first_attempt"]["error"]
    assert len(calls) == 2 and results.get("incomplete", False) == cut


_WITHOUT_INSTALLED = """
import os, runpy, sys
# as on the GPU machine: no installed agpe_compile (this venv may have an editable install)
sys.meta_path[:] = [f for f in sys.meta_path
                    if "editable" not in getattr(f, "__module__", "") + type(f).__module__]
script = sys.argv[1]
sys.path[:] = [os.path.dirname(os.path.abspath(script))] + [
    p for p in sys.path[1:] if os.path.abspath(p or ".") != os.getcwd() and "__editable__" not in p]
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    import agpe_compile
    assert os.path.dirname(os.path.dirname(os.path.abspath(agpe_compile.__file__))) == os.getcwd()
"""


@pytest.mark.parametrize("program", ["benchmarks/train_step.py", "examples/char_lm.py",
                                     "benchmarks/gpu_host_probe.py"])
def test_scripts_find_the_repository_without_pythonpath(program):
    # `python benchmarks/train_step.py` on the GPU machine (no installed agpe_compile, no
    # PYTHONPATH) failed with ModuleNotFoundError (audit CW HIGH-3)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_INSTALLED, program], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def _bash(script, tmp_path, args=(), **variables):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PARTS", "DEADLINE", "OUT", "RUN_DIR", "ALLOW_NO_CUDA", "CHAR_LM_LIMIT", "CHAR_LM_TEXT",
                        "CHAR_LM_RESULTS")}
    env.update(RUN_DIR=str(tmp_path / "run"), OUT=str(tmp_path / "out"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""), **variables)
    return subprocess.run(["bash", script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("variables,message", [
    (dict(PARTS="diagnose,kernels"), "unknown part 'diagnose,kernels'"),
    (dict(PARTS="tests tmm"), "unknown part 'tmm'"),
    (dict(PARTS="probe", DEADLINE="abc"), "DEADLINE: expected a positive integer"),
    (dict(PARTS="probe", DEADLINE="0570"), "DEADLINE: expected a positive integer"),
], ids=["comma", "typo", "deadline-text", "deadline-octal"])
def test_gpu_session_refuses_bad_variables_before_any_work(tmp_path, variables, message):
    # a comma or a typo in PARTS ran nothing and exited 0; DEADLINE=abc failed every part
    # (audit CW LOW-1/3)
    done = _bash("benchmarks/gpu_session.sh", tmp_path, **variables)
    assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "run").exists()  # before any work


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize("script", ["benchmarks/gpu_session.sh", "benchmarks/gpu_char_lm.sh",
                                    "benchmarks/gpu_extra.sh"])
def test_gpu_scripts_refuse_a_machine_without_cuda(tmp_path, script):
    # without CUDA the tests part passed with every test skipped and the benchmarks timed the
    # CPU (audit CW LOW-2); ALLOW_NO_CUDA=1 is the CPU dry run's way past it
    done = _bash(script, tmp_path, PARTS="probe", DEADLINE="1", CHAR_LM_LIMIT="5")
    assert done.returncode == 3 and "ALLOW_NO_CUDA=1" in done.stderr, done.stdout + done.stderr


def test_gpu_char_lm_checks_its_limit_and_forwards_its_arguments(tmp_path):
    done = _bash("benchmarks/gpu_char_lm.sh", tmp_path, CHAR_LM_LIMIT="9m", ALLOW_NO_CUDA="1")
    assert done.returncode == 2 and "CHAR_LM_LIMIT" in done.stderr, done.stdout + done.stderr
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 10)
    # the extra arguments reach char_lm.py: its --runs check answers (before the text's)
    done = _bash("benchmarks/gpu_char_lm.sh", tmp_path, args=["--runs", "agpe-50"], CHAR_LM_LIMIT="60",
                 ALLOW_NO_CUDA="1", CHAR_LM_TEXT=str(text))
    assert done.returncode == 2 and "--runs: unknown ['agpe-50']" in done.stdout, done.stdout + done.stderr


def test_char_lm_trains_only_the_runs_named(tmp_path, capsys):
    # a second device call after a cut trains the agpe run only, not dense again (audit CW MEDIUM-4)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        char_lm = _load("examples/char_lm.py", "gpu_script_char_lm_runs")
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 200)
    common = ["--smoke", "--text-file", str(text), "--sparsities", "0.75", "--lowering", "aot_eager",
              "--out", str(tmp_path / "out")]
    char_lm.main(common + ["--runs", "dense"])
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["run"] for r in first["runs"]] == ["dense"]
    capsys.readouterr()
    char_lm.main(common + ["--runs", "agpe-75"])
    table = capsys.readouterr().out
    final = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["run"] for r in final["runs"]] == ["dense", "agpe-75"]
    assert final["runs"][0] == first["runs"][0]  # kept, not trained again
    (row,) = [line for line in table.splitlines() if line.startswith("agpe-75")]
    assert "%" in row  # compared with the earlier dense run
