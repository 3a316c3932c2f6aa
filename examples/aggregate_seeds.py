"""Seed averages of examples/fashion_mnist.py runs: mean ± sample std per method.

    python examples/aggregate_seeds.py runs/fm_full_seed0 runs/fm_full_seed1 runs/fm_full_seed2

Each argument is a results.json written by fashion_mnist.py (or the --out folder holding
one). Files are grouped by their "seed" field; several files of the same seed are merged
(e.g. one method run later into another --out), a method present twice for one seed is an
error unless --replace (then the later file wins, and the replacement is listed). Prints Markdown: the per-seed accuracy and training FLOPs of every method, mean ±
sample standard deviation (n-1) of every figure of the example's table (a figure missing
from some seeds is averaged over those that have it, marked "(n=k)"), the per-seed gaps
AGPE − dense and AGPE − RigL (and −SET), and whether the mean meets the targets "AGPE within
0.5 points of dense" and "AGPE at or above RigL and SET". Wall-clock is averaged only over
files with the same torch version and thread count (else the cell says "not averaged"). A file with a "source" field (a
result transcribed by hand, not written by the example) is marked in the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

METHOD_ORDER = ("plain", "dense", "agpe", "rigl", "set", "gmp")
# (key in results.json, column title, format of one value)
METRICS = (
    ("accuracy", "test acc %", "{:.2f}"),
    ("flops_ratio", "train FLOPs", "{:.3f}"),
    ("seconds", "wall s", "{:.0f}"),
    ("graphs", "compilations", "{:.1f}"),
    ("sparsifier_pct", "sparsifier %", "{:.2f}"),
    ("density", "final density", "{:.3f}"),
)
# Settings that must agree for runs to be averaged together.
COMPARED = ("example", "mode", "epochs", "settings", "agpe_settings")
# Compared in full between files that both hold an agpe run (a key one file lacks is a
# different setting; a file written before the example recorded them ran the defaults of
# its day, which the example then recorded as {}).
COMPARED_IN_FULL = ("agpe_settings",)
# What a wall-clock figure depends on besides the settings: wall-clock is averaged only over
# files that agree on these (accuracies and FLOPs do not depend on them).
TIMING = ("torch", "threads")
_TIMING_KEY = "_timing"  # added to each method's figures by load_runs: the file's TIMING values

Runs = Dict[int, Dict[str, dict]]  # seed -> method -> the example's per-method figures


def _results_path(path: str) -> str:
    return os.path.join(path, "results.json") if os.path.isdir(path) else path


def eval_set_of(paths: Iterable[str]) -> str:
    """The set the accuracies of these results.json files were measured on: "test" (the
    default of files without an "eval_set" field) or "validation". Call after load_runs,
    which refuses files that mix them."""
    for path in paths:
        with open(_results_path(path)) as f:
            return str(json.load(f).get("eval_set", "test"))
    return "test"


def load_runs(paths: Iterable[str], replace: bool = False) -> Tuple[Runs, Dict[int, List[str]], List[str]]:
    """(runs, sources, warnings): the per-seed results of every file, merged by seed.

    sources[seed] lists the "source" notes of hand-made files of that seed; warnings lists
    settings that differ between files (the figures are still returned; keys of
    ``settings`` that only one file has are not compared: older files lack newer keys)
    and, with ``replace``, every method a later file replaced (without it a method present
    twice for one seed is an error). Files evaluated on different sets (test vs the
    validation split) are never mixed: that raises. Files that differ in torch version or
    thread count are averaged for every figure but wall-clock (warned; the report says
    so). Raises ``ValueError`` (naming the file)
    for a file that is not a results.json, ``OSError`` for one that cannot be read."""
    runs: Runs = {}
    sources: Dict[int, List[str]] = {}
    warnings: List[str] = []
    reference: Optional[Tuple[str, dict]] = None
    agpe_reference: Optional[Tuple[str, dict]] = None  # the first file with an agpe run
    origin: Dict[Tuple[int, str], str] = {}
    eval_set: Optional[Tuple[str, str]] = None
    reference_timing: Optional[Tuple[str, tuple]] = None
    timing_warned = False
    seen_paths = set()
    for path in paths:
        path = _results_path(path)
        if os.path.realpath(path) in seen_paths:
            raise ValueError(f"{path}: given more than once")
        seen_paths.add(os.path.realpath(path))
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not JSON ({error}): not a fashion_mnist results.json") from None
        if not isinstance(data, dict) or "seed" not in data or "methods" not in data:
            raise ValueError(f"{path}: not a fashion_mnist results.json (needs 'seed' and 'methods')")
        seed = int(data["seed"])
        evaluated = str(data.get("eval_set", "test"))
        if eval_set is None:
            eval_set = (path, evaluated)
        elif evaluated != eval_set[1]:
            raise ValueError(f"{path}: accuracy on the {evaluated} set, but {eval_set[0]} has the {eval_set[1]} "
                             f"set; they cannot be averaged together")
        compared = {key: data[key] for key in COMPARED if key in data}
        if reference is None:
            reference = (path, compared)
        else:
            # settings only on the keys both files have (older files lack newer keys)
            differing = sorted(k for k in compared.keys() & reference[1].keys() if k not in COMPARED_IN_FULL
                               and _comparable(compared[k], reference[1][k]) != _comparable(reference[1][k], compared[k]))
            if differing:
                warnings.append(f"{path} differs from {reference[0]} in {', '.join(differing)}")
        if "agpe" in data["methods"]:
            # agpe_settings in full, against the first file that holds an agpe run, whatever the
            # order of the files (a key one file lacks is the example's default there, a different run)
            settings = {k: compared.get(k, {}) for k in COMPARED_IN_FULL}
            if agpe_reference is None:
                agpe_reference = (path, settings)
            else:
                differing = [k for k in COMPARED_IN_FULL if settings[k] != agpe_reference[1][k]]
                if differing:
                    warnings.append(f"{path} differs from {agpe_reference[0]} in {', '.join(differing)}")
        timing = tuple(str(data.get(key, "unknown")) for key in TIMING)
        if reference_timing is None:
            reference_timing = (path, timing)
        elif timing != reference_timing[1] and not timing_warned:
            timing_warned = True
            warnings.append(f"{path} has {_describe_timing(timing)}, {reference_timing[0]} "
                            f"{_describe_timing(reference_timing[1])}: wall-clock is not averaged where they mix")
        if data.get("source"):
            sources.setdefault(seed, []).append(str(data["source"]))
        per_seed = runs.setdefault(seed, {})
        for method, figures in data["methods"].items():
            if method in per_seed:
                if not replace:
                    raise ValueError(f"{path}: method {method!r} of seed {seed} is already in another file "
                                     f"(--replace lets later files replace it)")
                warnings.append(f"{path}: method {method!r} of seed {seed} replaces the one from "
                                f"{origin[(seed, method)]}")
            per_seed[method] = {**figures, _TIMING_KEY: timing}
            origin[(seed, method)] = path
    return runs, sources, warnings


def _describe_timing(timing: tuple) -> str:
    return ", ".join(f"{key} {value}" for key, value in zip(TIMING, timing))


def mixed_timing(runs: Runs, method: str) -> List[tuple]:
    """The distinct (torch, threads) of the files ``method``'s figures came from, when
    there are several (then its wall-clock is not averaged); else []."""
    found = sorted({runs[s][method].get(_TIMING_KEY) for s in runs if method in runs[s]}, key=str)
    found = [t for t in found if t is not None]
    return found if len(found) > 1 else []


def _comparable(value, other=None):
    """``value`` for comparison; dicts keep only the keys ``other`` (a dict) also has."""
    if isinstance(value, dict):
        keys = value.keys() if not isinstance(other, dict) else value.keys() & other.keys()
        return {k: value[k] for k in keys}
    return value


def methods_of(runs: Runs) -> List[str]:
    """Every method present in any seed: the example's order first, then any others as found."""
    seen: List[str] = []
    for per_seed in runs.values():
        seen.extend(m for m in per_seed if m not in seen)
    return [m for m in METHOD_ORDER if m in seen] + [m for m in seen if m not in METHOD_ORDER]


