"""examples/fashion_mnist.py: the CI smoke run, and the error when the data is missing."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "fashion_mnist.py")
DATA = "/usr/share/datasets/fashion-mnist"


def test_missing_dataset_names_the_apt_command(tmp_path):
    result = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--data-dir", str(tmp_path), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"Fashion-MNIST file train-images-idx3-ubyte(.gz) not found in {tmp_path}" in result.stderr
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in result.stderr


@pytest.mark.skipif(not os.path.isdir(DATA), reason=f"needs Debian's dataset-fashion-mnist in {DATA}")
@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot read the Fashion-MNIST file"),  # a raw EOFError traceback before
    ("swap", "expected N 28x28 images and N labels"),  # 10,000 test labels for 60,000 images trained silently
    ("corrupt", "cannot read the Fashion-MNIST file"),  # a damaged deflate stream: a raw zlib.error
])
def test_damaged_data_files_are_named(tmp_path, damage, message, capsys):
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    for name in os.listdir(DATA):
        shutil.copy(os.path.join(DATA, name), data / name)
    labels = sorted(p for p in data.iterdir() if p.name.startswith("train-labels"))[0]
    images = sorted(p for p in data.iterdir() if p.name.startswith("train-images"))[0]
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:5000])
    elif damage == "corrupt":
        raw = bytearray(images.read_bytes())
        raw[1000:1400] = bytes(400)  # a zlib.error ("invalid distance too far back"), no OSError
        images.write_bytes(bytes(raw))
    else:
        test_labels = sorted(p for p in data.iterdir() if p.name.startswith("t10k-labels"))[0]
        shutil.copy(test_labels, labels)
    # in this process (test_missing_dataset_names_the_apt_command runs the command line)
    with pytest.raises(SystemExit) as exited:
        _example_module().main(["--smoke", "--methods", "plain", "--data-dir", str(data), "--out",
                                str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exited.value.code not in (0, None) and message in (err + str(exited.value.code))


@pytest.mark.skipif(not os.path.isdir(DATA), reason=f"needs Debian's dataset-fashion-mnist in {DATA}")
def test_smoke_run_prints_the_table_and_writes_logs_and_plots(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--methods", "plain,dense,agpe,rigl", "--out",
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 7]
    assert [r[0].strip() for r in rows] == ["method", "plain", "dense", "agpe", "rigl"]
    flops = {r[0].strip(): float(r[2].strip().rstrip("x")) for r in rows[1:]}
    assert flops["dense"] == 1.0 and flops["rigl"] < 0.2 and flops["agpe"] < flops["dense"]
    accuracy = {r[0].strip(): r[1].strip() for r in rows[1:]}
    assert accuracy["plain"] == accuracy["dense"]  # the same training, without agpe
    plain = rows[1]
    assert int(plain[4]) >= 1 and plain[5].strip() == "-" and plain[6].strip() == "-"
    assert not (out / "plain.jsonl").exists()  # no Sparsifier, no audit log
    assert "rigl [##############################] 40/40" in result.stderr  # the progress bar
    assert "\r" not in result.stderr  # into a pipe: lines, not a bar redrawn in place
    for name in ("dense.jsonl", "agpe.jsonl", "rigl.jsonl", "density_agpe.png", "loss_vs_flops.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("*.partial"))  # each log is renamed into place when its method finishes


@pytest.mark.skipif(not os.path.isdir(DATA), reason=f"needs Debian's dataset-fashion-mnist in {DATA}")
def test_validation_split_and_agpe_overrides(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--methods", "agpe", "--validation", "500",
                             "--agpe", "cooldown=3", "--agpe", "improve_tol=0.02", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "val acc %" in result.stdout and "test acc %" not in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["eval_set"] == "validation" and results["settings"]["validation"] == 500
    # The example's own AGPE setting (AGPE_SETTINGS) plus the two overrides.
    assert results["agpe_settings"] == {"saliency": "magnitude", "cooldown": 3, "improve_tol": 0.02}
    records = [json.loads(line) for line in (out / "agpe.jsonl").read_text().splitlines()]
    assert records[0]["config"]["cooldown"] == 3 and records[0]["config"]["improve_tol"] == 0.02
    assert records[0]["config"]["saliency"] == "magnitude"
    assert records[-1] == {"event": "eval", "step": records[-1]["step"],
                           "validation_accuracy": results["methods"]["agpe"]["accuracy"]}


@pytest.mark.parametrize("args, message", [
    (["--agpe", "target_sparsity=0.5"], "--agpe: expected KEY=VALUE with KEY one of"),
    (["--agpe", "cooldown"], "--agpe: expected KEY=VALUE with KEY one of"),
    (["--agpe", "cooldown=-1"], "--agpe: AGPEConfig.cooldown got -1; expected an int >= 0"),
    (["--agpe", "patience=2", "--agpe", "patience=3"], "--agpe: patience given more than once"),
    (["--agpe", "buckets=1.0,x"], "--agpe: buckets: expected comma-separated numbers, got '1.0,x'"),
    (["--agpe", "buckets=0.5,0.1"], "--agpe: AGPEConfig.buckets got (0.5, 0.1); expected a list or tuple"),
    (["--validation", "2048"], "--validation: expected 0 <= N < 2048"),
    (["--sparsity", "1.5"], "--sparsity/--block-size: agpe: AGPEConfig.target_sparsity got 1.5"),
    (["--block-size", "0"], "--sparsity/--block-size: agpe: AGPEConfig.block_size got 0"),
    (["--block-size", "7"], "--block-size: expected a divisor of every sparse layer's dimensions [784, 1000"),
    (["--hidden", "1000,x"], "--hidden: expected comma-separated integers, got '1000,x'"),
])
def test_bad_flags_are_named(tmp_path, args, message, capsys):
    # in this process (a subprocess per case spent most of its time importing torch); the
    # command line itself: test_a_bad_flag_exits_with_status_2_from_the_command_line
    with pytest.raises(SystemExit) as exited:
        _example_module().main(["--smoke", "--out", str(tmp_path), *args])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_flag_exits_with_status_2_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, EXAMPLE, "--smoke", "--out", str(tmp_path), "--agpe", "cooldown=-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--agpe: AGPEConfig.cooldown got -1; expected an int >= 0" in result.stderr


def _example_module():
    import importlib.util

    name = "agpe_example_fashion_mnist"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLE)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
        spec.loader.exec_module(module)
    return sys.modules[name]
