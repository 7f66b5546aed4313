"""Evaluate a report generator: generate on a split, label, score CE + NLG metrics (MRG-R1, arXiv 2512.16145).

    python evaluate.py --dataset demo --policy runs/demo/sft --adapter runs/demo/final
    python -m mrgr1.evaluate ...          # the same command line
    python evaluate.py --dataset iu_xray --policy huatuogpt-vision-7b --adapter runs/iu_xray/final \
        --dtype bfloat16 --eval-batch-size 16 --output-dir runs/iu_xray/eval-test
    python evaluate.py --predictions other_system.jsonl --labeler chexbert      # no model needed

Pipeline, top to bottom:
    studies of one split --greedy decoding (batched, KV cache)--> completions
    --extract_report (text inside <report>)--> reports --labeler (CheXbert; rules for the demo)-->
    codes [N, 14] --> ce_scores (every CE convention, named) + nlg_scores (BLEU, ROUGE-L, CIDEr-D)
    + the mean format reward of the completions.

Outputs in --output-dir:
    predictions.jsonl   one study per line: {"id", "reference", "generated", "report",
                        "report_labels", "reference_labels"}; labels are 14 CheXbert codes in
                        mrgr1.labels.CONDITIONS order (0 blank, 1 positive, 2 negative, 3 uncertain).
                        Written batch by batch: a rerun with the same flags continues where an
                        interrupted one stopped.
    eval_config.json    the flags that decide the predictions (a resume must match them), the
                        image resolution (min_pixels, max_pixels) included.
    metrics.json        the scores (the dict main() returns).
    report.html         the same tables, a per-observation chart and every study (mrgr1/eval_report.py);
                        --no-html skips it.

Settings: the run configuration's fields that decide how a policy runs and is scored (image
resolution, new-token budget, prompt wording, labeler, batch size, dtype) come from the flags, else
from the run that wrote --adapter or --policy (its train_config.json), else from the dataset's
preset (mrgr1/run_config.py); never from the checkpoint's preprocessor_config.json. So evaluating a
run reproduces the CE-F1 its training printed after GRPO.

--predictions FILE scores a file in the format above without a model. Only "id", "reference" and
"generated" or "report" are required, so other systems' outputs are scored the same way; labels
missing from a line are computed with --labeler (labels given in the file are used as they are,
unless --relabel).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from mrgr1 import baselines, checkpoint, data, distributed, eval_report, lora, pipeline, run_config, vlm, weights
from mrgr1.evaluation import generate_reports
from mrgr1.files import read_json
from mrgr1.metrics import ce_scores, format_table, nlg_scores
from mrgr1.predictions import PredictionsError, append_records, read_predictions
from mrgr1.prompts import PromptEncoder
from mrgr1.rewards import extract_report, format_reward

PREDICTIONS_FILE = "predictions.jsonl"
CONFIG_FILE = "eval_config.json"
METRICS_FILE = "metrics.json"
# The run configuration's fields that decide how a policy is run and scored: flags here, and by
# default the values the run recorded (train_config.json beside --adapter or --policy), else the
# dataset's preset (mrgr1/run_config.py).
RUN_FIELDS = ("dataset", "data_root", "all_images", "weights_dir", "labeler", "chexbert_weights", "max_new_tokens",
              "min_pixels", "max_pixels", "system_prompt", "instruction", "eval_batch_size", "dtype", "device", "decode")
# Flags whose change makes earlier predictions of an output folder invalid for a resumed run.
RESUME_KEYS = ("policy", "adapter", "dataset", "data_root", "split", "all_images", "labeler", "chexbert_weights",
               "max_new_tokens", "temperature", "top_p", "seed", "dtype", "min_pixels", "max_pixels",
               "system_prompt", "instruction")


class EvalError(ValueError):
    """Bad evaluation input (an adapter folder, flags); the message says what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("evaluation")
    g.add_argument("--predictions", default=None, help="score this predictions .jsonl instead of running a model")
    g.add_argument("--relabel", action="store_true", help="with --predictions: ignore labels in the file, label again")
    g.add_argument("--split", default="test", choices=data.SPLITS)
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N studies of the split")
    g.add_argument("--policy", default=None, help="a preset in weights_manifest.json or an HF model folder "
                   "(default: runs/demo/sft for the demo, the real preset's policy otherwise)")
    g.add_argument("--adapter", default=None, help="a PEFT LoRA folder or a train_grpo.py checkpoint folder")
    g.add_argument("--temperature", type=float, default=0.0, help="decoding temperature (0 = greedy, the default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (unused when greedy)")
    a("--output-dir", default=None, help="default runs/<dataset>/eval-<split>; with --predictions, "
                                         "the predictions file's folder")
    a("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    a("--html", action=argparse.BooleanOptionalAction, default=True, help="write report.html in --output-dir: "
      "the tables, a per-observation chart, every study with both reports and their labels (default: yes)")
    run_config.add_flags(p, RUN_FIELDS, help_overrides={
        "max_new_tokens": "completion budget (default: the run's, else the preset's)"})
    args = p.parse_args(argv)
    args.settings = settings = run_settings(args)
    for name in RUN_FIELDS:
        setattr(args, name, getattr(settings, name))
    if args.output_dir is None:
        args.output_dir = (os.path.dirname(os.path.abspath(args.predictions)) if args.predictions
                           else os.path.join("runs", args.dataset, f"eval-{args.split}"))
    return args


