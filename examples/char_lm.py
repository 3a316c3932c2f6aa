"""Character-level GPT on the King James Bible: dense vs AGPE at several target sparsities.

The text comes from Debian's ``bible-kjv`` (``bible -l0 "gen1:1-rev22:21"``); the first
90% of it is the training split, the last 10% the validation split (fixed). Every run
compiles the same model with the agpe backend and trains with the same seed; the dense
run is policy ``dense`` (all blocks active), so FLOPs are counted the same way for all.

    python examples/char_lm.py --quick            # minutes on a 2-core CPU
    python examples/char_lm.py --full             # the documented setting (GPU)
    python examples/char_lm.py --quick --sparsities 0.75 --out runs/char_lm
    bible -l0 "gen1:1-rev22:21" > kjv.txt && python examples/char_lm.py --full --text-file kjv.txt

``--text-file`` reads the same text from a file, for machines without the ``bible``
command (the GPU machine): write it once where bible-kjv is installed, carry the file.

Prints a table (validation loss, training FLOPs relative to dense, wall-clock,
compilations) and writes ``val_loss_vs_flops.png``, ``results.json`` and one audit JSONL
per run into ``--out``. results.json records the setting and the options (seed,
--prune-until, --lowering, the text's source) and is rewritten after each run and at each
evaluation (the unfinished run's row so far, marked ``partial_step``, unless an earlier
invocation finished that run: a time limit keeps the curve of the run it stopped); a rerun
with the same ones keeps the earlier runs it does not train again (and each run it does,
until it finishes it), one with others moves the earlier file aside to results-N.json. An
audit log is written as NAME.jsonl.partial and renamed when its run finishes, so an
interrupted invocation leaves the last finished log in place.

``--runs`` trains only the named runs (``dense``, ``agpe-<percent>``), e.g. the agpe run a
time limit cut, without training dense again: ``--full --sparsities 0.75 --runs agpe-75``.
Its table compares with the dense run of results.json when it holds a finished one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the repository root too (as benchmarks/kernels.py): the GPU machine has no installed
# agpe_compile (audit CW HIGH-3)
if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import agpe_compile  # noqa: E402
from agpe_compile.controller import AGPEConfig, Sparsifier  # noqa: E402
from gpt import GPT  # noqa: E402

SETTINGS = {
    "quick": dict(d_model=128, n_layers=2, n_heads=4, seq_len=64, batch=32, steps=600, eval_every=100,
                  eval_batches=16, block_size=32, lr=3e-3, update_interval=25),
    "full": dict(d_model=384, n_layers=6, n_heads=6, seq_len=256, batch=64, steps=5000, eval_every=250,
                 eval_batches=50, block_size=64, lr=1e-3, update_interval=100),
    "smoke": dict(d_model=64, n_layers=1, n_heads=2, seq_len=32, batch=8, steps=12, eval_every=6,
                  eval_batches=2, block_size=32, lr=3e-3, update_interval=4),
}


def load_text(path: Optional[str] = None) -> str:
    """The KJV text as ``bible`` prints it (chapter headings and numbered verses), its lines
    stripped, blank ones dropped: from ``bible`` or from ``path`` (a file or a pipe holding
    the output of ``bible -l0 "gen1:1-rev22:21"``)."""
    if path is not None:
        if not os.path.exists(path):
            raise SystemExit(f"char_lm: --text-file {path!r} does not exist; write it with "
                             f"`bible -l0 \"gen1:1-rev22:21\" > {path}`")
        if os.path.isdir(path):
            raise SystemExit(f"char_lm: --text-file {path!r} is a folder; expected the text file")
        try:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
        except (OSError, UnicodeDecodeError) as error:
            raise SystemExit(f"char_lm: cannot read --text-file {path!r}: {error}") from None
    else:
        if shutil.which("bible") is None:
            raise SystemExit("char_lm: the `bible` command is missing; install Debian's text with "
                             "`apt-get install -y bible-kjv bible-kjv-text` (or pass --text-file)")
        done = subprocess.run(["bible", "-l0", "gen1:1-rev22:21"], capture_output=True, text=True)
        if done.returncode != 0:
            said = done.stderr.strip() or done.stdout.strip()
            raise SystemExit(f"char_lm: `bible -l0 gen1:1-rev22:21` failed (exit status {done.returncode})"
                             + (f": {said[-500:]}" if said else "") + "; reinstall Debian's text with "
                             "`apt-get install --reinstall -y bible-kjv bible-kjv-text` (or pass --text-file)")
        raw = done.stdout
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"char_lm: no text in {path or 'the output of bible'}")
    return "\n".join(lines)


def encode(text: str) -> Tuple[torch.Tensor, List[str]]:
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long), vocab


def batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator, device):
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    chunk = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).to(device)
    return chunk[:, :-1], chunk[:, 1:]


def _cpu_attention_formulas() -> dict:
    """torch's FlopCounterMode counts the CUDA attention kernels (flash, efficient, cuDNN)
    but has no formula for the CPU one, so attention counted 0 FLOPs on the CPU and the
    FLOP ratios there left it out (helper audit BU). Map the CPU ops to torch's own formulas
    so both devices count the same (torch's formulas: 4*B*H*T*T*Dh forward, 2.5 times that
    backward)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    formulas = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop)):
        op = getattr(aten, name, None)
        if op is not None:
            formulas[op] = _raw(formula)
    return formulas


