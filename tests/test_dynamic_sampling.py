"""--dynamic-sampling (DAPO's dynamic sampling, mrgr1/dynamic_sampling.py): the update trains on the
groups whose rewards differ, extra rounds of studies are drawn until B such groups or the cap, and
with several ranks every rank keeps the same number of groups.

The reward is patched so that each study decides whether its group is informative: a "flat"
study's G completions all earn 0.5, any other's earn 0, 1/G, 2/G, ... (the member's index)."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from mrgr1 import data, distributed, dynamic_sampling, grpo, labels, lora, pipeline, synthetic, trainer
from mrgr1.prompts import PromptEncoder
from mrgr1.run_config import RunConfig

WORDING = (RunConfig.system_prompt, RunConfig.instruction, RunConfig.sft_think)
G = 2


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "demo")
    return synthetic.generate(root, n_train=12, n_val=0, n_test=2, image_size=56, seed=0)


def policy(demo_root, folder):
    studies = data.load_split("demo", demo_root, "train")
    init = pipeline.demo_policy_folder(str(folder), [s.report for s in studies], WORDING)
    model, processor = pipeline.load_policy(init)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    return studies, model, processor


def flat_rewards(flat_ids: set):
    """A score_completions whose groups are informative unless their study's id is in flat_ids."""
    def score(texts, studies, *args, **kwargs):
        values = torch.tensor([0.5 if s.id in flat_ids else j / G for s in studies for j in range(G)])
        return values, {"mccs": values}, {}
    return score


def step(model, processor, studies, more, monkeypatch, flat, **cfg_overrides):
    """One grpo_step with plain SGD; returns (stats, rollout, the rounds roll_out made, scheduler)."""
    monkeypatch.setattr(trainer, "score_completions", flat_rewards({s.id for s in flat}))
    rounds, real = [], trainer.roll_out

    def recording(*args, **kwargs):
        rounds.append(real(*args, **kwargs))
        return rounds[-1]
    monkeypatch.setattr(trainer, "roll_out", recording)
    cfg = RunConfig(num_generations=G, max_new_tokens=8, beta=0.04, **{"dynamic_sampling": True, **cfg_overrides})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    stats, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies,
                                       labels.RuleLabeler(), optimizer, scheduler, cfg, torch.Generator().manual_seed(0),
                                       more_studies=more, **pipeline.special_ids(processor))
    return stats, rollout, rounds, scheduler


def stream(batches):
    """A more_studies handing out these batches in turn, counting the calls."""
    it = iter(batches)

    def more():
        more.calls += 1
        return next(it)
    more.calls = 0
    return more


def group_rows(sampled, g):
    return slice(g * G, (g + 1) * G)


def test_the_update_trains_on_exactly_the_first_b_informative_groups(demo_root, tmp_path, monkeypatch):
    studies, model, processor = policy(demo_root, tmp_path / "init")
    s = studies
    more = stream([s[4:8], s[8:12]])
    stats, rollout, rounds, _ = step(model, processor, s[:4], more, monkeypatch, flat=[s[0], s[2], s[5]])
    # round 0: groups 1, 3 informative; one extra round (studies 4-7): 4, 6, 7; the first four kept
    assert more.calls == 1 and len(rounds) == 2
    assert rollout.studies == [s[1], s[3], s[4], s[6]]
    kept = [(rounds[0], 1), (rounds[0], 3), (rounds[1], 0), (rounds[1], 2)]
    assert rollout.texts == [t for r, g in kept for t in r.texts[group_rows(r, g)]]
    assert torch.equal(rollout.rewards, torch.cat([r.rewards[group_rows(r, g)] for r, g in kept]))
    assert torch.equal(rollout.advantages, grpo.group_advantages(rollout.rewards, G))
    assert (rollout.advantages != 0).all()
    C = rollout.completion_mask.shape[1]
    for k, (r, g) in enumerate(kept):  # the update's token rows: those completions, padded to C
        mask = r.completion_mask[group_rows(r, g)]
        n = int(mask.sum(1).max())
        assert torch.equal(rollout.completions[k * G:(k + 1) * G, :n] * mask[:, :n],
                           r.completions[group_rows(r, g)][:, :n] * mask[:, :n])
        assert torch.equal(rollout.completion_mask[k * G:(k + 1) * G, :n], mask[:, :n])
    assert rollout.old_logps.shape == (4 * G, C)
    assert stats["dynamic/rounds"] == 1 and stats["dynamic/groups"] == 4
    assert stats["dynamic/dropped_share"] == pytest.approx(1 - 4 / 8)
    # the logged reward is every group sampled, the dropped ones included
    assert stats["reward"] == pytest.approx(float(torch.cat([r.rewards for r in rounds]).mean()))


