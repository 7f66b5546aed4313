"""The shared prompt (each study's prompt through the decoder once for its G completions) equals the
unshared rows [prompt | completion]: log-probs, every gradient, and a whole GRPO step. The oracle is
`Qwen2_5_VL.token_logps` on the repeated rows, which test_model.py checks against transformers."""
import copy

import pytest
import torch

from mrgr1 import labels, lora, trainer
from mrgr1.config import preset
from mrgr1.run_config import RunConfig
from mrgr1.shared_prompt import completion_logps
from mrgr1.vlm import Qwen2_5_VL
from tests.tiny_qwen import tiny_token_ids

VOCAB = 300
IDS = tiny_token_ids(VOCAB)
IMG, VS, VE = IDS["image_token_id"], IDS["vision_start_token_id"], IDS["vision_end_token_id"]
GRIDS = torch.tensor([[1, 4, 6], [1, 4, 4], [1, 8, 4]])  # study 0: one view; study 1: two views
G = 3


def rel_close(a, b, rtol=1e-5):
    """|a - b| <= rtol * max|b|: equal up to fp32 rounding, at the scale of the tensor."""
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, f"max diff {(a - b).abs().max():.3g}, scale {scale:.3g}"


def model_and_batch(seed=0):
    """A tiny random Qwen2.5-VL; two studies whose prompts differ in length (left padding) and in
    views; G = 3 right-padded completions each (one row just EOS-long, one full)."""
    torch.manual_seed(seed)
    model = Qwen2_5_VL.from_config(preset("tiny", vocab_size=VOCAB, **IDS), seed=seed)
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, VOCAB - 10, (n,), generator=g).tolist()  # noqa: E731
    rows = [text(2) + [VS] + [IMG] * 6 + [VE] + text(3),
            text(4) + [VS] + [IMG] * 4 + [VE] + [VS] + [IMG] * 8 + [VE] + text(2)]
    P = max(map(len, rows))
    prompt_ids, prompt_mask = torch.zeros(2, P, dtype=torch.long), torch.zeros(2, P, dtype=torch.long)
    for b, r in enumerate(rows):
        prompt_ids[b, P - len(r):], prompt_mask[b, P - len(r):] = torch.tensor(r), 1
    pixel_values = torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g)
    C = 5
    completions = torch.randint(0, VOCAB - 10, (2 * G, C), generator=g)
    lengths = torch.tensor([5, 1, 3, 4, 5, 2])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()                    # [6, C]
    return model, prompt_ids, prompt_mask, pixel_values, completions, completion_mask


def unshared_rows(prompt_ids, prompt_mask, pixel_values, completions, completion_mask):
    """The rows [prompt | completion] with each study's views repeated G times (the oracle's input)."""
    views = [GRIDS[:1], GRIDS[1:]]
    patches = pixel_values.split([int(v.prod(-1).sum()) for v in views])
    return dict(input_ids=torch.cat([prompt_ids.repeat_interleave(G, 0), completions], 1),
                attention_mask=torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask], 1),
                pixel_values=torch.cat([p for p in patches for _ in range(G)]),
                image_grid_thw=torch.cat([v for v in views for _ in range(G)]))


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_log_probs_and_every_gradient_equal_the_unshared_rows(checkpointing):
    """Images (the tower trains, so its gradient is summed over the G rows too), left-padded prompts
    of different lengths, right-padded completions, with and without gradient checkpointing."""
    model, ids, mask, pv, comp, cmask = model_and_batch()
    model.train()
    model.gradient_checkpointing = checkpointing
    weights = torch.randn(comp.shape) * cmask                       # a loss that weighs every token
    expected = model.token_logps(**unshared_rows(ids, mask, pv, comp, cmask), logits_to_keep=comp.shape[1])
    (expected * weights).sum().backward()
    expected_grads = grads(model)
    index = torch.arange(2 * G) // G
    got = completion_logps(model, ids, mask, comp, cmask, index, pv, GRIDS)
    (got * weights).sum().backward()
    got_grads = grads(model)
    rel_close(got[cmask.bool()], expected[cmask.bool()])
    assert set(got_grads) == set(expected_grads) and any(n.startswith("model.visual.") for n in got_grads)
    for name, g in expected_grads.items():
        rel_close(got_grads[name], g)


