"""train_grpo.py end to end on a tiny demo set: what changes, what must not, and resuming."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train_grpo
from mrgr1 import checkpoint, data, synthetic, weights
from mrgr1.prompts import PromptEncoder, study_messages
from mrgr1.run_config import RunConfig

WORDING = (RunConfig.system_prompt, RunConfig.instruction, RunConfig.sft_think)  # the defaults


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo") / "demo")
    return synthetic.generate(root, n_train=8, n_val=2, n_test=4, image_size=56, seed=0)


@pytest.fixture
def varied_rewards(monkeypatch):
    """For the tests that need a step to move the weights: an untrained tiny model earns reward 0 on every completion, so every advantage, and with it
    every gradient, would be 0. Add a term that differs between completions (from their length) to
    the real reward, so that a step actually moves the adapters."""
    from mrgr1 import trainer

    real = trainer.compute_rewards

    def rewards(completions, *args, **kwargs):
        total, parts = real(completions, *args, **kwargs)
        return total + torch.tensor([len(c) % 5 / 5 for c in completions]), parts
    monkeypatch.setattr(trainer, "compute_rewards", rewards)


def run(demo_root, out, *extra):
    """A small, fast GRPO run: 2 studies x 2 completions x 8 tokens per step, no SFT."""
    argv = ["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(out),
            "--sft-steps", "0", "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "8",
            "--eval-limit", "0", "--sample-every", "0", "--lora-rank", "4", "--lr", "1e-2",
            "--beta", "0.04", *extra]
    return train_grpo.main(argv)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def demo_policy(demo_root, tmp_path, split: str, n: int):
    """The first n studies of a split and the untrained demo policy drawn for them -> (studies, model, processor)."""
    from mrgr1 import pipeline

    studies = data.load_split("demo", demo_root, split)[:n]
    folder = pipeline.demo_policy_folder(str(tmp_path / "init"), [s.report for s in studies], WORDING)
    return (studies, *pipeline.load_policy(folder))


def sgd(model, lr: float):
    """Plain SGD on the trainable parameters with a constant schedule: an update proportional to the gradient."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_two_grpo_steps_change_only_the_adapter_weights(demo_root, tmp_path, varied_rewards):
    from mrgr1 import labels, lora, pipeline, trainer

    studies = data.load_split("demo", demo_root, "train")
    folder = pipeline.demo_policy_folder(str(tmp_path / "init"), [s.report for s in studies], WORDING)
    model, processor = pipeline.load_policy(folder)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.05)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = RunConfig(num_generations=2, max_new_tokens=8, beta=0.04, grad_accum=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        _, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies[2 * step:2 * step + 2], labels.RuleLabeler(),
                                       optimizer, scheduler, cfg, generator, **pipeline.special_ids(processor))
        assert rollout.advantages.abs().sum() > 0
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "two steps with non-zero advantages must move the adapters"
    assert all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert any(".lora_B." in k for k in changed)


def test_the_demo_defaults_exercise_the_kl_term_and_the_clipped_ratio(demo_root, tmp_path, varied_rewards):
    """The demo trains with beta > 0 and two updates per batch, so the logged KL is positive and
    the ratio moves away from 1 in the second update (on-policy it would be exactly 1)."""
    argv = ["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path), "--sft-steps", "0",
            "--num-generations", "2", "--batch-size", "2", "--max-new-tokens", "8", "--eval-limit", "0",
            "--sample-every", "0", "--lora-rank", "4", "--lr", "1e-2", "--steps", "1"]
    args = train_grpo.parse_args(argv)
    assert args.beta > 0 and args.num_iterations > 1
    train_grpo.main(argv)
    row = metrics(tmp_path)[0]
    assert row["kl"] > 0, "the second update moved the policy away from the reference"
    assert row["ratio_mean"] != 1.0 and "clip_ratio/region_mean" in row


