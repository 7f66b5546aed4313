"""What a policy knows about each finding, and how much of it greedy decoding already uses.

The diagnostic behind the README's "The demo, measured". It prints
- the greedy reports' CE-F1 (micro) and mean MCCS, and the mean MCCS of sampled completions;
- the CE-F1 of a majority vote: a finding counts as stated when more than half of the sampled
  completions state it. Sharpening the policy (what GRPO does first) moves greedy decoding towards
  this vote, so a vote no better than greedy means sharpening alone cannot raise CE-F1;
- with --vote-shares, the same vote at other shares t (a finding is stated when more than a share
  t of the samples state it): a lower t trades precision for recall, as a policy that mentions a
  finding it is less sure of would;
- per CheXpert observation, P(stated positive | reference positive) and P(stated positive |
  reference not positive) over the samples. A policy that reads a finding from the pixels has the
  first much larger than the second;
- with --first-token OBSERVATION, for the studies whose reference states it, the next-token
  distribution where the report begins: a model that sees the finding but spreads its probability
  over many ways of wording it can still lose every greedy choice to one stock sentence.

    python benchmarks/finding_mentions.py --policy runs/demo/sft
    python benchmarks/finding_mentions.py --policy runs/demo/sft --adapter runs/demo/final
    python benchmarks/finding_mentions.py --policy runs/demo/sft --split test --limit 100 --samples 16
    python benchmarks/finding_mentions.py --policy runs/demo/sft --split test --limit 100 --samples 16 \
        --vote-shares 0.2,0.25,0.3,0.35,0.4,0.45
    python benchmarks/finding_mentions.py --policy runs/demo/sft --split test --limit 100 \
        --first-token Cardiomegaly
"""
import argparse

import torch

from mrgr1 import labels, lora, pipeline, trainer
from mrgr1.evaluation import generate_reports
from mrgr1.prompts import PromptEncoder
from mrgr1.run_config import RunConfig
from mrgr1.generate import generate
from mrgr1.metrics import ce_scores
from mrgr1.rewards import extract_report, mccs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="an HF-format folder, e.g. runs/demo/sft")
    p.add_argument("--adapter", default=None, help="a PEFT-format LoRA folder, e.g. runs/demo/final")
    p.add_argument("--dataset", default="demo")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--samples", type=int, default=8, help="completions per study")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=72)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vote-shares", default="", help="also score votes at these shares, e.g. 0.25,0.3,0.4")
    p.add_argument("--first-token", default="", metavar="OBSERVATION",
                   help="also show, for the studies whose reference states this observation (e.g. "
                        "Cardiomegaly), the policy's next-token distribution where the report begins")
    args = p.parse_args(argv)

    if args.first_token and args.first_token not in labels.CONDITIONS:
        p.error(f"--first-token {args.first_token!r} is not one of {', '.join(labels.CONDITIONS)}")
    model, processor = pipeline.load_policy(args.policy)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
    studies = pipeline.load_studies(args.dataset, args.data_root, args.split)[:args.limit]
    labeler, special = labels.RuleLabeler(), pipeline.special_ids(processor)
    cfg = RunConfig(max_new_tokens=args.max_new_tokens)  # the default prompt wording
    encoder = PromptEncoder(processor, cfg.system_prompt, cfg.instruction)
    if args.first_token:
        show_first_tokens(model, processor, encoder, studies, labeler, args.first_token, cfg.sft_think)
    generator = torch.Generator().manual_seed(args.seed)
    generated, reference = [], []
    for s in range(0, len(studies), 10):
        batch = studies[s:s + 10]
        prompts = encoder(batch)
        out, mask = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                             prompts["image_grid_thw"], max_new_tokens=args.max_new_tokens,
                             num_samples=args.samples, temperature=args.temperature, generator=generator, **special)
        texts = trainer.decode_completions(processor, out, mask, special["pad_token_id"])
        generated.append(labeler.label([extract_report(t) for t in texts]))                    # [b*G, 14]
        reference.append(labeler.label([x.report for x in batch]).repeat_interleave(args.samples, 0))
    gen, ref = torch.cat(generated), torch.cat(reference)                 # [N*G, 14]
    greedy = labeler.label([extract_report(t) for t in generate_reports(
        model, processor, encoder, studies, cfg, **special)])                         # [N, 14]
    study_ref = ref[::args.samples]                                               # [N, 14]
    print(f"greedy: CE-F1 (micro) {ce_scores(greedy, study_ref)['ce_micro/f1']:.4f}, "
          f"MCCS {float(mccs(greedy, study_ref, cfg.mccs_margin, cfg.mccs_mapping).mean()):.4f} | sampled (T={args.temperature}): "
          f"MCCS {float(mccs(gen, ref, cfg.mccs_margin, cfg.mccs_mapping).mean()):.4f} | majority vote of the {args.samples} samples: "
          f"CE-F1 (micro) {ce_scores(majority_vote(gen, args.samples), study_ref)['ce_micro/f1']:.4f}")
    if args.vote_shares:
        print("vote 'stated by more than a share t of the samples', CE-F1 (micro) / precision / recall:")
        print(f"  greedy {' ' * 8}{_prf(greedy, study_ref)}")
        for t in (float(x) for x in args.vote_shares.split(",")):
            print(f"  t = {t:.2f}    {_prf(majority_vote(gen, args.samples, more_than=t), study_ref)}")
    print(f"{'observation':28s} {'studies':>7s}  P(stated + | +)  P(stated + | not +)")
    for j, name in enumerate(labels.CONDITIONS):
        pos = ref[:, j] == labels.POSITIVE
        if pos.any():
            said = gen[:, j] == labels.POSITIVE
            print(f"{name:28s} {int(pos.sum()) // args.samples:7d}  {float(said[pos].float().mean()):15.2f}  "
                  f"{float(said[~pos].float().mean()):19.2f}")


