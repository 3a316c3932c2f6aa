"""AGPETrainer: Hugging Face Trainer + Sparsifier on a tiny GPT-2, on the CPU.

One 8-step run (gradient accumulation 2, an epoch of 5 micro-batches, so every third
optimizer step has a single micro-batch) is shared by the tests that read it; the resume
test trains a second trainer from its step-5 checkpoint. aot_eager keeps compiling short.
"""

import dataclasses
import math
import os

import pytest
import torch

import agpe_compile
from agpe_compile.controller import AGPEConfig, Sparsifier

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from agpe_compile.integrations import AGPETrainer, SPARSIFIER_NAME  # noqa: E402  (needs transformers)

FAST = {"inductor": False}
STEPS, CHECKPOINT = 8, 5


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=20, seed=0):
        self.ids = torch.randint(0, 96, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(convert=True):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=32, vocab_size=96,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)  # dropout on: the resume must restore the RNG too
    # transformers finds no loss type in the class name "GPT2LMHeadModel": its loss then warns from
    # inside the compiled forward (a graph break), and the Trainer counts unshifted labels
    model.loss_type = "ForCausalLM"
    if convert:
        agpe_compile.linear_from_conv1d(model)
    return model


def agpe_config(**changes):
    values = dict(target_sparsity=0.5, block_size=16, update_interval=2, end_step=STEPS, buckets=(1.0, 0.5))
    return AGPEConfig(**{**values, **changes})


def training_args(output_dir, **changes):
    values = dict(output_dir=str(output_dir), use_cpu=True, seed=0, per_device_train_batch_size=4,
                  gradient_accumulation_steps=2, max_steps=STEPS, logging_steps=1, save_steps=CHECKPOINT,
                  report_to=[], dataloader_num_workers=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**values, **changes})


def make_trainer(output_dir, model=None, args=None, **kwargs):
    kwargs.setdefault("agpe_config", agpe_config())
    kwargs.setdefault("agpe_compile_options", FAST)
    return AGPETrainer(model=model if model is not None else tiny_gpt2(),
                       args=args if args is not None else training_args(output_dir),
                       train_dataset=Tokens(), **kwargs)


class Run:
    """The shared run: its trainer, the loss each Sparsifier step got, the end state."""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch._dynamo.reset()
    out = tmp_path_factory.mktemp("straight")
    result = Run()
    result.output, result.losses = out, []
    original = Sparsifier.step

    def spy(self, loss=None, *args, **kwargs):
        result.losses.append(float(loss))
        return original(self, loss, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Sparsifier, "step", spy)
        result.trainer = make_trainer(out)
        result.trainer.train()
    result.model_state = {k: v.clone() for k, v in result.trainer.model.state_dict().items()}
    result.sparsifier_state = result.trainer.sparsifier.state_dict()
    return result


def test_trains_to_the_target_with_one_sparsifier_step_per_optimizer_step(run):
    trainer, sparsifier = run.trainer, run.trainer.sparsifier
    assert trainer.state.global_step == STEPS
    assert sparsifier.step_count == STEPS  # not once per micro-batch (13 here)
    assert sparsifier.optimizer is trainer.optimizer.optimizer  # accelerate's wrapper, looked through
    assert sparsifier.global_density == pytest.approx(0.5, abs=0.02)
    assert sorted(sparsifier.layers) == sorted(f"transformer.h.{i}.{name}" for i in range(2) for name in
                                               ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    # Each step got the whole step's loss: the sum over its micro-batches the Trainer logs.
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, STEPS + 1))
    assert run.losses == pytest.approx([entry["loss"] for entry in logged], rel=1e-6)
    assert logged[0]["agpe_density"] == 1.0 and logged[-1]["agpe_density"] == sparsifier.global_density
    # Compiled in place: the model keeps its class and its key names.
    assert type(trainer.model) is transformers.GPT2LMHeadModel
    assert not any("_orig_mod" in key for key in run.model_state)