def test_checkpoints_hold_only_the_adapter_in_peft_layout(demo_root, tmp_path):
    run(demo_root, tmp_path, "--steps", "1")
    ckpt = checkpoint.find_latest(str(tmp_path))
    assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors",
                                        "train_config.json", "trainer_state.pt"]
    adapter = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.language_model.layers.") and
               k.endswith((".lora_A.weight", ".lora_B.weight")) for k in adapter)
    config = json.load(open(os.path.join(ckpt, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["r"] == 4


def test_adapter_off_is_the_base_model_exactly(demo_root, tmp_path, varied_rewards):
    from mrgr1 import lora, pipeline

    run(demo_root, tmp_path, "--steps", "1")
    base, processor = pipeline.load_policy(str(tmp_path / "init"))
    tuned, _ = pipeline.load_policy(str(tmp_path / "init"))
    lora.load_adapter(tuned, str(tmp_path / "final"))
    studies = data.load_split("demo", demo_root, "test")[:2]
    batch = PromptEncoder(processor, *WORDING[:2])(studies)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    with torch.no_grad():
        with lora.adapters_disabled(tuned):
            assert torch.equal(tuned(*args), base(*args))
        assert not torch.allclose(tuned(*args), base(*args)), "the trained adapter changes the output"


def test_metrics_use_trl_names(demo_root, tmp_path):
    run(demo_root, tmp_path, "--steps", "1")
    row = metrics(tmp_path)[0]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/mccs/mean", "rewards/format/mean",
                "kl", "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
                "loss", "grad_norm", "lr"):
        assert key in row, key


def test_resume_continues_exactly(demo_root, tmp_path, varied_rewards):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(demo_root, straight, "--steps", "4", "--save-every", "2")
    run(demo_root, resumed, "--steps", "4", "--save-every", "2")
    # simulate a crash right after the step-2 checkpoint: drop what came after it
    (resumed / "latest").write_text("checkpoint-000002\n")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()[:2]
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run(demo_root, resumed, "--steps", "4", "--save-every", "2", "--resume")

    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("reward", "loss", "kl", "grad_norm", "lr", "completions/mean_length"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), (ra["step"], key)
    wa = load_file(str(straight / "final" / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "final" / "adapter_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_crash_while_saving_keeps_the_previous_checkpoint(demo_root, tmp_path, monkeypatch):
    run(demo_root, tmp_path, "--steps", "1")
    good = checkpoint.find_latest(str(tmp_path))

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError):
        run(demo_root, tmp_path, "--steps", "2", "--resume")
    monkeypatch.undo()
    assert checkpoint.find_latest(str(tmp_path)) == good
    from mrgr1 import lora, pipeline

    model, _ = pipeline.load_policy(str(tmp_path / "init"))
    lora.apply_lora(model, rank=4, alpha=32, dropout=0.05)
    assert checkpoint.load_checkpoint(good, model)["step"] == 1


def test_a_truncated_checkpoint_is_a_clear_error(demo_root, tmp_path):
    run(demo_root, tmp_path, "--steps", "1")
    state = os.path.join(checkpoint.find_latest(str(tmp_path)), checkpoint.STATE_FILE)
    with open(state, "r+b") as f:
        f.truncate(100)
    with pytest.raises(checkpoint.CheckpointError, match="trainer_state.pt"):
        run(demo_root, tmp_path, "--steps", "2", "--resume")


def test_resume_without_a_checkpoint_says_so(demo_root, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        run(demo_root, tmp_path, "--steps", "1", "--resume")


def test_missing_real_data_stops_before_any_work(tmp_path):
    with pytest.raises(data.DataError, match="data folder not found"):
        train_grpo.main(["--dataset", "iu_xray", "--data-root", str(tmp_path / "nope"),
                         "--output-dir", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_missing_chexbert_weights_name_the_download_command(demo_root, tmp_path):
    with pytest.raises(weights.WeightsError, match="python -m mrgr1.weights download chexbert"):
        run(demo_root, tmp_path, "--steps", "1", "--labeler", "chexbert",
            "--weights-dir", str(tmp_path / "weights"))


def test_rollout_reuses_each_prompts_image_features_for_its_g_rows(demo_root, tmp_path):
    """With LoRA the vision tower is frozen: the rollout encodes each study's two views once, and
    scoring the B*G rows from those features equals scoring them from their own pixels."""
    from mrgr1 import lora, pipeline, trainer

    studies = data.load_split("demo", demo_root, "train")[:2]
    folder = pipeline.demo_policy_folder(str(tmp_path / "init"), [s.report for s in studies], WORDING)
    model, processor = pipeline.load_policy(folder)
    prompts = PromptEncoder(processor, *WORDING[:2])(studies)
    completions = torch.randint(0, 50, (6, 4))
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]] * 2)             # [B*G, C]
    from_pixels = trainer.encode_views(model, prompts)                                  # tower trains
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.05)
    from_features = trainer.encode_views(model, prompts)                                # tower frozen
    assert from_features["pixel_values"] is None and from_features["image_features"] is not None
    assert from_pixels.get("image_features") is None and from_pixels["pixel_values"] is not None

    def rollout(prompts):
        return trainer.Rollout(prompts, completions, cmask, 3, texts=[""] * 6, truncated=torch.zeros(6, dtype=torch.bool),
                               rewards=torch.zeros(6), reward_terms={}, advantages=torch.zeros(6))
    a, b = rollout(from_features), rollout(from_pixels)
    with torch.no_grad():
        for start, stop in ((0, 6), (1, 4)):  # whole batch, and a micro-batch cutting across studies
            assert torch.allclose(model.token_logps(**a.inputs(slice(start, stop)), logits_to_keep=4),
                                  model.token_logps(**b.inputs(slice(start, stop)), logits_to_keep=4), atol=1e-5)


def test_pi_old_is_a_no_grad_pass_of_the_weights_that_sampled(demo_root, tmp_path, varied_rewards):
    """With mu = 2 the step takes pi_old from its first update's forward (no optimizer step has
    happened yet) instead of a pass of its own: it equals log-probs computed without grad, in
    eval mode, by a copy of the weights that sampled the rollout, for every micro-batch."""
    import copy

    from mrgr1 import labels, lora, pipeline, trainer

    studies = data.load_split("demo", demo_root, "train")[:3]
    model, processor = pipeline.load_policy(pipeline.demo_policy_folder(str(tmp_path / "init"),
                                                                         [s.report for s in studies], WORDING))
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.3)  # dropout must be off in pi_old too
    with torch.no_grad():  # adapters that already act (lora_B starts at 0), so that dropout would show
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    cfg = RunConfig(num_generations=2, max_new_tokens=8, beta=0.04, num_iterations=2, grad_accum=4)
    sampler = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    stats, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies, labels.RuleLabeler(), optimizer, scheduler,
                                       cfg, torch.Generator().manual_seed(0), **pipeline.special_ids(processor))
    sampler.eval()
    expected = trainer.rollout_logps(sampler, rollout, trainer.micro_batches(6, 1), cfg.temperature,
                                      shared=False)
    assert rollout.old_logps.shape == rollout.completion_mask.shape
    assert torch.allclose(rollout.old_logps, expected, atol=1e-6)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), sampler.parameters())
                   if a.requires_grad and a.shape[0] > 4)  # the step moved the adapters (lora_B)


