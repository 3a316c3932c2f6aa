"""The JSONL audit trail records what really happened; the report renders it to PNGs."""

import builtins
import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F

from agpe_compile import report
from agpe_compile.controller import AGPEConfig, AuditLog, read_records

from .helpers import batches, make_run, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def agpe_run(tmp_path_factory):
    """An AGPE run of 24 steps with updates every 4 steps; the masks around each update."""
    path = str(tmp_path_factory.mktemp("audit") / "agpe.jsonl")
    config = AGPEConfig(policy="agpe", target_sparsity=0.75, block_size=4, update_interval=4, end_step=20,
                        audit_path=path, cooldown=0, patience=1)
    torch._dynamo.reset()
    _, opt, sp, cmodel, backend = make_run(config)
    masks = {}
    for step, (x, y) in enumerate(batches(24), start=1):
        loss = F.cross_entropy(cmodel(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        before = {n: s.block_mask.clone() for n, s in sp.layers.items()}
        sp.step(loss)
        masks[step] = (before, {n: s.block_mask.clone() for n, s in sp.layers.items()})
    return path, sp, masks, backend


def test_start_record(agpe_run):
    path, sp, _, _ = agpe_run
    start = read_records(path)[0]
    assert start["event"] == "start" and start["step"] == 0
    assert AGPEConfig.from_dict(start["config"]) == sp.config
    assert start["layers"]["fc2"] == {"shape": [32, 32], "block_size": 4, "grid": [8, 8]}


def test_interval_records_match_the_masks(agpe_run):
    path, sp, masks, _ = agpe_run
    records = [r for r in read_records(path) if r["event"] == "interval"]
    assert [r["step"] for r in records] == [4, 8, 12, 16, 20, 24]
    assert [r["updated"] for r in records] == [True] * 5 + [False]
    grown_at = {}  # (layer, step) -> blocks grown at that update
    for r in records:
        before, after = masks[r["step"]]
        for name, layer in r["layers"].items():
            grown_at[name, r["step"]] = ~before[name] & after[name]
            just_grown = grown_at.get((name, r["step"] - 4), torch.zeros_like(after[name]))
            assert layer["dropped_just_grown"] == int((before[name] & ~after[name] & just_grown).sum())
            assert layer["dropped"] == int((before[name] & ~after[name]).sum())
            assert layer["grown"] == int((~before[name] & after[name]).sum())
            assert layer["density_after"] == pytest.approx(float(after[name].float().mean()))
            assert layer["nonfinite_skips"] == 0
            assert set(layer["saliency"]) == {"mean", "max", "min", "active_mean"}
        assert r["global_density_after"] == pytest.approx(
            sum(int(m.sum()) for m in after.values()) / sum(m.numel() for m in after.values()))
        assert r["loss"] > 0 and (r["schedule"] is not None) == r["updated"]
    assert sum(layer["dropped"] for r in records for layer in r["layers"].values()) > 0
    assert records[-1]["global_density_after"] == 0.25 and records[-1]["bucket"] == 0.25
    sparse = [r["flops"]["sparse"] for r in records]
    assert sparse == sorted(sparse) and sparse[-1] == sp.flops.sparse
    # The graph compiled in the first interval; after that exactly one recompile follows
    # each update that moved layers to another layout bucket, and none otherwise.
    assert records[0]["recompiles"] == 1
    assert [r["recompiles"] for r in records[1:]] == [int(bool(r["rebucketed"])) for r in records[:-1]]
    assert sum(bool(r["rebucketed"]) for r in records) >= 3


def test_non_finite_values_are_written_as_null(tmp_path):
    log = AuditLog(str(tmp_path / "sub" / "a.jsonl"))
    log.write({"event": "x", "loss": float("nan"), "nested": {"v": float("inf")}})
    line = (tmp_path / "sub" / "a.jsonl").read_text()
    assert json.loads(line) == {"event": "x", "loss": None, "nested": {"v": None}}
    AuditLog(None).write({"event": "ignored"})  # no path: no file, no error


def test_report_renders_pngs(agpe_run, tmp_path, capsys):
    path = agpe_run[0]
    assert report.main([path, "--out", str(tmp_path)]) == 0
    for name in ("density_agpe.png", "loss_vs_flops.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'density_agpe.png'}" in out
    records = read_records(path)
    intervals = [r for r in records if r["event"] == "interval"]
    summary = report.summarize(records)
    assert summary["updates"] == sum(r["updated"] for r in intervals) == 5
    assert summary["dropped"] == sum(layer["dropped"] for r in intervals for layer in r["layers"].values()) > 0
    assert summary["regrown_dropped"] == sum(
        layer["dropped_just_grown"] for r in intervals for layer in r["layers"].values())
    assert summary["final_density"] == 0.25
    assert report.summary_line("agpe", summary) in out


def test_report_without_matplotlib_prints_the_summary_and_says_the_plots_need_it(agpe_run, tmp_path, capsys,
                                                                                  monkeypatch):
    # matplotlib is no dependency: without it the CLI gave a ModuleNotFoundError traceback and no summary
    path = agpe_run[0]
    summary = report.summary_line("agpe", report.summarize(read_records(path)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert report.main([path, "--out", str(tmp_path / "plots")]) == 1
    captured = capsys.readouterr()
    assert captured.out == summary + "\n"
    assert "plots need matplotlib: pip install matplotlib" in captured.err
    assert "the summary above is complete" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "plots").exists()  # no plot: no folder made for them
    monkeypatch.undo()  # with matplotlib: the summary first too, then the files written
    assert report.main([path, "--out", str(tmp_path / "plots")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == summary and lines[1:] == [f"wrote {tmp_path / 'plots' / name}"
                                                 for name in ("density_agpe.png", "loss_vs_flops.png")]


def test_report_summary_of_an_older_audit_file_says_what_it_lacks():
    layer = {"density_before": 1.0, "density_after": 0.5, "dropped": 4, "grown": 2}
    records = [{"event": "start"}, {"event": "interval", "updated": True, "layers": {"fc": layer},
                                    "global_density_after": 0.5, "flops": {"sparse": 3, "dense": 4}}]
    summary = report.summarize(records)
    assert summary["regrown_dropped"] is None and summary["flops_ratio"] == 0.75
    assert report.summary_line("old", summary) == (
        "old: 1 mask updates, 4 blocks dropped, 2 grown, of those dropped again at the next update: "
        "n/a (older audit file); final density 0.500, training FLOPs of the agpe layers 0.750x dense")


def test_report_summary_names_held_updates():
    # a held update (fp16 scores that overflowed) is no mask update; the summary said nothing of it
    layer = {"density_before": 1.0, "density_after": 1.0, "dropped": 0, "grown": 0, "dropped_just_grown": 0}
    records = [{"event": "start"}] + [
        {"event": "interval", "updated": updated, "schedule": schedule, "layers": {"fc": layer},
         "global_density_after": 1.0, "flops": {"sparse": 4, "dense": 4}}
        for updated, schedule in ((False, "hold:nonfinite-scores"), (True, "cubic"), (False, None))]
    summary = report.summarize(records)
    assert summary["updates"] == 1 and summary["held"] == 1
    assert report.summary_line("fp16", summary).startswith(
        "fp16: 1 mask updates (1 changed no block), 1 more held (their scores were not finite), 0 blocks dropped")


def _interval(step, dropped=2):
    layer = {"density_before": 1.0, "density_after": 0.5, "dropped": dropped, "grown": 0, "dropped_just_grown": 0}
    return {"event": "interval", "step": step, "updated": True, "layers": {"fc": layer}, "target_density": 0.5,
            "global_density_after": 0.5, "flops": {"sparse": step, "dense": 2 * step}}


def test_report_follows_the_last_timeline_of_a_resumed_or_rerun_log(tmp_path, capsys):
    # a crash at step 50 resumed from the step-30 checkpoint wrote 35..50 twice: 16 updates for 12
    resumed = ([{"event": "start", "step": 0}] + [_interval(s) for s in range(5, 55, 5)]
               + [{"event": "start", "step": 0}] + [_interval(s) for s in range(35, 65, 5)])
    assert [r["step"] for r in report._intervals(resumed)] == list(range(5, 65, 5))
    assert report.summarize(resumed)["updates"] == 12 and report.superseded(resumed) == 4
    rerun = [{"event": "start", "step": 0}] + [_interval(s) for s in (5, 10)] * 2  # the same script twice
    assert report.summarize(rerun)["updates"] == 2 and report.summarize(rerun)["dropped"] == 4
    path = tmp_path / "rs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in resumed))
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert "4 interval record(s) are superseded by a later run or a resume" in captured.err
    assert "rs: 12 mask updates, 24 blocks dropped" in captured.out


def test_report_rejects_a_missing_file(tmp_path):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope.jsonl")])


def test_report_of_a_folder_says_to_give_its_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path)])
    assert f"{tmp_path} is a folder; give the audit files in it" in capsys.readouterr().err


def test_report_without_out_leaves_the_plots_beside_the_audit_file_alone(agpe_run, tmp_path):
    import shutil

    run = tmp_path / "agpe.jsonl"
    shutil.copy(agpe_run[0], run)
    (tmp_path / "loss_vs_flops.png").write_bytes(b"the example's comparison of five methods")
    assert report.main([str(run)]) == 0
    assert (tmp_path / "loss_vs_flops.png").read_bytes() == b"the example's comparison of five methods"
    assert (tmp_path / "report" / "loss_vs_flops.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("content, message", [
    (b"", "no complete records (an agpe audit file has a 'start' record"),
    (b'{"event": "sta', "no complete records"),  # a torn only line is no "empty" file (audit BC)
    (b'{"event": "start"}\nnot json\n', "line 2 is not JSON"),
    (b"[1, 2]\n", "line 1 is not a JSON object"),
    (b"\x80\x81", "not a UTF-8 text file"),
    (b'{"event": "start"}\n{"event": "interv\n{"event": "interval"}\n', "line 2 is not JSON"),  # not a restart
])
def test_report_names_what_is_wrong_with_a_file(tmp_path, capsys, content, message):
    path = tmp_path / "run.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.png"))  # nothing written