def test_checkpoints_hold_the_masks_and_the_sparsifier(run):
    from safetensors.torch import load_file

    folder = run.output / f"checkpoint-{CHECKPOINT}"
    saved = torch.load(folder / SPARSIFIER_NAME, weights_only=True)
    weights = load_file(folder / "model.safetensors")
    assert saved["step"] == CHECKPOINT
    for name, mask in saved["masks"].items():
        assert torch.equal(weights[f"{name}.weight_block_mask"], mask)
    density = sum(int(m.sum()) for m in saved["masks"].values()) / sum(m.numel() for m in saved["masks"].values())
    assert density < 1.0  # pruned before the checkpoint: the resume starts from sparse masks
    # ... and the masks change after it, so the resumed run must decide like the straight one.
    assert any(not torch.equal(mask, run.sparsifier_state["masks"][name]) for name, mask in saved["masks"].items())


def test_resume_from_a_mid_run_checkpoint_is_bit_identical(run, tmp_path, caplog):
    trainer = make_trainer(tmp_path)
    with caplog.at_level("WARNING", logger="agpe_compile"):
        trainer.train(resume_from_checkpoint=str(run.output / f"checkpoint-{CHECKPOINT}"))
    assert "masks already have inactive blocks" not in caplog.text  # the Sparsifier's state is loaded: no advice
    assert trainer.state.global_step == trainer.sparsifier.step_count == STEPS
    resumed = trainer.model.state_dict()
    assert resumed.keys() == run.model_state.keys()
    differ = [key for key, value in run.model_state.items() if not torch.equal(value, resumed[key])]
    assert differ == []  # weights, masks, layouts, saliency sums, counters
    state = trainer.sparsifier.state_dict()
    for key in ("step", "target_density", "pruned_saliency", "schedule_state", "flops", "loss_window"):
        assert state[key] == run.sparsifier_state[key], key
    for key in ("masks", "saliency_ema", "grown_age"):
        for name, value in state[key].items():
            assert torch.equal(value, run.sparsifier_state[key][name]), (key, name)
    assert torch.equal(state["rng_state"], run.sparsifier_state["rng_state"])
    # The log history up to the checkpoint comes back with the trainer state; every step's loss matches.
    resumed_losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert resumed_losses == [(e["step"], e["loss"]) for e in run.trainer.state.log_history if "loss" in e]


def test_resuming_with_another_block_size_says_so_before_loading(run, tmp_path):
    # torch's "size mismatch for transformer.h.0.attn.c_attn.weight_block_mask" named no cause
    trainer = make_trainer(tmp_path, agpe_config=agpe_config(block_size=32))
    with pytest.raises(ValueError, match="trained with AGPEConfig.block_size=16, this trainer has block_size=32"):
        trainer.train(resume_from_checkpoint=str(run.output / f"checkpoint-{CHECKPOINT}"))


