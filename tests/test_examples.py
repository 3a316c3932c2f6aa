"""The examples and benchmarks run end to end (tiny settings; CI smoke tests)."""

import json
import math
import os
import re
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
    stripped = re.search(r"stripped 8 layers .*; (\d+) state_dict keys; max \|plain - agpe\| = (\S+)", stdout)
    assert stripped is not None, stdout[-1000:]
    assert float(stripped.group(2)) < 1e-4


def test_ddp_example_two_ranks_stay_identical():
    stdout = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "examples/ddp_fashion_mnist.py", "--max-steps", "30", "--update-interval", "5"])
    assert "2 ranks, 30 steps" in stdout and "identical across ranks: yes" in stdout, stdout[-2000:]
    assert re.search(r"test accuracy \d+\.\d+% at density 0\.\d+", stdout), stdout[-2000:]


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


def test_train_step_profile_sums_device_rows_only():
    # An operator row (aten::mm, CPU) carries the time of the kernels it launched: summing
    # every row counted an eager dense step's kernels twice (38.5 ms for a 19.5 ms step on
    # the H200, twenty-first session)
    import importlib.util
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(ROOT, "benchmarks", "train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=700.0),  # aten::mm
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=700.0),  # its kernel
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=50.0),  # a Triton kernel
            SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=0.0)]  # host-only op
    assert bench.device_time_us(rows) == 750.0


