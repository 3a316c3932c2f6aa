"""examples/ddp_fashion_mnist.py --help says what each option means and its default."""

import importlib.util
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    name = "help_ddp_fashion_mnist"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", "ddp_fashion_mnist.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _option_help(text: str) -> dict:
    """Each option's help text, whitespace collapsed, from argparse's --help output."""
    options = text.split("options:", 1)[1]
    blocks = re.split(r"\n  (?=-)", "\n" + options)
    helps = {}
    for block in blocks:
        block = " ".join(block.split())
        if block.startswith("--"):
            flag, _, rest = block.partition(" ")
            metavar = rest.split(" ", 1)[0]
            helps[flag] = rest[len(metavar):].strip() if metavar.isupper() or metavar.startswith("{") else rest
    return helps


def test_every_ddp_example_option_has_help_with_its_default(capsys):
    # --sparsity, --block-size, --update-interval, --backend and --seed were listed with no text at all
    ddp = _load_example()
    with pytest.raises(SystemExit) as exit_info:
        ddp.parse_args(["--help"])
    assert exit_info.value.code == 0
    helps = _option_help(capsys.readouterr().out)
    defaults = {"--sparsity": "0.9", "--block-size": "8", "--update-interval": "20", "--backend": "gloo",
                "--seed": "0", "--epochs": "1", "--batch-size": "64"}
    for flag, default in defaults.items():
        assert re.search(rf"\bdefault {re.escape(default)}\)", helps.get(flag, "")), (flag, helps.get(flag))
    assert helps["--max-steps"]  # no default: stops only with --epochs
    args = ddp.parse_args([])  # the defaults the help names are the ones used
    assert (args.sparsity, args.block_size, args.update_interval, args.backend, args.seed) == (0.9, 8, 20, "gloo", 0)