def test_evaluation_runs_on_the_sparse_model(run):
    trainer = run.trainer
    step = trainer.sparsifier.step_count
    counters = {n: s.counters.clone() for n, s in trainer.sparsifier.layers.items()}
    metrics = trainer.evaluate(Tokens(n=8, seed=1))
    assert math.isfinite(metrics["eval_loss"])
    assert trainer.state.log_history[-1]["agpe_density"] == trainer.sparsifier.global_density
    assert "agpe_density" not in metrics  # the logs get it; the metrics evaluate() returns stay the Trainer's
    assert metrics["epoch"] == trainer.state.epoch  # ... including what the Trainer adds to them
    assert trainer.sparsifier.step_count == step  # evaluation is no training step
    assert all(torch.equal(s.counters, counters[n]) for n, s in trainer.sparsifier.layers.items())
    # The compiled evaluation computes what the pruned model computes eagerly (inactive weights are zeros).
    with torch.compiler.set_stance("force_eager"):
        eager = trainer.evaluate(Tokens(n=8, seed=1))
    assert metrics["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)
    batch = Tokens(n=8, seed=1).ids
    with torch.no_grad():
        direct = trainer.model(input_ids=batch, labels=batch).loss
    assert metrics["eval_loss"] == pytest.approx(float(direct), rel=1e-5)


def test_a_second_train_without_resume_says_the_sparsifier_goes_on(run, caplog):
    trainer = run.trainer
    state = transformers.TrainerState(global_step=0)
    trainer._agpe_train_begins = 0  # as a new train() call starts (a second begin within one is a retry)
    with caplog.at_level("WARNING", logger="agpe_compile.integrations.hf"):
        trainer.callback_handler.on_train_begin(trainer.args, state, transformers.TrainerControl())
    assert f"train() starts at global step 0, but the Sparsifier has run {STEPS} steps" in caplog.text


def test_load_best_model_at_end_restores_that_checkpoints_sparsifier(tmp_path):
    evals = []

    def first_is_best(prediction):  # deterministic: the evaluation at step 2 scores highest
        evals.append(len(evals))
        return {"first": float(len(evals) == 1)}

    args = training_args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                         logging_steps=2, load_best_model_at_end=True, metric_for_best_model="first")
    trainer = make_trainer(tmp_path, args=args, eval_dataset=Tokens(n=4, seed=1), compute_metrics=first_is_best,
                           agpe_config=agpe_config(policy="rigl", update_interval=1, end_step=4))  # swaps at 0.5
    trainer.train()
    assert len(evals) == 2 and trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert trainer.sparsifier.step_count == 2
    saved = torch.load(os.path.join(trainer.state.best_model_checkpoint, SPARSIFIER_NAME), weights_only=True)
    last = torch.load(os.path.join(tmp_path, "checkpoint-4", SPARSIFIER_NAME), weights_only=True)
    assert any(not torch.equal(mask, last["masks"][name]) for name, mask in saved["masks"].items())
    for name, state in trainer.sparsifier.layers.items():  # the Trainer reloaded the model's masks; they agree
        assert torch.equal(state.block_mask, saved["masks"][name])
    # the FLOP report is the whole run's (it went back to the best checkpoint's 2 steps)
    assert trainer.sparsifier.accountant.state_dict() == last["flops"] != saved["flops"]


def test_load_best_model_at_end_says_when_the_best_checkpoint_is_denser_than_the_target(tmp_path, caplog):
    # chosen by a metric from before pruning reached the target: the run ends on a dense model
    def first_is_best(prediction):
        first_is_best.calls = getattr(first_is_best, "calls", 0) + 1
        return {"first": float(first_is_best.calls == 1)}

    args = training_args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                         logging_steps=2, load_best_model_at_end=True, metric_for_best_model="first")
    trainer = make_trainer(tmp_path, args=args, eval_dataset=Tokens(n=4, seed=1), compute_metrics=first_is_best,
                           agpe_config=agpe_config(policy="gmp", update_interval=1, begin_step=1, end_step=4))
    with caplog.at_level("WARNING", logger="agpe_compile"):
        trainer.train()
    assert trainer.sparsifier.global_density > 0.51
    assert "load_best_model_at_end restored" in caplog.text and "above the target 0.500" in caplog.text


def test_load_best_model_at_end_reports_the_runs_flops_once(tmp_path):
    # re-audit BP F3: a best checkpoint saved mid-interval left its snapshot under the run's
    # restored totals, so the first read of sparsifier.flops counted its last rows again
    evals = []

    def first_is_best(prediction):
        evals.append(len(evals))
        return {"first": float(len(evals) == 1)}

    args = training_args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                         logging_steps=2, load_best_model_at_end=True, metric_for_best_model="first")
    trainer = make_trainer(tmp_path, args=args, eval_dataset=Tokens(n=4, seed=1), compute_metrics=first_is_best,
                           agpe_config=agpe_config(policy="rigl", update_interval=4, end_step=8))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    last = torch.load(os.path.join(tmp_path, "checkpoint-4", SPARSIFIER_NAME), weights_only=True)
    # the run's 4 steps: checkpoint-4's totals plus the rows it had not yet accounted
    run = {n: f["rows"] + int(last["layer_buffers"][n]["counters"][0]) - last["seen_counters"][n][0]
           for n, f in last["flops"].items()}
    assert {n: layer.rows for n, layer in trainer.sparsifier.flops.layers.items()} == run


