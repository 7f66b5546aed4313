"""Data-parallel GRPO on the CPU with gloo: two processes make the update one process makes on the
whole batch, only rank 0 writes, and a rank that fails stops every rank instead of hanging.

Each test starts two fresh processes (spawn) that talk over 127.0.0.1 and waits at most
TIMEOUT_S for them: a hang fails the test instead of blocking the suite.
"""
import datetime
import json
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import train_grpo
from mrgr1 import checkpoint, data, distributed, grpo, labels, lora, pipeline, sft, synthetic, trainer
from mrgr1.prompts import PromptEncoder
from mrgr1.run_config import RunConfig

WORDING = (RunConfig.system_prompt, RunConfig.instruction, RunConfig.sft_think)  # the defaults

TIMEOUT_S = 60
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "demo")
    return synthetic.generate(root, n_train=8, n_val=2, n_test=4, image_size=56, seed=0)


# ----------------------------------------------------------------------------- running two ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, out_dir, fn, args):
    """Runs in each spawned process: torchrun's environment, then fn(rank, *args); a failure is
    written to error<rank>.txt for the parent to read."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two processes on a small shared machine
    try:
        fn(rank, *args)
    except BaseException:
        with open(os.path.join(out_dir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # fn returned: its work is done and written. Leave without the interpreter's teardown, where a
    # gloo worker thread now and then still holds a joinable std::thread and the process aborts
    # ("terminate called without an active exception", exit code -6) after it has finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(out_dir, fn, *args, world=2) -> list[int]:
    """Start `world` processes running fn(rank, *args); return their exit codes. Fails the test
    if one is still running after TIMEOUT_S (it is killed)."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(out_dir), fn, args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {TIMEOUT_S} s: a hang"
    return [p.exitcode for p in procs]


def errors(out_dir, world=2) -> dict:
    return {r: open(os.path.join(out_dir, f"error{r}.txt")).read() for r in range(world)
            if os.path.exists(os.path.join(out_dir, f"error{r}.txt"))}


def varied_rewards(completions, *args, **kwargs):
    """The real reward plus a term from the completion's length: an untrained model earns 0 on
    every completion, which would make every advantage and gradient 0 (as in test_train.py)."""
    total, parts = REAL_REWARDS(completions, *args, **kwargs)
    return total + torch.tensor([len(c) % 5 / 5 for c in completions]), parts


REAL_REWARDS = trainer.compute_rewards


def trainable(model) -> dict:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- one update, fixed rollouts

def fixed_sampler(completions, completion_mask, truncated):
    """A stand-in for trainer.sample_completions that returns these rows, cut to their own longest
    completion: what a rank that sampled only these rows would hold."""
    width = int(completion_mask.sum(1).max())

    def sample(*args, **kwargs):
        return completions[:, :width], completion_mask[:, :width], truncated
    return sample


def fixed_rewards(completions, refs, *args, **kwargs):
    """Rewards that depend only on (study, member): the same on a rank as in the single process."""
    values = [sum(map(ord, r)) % 7 / 7 + 0.3 * (j % 2) for j, r in enumerate(refs)]
    return torch.tensor(values), {}


def one_step(model, start: dict, processor, studies, sampled, loss_type: str) -> dict:
    """One GRPO step on given completions with plain SGD (no clipping) from `start`: unlike Adam's
    first step (about lr * sign(g)), its result is proportional to the gradient, so a wrong
    normaliser shows."""
    model.load_state_dict(start, strict=False)
    cfg = RunConfig(num_generations=2, max_new_tokens=8, beta=0.04, loss_type=loss_type,
                             max_grad_norm=1e9, grad_accum=2 if loss_type == "bnpo" else 1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    real_sampler, real_rewards = trainer.sample_completions, trainer.compute_rewards
    trainer.sample_completions, trainer.compute_rewards = fixed_sampler(*sampled), fixed_rewards
    try:
        stats, _ = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies, labels.RuleLabeler(), optimizer, scheduler,
                                     cfg, None, **pipeline.special_ids(processor))
    finally:
        trainer.sample_completions, trainer.compute_rewards = real_sampler, real_rewards
    out = {f"{loss_type}/{k}": v for k, v in trainable(model).items()}
    out[f"{loss_type}/loss"] = torch.tensor([stats["loss"]])
    out[f"{loss_type}/grad_norm"] = torch.tensor([stats["grad_norm"]])
    return out


