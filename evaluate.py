"""Evaluate a report generator: generate on a split, label, score CE + NLG metrics (MRG-R1, arXiv 2512.16145).

    python evaluate.py --dataset demo --policy runs/demo/sft --adapter runs/demo/final
    python evaluate.py --dataset iu_xray --policy huatuogpt-vision-7b --adapter runs/iu_xray/final \
        --dtype bfloat16 --batch-size 16 --output-dir runs/iu_xray/eval-test
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
    report.html         the same tables, a per-observation chart and every study (mrgr1/viewer.py);
                        --no-html skips it.

Image resolution: --min-pixels / --max-pixels, else the values the training run of --adapter or
--policy used (its train_config.json), else the default (at most 448x448 px per view; 84x84 for
the demo), never the range in the checkpoint's preprocessor_config.json (docs/real-data.md).

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

from mrgr1 import baselines, checkpoint, data, distributed, lora, pipeline, processing, trainer, viewer, vlm, weights
from mrgr1.labels import CONDITIONS
from mrgr1.metrics import ce_scores, format_table, nlg_scores
from mrgr1.rewards import extract_report, format_reward

PREDICTIONS_FILE = "predictions.jsonl"
CONFIG_FILE = "eval_config.json"
METRICS_FILE = "metrics.json"
# Flags whose change makes earlier predictions of an output folder invalid for a resumed run.
RUN_KEYS = ("policy", "adapter", "dataset", "data_root", "split", "all_images", "labeler",
            "chexbert_weights", "max_new_tokens", "temperature", "top_p", "seed", "dtype",
            "min_pixels", "max_pixels")
# Defaults that differ between the demo and real data (ours, as in train_grpo.py).
DEMO = dict(policy="runs/demo/sft", labeler="rules", max_new_tokens=64)
REAL = dict(policy="huatuogpt-vision-7b", labeler="chexbert", max_new_tokens=256)


class EvalError(ValueError):
    """Bad evaluation input (a predictions file, an adapter folder, flags); the message says what to do."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--predictions", default=None, help="score this predictions .jsonl instead of running a model")
    a("--relabel", action="store_true", help="with --predictions: ignore labels in the file, label again")
    a("--dataset", default=None, choices=data.DATASETS, help="default demo")
    a("--data-root", default=None, help="default data/<dataset>")
    a("--split", default="test", choices=data.SPLITS)
    a("--all-images", action="store_true", help="MIMIC-CXR: every image of a study, not the first")
    a("--limit", type=int, default=None, help="evaluate the first N studies of the split")
    a("--policy", default=None, help="a preset in weights_manifest.json or an HF model folder "
                                     "(default: runs/demo/sft for the demo, huatuogpt-vision-7b otherwise)")
    a("--adapter", default=None, help="a PEFT LoRA folder or a train_grpo.py checkpoint folder")
    a("--weights-dir", default="weights")
    a("--labeler", default=None, choices=("chexbert", "rules"),
      help="default: rules for the demo, chexbert otherwise (the paper's)")
    a("--chexbert-weights", default=None, help="chexbert.pth or .safetensors (default: weights/chexbert)")
    a("--batch-size", type=int, default=8, help="studies decoded together")
    a("--max-new-tokens", type=int, default=None, help="default 64 (demo), 256 (real)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    a("--seed", type=int, default=0, help="sampling seed (unused when greedy; a resumed sampled "
                                         "run draws other samples than an uninterrupted one)")
    a("--max-pixels", type=int, default=None, help="most pixels per view after resizing; overrides the "
      "checkpoint's preprocessor_config.json. Default: what training used (train_config.json in the "
      f"--adapter or --policy folder), else {processing.DEFAULT_MAX_PIXELS} = 448x448 "
      f"({pipeline.DEMO_PIXELS} = 84x84 for the demo)")
    a("--min-pixels", type=int, default=None, help="fewest pixels per view after resizing; default as "
      f"--max-pixels, else {processing.DEFAULT_MIN_PIXELS} = 56x56 ({pipeline.DEMO_PIXELS} for the demo)")
    a("--dtype", default="float32", choices=tuple(pipeline.DTYPES))
    a("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    a("--output-dir", default=None, help="default runs/<dataset>/eval-<split>; with --predictions, "
                                         "the predictions file's folder")
    a("--overwrite", action="store_true", help="discard earlier predictions in --output-dir")
    a("--html", action=argparse.BooleanOptionalAction, default=True, help="write report.html in --output-dir: "
      "the tables, a per-observation chart, every study with both reports and their labels (default: yes)")
    args = p.parse_args(argv)
    demo = args.dataset == "demo" or (args.dataset is None and args.predictions is None)
    args.dataset = args.dataset or ("demo" if args.predictions is None else None)
    for key, value in (DEMO if demo else REAL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.output_dir is None:
        args.output_dir = (os.path.dirname(os.path.abspath(args.predictions)) if args.predictions
                           else os.path.join("runs", args.dataset, f"eval-{args.split}"))
    return args


# ----------------------------------------------------------------------------- predictions file

def check_labels(value, where: str) -> list[int]:
    if (not isinstance(value, list) or len(value) != len(CONDITIONS)
            or not all(isinstance(c, int) and 0 <= c <= 3 for c in value)):
        raise EvalError(f"{where}: labels must be a list of {len(CONDITIONS)} CheXbert codes 0-3 "
                        f"(columns in mrgr1.labels.CONDITIONS order), got {value!r}")
    return value


def check_record(record, where: str) -> dict:
    """One predictions line: id, reference, generated and/or report; labels optional."""
    if not isinstance(record, dict):
        raise EvalError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "id" not in record or not isinstance(record.get("reference"), str):
        raise EvalError(f"{where}: needs \"id\" and a \"reference\" string")
    if not any(isinstance(record.get(k), str) for k in ("generated", "report")):
        raise EvalError(f"{where}: needs a \"generated\" (full completion) or \"report\" string")
    for key in ("report_labels", "reference_labels"):
        if key in record:
            check_labels(record[key], f"{where}, \"{key}\"")
    record["id"] = str(record["id"])
    if "report" not in record:
        record["report"] = extract_report(record["generated"])
    return record


def read_predictions(path: str, *, drop_partial_tail: bool = False) -> list[dict]:
    """Records of a predictions .jsonl; errors name the file and line.

    drop_partial_tail (resume): a last line without its newline is what an interrupted write
    leaves; it is cut from the file (that study is generated again) instead of being an error.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if drop_partial_tail and raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        print(f"{path}: dropping an incomplete last line (interrupted write); it is generated again")
        with open(path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text (byte {e.start}); a predictions file is JSON lines") from e
    records, line_of = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            record = check_record(json.loads(line), where)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: not valid JSON ({e.msg}, column {e.colno}); fix or delete the line") from e
        if record["id"] in line_of:
            raise EvalError(f"{where}: id {record['id']!r} already on line {line_of[record['id']]}; "
                            "each study may appear once")
        line_of[record["id"]] = n
        records.append(record)
    return records


def append_records(path: str, records: list[dict]) -> None:
    """One write per batch, flushed to disk: a crash loses at most the batch being written."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


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
        ("--batch-size", args.batch_size, args.batch_size < 1, "at least 1"),
        ("--limit", args.limit, args.limit is not None and args.limit < 1, "at least 1, or leave it out"),
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens < 1, "at least 1"),
        ("--temperature", args.temperature, args.temperature < 0, "0 for greedy, or above"),
        ("--top-p", args.top_p, not 0 < args.top_p <= 1, "in (0, 1]"),
        ("--min-pixels", args.min_pixels, args.min_pixels is not None and args.min_pixels < 1, "at least 1"),
        ("--max-pixels", args.max_pixels, args.max_pixels is not None and args.max_pixels < 1, "at least 1"),
    ] if bad]
    if problems:
        raise EvalError("invalid " + "; ".join(problems))