def test_load_best_model_at_end_after_the_sparsifier_was_closed_says_so(tmp_path, caplog):
    # re-audit BN F6: the end of train() loaded the best checkpoint into a closed Sparsifier
    class CloseAtTheEnd(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                trainer.sparsifier.close()

    args = training_args(tmp_path, max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
                         logging_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    trainer = make_trainer(tmp_path, args=args, eval_dataset=Tokens(n=4, seed=1),
                           agpe_config=agpe_config(policy="rigl", update_interval=1, end_step=4))
    trainer.add_callback(CloseAtTheEnd())
    with caplog.at_level("WARNING", logger="agpe_compile"):
        trainer.train()
    assert "but the run's Sparsifier was closed" in caplog.text


# ---- refusals: each says what to do instead ----------------------------------------------


class NotAnOptimizer:
    """A wrapper the Sparsifier cannot hook (no torch.optim.Optimizer step hooks)."""

    def __init__(self, params):
        self.param_groups = [{"params": list(params)}]

    def step(self):
        pass

    def zero_grad(self, set_to_none=True):
        pass


def stale_optimizer():
    model = tiny_gpt2(convert=False)
    optimizer = torch.optim.AdamW(model.parameters())  # holds the Conv1D weights conversion replaces
    agpe_compile.linear_from_conv1d(model)
    return model, optimizer


@pytest.mark.parametrize("case, match", [
    ("torch_compile", "Leave torch_compile, torch_compile_backend and torch_compile_mode unset"),
    ("backend_agpe", "accelerate does not accept backend 'agpe'.*compiles the model in place"),
    ("backend_inductor", "backend 'inductor'.*Leave torch_compile"),
    ("conv1d", r"Conv1D layers.*Call agpe_compile.linear_from_conv1d\(model\) before"),
    ("compiled", "Pass the uncompiled model"),
    ("model_init", r"pass the model itself \(model=...\)"),
    ("not_an_optimizer", r"Pass the torch.optim optimizer itself.*optimizers=\(None, None\)"),
    ("stale_optimizer", r"Create the optimizer from model.parameters\(\) after the conversion"),
    ("config_in_options", r"set them in agpe_config=AGPEConfig"),
    ("bad_option", "option 'inductor'"),
])
def test_refusals_name_the_fix(tmp_path, case, match):
    kwargs = {}
    if case == "torch_compile":
        kwargs["args"] = training_args(tmp_path, torch_compile=True)
    elif case == "backend_agpe":
        kwargs["args"] = training_args(tmp_path, torch_compile_backend="agpe")
    elif case == "backend_inductor":
        kwargs["args"] = training_args(tmp_path, torch_compile_backend="inductor")
    elif case == "conv1d":
        kwargs["model"] = tiny_gpt2(convert=False)
    elif case == "compiled":
        kwargs["model"] = torch.compile(tiny_gpt2(), backend="agpe")
    elif case == "not_an_optimizer":
        model = tiny_gpt2()
        kwargs.update(model=model, optimizers=(NotAnOptimizer(model.parameters()), None))
    elif case == "stale_optimizer":
        model, optimizer = stale_optimizer()
        kwargs.update(model=model, optimizers=(optimizer, None))
    elif case == "config_in_options":
        kwargs["agpe_compile_options"] = {"inductor": False, "target_sparsity": 0.9}
    elif case == "bad_option":
        kwargs["agpe_compile_options"] = {"inductor": "no"}
    if case == "model_init":
        with pytest.raises(ValueError, match=match):
            AGPETrainer(model_init=tiny_gpt2, args=training_args(tmp_path), train_dataset=Tokens(),
                        agpe_config=agpe_config())
        return
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, **kwargs)


def test_refusals_found_by_the_trainer_name_the_fix(tmp_path, monkeypatch):
    with monkeypatch.context() as env:  # an accelerate config that compiles with another backend
        env.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
        with pytest.raises(ValueError, match="unset ACCELERATE_DYNAMO_BACKEND"):
            make_trainer(tmp_path)
    args = training_args(tmp_path)
    args._setup_devices
    args._n_gpu = 2  # as on a machine with two visible GPUs
    with pytest.raises(ValueError, match="Launch one process per GPU"):
        make_trainer(tmp_path, args=args)
    trainer = make_trainer(tmp_path)
    for flag, name in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
        # as accelerate sets them from its config (a one-process test cannot launch FSDP); the
        # check read args.fsdp/args.deepspeed only
        with monkeypatch.context() as patched:
            patched.setattr(trainer, flag, True, raising=False)
            with pytest.raises(ValueError, match=f"accelerate is configured for {name}.*DistributedDataParallel"):
                trainer._refuse_after_init()
    plain = tmp_path / "plain-checkpoint"  # a folder without the Sparsifier's file
    plain.mkdir()
    with pytest.raises(ValueError, match=f"has no {SPARSIFIER_NAME}.*without resume_from_checkpoint"):
        make_trainer(tmp_path).train(resume_from_checkpoint=str(plain))


def test_a_schedule_past_the_run_is_warned_about_and_the_sparsifier_uses_the_trainers_optimizer(tmp_path, caplog):
    trainer = make_trainer(tmp_path, agpe_config=agpe_config(end_step=10_000))
    trainer.state.max_steps = STEPS
    with caplog.at_level("WARNING", logger="agpe_compile.integrations.hf"):
        optimizer = trainer.create_optimizer()
    assert "AGPEConfig.end_step=10000 is past the run's 8 optimizer steps" in caplog.text
    assert "AGPEConfig(end_step=6)" in caplog.text
    assert trainer.sparsifier.optimizer is optimizer
    assert trainer.sparsifier.global_density == 1.0  # nothing ran yet
    caplog.clear()  # with AGPEConfig's default update_interval (100) end_step=6 alone is refused: the advice says more
    trainer = make_trainer(tmp_path, agpe_config=AGPEConfig(target_sparsity=0.5, block_size=16))
    trainer.state.max_steps = STEPS
    with caplog.at_level("WARNING", logger="agpe_compile.integrations.hf"):
        trainer.create_optimizer()
    assert "e.g. AGPEConfig(end_step=6, update_interval=1)" in caplog.text
    AGPEConfig(target_sparsity=0.5, block_size=16, end_step=6, update_interval=1)  # the advice is accepted


def test_activation_checkpointing_runs_the_op_in_every_checkpointed_block(run, tmp_path, caplog):
    """HF's activation (formerly gradient) checkpointing wraps each block in torch.utils.checkpoint: its layers run
    agpe::sparse_linear there (Note [Weights inside higher-order ops]), so they count their
    rows like the straight run's, and the run prunes to the same target."""
    torch._dynamo.reset()
    trainer = make_trainer(tmp_path, args=training_args(tmp_path, activation_checkpointing=True))
    with caplog.at_level("WARNING", logger="agpe_compile"):
        trainer.train()
    sparsifier = trainer.sparsifier
    assert sparsifier.global_density == pytest.approx(0.5, abs=0.02)
    rows = {name: layer.rows for name, layer in sparsifier.flops.layers.items()}
    assert rows == {name: layer.rows for name, layer in run.trainer.sparsifier.flops.layers.items()}
    assert all(count > 0 for count in rows.values()), rows
    assert "agpe" not in caplog.text


def test_a_batch_size_retry_after_out_of_memory_is_refused_with_the_size_to_set(tmp_path):
    """Note [Batch-size retries]: the Trainer restarted at global step 0, the Sparsifier went
    on (10 steps against 8), and its checkpoints could not be resumed."""
    calls = []

    class OutOfMemoryAtStep3(AGPETrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(inputs["input_ids"].shape[0])
            if len(calls) == 5:  # step 3's first micro-batch, at batch size 4
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = OutOfMemoryAtStep3(model=tiny_gpt2(), args=training_args(tmp_path, auto_find_batch_size=True),
                                 train_dataset=Tokens(), agpe_config=agpe_config(), agpe_compile_options=FAST)
    with pytest.raises(RuntimeError, match="restarted training at global step 0 with batch size 3.*has already run 2 "
                                           "steps.*per_device_train_batch_size"):
        trainer.train()


def test_a_closed_sparsifier_writes_no_agpe_file_into_a_shipped_model(tmp_path):
    trainer = make_trainer(tmp_path, args=training_args(tmp_path, max_steps=2, save_steps=100))
    trainer.train()
    trainer.sparsifier.close()
    agpe_compile.strip(trainer.model)
    trainer.save_model(str(tmp_path / "shipped"))
    assert SPARSIFIER_NAME not in os.listdir(tmp_path / "shipped")
    assert "model.safetensors" in os.listdir(tmp_path / "shipped")


def test_a_trainer_subclass_of_ones_own_takes_it_as_a_mixin(tmp_path):
    class Mine(transformers.Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            return super().compute_loss(model, inputs, *args, **kwargs)

    class MyAGPETrainer(AGPETrainer, Mine):
        pass

    trainer = MyAGPETrainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=Tokens(),
                            agpe_config=agpe_config(), agpe_compile_options=FAST)
    assert agpe_compile.layer_states(trainer.model)  # prepared
    assert trainer.model._compiled_call_impl is not None  # compiled in place
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # one of the user's own
    trainer = MyAGPETrainer(model=model, args=training_args(tmp_path), train_dataset=Tokens(),
                            agpe_config=agpe_config(), agpe_compile_options=FAST, optimizers=(optimizer, None))
    trainer.state.max_steps = STEPS
    assert trainer.create_optimizer() is optimizer and trainer.sparsifier.optimizer is optimizer
    with pytest.raises(ValueError, match="Pass the torch.optim optimizer itself"):
        MyAGPETrainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=Tokens(),
                      agpe_config=agpe_config(), optimizers=(NotAnOptimizer([]), None))

    class WithItsOwnKeywords(transformers.Trainer):  # (was: "got an unexpected keyword argument 'alpha'")
        def __init__(self, *args, alpha=1.0, **kwargs):
            self.alpha = alpha
            super().__init__(*args, **kwargs)

    class Yours(AGPETrainer, WithItsOwnKeywords):
        pass

    trainer = Yours(tiny_gpt2(), training_args(tmp_path), alpha=0.5, train_dataset=Tokens(),
                    agpe_config=agpe_config(), agpe_compile_options=FAST)
    assert trainer.alpha == 0.5 and agpe_compile.layer_states(trainer.model)
    with pytest.raises(ValueError, match="Conv1D"):  # checked on what the Trainer ended up with, too
        Yours(tiny_gpt2(convert=False), training_args(tmp_path), alpha=0.5, agpe_config=agpe_config())

    class WithALeadingArgument(transformers.Trainer):  # its positions are not Trainer's
        def __init__(self, teacher, *args, **kwargs):
            self.teacher = teacher
            super().__init__(*args, **kwargs)

    class Distilling(AGPETrainer, WithALeadingArgument):
        pass

    teacher = tiny_gpt2(convert=False)  # Conv1D layers: it was taken for the model and refused
    trainer = Distilling(teacher, tiny_gpt2(), training_args(tmp_path), train_dataset=Tokens(),
                         agpe_config=agpe_config(), agpe_compile_options=FAST)
    assert trainer.teacher is teacher and agpe_compile.layer_states(trainer.model)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_ranks_resume_a_mid_interval_checkpoint_bit_identically(tmp_path):
    """Note [Ranks' own state]: each rank's interval sums come back from its own file (rank 1
    started from rank 0's before, and the next update decided another mask)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    with open(tmp_path / "ranks.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "tests.integrations.hf_ddp_worker", str(tmp_path)],
                              cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert done.returncode == 0, (tmp_path / "ranks.log").read_text()[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert "agpe_rank_state_0.pt" in ranks[0]["files"] and "agpe_rank_state_1.pt" in ranks[0]["files"]
    for r in ranks:
        assert r["straight_step"] == r["resumed_step"] == 8
        differ = [key for key, value in r["straight"].items() if not torch.equal(value, r["resumed"][key])]
        masks = [key for key in r["straight"] if key.endswith("weight_block_mask")]
        assert masks and differ == [], differ
        assert "data_parallel='off'" in r["off"] and "2 data-parallel ranks" in r["off"]
    weights = [key for key in ranks[0]["straight"] if key.endswith(".weight")]
    assert all(torch.equal(ranks[0]["straight"][key], ranks[1]["straight"][key]) for key in weights)


@pytest.mark.parametrize("max_steps,begin_step", [(8, 0), (78, 50), (71, 50), (1000, 0), (400, 350)])
def test_the_schedule_advice_is_a_config_that_updates_several_times(max_steps, begin_step):
    from agpe_compile.integrations.hf import _schedule_advice

    config = AGPEConfig(target_sparsity=0.5, block_size=16, begin_step=begin_step)  # update_interval 100
    text = _schedule_advice(config, max_steps)
    assert text.startswith("AGPEConfig(") and text.endswith(")") and "other fields" not in text, text
    fields = dict(item.split("=") for item in text[len("AGPEConfig("):-1].split(", "))
    advised = dataclasses.replace(config, **{k: int(v) for k, v in fields.items()})  # accepted
    assert advised.end_step <= max_steps
    assert (advised.end_step - advised.begin_step) // advised.update_interval >= 3, text


def test_a_retry_before_the_first_step_counts_only_the_batches_it_trains(tmp_path):
    """Note [Batch-size retries]: the failed attempt's micro-batch was left in the row
    counters (704 rows against 640) and in the first interval's saliency sums."""
    calls = []

    class OutOfMemoryOnce(AGPETrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            calls.append(inputs["input_ids"].shape[0])
            if len(calls) == 2:  # step 1's second micro-batch, at batch size 4
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
            return super().compute_loss(model, inputs, *args, **kwargs)

    args = dict(max_steps=4, save_steps=100)
    retried = OutOfMemoryOnce(model=tiny_gpt2(), train_dataset=Tokens(), agpe_config=agpe_config(end_step=4),
                              args=training_args(tmp_path / "a", auto_find_batch_size=True, **args),
                              agpe_compile_options=FAST)
    retried.train()
    assert retried._train_batch_size == 3 and retried.sparsifier.step_count == 4
    clean = make_trainer(tmp_path / "b", agpe_config=agpe_config(end_step=4),
                         args=training_args(tmp_path / "b", per_device_train_batch_size=3, **args))
    clean.train()
    for name, state in clean.sparsifier.layers.items():
        assert torch.equal(retried.sparsifier.layers[name].counters, state.counters), name
    assert (retried.sparsifier.flops.sparse, retried.sparsifier.flops.dense) == (clean.sparsifier.flops.sparse,
                                                                              clean.sparsifier.flops.dense)


def test_a_checkpoint_of_several_ranks_resumed_by_one_process_is_warned_about(run, tmp_path, caplog):
    import shutil

    folder = tmp_path / "checkpoint-5"
    shutil.copytree(run.output / f"checkpoint-{CHECKPOINT}", folder)
    (folder / "agpe_rank_state_1.pt").write_bytes(b"")  # as written by a second rank
    trainer = make_trainer(tmp_path, args=training_args(tmp_path, max_steps=6))
    with caplog.at_level("WARNING", logger="agpe_compile.integrations.hf"):
        trainer.train(resume_from_checkpoint=str(folder))
    assert "saved by several data-parallel ranks and is resumed by one process" in caplog.text