def one_sft_step(model, start: dict, processor, studies) -> dict:
    """One plain-SGD SFT step from `start`; the loss divides by every rank's token count."""
    model.load_state_dict(start, strict=False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loss = sft.sft_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies, optimizer, scheduler,
                        think=WORDING[2], max_grad_norm=1e9, eos_token_id=pipeline.special_ids(processor)["eos_token_ids"][0])
    return {**{f"sft/{k}": v for k, v in trainable(model).items()}, "sft/loss": torch.tensor([loss])}


def _update_my_rows(rank, folder, start, sampled, studies, out_dir):
    distributed.init("cpu")
    assert distributed.world_size() == 2 and dist.get_backend() == "gloo"
    model, processor = pipeline.load_policy(folder)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    mine = [t[2 * rank:2 * rank + 2] for t in sampled]  # this rank's study: rows 2r, 2r+1
    results = {}
    for loss_type in LOSS_TYPES:
        results.update(one_step(model, start, processor, distributed.shard(studies), mine, loss_type))
    results.update(one_sft_step(model, start, processor, distributed.shard(studies)))
    # --scale-rewards batch: the std of every rank's rewards, not of this rank's
    trainer.compute_rewards = fixed_rewards
    cfg = RunConfig(num_generations=2, max_new_tokens=4, beta=0.0, scale_rewards="batch")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    _, local = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), distributed.shard(studies), labels.RuleLabeler(), optimizer,
                                 scheduler, cfg, torch.Generator().manual_seed(rank), **pipeline.special_ids(processor))
    results["batch_advantages"] = local.advantages
    save_file(results, os.path.join(out_dir, f"rank{rank}.safetensors"))
    distributed.cleanup()


def test_two_ranks_make_the_single_process_update_and_sft_step(demo_root, tmp_path):
    studies = data.load_split("demo", demo_root, "train")
    folder = pipeline.demo_policy_folder(str(tmp_path / "init"), [s.report for s in studies], WORDING)
    model, processor = pipeline.load_policy(folder)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # lora_B starts at 0, which would leave lora_A's gradient 0
        for k, p in model.named_parameters():
            if ".lora_B." in k:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    start = trainable(model)
    cfg = RunConfig(num_generations=2, max_new_tokens=8)
    prompts = PromptEncoder(processor, *WORDING[:2])(studies[:2])
    sampled = trainer.sample_completions(model, prompts, cfg, torch.Generator().manual_seed(0), 2,
                                         **pipeline.special_ids(processor))          # [4, C] x 2, [4]
    expected = {}
    for loss_type in LOSS_TYPES:
        expected.update(one_step(model, start, processor, studies[:2], sampled, loss_type))
    expected.update(one_sft_step(model, start, processor, studies[:2]))

    codes = run_ranks(tmp_path, _update_my_rows, folder, start, sampled, studies[:2], str(tmp_path))
    assert codes == [0, 0], errors(tmp_path)
    for rank in (0, 1):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for loss_type in LOSS_TYPES + ("sft",):
            moved = max(float((expected[f"{loss_type}/{k}"] - v).abs().max()) for k, v in start.items())
            assert moved > 1e-3, f"{loss_type}: the single-process step must move the adapters"
            for k in start:
                key = f"{loss_type}/{k}"
                assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=0), (rank, key)
            for stat in ("loss", "grad_norm") if loss_type != "sft" else ("loss",):
                key = f"{loss_type}/{stat}"
                assert torch.allclose(got[key], expected[key], atol=1e-5, rtol=1e-5), (rank, key)
        # the whole batch's rewards, scaled by the whole batch's std; each rank holds its rows
        refs = [s.report for s in studies[:2] for _ in range(2)]
        full = grpo.group_advantages(fixed_rewards(None, refs)[0], 2, scale="batch")
        assert torch.allclose(got["batch_advantages"], full[2 * rank:2 * rank + 2], atol=1e-6)


# ----------------------------------------------------------------------------- train_grpo.main on two ranks

def run_args(demo_root, out, *extra):
    return ["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(out), "--sft-steps", "0",
            "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "8", "--eval-limit", "0",
            "--sample-every", "0", "--lora-rank", "4", "--lr", "1e-2", "--beta", "0.04", *extra]