def default_policy(dataset: str) -> str:
    """What --policy defaults to: the demo run's SFT model, else the real preset's policy."""
    policy = run_config.preset("demo" if dataset == "demo" else "real").policy
    return os.path.join("runs", "demo", "sft") if policy == "demo" else policy


def run_settings(args) -> run_config.RunConfig:
    """The run configuration to evaluate with: the flags given, else what the run of --adapter or
    --policy recorded, else the dataset's preset. Sets args.policy and args.recorded_from."""
    flags = run_config.given(args, RUN_FIELDS)
    recorded, args.recorded_from = {}, None
    # a predictions file involves no model: only a --policy / --adapter given says which run to follow
    policy = args.policy or (None if args.predictions else default_policy(flags.get("dataset", "demo")))
    for folder in (args.adapter, policy):
        found = run_config.load_recorded(folder) if folder and os.path.isdir(folder) else None
        if found is not None:
            recorded, args.recorded_from = found, os.path.join(folder, run_config.CONFIG_FILE)
            break
    # the data set: the flag, else the run's, else the demo (a predictions file needs none: real defaults)
    dataset = flags.pop("dataset", recorded.get("dataset") or (None if args.predictions else "demo"))
    args.policy = args.policy or default_policy(dataset or "real")
    where = ("dataset", "data_root", "device", "decode")  # where and how this evaluation runs: not the run's
    keep = {k: v for k, v in recorded.items() if k in RUN_FIELDS and k not in where}
    settings = run_config.preset("demo" if dataset == "demo" else "real", **{**keep, **flags})
    settings.dataset = dataset
    return settings


# ----------------------------------------------------------------------------- scoring

def label_missing(records: list[dict], make_labeler, relabel: bool = False) -> int:
    """Fill in report_labels / reference_labels where absent (all of them when relabel).

    Returns how many texts were labelled (0: every label came from the file)."""
    labelled = 0
    for key, text in (("report_labels", "report"), ("reference_labels", "reference")):
        todo = [r for r in records if relabel or key not in r]
        if todo:
            codes = make_labeler().label([r[text] for r in todo])  # [n, 14]
            for r, row in zip(todo, codes.long().tolist()):
                r[key] = row
        labelled += len(todo)
    return labelled


def score_records(records: list[dict]) -> dict:
    """CE (every convention) and NLG metrics of labelled records, plus the format reward."""
    if not records:
        raise EvalError("no predictions to score")
    reports, references = [r["report"] for r in records], [r["reference"] for r in records]
    scores = ce_scores(torch.tensor([r["report_labels"] for r in records]),     # [N, 14]
                       torch.tensor([r["reference_labels"] for r in records]))  # [N, 14]
    scores.update(nlg_scores(reports, references))
    completions = [r["generated"] for r in records if isinstance(r.get("generated"), str)]
    if completions:  # other systems' files may hold reports only: no format to judge
        scores["format_reward/mean"] = float(format_reward(completions).mean())
    scores.update(baselines.report_counts(reports, completions if len(completions) == len(records) else None))
    return scores


def baseline_scores(args, records: list[dict], make_labeler, own_references: bool = True) -> dict:
    """The trivial baselines (mrgr1/baselines.py) on these studies with --labeler: the empty report
    always, the training-report ones when --dataset's training split can be read; {} when the
    references were labelled by something else (labels in a predictions file)."""
    if not own_references:
        print("baselines not computed: the reference labels came from the predictions file "
              "(--relabel labels them with --labeler)")
        return {}
    train = None
    try:
        train = baselines.training_reports(args.dataset, args.data_root) if args.dataset else None
    except data.DataError as e:
        print(f"training-report baselines not computed: {str(e).splitlines()[0]}")
    if not args.dataset:
        print("training-report baselines not computed: give --dataset (and --data-root) to add them")
    ref = torch.tensor([r["reference_labels"] for r in records])  # [N, 14]
    return baselines.trivial_baselines(ref, make_labeler(), train, seed=args.seed)