def test_rows_of_a_micro_batch_may_start_and_end_inside_a_group():
    """Rows 2..4 of 6: the last row of study 0 and the first two of study 1, from precomputed
    (frozen-tower) image features."""
    model, ids, mask, pv, comp, cmask = model_and_batch(seed=1)
    with torch.no_grad():
        rows = unshared_rows(ids, mask, pv, comp, cmask)
        features = model.image_features(pv, GRIDS)
        sub = {k: v[2:5] for k, v in rows.items() if k in ("input_ids", "attention_mask")}
        expected = model.token_logps(**sub, pixel_values=torch.cat([pv[:24], pv[24:], pv[24:]]),
                                     image_grid_thw=torch.cat([GRIDS[:1], GRIDS[1:], GRIDS[1:]]),
                                     logits_to_keep=comp.shape[1])
        got = completion_logps(model, ids, mask, comp[2:5], cmask[2:5], torch.tensor([0, 1, 1]),
                               image_grid_thw=GRIDS, image_features=features)
    rel_close(got[cmask[2:5].bool()], expected[cmask[2:5].bool()])


# ---------------------------------------------------------------- a whole GRPO step

@pytest.fixture
def fixed_rewards(monkeypatch):
    """Rewards that differ inside every group (so every advantage is non-zero), independent of the
    sampled text: both runs of a comparison then train on the same numbers."""
    def score(texts, studies, labeler, cfg, reward_cache=None):
        r = torch.linspace(0.1, 0.9, len(texts)).roll(1)
        return r, {"mccs": r, "format": torch.zeros_like(r)}, {}
    monkeypatch.setattr(trainer, "score_completions", score)
    monkeypatch.setattr(trainer, "decode_completions", lambda processor, completions, *a: [""] * len(completions))


class ListEncoder:
    """The prompts of test_shared_prompt's two studies, whatever studies are asked for."""
    def __init__(self, batch):
        self.batch = batch

    def __call__(self, studies, device=None):
        return dict(self.batch)


@pytest.mark.parametrize("loss_type,grad_accum,mu", [("grpo", 1, 1), ("bnpo", 4, 2), ("dr_grpo", 4, 1),
                                                      ("dapo", 2, 2)])
def test_a_grpo_step_gives_the_same_loss_gradients_and_lora_weights(fixed_rewards, loss_type, grad_accum, mu):
    """Two copies of one LoRA policy take one step on the same rollout (same seed), one sharing the
    prompt and one not: loss, KL, every gradient and every adapter weight after the step agree to
    fp32 rounding. grad_accum 4 over 6 rows cuts micro-batches inside groups."""
    model, ids, mask, pv, _, _ = model_and_batch(seed=2)
    lora.apply_lora(model, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # adapters that act from the start, so the reference (adapters off) differs
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    encoder = ListEncoder({"input_ids": ids, "attention_mask": mask, "pixel_values": pv,
                           "image_grid_thw": GRIDS, "images_per_prompt": torch.tensor([1, 2])})
    results = {}
    for shared in (False, True):
        net = copy.deepcopy(model)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        cfg = RunConfig(num_generations=G, max_new_tokens=6, beta=0.04, loss_type=loss_type,
                        grad_accum=grad_accum, num_iterations=mu, shared_prompt=shared)
        stats, rollout = trainer.grpo_step(net, None, encoder, [None, None], labels.RuleLabeler(), optimizer,
                                           scheduler, cfg, torch.Generator().manual_seed(0),
                                           eos_token_ids=(7,), pad_token_id=0)
        results[shared] = stats, rollout, {n: (p.detach().clone(), p.grad.clone())
                                            for n, p in net.named_parameters() if p.requires_grad}
    (s0, r0, w0), (s1, r1, w1) = results[False], results[True]
    assert torch.equal(r0.completions, r1.completions)             # one rollout, scored twice
    rel_close(r1.ref_logps[r1.completion_mask.bool()], r0.ref_logps[r0.completion_mask.bool()])
    rel_close(r1.old_logps[r1.completion_mask.bool()], r0.old_logps[r0.completion_mask.bool()])
    assert s1["loss"] == pytest.approx(s0["loss"], rel=1e-5, abs=1e-7)
    assert s1["kl"] == pytest.approx(s0["kl"], rel=1e-5, abs=1e-9)
    for name, (weight, grad) in w0.items():
        rel_close(w1[name][1], grad)                                # the last update's gradient
        rel_close(w1[name][0], weight)                              # the adapters after the step


def test_text_only_prompts_equal_the_unshared_rows_too():
    model, _, _, _, comp, cmask = model_and_batch(seed=4)
    ids = torch.randint(0, VOCAB - 10, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0                                                    # study 1's prompt is 6 tokens
    rows = dict(input_ids=torch.cat([ids.repeat_interleave(G, 0), comp], 1),
                attention_mask=torch.cat([mask.repeat_interleave(G, 0), cmask], 1))
    with torch.no_grad():
        expected = model.token_logps(**rows, logits_to_keep=comp.shape[1])
        got = completion_logps(model, ids, mask, comp, cmask, torch.arange(2 * G) // G)
    rel_close(got[cmask.bool()], expected[cmask.bool()])