def test_a_cached_prompt_is_the_prompt_encoded_afresh(demo_root):
    """The prompt cache keeps each study's tokens and patches after first use; a batch built
    from it is the processor's own batch, and a full cache encodes the rest without keeping them."""
    from mrgr1.processing import train_demo_tokenizer

    studies = data.load_split("demo", demo_root, "train")
    processor = train_demo_tokenizer([s.report for s in studies], vocab_size=300)
    processor.image_kwargs.update(min_pixels=28 * 28, max_pixels=56 * 56)
    cache = PromptEncoder(processor, *WORDING[:2], cache_bytes=2**30)
    for batch in (studies[:3], studies[1:5], studies[:5]):  # studies seen before and new ones, mixed
        cached = cache(batch)
        fresh = processor([study_messages(s, *WORDING[:2]) for s in batch], [data.load_images(s) for s in batch])
        for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
            assert torch.equal(cached[key], fresh[key]), key
    assert len(cache.samples) == 5
    one_study = cache.bytes // 5
    small = PromptEncoder(processor, *WORDING[:2], cache_bytes=2 * one_study)
    full = small(studies[:4])
    assert len(small.samples) == 2 and small.bytes <= 2 * one_study
    assert torch.equal(full["pixel_values"], PromptEncoder(processor, *WORDING[:2])(studies[:4])["pixel_values"])