def test_train_step_times_each_variant_with_its_own_zero_hooks_only(monkeypatch):
    # The zero-weight hooks are global: each make_step installed another set and none was
    # removed, so the variant timed last re-zeroed every layer once per variant timed before
    # (the twenty-fifth session's H200 run: torch AdamW "fused" at d=0.25 took 1.54x the dense
    # step, host-bound at 29.9 ms of issue per step, against 0.73x in the twenty-first)
    import importlib.util

    import torch

    import agpe_compile
    from agpe_compile import zero_weights

    spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(ROOT, "benchmarks", "train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    size = dict(bench.SMALL_SIZE, batch=2, seq=16)
    device = torch.device("cpu")
    model = bench.make_stack(size, device)
    states = agpe_compile.prepare(model, options={"block_size": size["block"]})
    for state in states.values():
        state.zero_inactive = True
    bench.set_density(model, 0.5)
    x = torch.randn(size["batch"], size["seq"], size["d_model"])
    calls = []
    real = zero_weights.zero_inactive_
    monkeypatch.setattr(zero_weights, "zero_inactive_", lambda state: (calls.append(state), real(state)))
    try:
        for kind in ("foreach", "fused", "foreach"):
            step = bench.make_step(kind, model, model, x, device)
        step()  # the first step after set_density also syncs the edited masks
        calls.clear()
        step()
        assert len(calls) == len(states), f"{len(calls)} re-zero passes for {len(states)} layers"
    finally:
        while bench._ZERO_HOOKS:
            bench._ZERO_HOOKS.pop().remove()


def test_gpu_host_probe_eager_op_part_runs_on_the_cpu(capsys):
    # the probe runs only on a lent GPU (one call of a short lease): its eager-op part, the
    # one new since its last GPU run, is smoke-tested here on small CPU shapes
    import importlib.util

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("gpu_host_probe", os.path.join(ROOT, "benchmarks",
                                                                                     "gpu_host_probe.py"))
        probe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(probe)
        probe.eager_op_profile(2, 0.25, device="cpu", shape=(64, 64, 64), block=16)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    out = capsys.readouterr().out
    assert re.search(r"== eager op 64x64x64 d=0.25: host issue \d+\.\d+ ms", out), out[-2000:]
    assert "cProfile of 2 calls by cumulative" in out


def test_cpu_layer_benchmark(tmp_path):
    out = tmp_path / "cpu_layer.json"
    stdout = run(["benchmarks/cpu_layer.py", "--rows", "4", "--features", "16", "--block", "8",
                  "--densities", "1.0,0.5", "--out", str(out)])
    figures = json.loads(out.read_text())["ms"]
    assert list(figures) == ["plain F.linear", "agpe d=1", "agpe d=1 zero promise", "agpe d=0.5",
                             "agpe d=0.5 zero promise"]
    assert all(ms > 0 for ms in figures.values()) and "vs plain" in stdout


def test_cpu_step_benchmark(tmp_path):
    out = tmp_path / "cpu_step.json"
    stdout = run(["benchmarks/cpu_step.py", "--width", "8", "--layers", "2", "--steps", "2", "--repeats", "1",
                  "--density", "0.5", "--saliency", "magnitude", "--out", str(out)])
    result = json.loads(out.read_text())
    figures = result["ms_per_step"]
    assert list(figures) == ["plain", "agpe", "agpe_functional"]
    assert all(ms > 0 for ms in figures.values()) and "/ plain" in stdout
    assert result["density"] == {"plain": 1.0, "agpe": 0.5, "agpe_functional": 0.5}  # what was timed


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_char_lm_smoke(tmp_path):
    stdout = run(["examples/char_lm.py", "--smoke", "--lowering", "aot_eager", "--sparsities", "0.75",
                  "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["dense", "agpe-75"]
    assert results["runs"][1]["train_flops"] < results["runs"][0]["train_flops"]
    assert (tmp_path / "val_loss_vs_flops.png").stat().st_size > 0
    assert "agpe-75" in stdout


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_hf_trainer_example_smoke(tmp_path):
    pytest.importorskip("accelerate")
    stdout = run(["examples/hf_trainer.py", "--smoke", "--lowering", "aot_eager", "--out", str(tmp_path)])
    rows = {line.split("|")[0].strip(): [cell.strip() for cell in line.split("|")[1:]]
            for line in stdout.splitlines() if line.count("|") == 5}
    assert set(rows) == {"run", "dense", "agpe-75"}
    assert float(rows["agpe-75"][2].rstrip("x")) < 1.0 and float(rows["agpe-75"][3]) == 0.25  # pruned, fewer FLOPs
    assert float(rows["dense"][2].rstrip("x")) == 1.0
    for value in (rows["dense"][0], rows["agpe-75"][0]):
        assert math.isfinite(float(value))


def test_char_lm_reads_the_text_from_a_file(tmp_path):
    text = tmp_path / "kjv.txt"
    verse = "In the beginning God created the heaven and the earth.\n\n  And the earth was without form.  \n"
    text.write_text(verse * 400)
    stdout = run(["examples/char_lm.py", "--smoke", "--lowering", "aot_eager", "--sparsities", "0.75",
                  "--text-file", str(text), "--set", "steps=8", "--set", "lr=0.002", "--out", str(tmp_path / "out")])
    assert "agpe-75" in stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["run"] for r in results["runs"]] == ["dense", "agpe-75"]
    assert results["setting"]["steps"] == 8 and results["setting"]["lr"] == 0.002  # --set overrides
    assert [p["step"] for p in results["runs"][0]["curve"]] == [6, 8]
    assert results["options"] == {"seed": 0, "prune_until": results["options"]["prune_until"],
                                  "lowering": "aot_eager", "text": os.path.abspath(text)}
    # a rerun with the same settings keeps the run it does not train again (audit BC)
    stdout = run(["examples/char_lm.py", "--smoke", "--lowering", "aot_eager", "--sparsities", "0.5",
                  "--text-file", str(text), "--set", "steps=8", "--set", "lr=0.002", "--out", str(tmp_path / "out")])
    assert "(results.json and the plot also keep agpe-75 of an earlier run with the same settings)" in stdout
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["run"] for r in again["runs"]] == ["dense", "agpe-75", "agpe-50"]
    assert again["runs"][1] == results["runs"][1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl*")) == ["agpe-50.jsonl", "agpe-75.jsonl",
                                                                           "dense.jsonl"]


def test_char_lm_says_why_bible_failed(tmp_path, monkeypatch):
    # audit BC: a failing `bible` gave a bare CalledProcessError without bible's own message
    fake = tmp_path / "bin" / "bible"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cannot open data file' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import char_lm
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match=r"failed \(exit status 2\): cannot open data file; reinstall"):
        char_lm.load_text(None)