def test_the_batch_std_is_the_std_of_the_kept_groups(demo_root, tmp_path, monkeypatch):
    studies, model, processor = policy(demo_root, tmp_path / "init")
    s = studies
    _, rollout, _, _ = step(model, processor, s[:4], stream([s[4:8]]), monkeypatch, flat=[s[0], s[5]],
                            scale_rewards="batch")
    assert rollout.studies == [s[1], s[2], s[3], s[4]]
    assert torch.allclose(rollout.advantages, grpo.group_advantages(rollout.rewards, G, scale="batch"))


def test_extra_rounds_stop_at_the_cap_and_the_update_uses_what_it_found(demo_root, tmp_path, monkeypatch):
    studies, model, processor = policy(demo_root, tmp_path / "init")
    s = studies
    more = stream([s[4:8], s[8:12]])
    stats, rollout, rounds, _ = step(model, processor, s[:4], more, monkeypatch,
                                     flat=[x for i, x in enumerate(s) if i not in (2, 9)],
                                     dynamic_sampling_rounds=2)
    assert more.calls == 2 and len(rounds) == 3
    assert rollout.studies == [s[2], s[9]] and stats["dynamic/groups"] == 2 and stats["dynamic/rounds"] == 2
    assert stats["dynamic/dropped_share"] == pytest.approx(1 - 2 / 12)
    assert "loss" in stats and rollout.old_logps.shape[0] == 2 * G


def test_no_informative_group_after_the_cap_makes_no_update(demo_root, tmp_path, monkeypatch):
    studies, model, processor = policy(demo_root, tmp_path / "init")
    s = studies
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    more = stream([s[4:8], s[8:12]])
    stats, rollout, rounds, scheduler = step(model, processor, s[:4], more, monkeypatch, flat=s,
                                             dynamic_sampling_rounds=2, num_iterations=2)
    assert more.calls == 2 and len(rounds) == 3
    assert stats["dynamic/groups"] == 0 and stats["dynamic/dropped_share"] == 1.0 and "loss" not in stats
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)
    assert scheduler.last_epoch == 2  # the schedule advanced as mu = 2 updates would have
    assert rollout.studies == s[:4] and (rollout.advantages == 0).all()  # the first round, for the viewer


def test_without_the_flag_no_group_is_dropped_and_no_study_drawn(demo_root, tmp_path, monkeypatch):
    studies, model, processor = policy(demo_root, tmp_path / "init")
    s = studies
    more = stream([])
    stats, rollout, rounds, _ = step(model, processor, s[:4], more, monkeypatch, flat=[s[0], s[2]],
                                     dynamic_sampling=False)
    assert more.calls == 0 and len(rounds) == 1 and rollout.studies == s[:4]
    assert not any(k.startswith("dynamic/") for k in stats)
    assert stats["frac_reward_zero_std"] == 0.5 and (rollout.advantages[0:2] == 0).all()


def test_a_group_is_informative_when_any_two_of_its_rewards_differ():
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.25, 0.25, 0.1, 0.1 + 1e-7])
    assert dynamic_sampling.informative_groups(rewards, 2) == [1, 3]