def training_config(args) -> tuple[str, dict] | None:
    """(path, flags) of the train_config.json that train_grpo.py wrote beside the --adapter or the
    --policy folder (a checkpoint, final/ or sft/), or None (a preset, another tool's folder)."""
    for folder in (args.adapter, args.policy):
        path = os.path.join(folder, checkpoint.CONFIG_FILE) if folder else ""
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return path, json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise EvalError(f"{path}: not valid JSON ({e}); fix or delete it, or give "
                                f"--min-pixels and --max-pixels") from e
    return None


def image_resolution(args) -> str:
    """Fill in args.min_pixels / max_pixels: the flags, else the values training used, else the
    default (the demo's 84x84, else at most 448x448); returns where they came from."""
    found = training_config(args)
    recorded = found[1] if found else {}
    default = ((pipeline.DEMO_PIXELS, pipeline.DEMO_PIXELS) if args.dataset == "demo"
               else (processing.DEFAULT_MIN_PIXELS, processing.DEFAULT_MAX_PIXELS))
    sources = set()
    for key, fallback in zip(("min_pixels", "max_pixels"), default):
        if getattr(args, key) is not None:
            sources.add("--" + key.replace("_", "-"))
        elif recorded.get(key) is not None:
            setattr(args, key, int(recorded[key]))
            sources.add(found[0])
        else:
            setattr(args, key, fallback)
            sources.add("the default")
    if args.min_pixels > args.max_pixels:
        raise EvalError(f"image resolution: min_pixels {args.min_pixels} > max_pixels {args.max_pixels} "
                        f"(from {', '.join(sorted(sources))}); give --min-pixels and --max-pixels")
    return ", ".join(sorted(sources))


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
    """LoRA (PEFT layout or a LoRA training checkpoint), merged into the weights; or the full
    weights of a full-fine-tuning checkpoint (model.safetensors)."""
    try:
        if os.path.isfile(os.path.join(folder, lora.CONFIG_FILE)):
            names = lora.load_adapter(model, folder)
            lora.merge_lora(model)  # plain Linear layers again: faster decoding, same function
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
    config = {k: getattr(args, k) for k in RUN_KEYS}
    if args.overwrite:
        for name in (PREDICTIONS_FILE, METRICS_FILE):
            if os.path.exists(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
    done = read_predictions(pred_path, drop_partial_tail=True) if os.path.exists(pred_path) else []
    if done and os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                before = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EvalError(f"{config_path}: not valid JSON ({e}); use another --output-dir, or "
                            f"--overwrite to start again") from e
        changed = ", ".join(f"{k}: {before.get(k)!r} then, {config[k]!r} now" for k in RUN_KEYS
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


def run_model(args, device) -> tuple[list[dict], list[data.Study]]:
    """Generate, label and append predictions for every study not done yet; returns all records
    and the studies they are for, in split order."""
    split = pipeline.load_studies(args.dataset, args.data_root, args.split, all_images=args.all_images)
    studies = split[:args.limit] if args.limit else split
    check_policy(args)
    where = image_resolution(args)
    print(f"image resolution: {args.min_pixels} to {args.max_pixels} pixels per view (from {where})")
    # missing CheXbert weights stop the run here, before the model loads
    labeler = pipeline.build_labeler(args.labeler, args.chexbert_weights, args.weights_dir, device)
    os.makedirs(args.output_dir, exist_ok=True)
    pred_path = os.path.join(args.output_dir, PREDICTIONS_FILE)
    done_ids = {r["id"] for r in resume_state(args, split, pred_path)}
    todo = [s for s in studies if s.id not in done_ids]
    if len(todo) < len(studies):
        print(f"{pred_path}: {len(studies) - len(todo)} studies done, {len(todo)} to go")
    if todo:
        model, processor = build_model(args, device)
        special = pipeline.special_ids(processor)  # eos / pad / never-sampled vision token ids
        generator = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
        bar = tqdm(total=len(studies), initial=len(studies) - len(todo), desc="evaluate", unit="study",
                   dynamic_ncols=True)
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            texts = trainer.generate_reports(model, processor, batch, batch_size=len(batch),
                                             max_new_tokens=args.max_new_tokens, **special,
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
        records, studies = run_model(args, device)
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
        page = viewer.write_eval_report(args.output_dir, records, scores, labeler=labels_from, image_paths=views)
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
    except (EvalError, OSError, *pipeline.USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