def _raw(formula):
    """torch's registered formulas already take tensors (shape-wrapped): mark the mapping
    raw so FlopCounterMode does not wrap them a second time."""
    def count(*args, **kwargs):
        return formula(*args, **kwargs)

    count._get_raw = True
    return count


def other_flops_per_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, agpe_layers) -> int:
    """Training FLOPs of one step outside the agpe layers (attention, head, ...), counted once."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    model.zero_grad(set_to_none=True)
    rows = x.numel()
    linear = sum(6 * rows * s.weight_shape[0] * s.weight_shape[1] for s in agpe_layers.values())
    return counter.get_total_flops() - linear


@torch.no_grad()
def evaluate(compiled, data, setting, device, seed=1234) -> float:
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(setting["eval_batches"]):
        x, y = batches(data, setting["batch"], setting["seq_len"], gen, device)
        total += F.cross_entropy(compiled(x).flatten(0, 1), y.flatten()).item()
    return total / setting["eval_batches"]


def run_config(name: str, sparsity: float, setting: dict, args) -> AGPEConfig:
    """The Sparsifier config of one run (``sparsity`` 0: the dense run)."""
    return AGPEConfig(
        target_sparsity=sparsity, policy="dense" if sparsity == 0 else "agpe", block_size=setting["block_size"],
        exclude=("head",), update_interval=setting["update_interval"], begin_step=0,
        end_step=max(setting["update_interval"], int(args.prune_until * setting["steps"])),
        seed=args.seed, audit_path=os.path.join(args.out, f"{name}.jsonl.partial"),
    )


def run_names(sparsities) -> List[Tuple[str, float]]:
    """(name, target sparsity) of every run: the dense run, then agpe-<percent> per sparsity."""
    return [("dense", 0.0)] + [(f"agpe-{int(round(100 * s))}", s) for s in sparsities]


# Values of a setting that must be positive integers (and lr a positive number).
POSITIVE = ("d_model", "n_layers", "n_heads", "seq_len", "batch", "steps", "eval_every", "eval_batches",
            "block_size", "update_interval")


def check_setting(parser: argparse.ArgumentParser, setting: dict) -> None:
    """parser.error naming the flag for a setting the model or the loop cannot run."""
    for key in POSITIVE:
        value = setting[key]
        if isinstance(value, bool) or value < 1:
            flag = {"steps": "--steps/--set steps", "block_size": "--block-size"}.get(key, f"--set {key}")
            parser.error(f"{flag}: expected an integer >= 1, got {value}")
    if not setting["lr"] > 0 or not math.isfinite(setting["lr"]):
        parser.error(f"--set lr: expected a learning rate > 0, got {setting['lr']}")
    if setting["d_model"] % setting["n_heads"]:
        parser.error(f"--set d_model/n_heads: d_model={setting['d_model']} must be divisible by "
                     f"n_heads={setting['n_heads']}")


def check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """--out must be (or become) a writable folder; created here, before any run."""
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out: {out!r} exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        parser.error(f"--out: cannot create the folder {out!r} ({error.strerror or error})")
    if not os.access(out, os.W_OK | os.X_OK):
        parser.error(f"--out: the folder {out!r} is not writable")


def train(name: str, sparsity: float, setting: dict, train_data, val_data, vocab: int, args, device,
          on_eval=None) -> Dict:
    """One run; ``on_eval`` (optional) gets the run's row so far at every evaluation (marked
    ``partial_step``), so a time limit that stops a long run keeps its curve (audit BU)."""
    torch.manual_seed(args.seed)
    torch._dynamo.reset()
    model = GPT(vocab, setting["d_model"], setting["n_heads"], setting["n_layers"], setting["seq_len"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setting["lr"], weight_decay=0.0)
    steps = setting["steps"]
    config = run_config(name, sparsity, setting, args)
    if os.path.exists(config.audit_path):
        os.remove(config.audit_path)
    backend = agpe_compile.AgpeBackend({"exclude": ["head"], "inductor": args.lowering == "inductor"})
    sparsifier = Sparsifier(model, optimizer, config, recompile_counter=lambda: backend.graph_count)
    compiled = torch.compile(model, backend=backend)
    gen = torch.Generator().manual_seed(args.seed)
    x0, y0 = batches(train_data, setting["batch"], setting["seq_len"], gen, device)
    other = other_flops_per_step(model, x0, y0, sparsifier.layers)
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        x, y = batches(train_data, setting["batch"], setting["seq_len"], gen, device)
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sparsifier.step(loss)
        if step % setting["eval_every"] == 0 or step == steps:
            model.eval()
            val = evaluate(compiled, val_data, setting, device)
            model.train()
            flops = sparsifier.flops.sparse + other * step
            curve.append({"step": step, "val_loss": val, "train_flops": flops})
            print(f"  [{name}] step {step:5d}/{steps}  train {loss.item():.3f}  val {val:.3f}  "
                  f"density {sparsifier.global_density:.3f}  {time.perf_counter() - start:6.0f} s",
                  file=sys.stderr, flush=True)
            if on_eval is not None and step < steps:
                report = sparsifier.flops
                on_eval({"run": name, "target_sparsity": sparsity, "val_loss": val, "curve": list(curve),
                         "train_flops": flops, "dense_equiv_flops": report.dense + other * step,
                         "agpe_layer_flops_ratio": report.ratio, "final_density": sparsifier.global_density,
                         "wall_clock_s": time.perf_counter() - start, "compilations": backend.graph_count,
                         "mask_update_s": sparsifier.update_seconds, "partial_step": step})
    report = sparsifier.flops
    # Written beside the last run's log and renamed over it when this run finishes: an
    # interrupted run leaves the last finished log as it was
    os.replace(config.audit_path, os.path.join(args.out, f"{name}.jsonl"))
    return {
        "run": name, "target_sparsity": sparsity, "val_loss": curve[-1]["val_loss"], "curve": curve,
        "train_flops": report.sparse + other * steps, "dense_equiv_flops": report.dense + other * steps,
        "agpe_layer_flops_ratio": report.ratio, "final_density": sparsifier.global_density,
        "wall_clock_s": time.perf_counter() - start, "compilations": backend.graph_count,
        "mask_update_s": sparsifier.update_seconds,
    }


def plot(results: List[Dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"char_lm: matplotlib is not installed; {path} not written (results.json has the curves)",
              file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([p["train_flops"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], marker="o", label=r["run"])
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("char-level GPT on KJV text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def results_header(setting: dict, device, args) -> dict:
    """What makes two results.json files one comparison: everything but the runs."""
    return {"setting": setting, "device": str(device), "torch": torch.__version__,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "options": {"seed": args.seed, "prune_until": args.prune_until, "lowering": args.lowering,
                        "text": os.path.abspath(args.text_file) if args.text_file else "bible -l0 gen1:1-rev22:21"}}


def earlier_runs(out: str, header: dict) -> Dict[str, Dict]:
    """The runs of --out's results.json from an earlier invocation with the same settings,
    by name: kept in the new results.json, each until this invocation finishes that run
    again (an interrupted run loses no finished figures). One with other settings is
    moved aside to results-<n>.json, not lost."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            earlier = json.load(f)
        same = {k: v for k, v in earlier.items() if k != "runs"} == json.loads(json.dumps(header))
        runs = {r["run"]: r for r in earlier["runs"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        same, runs = False, {}
    if same:
        return runs
    n = 1
    while os.path.exists(os.path.join(out, f"results-{n}.json")):
        n += 1
    os.replace(path, os.path.join(out, f"results-{n}.json"))
    print(f"char_lm: {path} held runs with other settings: moved to results-{n}.json", file=sys.stderr)
    return {}


def write_results(out: str, header: dict, runs: Dict[str, Dict]) -> None:
    """results.json in ``out`` (atomically: a kill mid-write leaves the previous file)."""
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**header, "runs": list(runs.values())}, f, indent=2)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="minutes on a 2-core CPU (default)")
    size.add_argument("--full", action="store_true", help="the documented setting (GPU)")
    size.add_argument("--smoke", action="store_true", help="a few steps per run (CI)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9],
                        help="target sparsities in (0, 1), one agpe run each, named agpe-<percent>")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the weights, the batches and the layouts (>= 0; default 0)")
    parser.add_argument("--lowering", choices=("inductor", "aot_eager"), default="inductor")
    parser.add_argument("--out", default=None, help="output folder (default runs/char_lm, runs/char_lm_smoke with --smoke)")
    parser.add_argument("--text-file", default=None,
                        help="read the text from this file instead of running `bible` (same output)")
    parser.add_argument("--steps", type=int, default=None, help="override the setting's training steps (>= 1)")
    parser.add_argument("--block-size", type=int, default=None, help="override the setting's block size")
    parser.add_argument("--prune-until", type=float, default=0.5,
                        help="fraction of the steps over which sparsity is reached (AGPEConfig.end_step)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME",
                        help="train only these runs of --sparsities' (dense, agpe-<percent>; default all), e.g. "
                             "--runs agpe-75 after a time limit cut that run: dense is not trained again")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one value of the setting (keys: {', '.join(SETTINGS['quick'])})")
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run never overwrites a real one
        args.out = "runs/char_lm_smoke" if args.smoke else "runs/char_lm"
    for s in args.sparsities:
        if not 0 < s < 1:
            parser.error(f"--sparsities: expected values in (0, 1), got {s}")
    if not 0 <= args.seed <= 2**64 - 1:  # torch.manual_seed's range (AGPEConfig.seed's too)
        parser.error(f"--seed: expected an int in [0, 2**64 - 1], got {args.seed}")
    setting = dict(SETTINGS["full" if args.full else "smoke" if args.smoke else "quick"])
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in setting:
            parser.error(f"--set: expected KEY=VALUE with KEY one of {sorted(setting)}; got {item!r}")
        try:
            setting[key] = type(setting[key])(value)
        except ValueError:
            parser.error(f"--set {key}: expected a {type(setting[key]).__name__}, got {value!r}")
    if args.steps is not None:
        setting["steps"] = args.steps
    if args.block_size is not None:
        setting["block_size"] = args.block_size
    block, width = setting["block_size"], setting["d_model"]
    if isinstance(block, bool) or block < 1 or width % block:  # every block linear is a multiple of d_model wide
        parser.error(f"--block-size: expected a positive divisor of d_model={width} (every block's linear "
                     f"layers are multiples of it), got {block}")
    if not 0 < args.prune_until <= 1:
        parser.error(f"--prune-until: expected a fraction in (0, 1], got {args.prune_until}")
    check_setting(parser, setting)
    runs = run_names(args.sparsities)
    first: Dict[str, float] = {}
    for name, sparsity in runs[1:]:
        if name in first:  # the second run would overwrite the first one's audit file and row
            parser.error(f"--sparsities: {first[name]:g} and {sparsity:g} both name the run {name!r} (runs are "
                         f"named by the percentage rounded to an integer); give each sparsity once, at least "
                         f"0.01 apart")
        first[name] = sparsity
    if args.runs is not None:  # checked before any work, as the other flags
        names = [name for name, _ in runs]
        unknown = [name for name in args.runs if name not in names]
        if unknown:
            parser.error(f"--runs: unknown {unknown}; with --sparsities {' '.join(map(str, args.sparsities))} "
                         f"the runs are {' '.join(names)}")
        runs = [(name, sparsity) for name, sparsity in runs if name in args.runs]
    for name, sparsity in runs:  # the configs train() builds: a bad combination fails here, not mid-run
        try:
            config = run_config(name, sparsity, setting, args)
        except (TypeError, ValueError) as error:
            parser.error(f"--steps/--prune-until/--set: run {name!r}: {error}")
        if sparsity > 0 and config.end_step > setting["steps"]:  # it trained dense under an agpe name
            parser.error(f"--steps/--set: run {name!r}: {setting['steps']} steps are fewer than one update interval "
                         f"({config.update_interval}), so no mask update would run and the run would stay dense; "
                         f"give more steps or --set update_interval=N with N <= {setting['steps']}")
    text = load_text(args.text_file)  # (exits with a message when the text is missing or empty)
    need = setting["seq_len"] + 2  # one sequence + its shifted target, from each split
    split = int(0.9 * len(text))  # as below: one character, one token
    if min(split, len(text) - split) < need:
        source = f"--text-file {args.text_file!r}" if args.text_file else "the text of `bible`"
        parser.error(f"{source}: {len(text):,} characters is too short for --set seq_len={setting['seq_len']}: "
                     f"the validation split (the last 10%) needs at least {need} characters, so the text at "
                     f"least {10 * need:,}; give a longer text or a smaller seq_len")
    check_out(parser, args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # fp32 model, TF32 matmuls (cuBLAS and the Triton kernels)
    data, vocab = encode(text)
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    print(f"char_lm: {data.numel():,} chars, vocab {len(vocab)}, train {split:,} / val {data.numel() - split:,}; "
          f"{setting['steps']} steps on {device} (float32 matmul precision "
          f"{torch.get_float32_matmul_precision()})", file=sys.stderr)
    header = results_header(setting, device, args)
    earlier = earlier_runs(args.out, header)
    results = []
    for name, sparsity in runs:
        def on_eval(row, name=name):
            # the run so far, unless an earlier invocation finished this run (kept until this one does)
            if name not in earlier or "partial_step" in earlier[name]:
                write_results(args.out, header, {**earlier, **{r["run"]: r for r in results}, name: row})

        results.append(train(name, sparsity, setting, train_data, val_data, len(vocab), args, device, on_eval))
        # an interrupted run keeps what it finished, and the earlier figures of the runs it did not
        write_results(args.out, header, {**earlier, **{r["run"]: r for r in results}})
    # the dense run to compare with: this invocation's, else a finished one of results.json
    dense = next((r for r in results if r["run"] == "dense"), None)
    if dense is None and "partial_step" not in earlier.get("dense", {"partial_step": 0}):
        dense = earlier["dense"]
    if dense is None:
        print("(no finished dense run here or in results.json: the 'vs dense' columns are left empty)")
    print(f"\n{'run':<10} {'val loss':>9} {'vs dense':>9} {'train FLOPs':>12} {'vs dense':>9} "
          f"{'density':>8} {'wall s':>8} {'compiles':>9}")
    for r in results:
        vs_loss = f"{r['val_loss'] / dense['val_loss'] - 1:>+9.2%}" if dense else f"{'-':>9}"
        vs_flops = f"{r['train_flops'] / dense['train_flops']:>9.3f}" if dense else f"{'-':>9}"
        print(f"{r['run']:<10} {r['val_loss']:>9.4f} {vs_loss} "
              f"{r['train_flops']:>12.3e} {vs_flops} "
              f"{r['final_density']:>8.3f} {r['wall_clock_s']:>8.1f} {r['compilations']:>9d}")
    print("val loss: nats/char on the validation split; train FLOPs: executed training FLOPs of the whole model "
          "(agpe layers at their live blocks, the rest dense); vs dense: ratio to the dense run; density: final "
          "global density of the agpe layers; compiles: backend compilations")
    if args.smoke:
        print("(--smoke trains a few steps per run: an end-to-end check, its losses say nothing about accuracy)")
    kept = [name + (f" (unfinished: stopped at step {earlier[name]['partial_step']})"
                    if "partial_step" in earlier[name] else "")
            for name in earlier if name not in {r["run"] for r in results}]
    if kept:  # the same comparison: the table is this invocation's, results.json and the plot hold all
        print(f"(results.json and the plot also keep {', '.join(kept)} of an earlier run with the same settings)")
    print(f"wrote {os.path.join(args.out, 'results.json')} and one audit JSONL per run")
    plot(list({**earlier, **{r["run"]: r for r in results}}.values()), os.path.join(args.out, "val_loss_vs_flops.png"))
    if any(math.isnan(r["val_loss"]) for r in results):
        raise SystemExit("char_lm: a run diverged (NaN validation loss)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # no traceback: say what was kept
        sys.exit("interrupted: results.json in --out keeps the runs it finished (and the earlier figures it had yet to "
                 "replace); the unfinished one's audit log is left as .jsonl.partial")
