"""One rank of test_hf_trainer.py's data-parallel test (run by torch.distributed.run, 2 gloo ranks).

Trains 8 steps with checkpoints every 5 (mid-interval: updates every 2), resumes a second
trainer from checkpoint-5, and writes what the test compares to OUT/rank{r}.pt."""

import os
import sys

import torch
import transformers

import agpe_compile
from agpe_compile.controller import AGPEConfig
from agpe_compile.integrations.hf import AGPETrainer


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=40, seed=0):
        self.ids = torch.randint(0, 96, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=96,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    agpe_compile.linear_from_conv1d(model)
    return model


def trainer(output_dir, **config):
    args = transformers.TrainingArguments(
        output_dir=output_dir, use_cpu=True, ddp_backend="gloo", seed=0, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=8, logging_steps=1, save_steps=5, report_to=[],
        dataloader_num_workers=0, disable_tqdm=True)
    values = dict(target_sparsity=0.5, block_size=16, update_interval=2, end_step=8, buckets=(1.0, 0.5))
    return AGPETrainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(),
                       agpe_config=AGPEConfig(**{**values, **config}), agpe_compile_options={"inductor": False})


def main(out: str) -> None:
    straight = trainer(os.path.join(out, "straight"))
    straight.train()
    rank = straight.args.process_index
    result = {"straight": {k: v.clone() for k, v in straight.model.state_dict().items()},
              "straight_step": straight.sparsifier.step_count,
              "files": sorted(os.listdir(os.path.join(out, "straight", "checkpoint-5")))}
    torch._dynamo.reset()
    resumed = trainer(os.path.join(out, "resumed"))
    resumed.train(resume_from_checkpoint=os.path.join(out, "straight", "checkpoint-5"))
    result["resumed"] = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    result["resumed_step"] = resumed.sparsifier.step_count
    off = trainer(os.path.join(out, "off"), data_parallel="off")
    try:
        off.create_optimizer()
        result["off"] = "accepted"
    except ValueError as error:
        result["off"] = str(error)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