# ----------------------------------------------------------------------------- two ranks (gloo)

def _two_ranks(rank, demo_root, out_dir):
    from test_distributed import trainable

    distributed.init("cpu")
    studies = data.load_split("demo", demo_root, "train")
    folder = os.path.join(out_dir, "init")
    with distributed.rank0_first():
        if distributed.is_main():
            pipeline.demo_policy_folder(folder, [s.report for s in studies], WORDING)
    model, processor = pipeline.load_policy(folder)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    distributed.broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # as train.py: same start
    # rank 0: both of its studies informative at once; rank 1: none, then one, then two
    batches = [studies[0:2], studies[2:4], studies[4:6], studies[6:8]] if rank == 0 else \
              [studies[8:10], studies[10:12], studies[0:2], studies[2:4]]
    flat = {studies[8].id, studies[9].id, studies[10].id} if rank == 1 else set()
    trainer.score_completions = flat_rewards(flat)
    more = iter(batches[1:])
    cfg = RunConfig(num_generations=G, max_new_tokens=8, beta=0.0, dynamic_sampling=True, dynamic_sampling_rounds=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    stats, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), batches[0],
                                       labels.RuleLabeler(), optimizer, scheduler, cfg,
                                       torch.Generator().manual_seed(rank), more_studies=lambda: next(more),
                                       **pipeline.special_ids(processor))
    save_file({**trainable(model), "rounds": torch.tensor([stats["dynamic/rounds"]]),
               "groups": torch.tensor([stats["dynamic/groups"]]), "rows": torch.tensor([len(rollout.texts)])},
              os.path.join(out_dir, f"rank{rank}.safetensors"))
    distributed.cleanup()


def test_every_rank_samples_until_each_has_b_informative_groups_and_keeps_as_many(demo_root, tmp_path):
    from test_distributed import errors, run_ranks

    codes = run_ranks(tmp_path, _two_ranks, demo_root, str(tmp_path))
    assert codes == [0, 0], errors(tmp_path)
    got = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for g in got:  # rank 1 found 0, then 1, then 3 informative groups: two extra rounds on both ranks
        assert float(g["rounds"]) == 2 and float(g["groups"]) == 2 and int(g["rows"]) == 2 * G
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0]), "the ranks' weights drifted apart"
    assert any(float(v.abs().max()) > 0 for k, v in got[0].items() if ".lora_B." in k), "the step moved nothing"


# ----------------------------------------------------------------------------- train_grpo.py

def test_a_resumed_run_draws_the_same_extra_studies_and_ends_with_the_same_adapter(demo_root, tmp_path, monkeypatch):
    """The extra rounds advance the seeded data position, which the checkpoint stores: a run
    resumed after its step-2 checkpoint logs and trains exactly as the run that went straight on."""
    import json

    import train_grpo

    studies = data.load_split("demo", demo_root, "train")
    monkeypatch.setattr(trainer, "score_completions", flat_rewards({s.id for s in studies[::2]}))

    def run(out, *extra):
        train_grpo.main(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(out), "--sft-steps", "0",
                         "--num-generations", str(G), "--batch-size", "2", "--max-new-tokens", "8", "--eval-limit", "0",
                         "--sample-every", "0", "--lora-rank", "4", "--lr", "1e-2", "--steps", "4", "--save-every",
                         "2", "--dynamic-sampling", *extra])
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = run(straight)
    run(resumed)
    (resumed / "latest").write_text("checkpoint-000002\n")  # a crash right after the step-2 checkpoint
    b = run(resumed, "--resume")
    assert [r["step"] for r in b] == [1, 2, 3, 4] and sum(r["dynamic/rounds"] for r in a) > 0
    for ra, rb in zip(a, b):
        for key in ("reward", "loss", "grad_norm", "lr", "dynamic/rounds", "dynamic/dropped_share"):
            assert ra[key] == rb[key], (ra["step"], key)
    wa = load_file(str(straight / "final" / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
