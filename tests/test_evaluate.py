"""evaluate.py: predictions + metrics files, scoring a predictions file, resume, adapters, clean errors.

A tiny drawn demo set (5 test studies, 56 px) and an untrained `tiny` Qwen2.5-VL keep it fast; the
CE / NLG numbers are checked against mrgr1.metrics called directly on the same labels and texts
(the metrics themselves are tested against hand-worked values in test_metrics.py).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mrgr1 import evaluate, evaluation, lora, pipeline, run_config, synthetic, trainer
from mrgr1.prompts import PromptEncoder
from mrgr1.run_config import RunConfig
from mrgr1.labels import RuleLabeler
from mrgr1.metrics import ce_scores, nlg_scores
from mrgr1.vlm import Qwen2_5_VL

N_TEST = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(data root, policy folder) shared by the tests of this file."""
    root = tmp_path_factory.mktemp("eval")
    data_root = synthetic.generate(str(root / "demo"), n_train=6, n_val=0, n_test=N_TEST, image_size=56)
    reports = [s.report for s in pipeline.load_studies("demo", data_root, "train")]
    wording = (RunConfig.system_prompt, RunConfig.instruction, RunConfig.sft_think)
    return data_root, pipeline.demo_policy_folder(str(root / "policy"), reports, wording)


def _model_args(demo, out, *extra):
    data_root, policy = demo
    return ["--dataset", "demo", "--data-root", data_root, "--policy", policy, "--labeler", "rules",
            "--eval-batch-size", "2", "--max-new-tokens", "8", "--device", "cpu", "--output-dir", str(out), *extra]


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))


def _exit_message(capsys, argv):
    with pytest.raises(SystemExit) as info:
        evaluate.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def full_run(demo, tmp_path_factory):
    """One complete evaluation: (output folder, metrics it returned)."""
    out = tmp_path_factory.mktemp("full")
    return out, evaluate.main(_model_args(demo, out))


# ----------------------------------------------------------------------------- end to end

def test_run_writes_predictions_and_metrics(full_run):
    out, scores = full_run
    records = _lines(out / "predictions.jsonl")
    assert [r["id"] for r in records] == [f"demo_test_{i:05d}" for i in range(N_TEST)]
    labeler = RuleLabeler()
    for r in records:
        assert set(r) == {"id", "reference", "generated", "report", "report_labels", "reference_labels"}
        assert r["report_labels"] == labeler.label([r["report"]])[0].tolist()
        assert r["reference_labels"] == labeler.label([r["reference"]])[0].tolist()
    with open(out / "metrics.json", encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(scores))
    expected = ce_scores(torch.tensor([r["report_labels"] for r in records]),
                         torch.tensor([r["reference_labels"] for r in records]))
    expected.update(nlg_scores([r["report"] for r in records], [r["reference"] for r in records]))
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value) if key != "per_observation" else scores[key] == value
    assert 0.0 <= scores["format_reward/mean"] <= 1.0


def test_scoring_the_predictions_file_reproduces_the_metrics(full_run, tmp_path):
    out, scores = full_run
    again = evaluate.main(["--predictions", str(out / "predictions.jsonl"), "--dataset", "demo",
                           "--output-dir", str(tmp_path)])
    # the baselines need references labelled by --labeler; this file's labels are used as they are
    same = [k for k in scores if k != "labeler" and not k.startswith("baseline/")]
    assert {k: again[k] for k in same} == {k: scores[k] for k in same}
    # without labels in the file, the labeler recomputes the same ones
    stripped = [{k: r[k] for k in ("id", "reference", "generated")} for r in _lines(out / "predictions.jsonl")]
    _write_jsonl(tmp_path / "bare.jsonl", stripped)
    relabelled = evaluate.main(["--predictions", str(tmp_path / "bare.jsonl"), "--labeler", "rules"])
    assert relabelled["ce_micro/f1"] == scores["ce_micro/f1"]
    assert relabelled["per_observation"] == scores["per_observation"]
    assert relabelled["bleu_4"] == scores["bleu_4"]
    # --relabel replaces wrong labels in the file with the labeler's
    zeroed = [{**r, "report_labels": [0] * 14, "reference_labels": [0] * 14} for r in _lines(out / "predictions.jsonl")]
    _write_jsonl(tmp_path / "zeroed.jsonl", zeroed)
    args = ["--predictions", str(tmp_path / "zeroed.jsonl"), "--labeler", "rules"]
    assert evaluate.main(args)["ce_micro/f1"] == 0.0  # all blank: nothing positive to find
    assert evaluate.main(args + ["--relabel"])["per_observation"] == scores["per_observation"]