def test_a_record_cut_short_by_a_killed_run_is_skipped_and_the_next_run_starts_a_line(agpe_run, tmp_path, caplog):
    # the report refused the whole log over its torn last line, and a run appended after it
    # glued its first record onto the torn one
    path = tmp_path / "torn.jsonl"
    whole = open(agpe_run[0], encoding="utf-8").read()
    path.write_text(whole[:-200])  # killed while writing the last record
    with caplog.at_level(logging.WARNING):
        records = read_records(str(path))
    assert len(records) == whole.count("\n") - 1
    assert f"{path}: line {whole.count(chr(10))} is a record cut short" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    assert caplog.text.count("is a record cut short") == 1  # the plots reuse the records read (it said it twice)
    AuditLog(str(path)).write({"event": "start", "step": 0})  # a new run appends to the same file
    AuditLog(str(path)).write({"event": "interval", "step": 5})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = read_records(str(path))
    assert again[:-2] == records and again[-2:] == [{"event": "start", "step": 0}, {"event": "interval", "step": 5}]
    assert "is a record cut short" in caplog.text


def test_tensorboard_is_skipped_cleanly_without_it(agpe_run, tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level(logging.WARNING):
        written = report.render([agpe_run[0]], str(tmp_path), tensorboard_dir=str(tmp_path / "tb"))
    assert "TensorBoard logging skipped" in caplog.text
    assert len(written) == 2 and not (tmp_path / "tb").exists()


def test_report_tells_a_fresh_run_from_a_resume_by_the_start_and_load_records():
    # a second, fresh run with a longer interval (8, 16 after 2, 4, 6) was merged into the first
    start = {"event": "start", "step": 0, "audit_version": 2}
    fresh = [start] + [_interval(s) for s in (2, 4, 6)] + [start] + [_interval(s) for s in (8, 16)]
    assert [r["step"] for r in report._intervals(fresh)] == [8, 16] and report.superseded(fresh) == 3
    resumed = ([start] + [_interval(s) for s in range(5, 55, 5)] + [start, {"event": "load", "step": 30}]
               + [_interval(s) for s in range(35, 65, 5)])
    assert [r["step"] for r in report._intervals(resumed)] == list(range(5, 65, 5))
    seamless = [start] + [_interval(s) for s in (5, 10)] + [start, {"event": "load", "step": 10}, _interval(15)]
    assert [r["step"] for r in report._intervals(seamless)] == [5, 10, 15]
    # AGPETrainer's load_best_model_at_end reloads step 2's state after the run: nothing is superseded
    best = [start] + [_interval(s) for s in (2, 4, 6, 8)] + [{"event": "load", "step": 2}]
    assert [r["step"] for r in report._intervals(best)] == [2, 4, 6, 8] and report.superseded(best) == 0


def test_a_restored_sparsifier_writes_a_load_record(tmp_path):
    path = tmp_path / "a.jsonl"
    config = AGPEConfig(policy="agpe", block_size=4, update_interval=2, end_step=8, audit_path=str(path))
    _, opt, sp, cmodel, _ = make_run(config)
    train(cmodel, opt, sp, batches(4))
    state = sp.state_dict()
    sp.close()
    _, _, again, _, _ = make_run(config)
    again.load_state_dict(state)
    records = read_records(str(path))
    assert [r["event"] for r in records if r["event"] in ("start", "load")] == ["start", "start", "load"]
    assert records[-1] == {"event": "load", "step": 4} and records[0]["audit_version"] == 2