def test_char_lm_refuses_a_block_size_that_does_not_divide_the_model(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "char_lm.py"), "--smoke",
                             "--block-size", "7", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--block-size: expected a positive divisor of d_model=" in result.stderr and "Traceback" not in result.stderr


def test_char_lm_names_a_missing_text_file(tmp_path):
    missing = tmp_path / "nope.txt"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "char_lm.py"), "--smoke",
                             "--text-file", str(missing), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"--text-file {str(missing)!r} does not exist" in result.stderr


def test_char_lm_reads_its_text_from_a_pipe(tmp_path):
    # `--text-file <(bible ...)`: a pipe is no regular file and was called missing
    import threading

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import char_lm
    finally:
        sys.path.pop(0)
    pipe = tmp_path / "fifo"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text("In the beginning\n\n  God created\n"))
    writer.start()
    assert char_lm.load_text(str(pipe)) == "In the beginning\nGod created"
    writer.join()
    with pytest.raises(SystemExit, match="is a folder; expected the text file"):
        char_lm.load_text(str(tmp_path))


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_char_lm_text_file_holds_the_same_text_as_bible(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import char_lm
    finally:
        sys.path.pop(0)
    raw = subprocess.run(["bible", "-l0", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    (tmp_path / "kjv.txt").write_text(raw, encoding="utf-8")
    assert char_lm.load_text(str(tmp_path / "kjv.txt")) == char_lm.load_text()


def test_char_lm_counts_attention_flops_on_the_cpu():
    # torch's FlopCounterMode has no formula for the CPU attention kernel: every CPU char-LM
    # run logged attention as 0 FLOPs (helper audit BU), so its FLOP ratios left it out
    import importlib.util

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        spec = importlib.util.spec_from_file_location("char_lm", os.path.join(ROOT, "examples", "char_lm.py"))
        char_lm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(char_lm)
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    q = torch.randn(2, 4, 64, 32, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=char_lm._cpu_attention_formulas()) as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    forward = 4 * 2 * 4 * 64 * 64 * 32  # QK^T and AV, torch's formula (no causal halving)
    assert counter.get_total_flops() == 3.5 * forward  # forward + torch's backward (2.5x)


def test_char_lm_writes_the_unfinished_run_at_each_evaluation(tmp_path, monkeypatch):
    # results.json was written only when a run finished: a device call's time limit that
    # stopped the second (agpe) run of `--full` returned none of it (helper audit BU)
    import importlib.util

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        spec = importlib.util.spec_from_file_location("char_lm_partial", os.path.join(ROOT, "examples", "char_lm.py"))
        char_lm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(char_lm)
    finally:
        sys.path.remove(os.path.join(ROOT, "examples"))
    text = tmp_path / "text.txt"
    text.write_text("In the beginning God created the heaven and the earth. " * 200)
    written = []
    real = char_lm.write_results
    monkeypatch.setattr(char_lm, "write_results",
                        lambda out, header, runs: (written.append({n: dict(r) for n, r in runs.items()}),
                                                   real(out, header, runs)))
    char_lm.main(["--smoke", "--text-file", str(text), "--sparsities", "0.75", "--lowering", "aot_eager",
                  "--out", str(tmp_path / "out")])
    partial = [(name, row["partial_step"]) for runs in written for name, row in runs.items() if "partial_step" in row]
    assert ("dense", 6) in partial and ("agpe-75", 6) in partial, partial
    final = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["run"] for r in final["runs"]] == ["dense", "agpe-75"]
    assert not any("partial_step" in r for r in final["runs"])  # replaced by the finished rows


@pytest.mark.parametrize("stage", ["setting", "density", "everywhere"])
def test_a_tma_setting_that_fails_is_marked_failed_and_the_others_are_timed(monkeypatch, stage):
    # audit CW: a TMA setting whose compile failed raised out of run(), and main() re-ran every
    # setting with opaque ops (the working ones too) on a 15-minute lease
    import importlib.util

    import torch

    import agpe_compile

    spec = importlib.util.spec_from_file_location("train_step_bench", os.path.join(ROOT, "benchmarks", "train_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.delenv("AGPE_TMA", raising=False)
    bad = {"off", "persistent"} if stage == "everywhere" else {"persistent"}

    def broken():
        if os.environ.get("AGPE_TMA") in bad:
            raise RuntimeError(f"simulated compile failure under {os.environ['AGPE_TMA']}")

    if stage == "density":  # the setting's first step works, its rebucketed layouts fail
        real_rebucket = agpe_compile.rebucket
        monkeypatch.setattr(agpe_compile, "rebucket", lambda model: (broken(), real_rebucket(model))[1])
    else:
        real_step = bench.training_step
        # (the dense step runs before any setting, with AGPE_TMA unset)
        monkeypatch.setattr(bench, "training_step", lambda *a, **k: (broken(), real_step(*a, **k))[1])
    size = dict(bench.SMALL_SIZE, batch=2, seq=16)
    lines = []
    kwargs = dict(inductor=False, log=lines.append, densities=(0.5, 0.25), optimizers=("foreach",),
                  mask_update=False, tma_settings=("off", "persistent"))
    try:
        if stage == "everywhere":  # nothing timed: the error goes to main(), which falls back to opaque ops
            with pytest.raises(RuntimeError, match="simulated compile failure under off"):
                bench.run(size, torch.device("cpu"), 0, 1, **kwargs)
            assert os.environ.get("AGPE_TMA") is None  # the environment is put back
            return
        results = bench.run(size, torch.device("cpu"), 0, 1, **kwargs)
    finally:
        while bench._ZERO_HOOKS:
            bench._ZERO_HOOKS.pop().remove()
    rows = [(row["density"], row["tma"], "agpe_step_s" in row, row.get("failed", False)) for row in results["rows"]]
    assert rows == [(0.5, "off", True, False), (0.25, "off", True, False),
                    (0.5, "persistent", False, True), (0.25, "persistent", False, True)], rows
    assert all("simulated compile failure under persistent" in row["error"] for row in results["rows"][2:])
    assert sum("persistent" in line and "FAILED" in line for line in lines) == 2, lines
    assert results["timings_done"] and os.environ.get("AGPE_TMA") is None


def test_train_step_times_several_tma_settings_in_one_process(tmp_path):
    # the twenty-fifth session's non-graphed comparison of AGPE_TMA off / persistent came from
    # two processes that differed more than the effect: --tma-settings times both in one
    out = tmp_path / "train_step.json"
    stdout = run(["benchmarks/train_step.py", "--small", "--warmup", "0", "--iters", "1", "--lowering", "aot_eager",
                  "--densities", "0.5", "--optimizers", "foreach", "--no-mask-update", "--schedule-steps", "0",
                  "--tma-settings", "off,persistent", "--out", str(out)])
    results = json.loads(out.read_text())
    assert [(row["density"], row["optimizer"], row["tma"]) for row in results["rows"]] == [
        (0.5, "foreach", "off"), (0.5, "foreach", "persistent")]
    assert "AGPE_TMA" in stdout
    # the settings the rows ran, not the environment's value put back after them (audit CW LOW-4)
    assert results["tma_setting"] == "off,persistent"
    assert sorted(results["agpe_first_step_s_by_tma"]) == ["off", "persistent"]
