"""Hugging Face ``Trainer`` with agpe on real text: a character-level GPT-2 on the KJV Bible.

The same model is trained twice on Debian's ``bible-kjv`` text (``bible -l0
"gen1:1-rev22:21"``, as in examples/char_lm.py: the first 90% for training, the last 10%
for validation): dense with a plain ``transformers.Trainer``, and block-sparse with
``agpe_compile.integrations.hf.AGPETrainer`` (AGPE policy, pruned to ``--sparsity`` by half
of the run), both compiled with the same lowering. It prints validation loss, the agpe layers' training FLOPs against dense, the
final density and the wall-clock of each::

    python examples/hf_trainer.py --quick          # a few minutes on a 2-core CPU
    python examples/hf_trainer.py --smoke          # seconds: checks the wiring only

GPT-2's ``Conv1D`` layers are converted to ``nn.Linear`` first (``linear_from_conv1d``),
which agpe rewrites; the token embedding and the tied head stay dense.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import char_lm  # noqa: E402  (the same text and character encoding)

import agpe_compile  # noqa: E402
from agpe_compile.integrations.hf import AGPETrainer  # noqa: E402

SETTINGS = {
    "smoke": dict(n_embd=64, n_layer=1, n_head=2, seq_len=32, batch=4, steps=6, block=16, eval_chunks=8),
    "quick": dict(n_embd=128, n_layer=2, n_head=4, seq_len=64, batch=16, steps=400, block=32, eval_chunks=256),
}


class Chunks(torch.utils.data.Dataset):
    """Consecutive ``seq_len``-character pieces of ``data`` (labels = inputs: the model shifts)."""

    def __init__(self, data: torch.Tensor, seq_len: int, limit: int = 0):
        self.data, self.seq_len = data, seq_len
        self.count = data.numel() // seq_len if not limit else min(limit, data.numel() // seq_len)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        ids = self.data[i * self.seq_len:(i + 1) * self.seq_len]
        return {"input_ids": ids, "labels": ids}


def make_model(vocab: int, setting: dict) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)  # the same initial model for both runs
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=setting["seq_len"], n_embd=setting["n_embd"],
                                     n_layer=setting["n_layer"], n_head=setting["n_head"], bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # transformers 5.24 finds none in the class name (design.md, Known limits)
    agpe_compile.linear_from_conv1d(model)
    return model


def run(name: str, sparsity: float, setting: dict, train_set, val_set, vocab: int, args) -> dict:
    steps = setting["steps"]
    training = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, name), max_steps=steps, per_device_train_batch_size=setting["batch"],
        per_device_eval_batch_size=setting["batch"], learning_rate=3e-3, lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), weight_decay=0.1, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to=[], seed=args.seed, disable_tqdm=True, dataloader_num_workers=0, use_cpu=args.cpu)
    model = make_model(vocab, setting)
    if sparsity == 0.0:  # compiled with the same lowering (by accelerate), for a like-for-like wall-clock
        training = dataclasses.replace(training, torch_compile=True, torch_compile_backend=args.lowering)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=train_set)
    else:
        config = agpe_compile.AGPEConfig(target_sparsity=sparsity, block_size=setting["block"],
                                         update_interval=max(1, steps // 40), end_step=max(2, steps // 2),
                                         exclude=("lm_head",), seed=args.seed)  # the head: vocab-sized, tied
        trainer = AGPETrainer(model=model, args=training, train_dataset=train_set, agpe_config=config,
                              agpe_compile_options={"inductor": args.lowering == "inductor"})
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    result = {"run": name, "val_loss": trainer.evaluate(val_set)["eval_loss"], "wall_s": wall,
              "flops": 1.0, "density": 1.0}
    if sparsity:
        result["flops"] = trainer.sparsifier.flops.ratio
        result["density"] = trainer.sparsifier.global_density
    print(f"{name}: validation loss {result['val_loss']:.4f} after {steps} steps ({wall:.1f} s)", flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the CPU setting (default)")
    mode.add_argument("--smoke", action="store_true", help="a few steps of a tiny model: checks the wiring")
    parser.add_argument("--sparsity", type=float, default=0.75, help="target sparsity of the agpe run, in (0, 1)")
    parser.add_argument("--lowering", choices=("inductor", "aot_eager"), default="inductor",
                        help="agpe's lowering (aot_eager compiles faster)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both runs (>= 0)")
    parser.add_argument("--text-file", default=None,
                        help="read the text from this file instead of running `bible` (same output)")
    parser.add_argument("--out", default=None,
                        help="the Trainers' output folders go here (default runs/hf_trainer, --smoke: runs/hf_trainer_smoke)")
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run does not mix its checkpoints with the --quick run's
        args.out = "runs/hf_trainer_smoke" if args.smoke else "runs/hf_trainer"
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    char_lm.check_out(parser, args.out)  # a writable folder (created), after the other flags, before the text
    args.cpu = not torch.cuda.is_available()
    setting = SETTINGS["smoke" if args.smoke else "quick"]
    data, vocab = char_lm.encode(char_lm.load_text(args.text_file))
    split = int(0.9 * data.numel())
    train_set = Chunks(data[:split], setting["seq_len"])
    val_set = Chunks(data[split:], setting["seq_len"], limit=setting["eval_chunks"])
    print(f"KJV text: {data.numel():,} characters, {len(vocab)} symbols; {len(train_set):,} training chunks of "
          f"{setting['seq_len']}, {len(val_set)} validation chunks", flush=True)
    results = [run("dense", 0.0, setting, train_set, val_set, len(vocab), args),
               run(f"agpe-{round(100 * args.sparsity)}", args.sparsity, setting, train_set, val_set, len(vocab), args)]
    dense = results[0]["val_loss"]
    print(f"\n{'run':>8} | val loss | vs dense | agpe-layer FLOPs | density | wall s")
    for r in results:
        print(f"{r['run']:>8} | {r['val_loss']:8.4f} | {100 * (r['val_loss'] / dense - 1):+7.2f}% | "
              f"{r['flops']:15.3f}x | {r['density']:7.3f} | {r['wall_s']:6.1f}")
    print("agpe-layer FLOPs: the agpe layers' executed training FLOPs / the same steps run dense (the embedding, "
          "head and attention are not counted); dense: a plain Trainer, torch.compile with the same lowering"
          + (" (--smoke: too few steps for the losses to mean anything)" if args.smoke else ""))


if __name__ == "__main__":
    main()
