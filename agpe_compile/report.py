"""Plots of AGPE audit trails: ``python -m agpe_compile.report RUN.jsonl [MORE.jsonl] [--out DIR]``.

Renders, with matplotlib's Agg backend (no display needed):

* ``density_<run>.png`` per run: each layer's density and the global target over steps
  (``<run>`` is the file name without ``.jsonl``; files of the same name are told apart by
  their folders: ``seed0/agpe.jsonl`` and ``seed1/agpe.jsonl`` give ``density_seed0_agpe.png``
  and ``density_seed1_agpe.png``);
* ``loss_vs_flops.png``: training loss against cumulative training FLOPs (sparse,
  executed), one line per run, so runs at different budgets compare on one axis.

and prints one summary line per run: mask updates (those that changed no block: a schedule
hold; and the updates held because their scores were not finite, event
``hold:nonfinite-scores``, which are not mask updates), blocks dropped and grown, how many of
the grown blocks were dropped again at the very next update (regrowth that never got a
chance: see ``AGPEConfig.protect_grown``), final density and the training-FLOP ratio of
the agpe layers (the examples' tables also count the dense layers, such as a head).
Without ``--out`` the files go to a folder ``report`` next to the first audit file.

``--tensorboard DIR`` also writes the same scalars as TensorBoard events when
``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package); otherwise it
says so and skips.

The summary comes first; the plots need matplotlib, which agpe_compile does not depend on
(``pip install agpe_compile[report]``). Without it the command prints the summary, says that
it wrote no plot and exits with status 1.

Example::

    $ python -m agpe_compile.report runs/agpe.jsonl runs/rigl.jsonl --out runs/plots
    agpe: 5 mask updates, ...
    rigl: ...
    wrote runs/plots/density_agpe.png
    ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

from agpe_compile.controller.audit import read_records

log = logging.getLogger(__name__)


def _intervals(records: List[dict]) -> List[dict]:
    """The interval records of the run's last timeline (Note [Runs appended to one audit file])."""
    kept: List[dict] = []
    fresh = False  # a versioned "start" whose run has not said it resumed (no "load" yet)
    resumed_at = None  # a "load" whose run has written no interval yet
    for r in records:
        event = r.get("event")
        if event == "start":
            fresh, resumed_at = bool(r.get("audit_version")), None
            continue
        if event == "load":
            fresh = False
            at = r.get("step")
            resumed_at = at if isinstance(at, (int, float)) else None
            continue
        if event != "interval":
            continue
        if fresh:  # a new run from step 0: the earlier ones are superseded
            kept, fresh = [], False
        if resumed_at is not None:  # the resumed run goes on: what the log holds past its checkpoint goes
            kept = [k for k in kept if not isinstance(k.get("step"), (int, float)) or k["step"] <= resumed_at]
            resumed_at = None
        step = r.get("step")
        while kept and step is not None and kept[-1].get("step") is not None and kept[-1]["step"] >= step:
            kept.pop()
        kept.append(r)
    return kept


# Note [Runs appended to one audit file]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# The audit log appends. A run resumed from a checkpoint writes the steps after the
# checkpoint again (a crash at step 50, resumed from step 30, writes 35...50 twice), and a
# run started again with the same audit_path writes a whole second run after the first.
# Summed as they stand, they counted 16 updates for a run of 12, and the plots drew a line
# back to the start. So the report follows the last timeline: a Sparsifier writes a
# "start" record (with ``audit_version``) when it is created and a "load" record when
# ``load_state_dict`` restores it; a "load" at step s followed by intervals drops the records
# past s (the resumed run keeps what came before its checkpoint; a load with no interval
# after it, such as AGPETrainer's reload of the best checkpoint at the end, drops nothing),
# and a versioned "start" followed by an interval with no "load" before it is a fresh run,
# which replaces everything before it.
# Files written before those records existed fall back to the steps: an interval record at
# a step at or before the previous one's starts a new timeline there. The report says how
# many records were superseded.
def superseded(records: List[dict]) -> int:
    """How many interval records a later run or resume in the same file replaced."""
    return sum(1 for r in records if r.get("event") == "interval") - len(_intervals(records))


