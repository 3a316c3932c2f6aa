"""Data-parallel training (Note [Data-parallel masks]): two gloo ranks on the CPU, each in
its own process, decide the same masks and keep the same weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(tmp_path, mode, policy, *flags, world=2):
    port = _free_port()
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:  # files, not pipes: a rank blocked on a full pipe would stall the others
            procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", str(r), str(world),
                                           str(port), str(outs[r]), mode, policy, *flags],
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-4000:]
    return [torch.load(o, weights_only=False) for o in outs]


@pytest.mark.parametrize("mode,policy,flags", [("explicit", "agpe", ()), ("explicit", "rigl", ()),
                                              ("zerocode", "agpe", ()), ("explicit", "agpe", ("--outside",))])
def test_ranks_decide_the_same_masks_and_keep_the_same_weights(tmp_path, mode, policy, flags):
    ranks = _run(tmp_path, mode, policy, *flags)
    for r in ranks:
        assert "error" not in r, r["error"]
    first, second = ranks
    assert sorted(first["masks"]) == ["fc1", "fc2", "out"]
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]), name
    assert min(float(m.float().mean()) for m in first["masks"].values()) < 1.0  # masks were updated
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
    for name, ema in first["ema"].items():
        assert torch.equal(ema, second["ema"][name]), name
    assert first["losses"] != second["losses"]  # the ranks did see different data
    assert "fc1.weight_saliency" in first["ddp_ignored"]  # DDP does not broadcast the running sums


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_through_inductor_keep_the_same_model(tmp_path):
    first, second = _run(tmp_path, "explicit", "agpe", "--cuda")
    for r in (first, second):
        assert "error" not in r, r["error"]
    assert first["block_sizes"] == {"fc1": 32, "fc2": 32, "out": 32}
    assert min(float(m.float().mean()) for m in first["masks"].values()) < 1.0
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]), name
    for name, weight in first["weights"].items():
        assert torch.equal(weight, second["weights"][name]), name
    assert first["losses"] != second["losses"]


def test_data_parallel_off_lets_each_rank_decide_alone(tmp_path):
    # Ranks that train different models (here: different data and no averaging) decide
    # their own masks; nothing is averaged or checked.
    first, second = _run(tmp_path, "explicit", "agpe", "--data-parallel-off", "--edit-mask")
    for r in (first, second):
        assert "error" not in r, r["error"]
    assert first["ema"]["fc1"].shape == second["ema"]["fc1"].shape
    assert any(not torch.equal(first["ema"][n], second["ema"][n]) for n in first["ema"])


def test_a_mask_edited_on_one_rank_only_is_an_error_on_every_rank(tmp_path):
    ranks = _run(tmp_path, "explicit", "agpe", "--edit-mask")
    for r in ranks:
        assert "block masks differ between the 2 ranks" in r.get("error", ""), r.get("error")
        assert "fc2" in r["error"]


@pytest.mark.parametrize("flags", [(), ("--outside",)])
def test_ddp_optimizer_split_graphs_find_the_prepared_layers(tmp_path, flags):
    # A model larger than one gradient bucket: DDPOptimizer compiles each piece of the graph
    # with fake example inputs and runs it on fakes (Note [Fake example inputs]).
    (rank,) = _run(tmp_path, "explicit", "agpe", "--split", *flags, world=1)
    assert "error" not in rank, rank["error"]
    assert rank["block_sizes"] == {"fc1": 16, "fc2": 16, "out": 16}
    assert all(rows == 16 * 30 for rows in rank["rows"].values()), rank["rows"]  # every step ran the agpe op
    assert min(float(m.float().mean()) for m in rank["masks"].values()) < 1.0


def test_ranks_with_different_configs_are_refused_when_the_sparsifiers_are_created(tmp_path):
    # Otherwise their collectives would differ later (gloo aborts the process, NCCL hangs).
    ranks = _run(tmp_path, "explicit", "agpe", "--rank1-interval", "10")
    for r in ranks:
        assert r.get("at") == "creation" and "different AGPEConfigs or different layers" in r["error"], r


def test_the_audit_file_is_written_once_by_rank_0(tmp_path):
    path = tmp_path / "audit.jsonl"
    ranks = _run(tmp_path, "explicit", "agpe", "--audit", str(path))
    assert all("error" not in r for r in ranks)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records].count("start") == 1
    assert [r["step"] for r in records if r["event"] == "interval"] == [5, 10, 15, 20, 25, 30]


def test_the_audit_counts_every_ranks_skipped_scores(tmp_path):
    # rank 1's backward overflowed at step 3: rank 0 wrote its own count, 0
    path = tmp_path / "audit.jsonl"
    ranks = _run(tmp_path, "explicit", "agpe", "--audit", str(path), "--rank1-overflow-step", "3")
    assert all("error" not in r for r in ranks)
    first = [json.loads(line) for line in path.read_text().splitlines() if '"interval"' in line][0]
    assert {name: layer["nonfinite_skips"] for name, layer in first["layers"].items()} == {
        "fc1": 1, "fc2": 1, "out": 1}


def test_a_checkpoint_between_two_updates_resumes_exactly_with_each_ranks_own_state(tmp_path):
    """Note [Ranks' own state]: saved at step 12 (updates every 5), rank 0's checkpoint
    alone gives every rank rank 0's interval sums; each rank's rank_state_dict() restores
    its own, and the resumed run is the uninterrupted one."""
    ranks = _run(tmp_path, "explicit", "agpe", "--resume-at", "12")
    for r in ranks:
        for part in ("masks", "weights", "ema", "buffers"):
            for name, value in r["straight"][part].items():
                assert torch.equal(value, r["with"][part][name]), (part, name)
        # the case the rank state is for: without it the interval's sums were rank 0's, which
        # the saliency EMA keeps (here the masks came out the same; in the Hugging Face test
        # they do not), and the counters are rank 0's
        differ = [(part, name) for part in ("ema", "buffers") for name, value in r["straight"][part].items()
                  if not torch.equal(value, r["without"][part][name])]
        assert differ
        assert "saved by rank" in r["other_rank"] and "load each rank's own file" in r["other_rank"]


def test_ddp_optimizer_pieces_stay_whole_after_the_masks_changed(tmp_path):
    """DDPOptimizer runs each compiled piece on FakeTensors to propagate shapes; the call
    wrapper synced a changed mask's layout there and raised a data-dependent error, so
    Dynamo dropped the split graph and compiled every layer on its own (re-audit CG)."""
    import torch.distributed as dist
    from torch import nn

    import agpe_compile

    from .models import MLP, aot_backend, set_random_masks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        counts, outputs = [], []
        for changed in (False, True):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = MLP((256, 512, 512, 256, 8))
            agpe_compile.prepare(model, options={"block_size": 32})
            if changed:
                set_random_masks(model, 0.5)
            backend = aot_backend()
            compiled = torch.compile(nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1), backend=backend)
            x = torch.randn(6, 256, generator=torch.Generator().manual_seed(0))
            outputs.append((compiled(x), model(x)))
            counts.append(backend.graph_count)
    finally:
        dist.destroy_process_group()
    assert counts[0] == counts[1] == 2, counts  # two pieces, not one graph per layer
    for compiled_out, eager_out in outputs:
        torch.testing.assert_close(compiled_out, eager_out)