def test_resume_generates_only_the_missing_studies(demo, full_run, tmp_path, monkeypatch):
    out, scores = full_run
    full = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    k = 2
    for name in ("eval_config.json",):
        shutil.copy(out / name, tmp_path / name)
    # k whole lines, then half of the next one: what a crash during a write leaves
    (tmp_path / "predictions.jsonl").write_text("".join(full[:k]) + full[k][: len(full[k]) // 2], encoding="utf-8")
    seen = []
    real = evaluate.generate_reports

    def counting(model, processor, encoder, studies, *args, **kw):
        seen.extend(s.id for s in studies)
        return real(model, processor, encoder, studies, *args, **kw)
    monkeypatch.setattr(evaluate, "generate_reports", counting)
    resumed = evaluate.main(_model_args(demo, tmp_path))
    assert seen == [f"demo_test_{i:05d}" for i in range(k, N_TEST)]
    # greedy decoding is deterministic: the resumed file is the uninterrupted one, each id once
    assert (tmp_path / "predictions.jsonl").read_text(encoding="utf-8") == "".join(full)
    assert resumed["ce_micro/f1"] == scores["ce_micro/f1"]
    # a complete file: nothing left to generate, the model is not even loaded
    monkeypatch.setattr(pipeline, "load_policy", lambda *a, **kw: pytest.fail("model loaded"))
    evaluate.main(_model_args(demo, tmp_path))
    assert len(seen) == N_TEST - k
    # a smaller --limit scores the first studies of what is there
    assert evaluate.main(_model_args(demo, tmp_path, "--limit", "3"))["num_reports"] == 3


def test_resume_refuses_predictions_made_with_other_settings(demo, full_run, tmp_path, capsys):
    out, _ = full_run
    for name in ("eval_config.json", "predictions.jsonl"):
        shutil.copy(out / name, tmp_path / name)
    err = _exit_message(capsys, _model_args(demo, tmp_path, "--max-new-tokens", "9"))
    assert "max_new_tokens" in err and "--overwrite" in err


# ----------------------------------------------------------------------------- scoring a file

# Hand-written labels (CheXbert codes, 14 columns) for 3 studies; 1 positive, 2 negative, 3 uncertain.
REF = [[0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
       [0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1],
       [0, 0, 1, 0, 3, 0, 0, 1, 0, 0, 0, 0, 1, 0]]
GEN = [[0, 1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0],
       [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
       [0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0]]
TEXTS = [("Cardiomegaly. Possible effusion.", "The heart is enlarged. Small right pleural effusion."),
         ("No acute disease.", "No pneumothorax. Normal chest."),
         ("Opacity and edema. Tube in place.", "Right lower lobe opacity with atelectasis, edema may be present.")]


def test_scoring_uses_the_labels_given_in_the_file(tmp_path):
    records = [{"id": i, "reference": ref, "report": rep, "report_labels": g, "reference_labels": r}
               for i, ((rep, ref), g, r) in enumerate(zip(TEXTS, GEN, REF))]
    _write_jsonl(tmp_path / "other.jsonl", records)
    # CheXbert weights are absent from this weights dir: the labeler must not be needed
    scores = evaluate.main(["--predictions", str(tmp_path / "other.jsonl"), "--labeler", "chexbert",
                            "--weights-dir", str(tmp_path / "no_weights")])
    expected = ce_scores(torch.tensor(GEN), torch.tensor(REF))
    for key, value in expected.items():
        assert scores[key] == (value if key == "per_observation" else pytest.approx(value))
    # positive-only micro over the 3 x 14 codes: tp = 3 (Cardiomegaly, Lung Opacity, Support Devices)
    # + No Finding of study 1 = 4; fp = Edema (1 vs 3) = 1; fn = Pleural Effusion, Atelectasis = 2
    # -> F1 = 2*4 / (2*4 + 1 + 2) = 8/11
    assert scores["ce_micro/f1"] == pytest.approx(8 / 11)
    expected_nlg = nlg_scores([rep for rep, _ in TEXTS], [ref for _, ref in TEXTS])
    assert scores["bleu_4"] == pytest.approx(expected_nlg["bleu_4"])
    assert "format_reward/mean" not in scores  # reports only: no completions to judge
    assert scores["labeler"] == "the predictions file"


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    good = {"id": "a", "reference": "No effusion.", "generated": "<think>x</think><report>Effusion.</report>"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"id": "b", "reference": "x", "gener\n', encoding="utf-8")
    err = _exit_message(capsys, ["--predictions", str(path), "--labeler", "rules"])
    assert f"{path}, line 2" in err and "JSON" in err
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"id": "b", "generated": "x"}) + "\n", encoding="utf-8")
    err = _exit_message(capsys, ["--predictions", str(path), "--labeler", "rules"])
    assert f"{path}, line 3" in err and "reference" in err
    path.write_text(json.dumps({**good, "report_labels": [1] * 13}) + "\n", encoding="utf-8")
    err = _exit_message(capsys, ["--predictions", str(path), "--labeler", "rules"])
    assert f"{path}, line 1" in err and "14" in err
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n", encoding="utf-8")
    err = _exit_message(capsys, ["--predictions", str(path), "--labeler", "rules"])
    assert f"{path}, line 2" in err and "line 1" in err


# ----------------------------------------------------------------------------- clean errors

def test_missing_data_folder_stops_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_policy", lambda *a, **kw: pytest.fail("model loaded"))
    err = _exit_message(capsys, ["--dataset", "iu_xray", "--data-root", str(tmp_path / "iu_xray"),
                                 "--output-dir", str(tmp_path / "out")])
    assert "data folder not found" in err and str(tmp_path / "iu_xray") in err and "R2Gen" in err


def test_missing_chexbert_weights_give_the_download_command(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_policy", lambda *a, **kw: pytest.fail("model loaded"))
    argv = _model_args(demo, tmp_path / "out", "--labeler", "chexbert", "--weights-dir", str(tmp_path / "w"))
    err = _exit_message(capsys, argv)
    assert f"python -m mrgr1.weights download chexbert bert-base-uncased-vocab --dir {tmp_path / 'w'}" in err
    # the same for a predictions file without labels
    _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "reference": "No effusion.", "report": "Effusion."}])
    err = _exit_message(capsys, ["--predictions", str(tmp_path / "p.jsonl"), "--weights-dir", str(tmp_path / "w")])
    assert "python -m mrgr1.weights download chexbert" in err