def test_grad_accum_k_makes_k_micro_batches_of_nearly_equal_size():
    from mrgr1 import trainer

    parts = trainer.micro_batches(12, 5)
    assert [p.stop - p.start for p in parts] == [2, 2, 3, 2, 3]
    assert parts[0].start == 0 and parts[-1].stop == 12
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))
    assert len(trainer.micro_batches(3, 8)) == 3  # never an empty micro-batch


def test_the_rollout_records_the_labels_and_ccs_its_rewards_came_from(demo_root, tmp_path):
    """What a viewer shows of a step is what the step trained on: the rollout keeps each
    completion's labels, its reference's labels and its CCS, and MCCS follows from that CCS."""
    from mrgr1 import labels, lora, pipeline, rewards, trainer

    studies, model, processor = demo_policy(demo_root, tmp_path, "train", 2)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.05)
    cfg = RunConfig(num_generations=2, max_new_tokens=6, beta=0.0)
    optimizer, scheduler = sgd(model, 0.0)
    labeler = labels.RuleLabeler()
    _, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies, labeler, optimizer, scheduler, cfg,
                                   torch.Generator().manual_seed(0), **pipeline.special_ids(processor))
    assert torch.equal(rollout.ref_labels, labeler.label([s.report for s in studies for _ in range(2)]))
    assert torch.equal(rollout.labels, labeler.label([rewards.extract_report(t) for t in rollout.texts]))
    shaped = ((rollout.ccs - cfg.mccs_margin) / (1 - cfg.mccs_margin)).clamp_min(0)
    assert torch.allclose(rollout.reward_terms["mccs"], shaped)


def test_sampled_rewards_are_the_rewards_a_rollout_gives_the_same_draws(demo_root, tmp_path):
    """The held-out "sampled reward" the demo prints is GRPO's objective: the same samples, scored
    the same way, as a rollout from the same generator state."""
    from mrgr1 import evaluation, labels, pipeline, trainer

    studies, model, processor = demo_policy(demo_root, tmp_path, "test", 2)
    cfg = RunConfig(num_generations=3, max_new_tokens=6, beta=0.0)
    special = pipeline.special_ids(processor)
    optimizer, scheduler = sgd(model, 0.0)
    _, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies, labels.RuleLabeler(), optimizer, scheduler,
                                   cfg, torch.Generator().manual_seed(5), **special)
    sampled = evaluation.sampled_rewards(model, processor, PromptEncoder(processor, *WORDING[:2]), studies,
                                         labels.RuleLabeler(), RunConfig(**{**vars(cfg), "eval_sample_batch_size": 2}),
                                         torch.Generator().manual_seed(5), 3, **special)
    assert sorted(sampled) == ["format", "mccs", "reward"]
    assert torch.equal(sampled["reward"], rollout.rewards)          # [B*G] = [6]
    for name, values in rollout.reward_terms.items():
        assert torch.equal(sampled[name], values)


def test_before_and_after_grpo_report_ce_f1_and_the_sampled_reward(demo_root, tmp_path, capsys):
    results = run(demo_root, tmp_path / "a", "--steps", "1", "--eval-limit", "2", "--eval-samples", "2")
    printed = capsys.readouterr().out
    for when in ("before", "after"):
        assert {"ce_micro/f1", "sampled/reward", "sampled/mccs", "sampled/format"} <= set(results[when])
        assert f"{when} GRPO: reward of 2 sampled completions per study" in printed
    b, a = results["before"], results["after"]  # the run's last lines sum it up
    assert printed.strip().splitlines()[-2] == (
        f"GRPO moved test CE-F1 (micro) {b['ce_micro/f1']:.4f} -> {a['ce_micro/f1']:.4f}, "
        f"the sampled reward {b['sampled/reward']:.4f} -> {a['sampled/reward']:.4f}")
    assert printed.strip().splitlines()[-1].startswith(
        "the trivial level, without a model: an empty report scores CE-F1 micro ")
    skipped = run(demo_root, tmp_path / "b", "--steps", "1", "--eval-limit", "2", "--eval-samples", "0")
    assert "ce_micro/f1" in skipped["before"] and "sampled/reward" not in skipped["before"]


