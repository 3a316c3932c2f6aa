"""The GPU session scripts' commands parse on the CPU.

A lease has 15 minutes of device time in all; a flag renamed in a benchmark but not in
benchmarks/gpu_session.sh or gpu_char_lm.sh would spend a call on an argparse error. Every
``python benchmarks/*.py`` / ``python examples/*.py`` command of those scripts is parsed
here with the script's own parser (stopped right after parsing), and the test files the
session hands to pytest must exist.
"""

import argparse
import importlib.util
import os
import re
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("benchmarks/gpu_session.sh", "benchmarks/gpu_char_lm.sh")
_COMMAND = re.compile(r"\bpython ((?:benchmarks|examples)/\w+\.py)((?:\s+(?!2>|>|\|)[^\s|>]+)*)")


def _logical_lines(path):
    with open(os.path.join(ROOT, path)) as f:
        text = f.read().replace("\\\n", " ")
    return [line for line in text.splitlines() if not line.lstrip().startswith("#")]


def _expand(arguments, tmp):
    """Shell defaults as the script runs with no variables set; paths under ``tmp``."""
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