def run_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def run_labels(paths: Sequence[str]) -> List[str]:
    """One distinct label per audit file: its name without ``.jsonl``, with as many parent
    folders as it takes to tell files of the same name apart (``seed0/agpe`` and
    ``seed1/agpe``). ``ValueError`` when one file is given twice."""
    full = [os.path.normpath(os.path.abspath(p)) for p in paths]
    seen: Dict[str, str] = {}
    for given, path in zip(paths, full):
        if path in seen:
            raise ValueError(f"{given}: the same audit file as {seen[path]} (give each file once)")
        seen[path] = given
    parts = [[part for part in os.path.splitext(p)[0].split(os.sep) if part] for p in full]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashing:
            return labels
        grew = False
        for i in clashing:  # distinct absolute paths: a longer suffix tells them apart
            if depth[i] < len(parts[i]):
                depth[i], grew = depth[i] + 1, True
        if not grew:  # the same path but for the extension (a/run.json, a/run.jsonl): keep it
            return [label + os.path.splitext(p)[1] if i in clashing else label
                    for i, (label, p) in enumerate(zip(labels, full))]


def _file_label(label: str) -> str:
    """``label`` as part of a file name (``seed0/agpe`` -> ``seed0_agpe``)."""
    return label.replace("/", "_")


# Fields of an "interval" record that the plots and the summary read.
_INTERVAL_FIELDS = ("step", "target_density", "global_density_after", "flops", "layers")
_LAYER_FIELDS = ("density_after", "dropped", "grown")


