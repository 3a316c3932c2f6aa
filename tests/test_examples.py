"""The examples and benchmarks run end to end (tiny settings; CI smoke tests)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, timeout=600):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


def test_quickstart():
    stdout = run(["examples/quickstart.py"])
    assert "torch.ops.agpe.sparse_linear.default" in stdout
    assert "no: excluded by pattern 'head'" in stdout
    assert "step 19" in stdout


def test_train_step_benchmark_small(tmp_path):
    out = tmp_path / "train_step.json"
    stdout = run(["benchmarks/train_step.py", "--small", "--warmup", "0", "--iters", "1", "--schedule-steps", "80",
                  "--lowering", "aot_eager",
                  "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["schedule_compilations"] == results["schedule_bucket_sets"] <= 1 + results["schedule_crossings"]
    assert results["schedule_crossings"] >= 1 and results["mask_update_s"] > 0
    optimizers = ["foreach", "fused", "block_sparse"]  # each density is timed with each AdamW variant
    assert [(row["density"], row["optimizer"]) for row in results["rows"]] == [
        (d, o) for d in (1.0, 0.5, 0.25, 0.1) for o in optimizers]
    assert results["dense_optimizer"] in optimizers[:2]
    assert all(row["agpe_step_s"] > 0 for row in results["rows"])
    assert "agpe/dense" in stdout


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_char_lm_smoke(tmp_path):
    stdout = run(["examples/char_lm.py", "--smoke", "--lowering", "aot_eager", "--sparsities", "0.75",
                  "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["dense", "agpe-75"]
    assert results["runs"][1]["train_flops"] < results["runs"][0]["train_flops"]
    assert (tmp_path / "val_loss_vs_flops.png").stat().st_size > 0
    assert "agpe-75" in stdout