def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample standard deviation, n); std is nan below two values, mean is nan with none."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan, 0
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std, len(values)


def summarize(runs: Runs, metric: str = "accuracy") -> Dict[str, Tuple[float, float, int]]:
    """method -> (mean, sample std, number of seeds) of one metric over the seeds that ran it."""
    return {m: mean_std([runs[s][m][metric] for s in sorted(runs) if m in runs[s] and metric in runs[s][m]])
            for m in methods_of(runs)}


def gaps(runs: Runs, method: str, baseline: str, metric: str = "accuracy") -> Dict[int, float]:
    """seed -> method − baseline, for the seeds that ran both."""
    return {s: float(runs[s][method][metric]) - float(runs[s][baseline][metric])
            for s in sorted(runs) if method in runs[s] and baseline in runs[s]}


def _pm(mean: float, std: float, fmt: str) -> str:
    if math.isnan(mean):
        return "—"
    return fmt.format(mean) + ("" if math.isnan(std) else " ± " + fmt.replace("+", "").format(std))


def verdict(runs: Runs, tolerance: float = 0.5) -> List[str]:
    """The targets on the mean accuracy: AGPE within `tolerance` points of dense, at or above RigL and SET."""
    acc = summarize(runs)
    if "agpe" not in acc:
        return []
    agpe = acc["agpe"][0]
    lines = []
    if "dense" in acc:
        gap = agpe - acc["dense"][0]
        lines.append(f"AGPE within {tolerance} points of dense on the mean: "
                     f"{'yes' if gap >= -tolerance else 'no'} (AGPE − dense = {gap:+.3f})")
    for other, name in (("rigl", "RigL"), ("set", "SET")):
        if other in acc:
            gap = agpe - acc[other][0]
            lines.append(f"AGPE at or above {name} on the mean: {'yes' if gap >= 0 else 'no'} "
                         f"(AGPE − {name} = {gap:+.3f})")
    return lines