def lazy_labeler(args, device):
    """A function that builds the labeler on first call (a fully labelled file needs none)."""
    built = []

    def make():
        if not built:
            built.append(pipeline.build_labeler(args.labeler, args.chexbert_weights, args.weights_dir, device))
        return built[0]
    return make


# ----------------------------------------------------------------------------- the model

def check_flags(args) -> None:
    """Flag values that cannot work, refused before any work, all at once."""
    problems = [f"{flag} {value} ({need})" for flag, value, bad, need in [
        ("--limit", args.limit, args.limit is not None and args.limit < 1, "at least 1, or leave it out"),
        ("--temperature", args.temperature, args.temperature < 0, "0 for greedy, or above"),
        ("--top-p", args.top_p, not 0 < args.top_p <= 1, "in (0, 1]"),
    ] if bad]
    try:
        run_config.check(args.settings)
    except run_config.UsageError as e:
        problems.append(str(e).removeprefix("invalid "))
    if problems:
        raise EvalError("invalid " + "; ".join(problems))


def check_policy(args) -> None:
    """Fail before any work when the policy or adapter cannot be found."""
    if args.policy == "demo":
        raise EvalError("--policy demo is an untrained random model; evaluate a trained folder "
                        "(python train_grpo.py --dataset demo writes runs/demo/sft) or a preset")
    weights.resolve_policy(args.policy, args.weights_dir)  # raises with the download command
    if args.adapter and not os.path.isdir(args.adapter):
        raise EvalError(f"--adapter {args.adapter}: no such folder (a PEFT LoRA folder or a "
                        f"train_grpo.py checkpoint-* folder)")


def load_adapter(model, folder: str, device) -> str:
    """LoRA (PEFT layout or a LoRA training checkpoint), kept unmerged: the model computes exactly
    what training's evaluation computed; or the full weights of a full-fine-tuning checkpoint."""
    try:
        if os.path.isfile(os.path.join(folder, lora.CONFIG_FILE)):
            names = lora.load_adapter(model, folder)
            return f"LoRA adapter on {len(names)} layers"
        if os.path.isfile(os.path.join(folder, checkpoint.MODEL_FILE)):
            dtype = next(model.parameters()).dtype
            state = vlm.load_state(folder, device=device, dtype=dtype)
            vlm.check_keys(model, state, folder)
            model.load_state_dict(state, strict=False)  # check_keys found every key (tied lm_head aside)
            return "full fine-tuned weights"
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"cannot load --adapter {folder}: {e}") from e
    raise EvalError(f"--adapter {folder} holds neither {lora.CONFIG_FILE} (LoRA) nor "
                    f"{checkpoint.MODEL_FILE} (full fine-tuning checkpoint)")


def build_model(args, device):
    try:
        model, processor = pipeline.load_policy(args.policy, weights_dir=args.weights_dir, dtype=args.dtype,
                                                device=device, min_pixels=args.min_pixels,
                                                max_pixels=args.max_pixels)
    except (ValueError, KeyError) as e:  # a folder that is not a Qwen2.5-VL model (config, keys, files)
        raise EvalError(f"cannot load --policy {args.policy}: {type(e).__name__}: {e}") from e
    if args.adapter:
        print(f"{args.adapter}: {load_adapter(model, args.adapter, device)}")
    return model.eval(), processor


def prediction_records(texts: list[str], studies: list[data.Study], labeler) -> list[dict]:
    reports = [extract_report(t) for t in texts]
    report_codes = labeler.label(reports).long().tolist()                    # [B, 14]
    reference_codes = labeler.label([s.report for s in studies]).long().tolist()  # [B, 14]
    return [{"id": s.id, "reference": s.report, "generated": t, "report": r,
             "report_labels": rl, "reference_labels": fl}
            for s, t, r, rl, fl in zip(studies, texts, reports, report_codes, reference_codes)]


def resume_state(args, studies: list[data.Study], pred_path: str) -> list[dict]:
    """Predictions already written by an earlier run with the same flags (empty when none).

    studies: the whole split (a rerun may change --limit)."""
    config_path = os.path.join(args.output_dir, CONFIG_FILE)
    config = {k: getattr(args, k) for k in RESUME_KEYS}
    if args.overwrite:
        for name in (PREDICTIONS_FILE, METRICS_FILE):
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
    done = read_predictions(pred_path, drop_partial_tail=True) if os.path.exists(pred_path) else []
    if done and os.path.isfile(config_path):
        before = read_json(config_path, "use another --output-dir, or --overwrite to start again",
                           error=EvalError)
        changed = ", ".join(f"{k}: {before.get(k)!r} then, {config[k]!r} now" for k in RESUME_KEYS
                            if before.get(k) != config[k])
        if changed:
            raise EvalError(f"{pred_path} was written with other settings ({changed}); "
                            "use another --output-dir, or --overwrite to discard it")
    known = {s.id for s in studies}
    stray = [r["id"] for r in done if r["id"] not in known]
    if stray:
        raise EvalError(f"{pred_path} holds study {stray[0]!r}, which is not in the {args.split} split "
                        f"of {args.dataset}; use another --output-dir, or --overwrite to discard it")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return done


