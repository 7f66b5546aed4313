"""How often a policy states each finding as positive, on studies that have it and studies that do not.

The diagnostic behind the README's "The demo, measured": sample G completions per study, label the
extracted reports, and print P(stated positive | reference positive) and P(stated positive |
reference not positive) per CheXpert observation. A policy that reads a finding from the pixels has
the first much larger than the second.

    python benchmarks/finding_mentions.py --policy runs/demo/sft
    python benchmarks/finding_mentions.py --policy runs/demo/sft --adapter runs/demo/final
"""
import argparse

import torch

from mrgr1 import labels, lora, pipeline, trainer
from mrgr1.generate import generate
from mrgr1.rewards import extract_report


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
    args = p.parse_args(argv)

    model, processor = pipeline.load_policy(args.policy)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
    studies = pipeline.load_studies(args.dataset, args.data_root, args.split)[:args.limit]
    labeler, special = labels.RuleLabeler(), pipeline.special_ids(processor)
    generator = torch.Generator().manual_seed(args.seed)
    generated, reference = [], []
    for s in range(0, len(studies), 10):
        batch = studies[s:s + 10]
        prompts = trainer.encode_prompts(processor, batch)
        out, mask = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                             prompts["image_grid_thw"], max_new_tokens=args.max_new_tokens,
                             num_samples=args.samples, temperature=args.temperature, generator=generator, **special)
        texts = processor.batch_decode(out * mask + special["pad_token_id"] * (1 - mask))
        generated.append(labeler.label([extract_report(t) for t in texts]))                    # [b*G, 14]
        reference.append(labeler.label([x.report for x in batch]).repeat_interleave(args.samples, 0))
    gen, ref = torch.cat(generated), torch.cat(reference)
    print(f"{'observation':28s} {'studies':>7s}  P(stated + | +)  P(stated + | not +)")
    for j, name in enumerate(labels.CONDITIONS):
        pos = ref[:, j] == labels.POSITIVE
        if pos.any():
            said = gen[:, j] == labels.POSITIVE
            print(f"{name:28s} {int(pos.sum()) // args.samples:7d}  {float(said[pos].float().mean()):15.2f}  "
                  f"{float(said[~pos].float().mean()):19.2f}")


if __name__ == "__main__":
    main()
