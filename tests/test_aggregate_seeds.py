"""examples/aggregate_seeds.py on synthetic results.json files (no training)."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "aggregate_seeds.py")
_spec = importlib.util.spec_from_file_location("aggregate_seeds", SCRIPT)
agg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(agg)

SETTINGS = {"hidden": [1000, 1000, 1000], "sparsity": 0.9, "block_size": 8}
ACC = {  # seed -> method -> accuracy
    0: {"dense": 90.5, "agpe": 90.0, "rigl": 90.1, "set": 89.7, "gmp": 89.8},
    1: {"dense": 90.3, "agpe": 90.1, "rigl": 89.9, "set": 89.6, "gmp": 89.9},
    2: {"dense": 90.7, "agpe": 90.2, "rigl": 90.0, "set": 89.8},
}
FLOPS = {"dense": 1.0, "agpe": 0.18, "rigl": 0.105, "set": 0.103, "gmp": 0.22}


def figures(method, accuracy, seed):
    return {"accuracy": accuracy, "flops_ratio": FLOPS[method] + 0.001 * seed, "seconds": 300.0 + seed,
            "graphs": 8 if method == "agpe" else 2, "sparsifier_pct": 0.3, "update_ms": 10.0,
            "density": 1.0 if method == "dense" else 0.1}


def write(path, seed, methods, **extra):
    path.mkdir(parents=True, exist_ok=True)
    data = {"example": "fashion_mnist", "mode": "full", "seed": seed, "epochs": 15, "settings": SETTINGS,
            "methods": {m: figures(m, ACC[seed][m], seed) for m in methods}, **extra}
    (path / "results.json").write_text(json.dumps(data))
    return path


@pytest.fixture
def three_seeds(tmp_path):
    return [write(tmp_path / f"seed{s}", s, list(ACC[s])) for s in ACC]


def test_mean_and_sample_std_per_method(three_seeds):
    runs, sources, warnings = agg.load_runs([str(p) for p in three_seeds])
    assert sorted(runs) == [0, 1, 2] and sources == {} and warnings == []
    acc = agg.summarize(runs)
    assert list(acc) == ["dense", "agpe", "rigl", "set", "gmp"]
    mean, std, n = acc["dense"]
    assert n == 3 and mean == pytest.approx(90.5) and std == pytest.approx(0.2)  # sample std (n-1)
    assert std == pytest.approx(statistics.stdev([90.5, 90.3, 90.7]))
    assert acc["gmp"][2] == 2 and acc["gmp"][0] == pytest.approx(89.85)  # gmp ran in two seeds only
    flops = agg.summarize(runs, "flops_ratio")
    assert flops["agpe"][0] == pytest.approx(0.181)


def test_single_value_has_no_std():
    mean, std, n = agg.mean_std([3.0])
    assert (mean, n) == (3.0, 1) and math.isnan(std)
    assert math.isnan(agg.mean_std([])[0])


def test_per_seed_gaps(three_seeds):
    runs, _, _ = agg.load_runs([str(p / "results.json") for p in three_seeds])  # files or folders
    dense = agg.gaps(runs, "agpe", "dense")
    assert dense == pytest.approx({0: -0.5, 1: -0.2, 2: -0.5})
    assert agg.gaps(runs, "agpe", "rigl") == pytest.approx({0: -0.1, 1: 0.2, 2: 0.2})
    assert agg.gaps(runs, "agpe", "gmp") == pytest.approx({0: 0.2, 1: 0.2})  # seed 2 has no gmp


def test_verdict_on_the_means(three_seeds):
    runs, _, _ = agg.load_runs(three_seeds)
    lines = agg.verdict(runs)
    # AGPE − dense = 90.1 − 90.5 = −0.4 (within 0.5); − RigL = +0.1; − SET = +0.4
    assert lines[0].startswith("AGPE within 0.5 points of dense on the mean: yes") and "-0.40" in lines[0]
    assert lines[1].startswith("AGPE at or above RigL on the mean: yes") and "+0.10" in lines[1]
    assert lines[2].startswith("AGPE at or above SET on the mean: yes")
    assert agg.verdict(runs, tolerance=0.3)[0].startswith("AGPE within 0.3 points of dense on the mean: no")


def test_a_method_run_separately_is_merged_into_its_seed(tmp_path):
    main = write(tmp_path / "seed1", 1, ["dense", "agpe", "rigl", "set"])
    extra = write(tmp_path / "seed1_gmp", 1, ["gmp"])
    runs, _, _ = agg.load_runs([main, extra])
    assert list(runs[1]) == ["dense", "agpe", "rigl", "set", "gmp"]
    with pytest.raises(ValueError, match="'gmp' of seed 1"):
        agg.load_runs([main, extra, write(tmp_path / "again", 1, ["gmp"])])


def test_differing_settings_warn_and_transcribed_seeds_are_marked(tmp_path):
    a = write(tmp_path / "a", 0, ["dense", "agpe"], source="transcribed from docs")
    b = write(tmp_path / "b", 1, ["dense", "agpe"], epochs=2)
    runs, sources, warnings = agg.load_runs([a, b])
    assert sources == {0: ["transcribed from docs"]}
    assert len(warnings) == 1 and "epochs" in warnings[0]
    text = agg.report(runs, sources)
    # a hand-made file may hold fewer figures: those are averaged over the seeds that have them
    runs[0]["agpe"] = {"accuracy": 90.0, "flops_ratio": 0.177}
    table = agg.report(runs, sources).splitlines()
    assert any(line.startswith("| agpe | 2 | 90.05 ± 0.07 | 0.179 ± 0.003 | 301 (n=1) |") for line in table)
    assert "seed 0*" in text and "\\* seed 0: transcribed from docs" in text


def test_differing_agpe_settings_warn_and_a_file_given_twice_is_refused(tmp_path):
    # audit BC: a taylor and a magnitude agpe run were averaged without a word
    a = write(tmp_path / "a", 0, ["dense", "agpe"], agpe_settings={"saliency": "magnitude"})
    b = write(tmp_path / "b", 1, ["dense", "agpe"], agpe_settings={"saliency": "taylor"})
    _, _, warnings = agg.load_runs([a, b])
    assert len(warnings) == 1 and "agpe_settings" in warnings[0]
    c = write(tmp_path / "c", 2, ["dense", "agpe"], agpe_settings={})  # re-audit BD: a key only one file has
    _, _, warnings = agg.load_runs([a, c])
    assert len(warnings) == 1 and "agpe_settings" in warnings[0]
    d = write(tmp_path / "d", 1, ["dense", "agpe"])  # re-audit BE: written before the key existed (= {})
    _, _, warnings = agg.load_runs([a, d])
    assert len(warnings) == 1 and "agpe_settings" in warnings[0]
    assert agg.load_runs([d, c])[2] == []  # the defaults of its day, recorded as {} since
    assert agg.load_runs([write(tmp_path / "f", 2, ["dense"], agpe_settings={"saliency": "taylor"}), a])[2] == []
    # (a file without an agpe run: its agpe settings do not matter)
    # re-audit BH: nor does its place; the agpe runs of later files are compared with each other
    first = write(tmp_path / "g", 2, ["dense", "rigl"], agpe_settings={})
    for order in ([first, a, b], [first, b, a], [b, first, a]):
        warnings = agg.load_runs(order)[2]
        assert len(warnings) == 1 and "agpe_settings" in warnings[0], order
    with pytest.raises(ValueError, match="given more than once"):
        agg.load_runs([a, a / "results.json"])


def test_not_a_results_file(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="needs 'seed' and 'methods'"):
        agg.load_runs([tmp_path / "x.json"])


def test_command_line_prints_and_writes_the_report(three_seeds, tmp_path):
    out = tmp_path / "summary.md"
    result = subprocess.run([sys.executable, SCRIPT, *map(str, three_seeds), "--out", str(out)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == result.stdout
    lines = result.stdout.splitlines()
    assert "| dense | 90.50 (1.000×) | 90.30 (1.001×) | 90.70 (1.002×) | 90.50 ± 0.20 | 1.001 ± 0.001× |" in lines
    assert any(line.startswith("| gmp | 89.80 (0.220×) | 89.90 (0.221×) | — | 89.85 ± 0.07 |") for line in lines)
    assert "| agpe − dense | -0.50 | -0.20 | -0.50 | -0.40 ± 0.17 |" in lines
    assert "| agpe − rigl | -0.10 | +0.20 | +0.20 | +0.10 ± 0.17 |" in lines
    assert any(line.startswith("| agpe | 3 | 90.10 ± 0.10 | 0.181 ± 0.001 |") for line in lines)


def test_replace_lets_a_later_run_of_a_method_win_and_lists_it(tmp_path):
    old = write(tmp_path / "old", 0, ["dense", "agpe", "rigl"])
    new = write(tmp_path / "new", 0, ["agpe"])
    data = json.loads((new / "results.json").read_text())
    data["methods"]["agpe"]["accuracy"] = 91.0
    data["settings"] = {**SETTINGS, "validation": 0}  # a newer file with one more settings key
    (new / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="--replace lets later files replace it"):
        agg.load_runs([old, new])
    runs, _, warnings = agg.load_runs([old, new], replace=True)
    assert runs[0]["agpe"]["accuracy"] == 91.0 and runs[0]["rigl"]["accuracy"] == ACC[0]["rigl"]
    assert warnings == [f"{new / 'results.json'}: method 'agpe' of seed 0 replaces the one from "
                        f"{old / 'results.json'}"]


def test_validation_and_test_accuracies_are_never_mixed(tmp_path):
    test = write(tmp_path / "test", 0, ["dense"])
    val = write(tmp_path / "val", 1, ["dense"], eval_set="validation")
    with pytest.raises(ValueError, match="accuracy on the validation set, but .* has the test set"):
        agg.load_runs([test, val])
    runs, _, warnings = agg.load_runs([val, write(tmp_path / "val2", 2, ["dense"], eval_set="validation")])
    assert sorted(runs) == [1, 2] and warnings == []


def test_validation_runs_are_labelled_as_validation_accuracy(tmp_path, capsys):
    paths = [write(tmp_path / f"val{s}", s, ["dense", "agpe"], eval_set="validation") for s in (0, 1)]
    assert agg.eval_set_of(paths) == "validation"
    agg.main([str(p) for p in paths])
    text = capsys.readouterr().out
    assert "### Per seed (validation accuracy %, training FLOPs vs dense)" in text
    assert "| method | seeds | val acc % | train FLOPs |" in text
    assert "test acc" not in text and "test accuracy" not in text
    runs, _, _ = agg.load_runs(paths)
    assert "### Per seed (test accuracy %" in agg.report(runs)  # files without "eval_set": the test set
    assert agg.eval_set_of([write(tmp_path / "t", 0, ["dense"])]) == "test"


def test_command_line_errors_are_one_line_without_a_traceback(tmp_path):
    a, b = write(tmp_path / "a", 0, ["dense"]), write(tmp_path / "b", 0, ["dense"])
    result = subprocess.run([sys.executable, SCRIPT, str(a), str(b)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"error: {b / 'results.json'}: method 'dense' of seed 0 is already in another file "
                             f"(--replace lets later files replace it)\n")
    result = subprocess.run([sys.executable, SCRIPT, str(a), str(a)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == f"error: {a / 'results.json'}: given more than once\n"


def test_wall_clock_is_not_averaged_across_torch_versions_or_thread_counts(tmp_path):
    # Accuracy and FLOPs average over any machine; wall-clock only over files with the same
    # torch version and thread count (a 2-thread and a 1-thread run differ by up to 2x).
    paths = [write(tmp_path / "s0", 0, ["dense", "agpe"], torch="2.13.0+cpu", threads=1),
             write(tmp_path / "s1", 1, ["dense", "agpe"], torch="2.13.0+cpu", threads=2),
             write(tmp_path / "s2", 2, ["dense"], torch="2.13.0+cpu", threads=1)]
    runs, _, warnings = agg.load_runs([str(p) for p in paths])
    assert len(warnings) == 1 and "threads 2" in warnings[0] and "wall-clock is not averaged" in warnings[0]
    assert agg.mixed_timing(runs, "agpe") == [("2.13.0+cpu", "1"), ("2.13.0+cpu", "2")]
    text = agg.report(runs)
    mean_table = text.split("### Mean")[1].split("###")[0]
    agpe_row = next(line for line in mean_table.splitlines() if line.startswith("| agpe |"))
    assert "not averaged†" in agpe_row and "90.05" in agpe_row  # accuracy still averaged
    assert "† wall-clock of runs with different torch versions" in text and "threads 2" in text
    # The same files with one environment average wall-clock as before.
    same = [write(tmp_path / f"t{s}", s, ["dense", "agpe"], torch="2.13.0+cpu", threads=1) for s in (0, 1)]
    runs, _, warnings = agg.load_runs([str(p) for p in same])
    assert warnings == [] and agg.mixed_timing(runs, "agpe") == []
    assert "not averaged" not in agg.report(runs) and "300 ± 1" in agg.report(runs)