def check_records(path: str, records: List[dict]) -> None:
    """``ValueError`` naming the file and line of the first record the report cannot read, or
    saying that the file holds no agpe audit records (no "start" or "interval" event)."""
    with open(path, encoding="utf-8") as handle:  # read_records skips blank and torn lines: number the others
        numbers = [number for number, line in enumerate(handle, 1) if line.strip() and _parses(line)]
    for number, record in zip(numbers, records):
        if record.get("event") != "interval":
            continue
        missing = [key for key in _INTERVAL_FIELDS if key not in record]
        if missing:
            raise ValueError(f"{path}: line {number}: an interval record without {', '.join(map(repr, missing))}: "
                             f"not a complete agpe audit record")
        flops, layers = record["flops"], record["layers"]
        if not isinstance(flops, dict) or not {"sparse", "dense"} <= flops.keys():
            raise ValueError(f"{path}: line {number}: 'flops' of an interval record needs 'sparse' and 'dense'")
        if not isinstance(layers, dict):
            raise ValueError(f"{path}: line {number}: 'layers' of an interval record is not an object")
        for name, layer in layers.items():
            lacking = [key for key in _LAYER_FIELDS if not isinstance(layer, dict) or key not in layer]
            if lacking:
                raise ValueError(f"{path}: line {number}: layer {name!r} of an interval record lacks "
                                 f"{', '.join(map(repr, lacking))}")
    if not any(r.get("event") in ("start", "interval") for r in records):
        raise ValueError(f"{path}: no agpe audit records (no 'start' or 'interval' event in {len(records)} "
                         f"JSON line(s)): not an agpe audit file")


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def plot_density(records: List[dict], title: str, out_path: str) -> str:
    """Density per layer (and the global target) over training steps."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = _intervals(records)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    layers: Dict[str, List[float]] = {}
    for r in rows:
        for name, layer in r["layers"].items():
            layers.setdefault(name, []).append(layer["density_after"])
    for name, values in layers.items():
        ax.plot(steps, values, label=name)
    ax.plot(steps, [r["target_density"] for r in rows], "k--", label="global target")
    ax.set(xlabel="training step", ylabel="density (active blocks)", title=title, ylim=(0, 1.05))
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_loss_vs_flops(runs: Dict[str, List[dict]], out_path: str) -> str:
    """Training loss against cumulative executed training FLOPs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in runs.items():
        rows = [r for r in _intervals(records) if r.get("loss") is not None]
        ax.plot([r["flops"]["sparse"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set(xlabel="cumulative training FLOPs (agpe layers)", ylabel="training loss", yscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def write_tensorboard(runs: Dict[str, List[dict]], log_dir: str) -> bool:
    """Scalars per run under ``log_dir/<run>``; False (and a log line) without TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        log.warning("agpe.report: TensorBoard logging skipped (%s)", error)
        return False
    for name, records in runs.items():
        writer = SummaryWriter(os.path.join(log_dir, name))
        for r in _intervals(records):
            if r.get("loss") is not None:
                writer.add_scalar("loss", r["loss"], r["step"])
            writer.add_scalar("density/global", r["global_density_after"], r["step"])
            writer.add_scalar("flops/sparse", r["flops"]["sparse"], r["step"])
            for layer, values in r["layers"].items():
                writer.add_scalar(f"density/{layer}", values["density_after"], r["step"])
        writer.close()
    return True


def summarize(records: List[dict]) -> dict:
    """Totals of a run's interval records (``regrown_dropped`` is None for audit files
    written before the ``dropped_just_grown`` field existed)."""
    intervals = _intervals(records)
    layers = [layer for r in intervals for layer in r.get("layers", {}).values()]
    has_churn = all("dropped_just_grown" in layer for layer in layers)
    last = intervals[-1] if intervals else {}
    flops = last.get("flops") or {}
    return {
        "updates": sum(1 for r in intervals if r.get("updated")),
        "held": sum(1 for r in intervals if r.get("schedule") == "hold:nonfinite-scores"),
        "unchanged": sum(1 for r in intervals if r.get("updated")
                         and not any(layer["dropped"] or layer["grown"] for layer in r.get("layers", {}).values())),
        "dropped": sum(layer["dropped"] for layer in layers),
        "grown": sum(layer["grown"] for layer in layers),
        "regrown_dropped": sum(layer["dropped_just_grown"] for layer in layers) if has_churn else None,
        "final_density": last.get("global_density_after"),
        "flops_ratio": flops["sparse"] / flops["dense"] if flops.get("dense") else None,
    }


def summary_line(name: str, summary: dict) -> str:
    grown = summary["grown"]
    churn = summary["regrown_dropped"]
    if churn is None:
        again = "n/a (older audit file)"
    else:
        again = f"{churn} ({100.0 * churn / grown:.0f}%)" if grown else "0"
    density = summary["final_density"]
    flops = summary["flops_ratio"]
    held, unchanged = summary.get("held", 0), summary.get("unchanged", 0)
    unchanged = f" ({unchanged} changed no block)" if unchanged else ""
    held = f", {held} more held (their scores were not finite)" if held else ""
    return (f"{name}: {summary['updates']} mask updates{unchanged}{held}, {summary['dropped']} blocks dropped, "
            f"{grown} grown, "
            f"of those dropped again at the next update: {again}; final density "
            f"{'n/a' if density is None else f'{density:.3f}'}, training FLOPs of the agpe layers "
            f"{'n/a' if flops is None else f'{flops:.3f}x'} dense")


def render(paths: Sequence[str], out_dir: str, tensorboard_dir: Optional[str] = None,
           records: Optional[Sequence[List[dict]]] = None) -> List[str]:
    """Write every plot for the audit files ``paths`` into ``out_dir``; the PNG paths.
    ``records``: the files' records when the caller has read them already."""
    os.makedirs(out_dir, exist_ok=True)
    records = [read_records(p) for p in paths] if records is None else records
    runs = dict(zip(run_labels(paths), records))
    written: List[str] = []
    for name, records in runs.items():
        file_label, n = _file_label(name), 1
        while os.path.join(out_dir, f"density_{file_label}.png") in written:  # seed0/agpe vs seed0_agpe
            n += 1
            file_label = f"{_file_label(name)}-{n}"
        written.append(plot_density(records, name, os.path.join(out_dir, f"density_{file_label}.png")))
    written.append(plot_loss_vs_flops(runs, os.path.join(out_dir, "loss_vs_flops.png")))
    if tensorboard_dir is not None:
        write_tensorboard(runs, tensorboard_dir)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agpe_compile.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="audit JSONL files written by a Sparsifier")
    parser.add_argument("--out", default=None,
                        help="output directory (default: a folder 'report' next to the first file, so the plots "
                             "an example wrote beside its audit files stay as they are)")
    parser.add_argument("--tensorboard", default=None, help="also write TensorBoard events here")
    args = parser.parse_args(argv)
    folders = [p for p in args.runs if os.path.isdir(p)]
    if folders:
        parser.error(f"{folders[0]} is a folder; give the audit files in it (e.g. {os.path.join(folders[0], '*.jsonl')})")
    missing = [p for p in args.runs if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such audit file: {missing[0]}")
    try:
        labels = run_labels(args.runs)
    except ValueError as error:
        parser.error(str(error))
    summaries, read = [], []
    for path in args.runs:
        try:
            records = read_records(path)
        except UnicodeDecodeError as error:  # (a ValueError too: first)
            parser.error(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start}): not an agpe audit file")
        except ValueError as error:
            parser.error(str(error))
        if not records:
            parser.error(f"{path}: no complete records (an agpe audit file has a 'start' record, written when the "
                         f"Sparsifier with audit_path= is created, and one record per update interval)")
        try:
            check_records(path, records)
        except ValueError as error:
            parser.error(str(error))
        replaced = superseded(records)
        if replaced:
            restarts = sum(1 for r in records if r.get("event") == "start")
            print(f"{path}: {replaced} interval record(s) are superseded by a later run or a resume from a "
                  f"checkpoint in the same file ({restarts} 'start' records): the summary and plots follow the "
                  f"last timeline", file=sys.stderr)
        starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
        if len(starts) > 1 and not any(r.get("event") in ("interval", "load") for r in records[starts[-1]:]):
            print(f"{path}: the last of the file's {len(starts)} runs wrote no interval record yet: the summary and "
                  f"plots are of the runs before it", file=sys.stderr)
        summaries.append(summarize(records))
        read.append(records)
    try:  # matplotlib is not a dependency (pip install agpe_compile[report]): the summary needs none
        import matplotlib  # noqa: F401
    except ImportError as error:
        no_matplotlib: Optional[ImportError] = error
    else:
        no_matplotlib = None
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.runs[0])), "report")
    if no_matplotlib is None:  # no plots to write without it: leave the folder alone
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            parser.error(f"--out: {out_dir!r} exists and is not a folder" if args.out else
                         f"{out_dir!r}, the default output folder, exists and is not a folder: give --out DIR")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as error:
            parser.error(f"--out: cannot create the folder {out_dir!r} ({error.strerror or error})")
        if not os.access(out_dir, os.W_OK | os.X_OK):
            parser.error(f"--out: the folder {out_dir!r} is not writable")
    for label, summary in zip(labels, summaries):  # first: it stands even if the plots fail
        print(summary_line(label, summary))
    sys.stdout.flush()
    if no_matplotlib is not None:
        if args.tensorboard is not None:  # needs no matplotlib
            write_tensorboard(dict(zip(labels, read)), args.tensorboard)
        print(f"agpe.report: plots need matplotlib: pip install matplotlib (or agpe_compile[report]); the summary "
              f"above is complete, and no plot was written ({no_matplotlib})", file=sys.stderr)
        return 1
    try:
        written = render(args.runs, out_dir, args.tensorboard, records=read)
    except OSError as error:
        parser.error(f"cannot write the plots into {out_dir!r}: {error}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