def report(runs: Runs, sources: Optional[Dict[int, List[str]]] = None, eval_set: str = "test") -> str:
    """The Markdown report: per-seed table, mean ± std table, gaps, verdict. ``eval_set`` is
    what the accuracies were measured on ("test", or "validation" for --validation runs)."""
    sources = sources or {}
    seeds = sorted(runs)
    methods = methods_of(runs)
    label = {s: f"seed {s}" + ("*" if s in sources else "") for s in seeds}
    titles = {key: (f"{'val' if eval_set == 'validation' else eval_set} acc %" if key == "accuracy" else title)
              for key, title, _ in METRICS}
    out = [f"### Per seed ({eval_set} accuracy %, training FLOPs vs dense)", ""]
    out.append("| method | " + " | ".join(label[s] for s in seeds) + " | mean ± std acc | mean FLOPs |")
    out.append("|---" * (len(seeds) + 3) + "|")
    acc, flops = summarize(runs, "accuracy"), summarize(runs, "flops_ratio")
    for m in methods:
        cells = [f"{runs[s][m]['accuracy']:.2f} ({runs[s][m]['flops_ratio']:.3f}×)" if m in runs[s] else "—"
                 for s in seeds]
        out.append(f"| {m} | " + " | ".join(cells) + f" | {_pm(*acc[m][:2], '{:.2f}')} | "
                   f"{_pm(*flops[m][:2], '{:.3f}')}× |")
    out += ["", "### Mean ± sample std over seeds", ""]
    out.append("| method | seeds | " + " | ".join(titles[key] for key, _, _ in METRICS) + " |")
    out.append("|---" * (len(METRICS) + 2) + "|")
    stats = {key: summarize(runs, key) for key, _, _ in METRICS}
    unaveraged = {m: mixed_timing(runs, m) for m in methods}
    for m in methods:
        cells = ["not averaged†" if key == "seconds" and unaveraged[m] else
                 _pm(*stats[key][m][:2], fmt) + ("" if stats[key][m][2] in (0, acc[m][2]) else f" (n={stats[key][m][2]})")
                 for key, _, fmt in METRICS]
        out.append(f"| {m} | {acc[m][2]} | " + " | ".join(cells) + " |")
    mixed = {m: t for m, t in unaveraged.items() if t}
    if mixed:
        out += ["", "† wall-clock of runs with different torch versions or thread counts is not averaged: "
                + "; ".join(f"{m}: " + " / ".join(_describe_timing(t) for t in found) for m, found in mixed.items())]
    pairs = [(a, b) for a, b in (("agpe", "dense"), ("agpe", "rigl"), ("agpe", "set")) if a in methods and b in methods]
    if pairs:
        out += ["", "### Per-seed accuracy gaps (points)", ""]
        out.append("| gap | " + " | ".join(label[s] for s in seeds) + " | mean ± std |")
        out.append("|---" * (len(seeds) + 2) + "|")
        for a, b in pairs:
            per_seed = gaps(runs, a, b)
            cells = [f"{per_seed[s]:+.2f}" if s in per_seed else "—" for s in seeds]
            mean, std, _ = mean_std(list(per_seed.values()))
            out.append(f"| {a} − {b} | " + " | ".join(cells) + f" | {_pm(mean, std, '{:+.2f}')} |")
    lines = verdict(runs)
    if lines:
        out += [""] + [f"- {line}" for line in lines]
    for s in seeds:
        for note in sources.get(s, []):
            out += ["", f"\\* seed {s}: {note}"]
    return "\n".join(out) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="results.json files or the --out folders holding them")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--replace", action="store_true",
                        help="a method a later file has for the same seed replaces the earlier one (listed)")
    args = parser.parse_args(argv)
    try:
        runs, sources, warnings = load_runs(args.paths, replace=args.replace)
        eval_set = eval_set_of(args.paths)
    except (OSError, ValueError) as error:  # a missing or unreadable file, not a results.json, a clash
        raise SystemExit(_error(str(error)))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    text = report(runs, sources, eval_set)
    if args.out:  # written before printing: an unwritable --out fails without a half-done run
        try:
            with open(args.out, "w") as f:
                f.write(text)
        except OSError as error:
            raise SystemExit(_error(f"--out: cannot write {args.out!r} ({error.strerror or error})"))
    print(text, end="")


def _error(message: str) -> int:
    """Print ``error: message`` to stderr; the exit code (2, as for a bad flag)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