def test_a_predictions_file_does_not_follow_the_demo_run_in_the_working_folder(tmp_path, capsys, monkeypatch):
    """runs/demo/sft (the default demo policy) recorded labeler rules; scoring a predictions file
    involves no model, so it keeps the real default (CheXbert) wherever it is run."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/demo/sft")
    run_config.save(run_config.preset("demo"), "runs/demo/sft")
    _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "reference": "No effusion.", "report": "Effusion."}])
    err = _exit_message(capsys, ["--predictions", str(tmp_path / "p.jsonl"), "--weights-dir", str(tmp_path / "w")])
    assert "python -m mrgr1.weights download chexbert" in err


def test_missing_policy_preset_gives_the_download_command(tmp_path, capsys, demo):
    argv = _model_args(demo, tmp_path / "out", "--policy", "qwen2.5-vl-3b", "--weights-dir", str(tmp_path / "w"))
    err = _exit_message(capsys, argv)
    assert "python -m mrgr1.weights download qwen2.5-vl-3b" in err


# ----------------------------------------------------------------------------- adapters

def _inputs():
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def test_lora_adapter_folder_is_applied(demo, tmp_path):
    _, policy = demo
    trained = Qwen2_5_VL.from_pretrained(policy)
    lora.apply_lora(trained, rank=2, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        for layer in lora.lora_layers(trained).values():
            layer.lora_B.weight.normal_(0, 0.05)  # a non-zero update
    lora.save_adapter(trained, str(tmp_path / "adapter"))
    fresh = Qwen2_5_VL.from_pretrained(policy)
    assert "LoRA" in evaluate.load_adapter(fresh, str(tmp_path / "adapter"), "cpu")
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask), trained(ids, mask), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(fresh(ids, mask), Qwen2_5_VL.from_pretrained(policy)(ids, mask))


def test_full_fine_tuning_checkpoint_is_applied(demo, tmp_path):
    _, policy = demo
    tuned = Qwen2_5_VL.from_pretrained(policy)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path / "checkpoint-000010"
    folder.mkdir()  # as mrgr1.checkpoint writes it: every tensor of state_dict, tied ones cloned
    save_file({k: v.clone().contiguous() for k, v in tuned.state_dict().items()}, str(folder / "model.safetensors"))
    fresh = Qwen2_5_VL.from_pretrained(policy)
    evaluate.load_adapter(fresh, str(folder), "cpu")
    ids, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, mask), tuned(ids, mask))


def test_adapter_folder_without_weights_is_a_clean_error(demo, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _exit_message(capsys, _model_args(demo, tmp_path / "out", "--adapter", str(tmp_path / "empty")))
    assert str(tmp_path / "empty") in err and "adapter_config.json" in err


# ----------------------------------------------------------------------------- image resolution

def _recording_load_policy(monkeypatch):
    """pipeline.load_policy that keeps each processor it returns (their image_kwargs)."""
    processors, real = [], pipeline.load_policy

    def recording(*a, **kw):
        model, processor = real(*a, **kw)
        processors.append(processor)
        return model, processor
    monkeypatch.setattr(pipeline, "load_policy", recording)
    return processors


def _pixels(processor):
    return processor.image_kwargs["min_pixels"], processor.image_kwargs["max_pixels"]


def test_resolution_flags_reach_the_processor_and_eval_config(demo, tmp_path, monkeypatch):
    processors = _recording_load_policy(monkeypatch)
    evaluate.main(_model_args(demo, tmp_path, "--limit", "1", "--min-pixels", "784", "--max-pixels", "3136"))
    assert _pixels(processors[0]) == (784, 3136)
    with open(tmp_path / "eval_config.json") as f:
        assert {k: v for k, v in json.load(f).items() if k.endswith("_pixels")} == {"min_pixels": 784, "max_pixels": 3136}


def test_a_training_runs_adapter_is_evaluated_at_the_resolution_training_used(demo, tmp_path, monkeypatch):
    _, policy = demo
    model = Qwen2_5_VL.from_pretrained(policy)
    lora.apply_lora(model, rank=2, alpha=4.0, dropout=0.0)
    lora.save_adapter(model, str(tmp_path / "checkpoint-000004"))
    with open(tmp_path / "checkpoint-000004" / "train_config.json", "w") as f:  # as train_grpo.py writes it
        json.dump({"dataset": "demo", "min_pixels": 28 * 28, "max_pixels": 56 * 56}, f)
    processors = _recording_load_policy(monkeypatch)
    adapter = ["--limit", "1", "--adapter", str(tmp_path / "checkpoint-000004")]
    evaluate.main(_model_args(demo, tmp_path / "out", *adapter))
    assert _pixels(processors[0]) == (784, 3136)  # not the policy folder's preprocessor file (7056)
    evaluate.main(_model_args(demo, tmp_path / "out2", *adapter, "--max-pixels", "7056"))
    assert _pixels(processors[1]) == (784, 7056)  # a flag wins over the training run's value


# ----------------------------------------------------------------------------- one line per user mistake

def test_flag_values_that_cannot_work_are_one_line_naming_each(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_studies", lambda *a, **kw: pytest.fail("data loaded"))
    err = _exit_message(capsys, ["--eval-batch-size", "0", "--top-p", "1.5", "--max-pixels", "-1",
                                 "--output-dir", str(tmp_path)])
    assert err.count("\n") == 1 and err.startswith("error: invalid ")
    assert "--eval-batch-size 0" in err and "--top-p 1.5" in err and "--max-pixels -1" in err


def test_a_chexbert_file_that_would_run_code_is_one_error_line(tmp_path, capsys, minilm_dir):
    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'code_ran'}",))
    torch.save({"model_state_dict": {"module.bert.x": RunsCode()}}, tmp_path / "evil.pth")
    vocab_dir = tmp_path / "w" / "bert-base-uncased-vocab"
    vocab_dir.mkdir(parents=True)
    shutil.copy(os.path.join(minilm_dir, "vocab.txt"), vocab_dir / "vocab.txt")
    _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "reference": "No effusion.", "report": "Effusion."}])
    err = _exit_message(capsys, ["--predictions", str(tmp_path / "p.jsonl"), "--labeler", "chexbert",
                                 "--chexbert-weights", str(tmp_path / "evil.pth"), "--weights-dir", str(tmp_path / "w")])
    assert err.startswith(f"error: {tmp_path / 'evil.pth'}: not a plain state dict") and err.count("\n") == 1
    assert not (tmp_path / "code_ran").exists()


def test_a_predictions_file_that_is_not_text_is_one_error_line(tmp_path, capsys):
    (tmp_path / "p.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    err = _exit_message(capsys, ["--predictions", str(tmp_path / "p.jsonl")])
    assert f"{tmp_path / 'p.jsonl'}: not UTF-8 text" in err


def test_the_command_line_exits_with_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "evaluate.py", "--predictions", str(tmp_path / "none.jsonl")],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 2
    assert result.stderr == f"error: --predictions {tmp_path / 'none.jsonl'}: no such file\n"


def test_top_p_samples_from_the_nucleus_as_generate_does(demo, tmp_path):
    """--temperature 1 --top-p 0.5 writes the reports that generate() samples with the same
    seed and nucleus (evaluate.py decodes each batch with one generator, seeded by --seed)."""
    from mrgr1.generate import generate

    data_root, policy = demo
    evaluate.main(_model_args(demo, tmp_path, "--temperature", "1", "--top-p", "0.5", "--eval-batch-size", "5",
                              "--seed", "3", "--max-pixels", str(56 * 56), "--min-pixels", str(56 * 56)))
    model, processor = pipeline.load_policy(policy, min_pixels=56 * 56, max_pixels=56 * 56)
    studies = pipeline.load_studies("demo", data_root, "test")
    special = pipeline.special_ids(processor)
    encoder = PromptEncoder(processor, RunConfig.system_prompt, RunConfig.instruction)
    prompts = encoder(studies)
    out, mask = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                         prompts["image_grid_thw"], max_new_tokens=8, temperature=1.0, top_p=0.5,
                         generator=torch.Generator().manual_seed(3), **special)
    expected = trainer.decode_completions(processor, out, mask, special["pad_token_id"])
    assert [r["generated"] for r in _lines(tmp_path / "predictions.jsonl")] == expected
    cfg = RunConfig(max_new_tokens=8)
    greedy = evaluation.generate_reports(model, processor, encoder, studies, cfg, **special)
    nucleus_only = evaluation.generate_reports(model, processor, encoder, studies, cfg, temperature=1.0,
                                               top_p=1e-6, generator=torch.Generator().manual_seed(0), **special)
    assert nucleus_only == greedy  # a nucleus of one token is the most likely token


def test_baselines_stand_beside_the_scores_in_metrics_and_report(full_run):
    out, scores = full_run
    records = _lines(out / "predictions.jsonl")
    ref = torch.tensor([r["reference_labels"] for r in records])  # [N, 14]
    empty = RuleLabeler().label([""] * len(records))
    assert scores["baseline/empty/ce_micro/f1"] == pytest.approx(ce_scores(empty, ref)["ce_micro/f1"])
    assert {"baseline/most_common/ce_micro/f1", "baseline/random/ce_macro_13/f1",
            "baseline/most_common/report", "num_unparseable_reports"} <= set(scores)
    with open(out / "metrics.json", encoding="utf-8") as f:
        assert json.load(f)["baseline/empty/ce_micro_13/f1"] == scores["baseline/empty/ce_micro_13/f1"]
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "an empty report" in page and "a random training report" in page