def test_the_run_ends_with_a_png_of_reward_kl_and_length(demo_root, tmp_path):
    pytest.importorskip("matplotlib")
    run(demo_root, tmp_path, "--steps", "2")
    with open(tmp_path / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_command_line_reports_missing_data_without_a_traceback(tmp_path):
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_grpo.py")
    done = subprocess.run([sys.executable, script, "--dataset", "iu_xray", "--data-root", str(tmp_path / "nope"),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: data folder not found" in done.stderr and "Traceback" not in done.stderr



def test_one_step_raises_the_completions_with_positive_advantage_and_lowers_the_others(demo_root, tmp_path,
                                                                                      varied_rewards):
    """What the step is for: after one GRPO update (beta = 0, on-policy, a small SGD step), the
    mean token log-probability of the completions with A > 0 rises and of those with A < 0 falls."""
    from mrgr1 import labels, lora, pipeline, trainer

    studies, model, processor = demo_policy(demo_root, tmp_path, "train", 2)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    cfg = RunConfig(num_generations=4, max_new_tokens=8, beta=0.0)
    optimizer, scheduler = sgd(model, 0.05)
    _, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies,
                                   labels.RuleLabeler(), optimizer, scheduler, cfg, torch.Generator().manual_seed(0),
                                   **pipeline.special_ids(processor))
    model.eval()
    after = trainer.rollout_logps(model, rollout, [slice(0, 8)], cfg.temperature, shared=False)  # [B*G, C]
    mask = rollout.completion_mask.float()
    change = ((after - rollout.old_logps) * mask).sum(1) / mask.sum(1)                   # [B*G]
    A = rollout.advantages
    groups = A.view(-1, cfg.num_generations)                                            # [B, G]
    spread = (groups.amax(1) > groups.amin(1))[:, None]                                 # [B, 1]
    strong_up = ((groups == groups.amax(1, keepdim=True)) & spread).view(-1)  # the best and worst of
    strong_down = ((groups == groups.amin(1, keepdim=True)) & spread).view(-1)  # their groups
    assert strong_up.any() and strong_down.any()
    assert (change[strong_up] > 0).all() and (change[strong_down] < 0).all(), (change, A)
    # completions share tokens (the format, common phrases), so a weakly negative one can be lifted
    # with its better siblings; on average the step moves each side its own way
    assert change[A > 0].mean() > 0 > change[A < 0].mean(), (change, A)
    assert float((A * change).sum()) > 0


def test_each_step_logs_the_seconds_of_its_phases_within_the_step_time(demo_root, tmp_path):
    from mrgr1.timing import PHASES

    run(demo_root, tmp_path, "--steps", "2")
    for row in metrics(tmp_path):
        seconds = [row[f"timing/{phase}"] for phase in PHASES]
        assert all(s >= 0 for s in seconds) and row["timing/rollout"] > 0 and row["timing/update"] > 0
        assert sum(seconds) <= row["step_time"]
        generated = row["completions/mean_length"] * 2 * 2  # B x G completions
        assert row["timing/rollout_tokens_per_s"] == pytest.approx(generated / row["timing/rollout"])
        assert row["timing/update_tokens_per_s"] > 0


def test_update_throughput_counts_prompt_and_completion_tokens_of_every_update(demo_root, tmp_path):
    from mrgr1 import labels, lora, pipeline, trainer

    studies, model, processor = demo_policy(demo_root, tmp_path, "train", 2)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    cfg = RunConfig(num_generations=2, max_new_tokens=8, beta=0.04, num_iterations=2)
    stats, rollout = trainer.grpo_step(model, processor, PromptEncoder(processor, *WORDING[:2]), studies,
                                       labels.RuleLabeler(), *sgd(model, 0.01), cfg, torch.Generator().manual_seed(0),
                                       **pipeline.special_ids(processor))
    fed = float(rollout.inputs(slice(0, 4))["attention_mask"].sum()) * 2  # [prompt | completion], mu = 2
    assert stats["timing/update_tokens_per_s"] * stats["timing/update"] == pytest.approx(fed)
    generated = float(rollout.completion_mask.sum())
    assert stats["timing/rollout_tokens_per_s"] * stats["timing/rollout"] == pytest.approx(generated)
    assert stats["timing/reference"] > 0  # beta != 0: the reference pass ran