def show_first_tokens(model, processor, encoder, studies, labeler, observation: str, think: str,
                      top: int = 8) -> None:
    """Where the report begins (after `<think>think</think><report>`, as in the SFT targets), the next-token
    distribution for the studies whose reference states `observation` positive: the tokens with the
    largest mean probability, and how many of those studies pick each one greedily."""
    j = labels.CONDITIONS.index(observation)
    stated = labeler.label([s.report for s in studies])[:, j] == labels.POSITIVE     # [N]
    chosen = [s for s, yes in zip(studies, stated.tolist()) if yes]
    if not chosen:
        print(f"no study in the split states {observation}")
        return
    prompts = encoder(chosen)
    start = torch.tensor(processor.encode(f"<think>{think}</think><report>")).expand(len(chosen), -1)  # [N, S]
    ids = torch.cat([prompts["input_ids"], start], 1)
    mask = torch.cat([prompts["attention_mask"], torch.ones_like(start)], 1)
    with torch.no_grad():
        logits = model(ids, mask, prompts["pixel_values"], prompts["image_grid_thw"], logits_to_keep=1)
    print(f"first report token, {len(chosen)} studies whose reference states {observation}: "
          f"token, mean probability, studies where it is greedy's choice")
    for token, prob, picked in token_table(logits[:, -1].float().softmax(-1), top):
        print(f"  {processor.tokenizer.decode([token])!r:20s} {prob:.3f} {picked:4d}")


def token_table(probs: torch.Tensor, top: int) -> list[tuple[int, float, int]]:
    """probs [N, V] -> (token, mean probability, rows whose argmax it is) for the `top` tokens of
    largest mean probability, largest first."""
    mean, picks = probs.mean(0), torch.bincount(probs.argmax(-1), minlength=probs.shape[1])
    best = mean.topk(min(top, probs.shape[1]))
    return [(t, p, int(picks[t])) for p, t in zip(best.values.tolist(), best.indices.tolist())]


def _prf(pred: torch.Tensor, ref: torch.Tensor) -> str:
    sc = ce_scores(pred, ref)
    return f"{sc['ce_micro/f1']:.4f} / {sc['ce_micro/precision']:.4f} / {sc['ce_micro/recall']:.4f}"


def majority_vote(sampled: torch.Tensor, samples: int, more_than: float = 0.5) -> torch.Tensor:
    """Codes [N*G, 14] of G samples per study -> [N, 14]: positive where more than a share
    `more_than` (default half) of a study's samples say positive, blank elsewhere; No Finding by
    CheXpert's rule (no other observation but Support Devices positive)."""
    share = (sampled == labels.POSITIVE).float().view(-1, samples, sampled.shape[1]).mean(1)
    vote = (share > more_than).long() * labels.POSITIVE                           # [N, 14]
    others = vote[:, :labels.NO_FINDING].tolist()                                # [N][13]
    vote[:, labels.NO_FINDING] = torch.tensor([labels.no_finding(row) for row in others])
    return vote


if __name__ == "__main__":
    main()
