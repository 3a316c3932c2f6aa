"""agpe_compile/env.py: the on/off environment switches read words, and refuse the rest."""

import os
import subprocess
import sys

import pytest

from agpe_compile import eager_lowering
from agpe_compile.env import switch


@pytest.mark.parametrize("value, expected", [("0", False), ("false", False), ("OFF", False), (" no ", False),
                                             ("1", True), ("True", True), ("on", True), ("yes", True),
                                             ("", True)])
def test_on_and_off_words(monkeypatch, value, expected):
    monkeypatch.setenv("AGPE_TEST_SWITCH", value)
    assert switch("AGPE_TEST_SWITCH") is expected


def test_unset_gives_the_default(monkeypatch):
    monkeypatch.delenv("AGPE_TEST_SWITCH", raising=False)
    assert switch("AGPE_TEST_SWITCH") is True
    assert switch("AGPE_TEST_SWITCH", default=False) is False


@pytest.mark.parametrize("value", ["2", "disable", "0ff", "nope"])
def test_any_other_value_is_an_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("AGPE_EAGER_IN_PLACE", value)
    with pytest.raises(ValueError, match=f"AGPE_EAGER_IN_PLACE.*{value!r}"):
        eager_lowering.enabled()


def test_the_import_time_switches_read_the_words():
    code = ("import importlib, os\n"  # agpe_compile.ops.sparse_linear names the op, not the module
            "bsr, op = (importlib.import_module('agpe_compile.ops.' + m) for m in ('bsr_path', 'sparse_linear'))\n"
            "print(bsr.ENABLED, op.INLINE_KERNELS)\n"
            "os.environ['AGPE_CPU_BSR'] = 'disabled'\n"
            "try:\n"
            "    importlib.reload(bsr)\n"  # raises at the switch, before any other statement runs again
            "except ValueError as error:\n"
            "    print('refused:', error)\n")
    env = dict(os.environ, AGPE_CPU_BSR="false", AGPE_INLINE_KERNELS="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    first, second = out.stdout.splitlines()
    assert first.split() == ["False", "False"]
    assert second.startswith("refused:") and "AGPE_CPU_BSR" in second and "'disabled'" in second