def run_model(args, device, make_labeler) -> tuple[list[dict], list[data.Study]]:
    """Generate, label and append predictions for every study not done yet; returns all records
    and the studies they are for, in split order."""
    split = pipeline.load_studies(args.dataset, args.data_root, args.split, all_images=args.all_images)
    studies = split[:args.limit] if args.limit else split
    check_policy(args)
    print(f"settings (pixels, new tokens, prompt, labeler) from {args.recorded_from or 'the ' + args.dataset + ' preset'}"
          f", flags given override them; image resolution {args.min_pixels} to {args.max_pixels} pixels per view")
    # missing CheXbert weights stop the run here, before the model loads
    labeler = make_labeler()
    os.makedirs(args.output_dir, exist_ok=True)
    pred_path = os.path.join(args.output_dir, PREDICTIONS_FILE)
    done_ids = {r["id"] for r in resume_state(args, split, pred_path)}
    todo = [s for s in studies if s.id not in done_ids]
    if len(todo) < len(studies):
        print(f"{pred_path}: {len(studies) - len(todo)} studies done, {len(todo)} to go")
    if todo:
        model, processor = build_model(args, device)
        encoder = PromptEncoder(processor, args.system_prompt, args.instruction)
        special = pipeline.special_ids(processor)  # eos / pad / never-sampled vision token ids
        generator = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
        bar = tqdm(total=len(studies), initial=len(studies) - len(todo), desc="evaluate", unit="study",
                   dynamic_ncols=True)
        for start in range(0, len(todo), args.eval_batch_size):
            batch = todo[start:start + args.eval_batch_size]
            texts = generate_reports(model, processor, encoder, batch, args.settings, **special,
                                     temperature=args.temperature, top_p=args.top_p, generator=generator)
            append_records(pred_path, prediction_records(texts, batch, labeler))
            bar.update(len(batch))
        bar.close()
    by_id = {r["id"]: r for r in read_predictions(pred_path)}
    return [by_id[s.id] for s in studies], studies  # split order


# ----------------------------------------------------------------------------- main

def evaluate(args) -> dict:
    device = distributed.pick_device(args.device)
    make_labeler = lazy_labeler(args, device)
    if args.predictions:
        if not os.path.isfile(args.predictions):
            raise EvalError(f"--predictions {args.predictions}: no such file")
        records = read_predictions(args.predictions)
        own_references = args.relabel or not any("reference_labels" in r for r in records)  # baselines
        labelled = label_missing(records, make_labeler, relabel=args.relabel)
        labels_from = args.labeler if labelled else "the predictions file"
        source, studies = args.predictions, []
    else:
        records, studies = run_model(args, device, make_labeler)
        labels_from, source = args.labeler, os.path.join(args.output_dir, PREDICTIONS_FILE)
        own_references = True
    scores = score_records(records)
    scores.update(baseline_scores(args, records, make_labeler, own_references))
    scores["labeler"] = labels_from
    os.makedirs(args.output_dir, exist_ok=True)
    out = os.path.join(args.output_dir, METRICS_FILE)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(scores, f, indent=2)
    print(f"\n{source}: {len(records)} studies, labels from {labels_from}\n")
    print(format_table(scores, labeler=labels_from))
    if "format_reward/mean" in scores:
        print(f"{'format reward (mean)':<32}{scores['format_reward/mean']:8.4f}")
    print(f"{'empty reports':<32}{scores['num_empty_reports']:8d}")
    for line in (baselines.trivial_sentence(scores), baselines.report_warning(scores, len(records))):
        if line:
            print(line)
    print(f"wrote {out}")
    if args.html:  # a predictions file has no images; a model run shows each study's views
        views = {s.id: s.image_paths for s in studies}
        page = eval_report.write_eval_report(args.output_dir, records, scores, labeler=labels_from, image_paths=views)
        print(f"wrote {page}")
    return scores


def main(argv=None) -> dict:
    """Run the evaluation. An error caused by a flag, a file or the data the user gave exits with
    code 2 and one `error: ...` line (OSError included: a path that cannot be read or written);
    anything else is a bug and keeps its traceback."""
    args = parse_args(argv)
    try:
        check_flags(args)
        return evaluate(args)
    except (EvalError, PredictionsError, OSError, *pipeline.USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