def _train(rank, demo_root, out, result_dir):
    trainer.compute_rewards = varied_rewards
    if rank != 0:  # only rank 0 writes checkpoints and adapters
        def refuse(*a, **k):
            raise AssertionError(f"rank {rank} tried to write a checkpoint")
        checkpoint.save_checkpoint = refuse
        lora.save_adapter = refuse
    step = trainer.grpo_step

    def step_and_record(model, *args, **kwargs):
        out = step(model, *args, **kwargs)
        save_file(trainable(model), os.path.join(result_dir, f"weights{rank}.safetensors"))
        return out
    trainer.grpo_step = step_and_record
    train_grpo.main(run_args(demo_root, out, "--steps", "1"))
    distributed.cleanup()


def test_train_grpo_on_two_ranks_writes_once_and_resumes_on_one(demo_root, tmp_path):
    out = tmp_path / "run"
    codes = run_ranks(tmp_path, _train, demo_root, str(out), str(tmp_path))
    assert codes == [0, 0], errors(tmp_path)
    w0, w1 = (load_file(str(tmp_path / f"weights{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the ranks' weights drifted apart"
    assert any(float(v.abs().max()) > 0 for k, v in w0.items() if ".lora_B." in k), "the step moved nothing"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1], "one line per step: rank 0 alone logs"
    assert set(os.listdir(out)) - {"curves.png"} == {"checkpoint-000001", "final", "init", "latest", "metrics.jsonl"}
    saved = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert len(saved) == len(w0)

    # the data position is in global batches and the sampler seed in (seed, rank, step): a run
    # written by two ranks continues in one process
    train_grpo.main(run_args(demo_root, out, "--steps", "2", "--resume"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def _evaluate_one_study(rank, demo_root, out, result_dir):
    results = train_grpo.main(run_args(demo_root, out, "--steps", "1", "--eval-limit", "1", "--eval-samples", "2"))
    with open(os.path.join(result_dir, f"scores{rank}.json"), "w") as f:
        json.dump(results, f)
    distributed.cleanup()


def test_a_rank_without_test_studies_still_joins_every_gather_of_the_evaluation(demo_root, tmp_path):
    """One test study, two ranks: rank 1 scores nothing, yet must take part in each gather (or
    rank 0 waits for ever), and both ranks end with the same scores."""
    codes = run_ranks(tmp_path, _evaluate_one_study, demo_root, str(tmp_path / "run"), str(tmp_path))
    assert codes == [0, 0], errors(tmp_path)
    scores = [json.loads((tmp_path / f"scores{r}.json").read_text()) for r in (0, 1)]
    assert scores[0] == scores[1]
    assert {"ce_micro/f1", "sampled/reward", "sampled/mccs"} <= set(scores[0]["after"])


def test_each_rank_takes_a_contiguous_slice_of_whole_studies(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.shard([10, 11, 12, 13]) == [12, 13]
    assert distributed.split_evenly([1, 2, 3]) == [2, 3]  # evaluation: parts of any length
    seeds = {distributed.rank_seed(0, r, s, purpose) for r in (0, 1) for s in (0, 1)
             for purpose in ("rollout", "dropout")}
    assert len(seeds) == 8, "every (rank, step) samples, and drops LoRA inputs, with its own seed"


def test_batch_size_must_split_over_the_ranks(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="--batch-size 3 does not split evenly over 2 ranks"):
        train_grpo.main(run_args(demo_root, tmp_path, "--steps", "1", "--batch-size", "3"))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


# ----------------------------------------------------------------------------- failures

def _fail_on_rank_1(rank, demo_root, out):
    # a short timeout: should the lost connection go unnoticed, the wait still ends
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    if rank == 1:
        def crash(*a, **k):
            raise RuntimeError("the labeler crashed on rank 1")
        trainer.compute_rewards = crash
    train_grpo.main(run_args(demo_root, out, "--steps", "1"))


def test_a_failing_rank_stops_every_rank(demo_root, tmp_path):
    started = time.time()
    codes = run_ranks(tmp_path, _fail_on_rank_1, demo_root, str(tmp_path / "run"))
    assert codes[0] != 0 and codes[1] != 0, "rank 0 must raise when rank 1 fails, not finish or hang"
    found = errors(tmp_path)
    assert "the labeler crashed on rank 1" in found[1]
    assert "the labeler crashed" not in found[0] and "distributed_c10d" in found[0]  # a collective
    assert time.time() - started < TIMEOUT_S
