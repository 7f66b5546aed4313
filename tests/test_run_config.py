"""The run configuration (mrgr1/run_config.py): one home for every default, both presets, every
flag checked before any work, and evaluate.py reading a run's recorded configuration."""
import dataclasses
import json
import os

import pytest
import torch

from mrgr1 import evaluate, run_config, synthetic, train
from mrgr1.run_config import FIELDS, RunConfig, UsageError

# Every numeric flag with a bound: a value out of bounds and one inside. The test below fails when
# a numeric field is added to RunConfig without a line here.
BOUNDS = {
    "lora_rank": ("-1", "0"), "lora_alpha": ("0", "16"), "lora_dropout": ("1", "0.1"),
    "min_pixels": ("0", "784"), "max_pixels": ("0", "7056"), "mccs_margin": ("1", "-0.5"),
    "steps": ("-1", "0"), "batch_size": ("0", "2"), "num_generations": ("1", "2"), "max_new_tokens": ("0", "1"),
    "temperature": ("0", "0.7"), "top_p": ("0", "1"), "lr": ("0", "1e-4"), "weight_decay": ("-0.1", "0"),
    "warmup_ratio": ("1.5", "1"), "max_grad_norm": ("0", "0.5"), "beta": ("-0.01", "0"), "epsilon": ("1", "0"),
    "epsilon_high": ("-0.1", "0.28"), "num_iterations": ("0", "1"), "dynamic_sampling_rounds": ("-1", "0"), "grad_accum": ("0", "1"),
    "sft_steps": ("-1", "0"), "sft_lr": ("0", "1e-3"), "sft_batch_size": ("0", "1"), "eval_limit": ("-1", "0"),
    "eval_samples": ("-1", "0"), "eval_batch_size": ("0", "1"), "eval_sample_batch_size": ("0", "1"),
    "save_every": ("0", "1"), "sample_every": ("-1", "0"), "prompt_cache_gb": ("-1", "0"), "threads": ("0", "1"),
}
NUMERIC = {n for n, f in FIELDS.items() if str(f.type).split(" ")[0] in ("int", "float")}


def test_every_numeric_flag_has_bounds_and_a_line_in_this_test():
    unchecked = sorted(n for n in NUMERIC if FIELDS[n].metadata["check"] is None and n != "seed")
    assert unchecked == [], "give these fields a check= in RunConfig"
    assert set(BOUNDS) == NUMERIC - {"seed"}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_numeric_flag_out_of_bounds_is_refused_by_name_before_any_work(name, tmp_path):
    bad, good = BOUNDS[name]
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=f"invalid .*{run_config.flag(name)} "):
        train.parse_args(["--dataset", "demo", run_config.flag(name), bad, "--output-dir", str(out)])
    assert not out.exists()  # nothing written, nothing loaded
    train.parse_args(["--dataset", "demo", run_config.flag(name), good, "--output-dir", str(out)])


def test_a_margin_of_one_is_refused_at_the_command_line_not_at_the_first_reward(tmp_path):
    with pytest.raises(UsageError, match=r"--mccs-margin 1\.0 \(in \[-1, 1\)\)"):
        train.parse_args(["--mccs-margin", "1.0", "--output-dir", str(tmp_path)])


def test_sizes_that_do_not_fit_the_training_split_are_refused_together():
    cfg = run_config.preset("demo", batch_size=9, sft_batch_size=20)
    with pytest.raises(UsageError) as err:
        run_config.check_sizes(cfg, n_train=8)
    assert "--batch-size 9 is larger than the 8" in str(err.value)
    assert "--sft-batch-size 20 is larger than the 8" in str(err.value)
    run_config.check_sizes(run_config.preset("demo", batch_size=8, sft_batch_size=8), n_train=8)


def test_the_demo_preset_changes_only_the_fields_that_name_a_demo_value():
    real, demo = run_config.preset("real"), run_config.preset("demo")
    differ = {n for n in FIELDS if getattr(real, n) != getattr(demo, n)}
    assert differ == {n for n, f in FIELDS.items() if f.metadata["demo"] is not dataclasses.MISSING}
    assert (demo.policy, demo.labeler, demo.max_new_tokens) == ("demo", "rules", 72)
    assert real.reward_weights == (0.75, 0.25) and real.mccs_mapping == (0.0, 1.0, -1.0, 1.0)  # the paper's
    assert real.lora_dropout == 0.0  # the README's value, also in library calls (no private default)


def test_flags_override_the_preset_and_the_help_is_grouped(capsys):
    cfg = train.parse_args(["--dataset", "demo", "--steps", "3", "--reward", "ce_f1", "--reward-weights", "1,0"])
    assert (cfg.steps, cfg.batch_size, cfg.reward_weight_map) == (3, 8, {"ce_f1": 1.0, "format": 0.0})
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = capsys.readouterr().out
    for group in run_config.GROUPS:
        assert f"\n{group}:\n" in shown
    assert "--epochs" not in shown  # one way to say how long a run is: --steps


def test_a_run_folder_records_its_configuration_and_reads_back_equal(tmp_path):
    cfg = run_config.preset("demo", mccs_margin=0.25, instruction="Describe.")
    run_config.save(cfg, str(tmp_path))
    assert RunConfig(**run_config.load_recorded(str(tmp_path))) == cfg
    (tmp_path / run_config.CONFIG_FILE).write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        run_config.load_recorded(str(tmp_path))


def test_evaluating_a_run_prints_exactly_the_ce_f1_its_training_printed_after_grpo(tmp_path, capsys):
    """The check the run configuration exists for: evaluate.py on a finished run, given nothing but
    the data and the run's folders, decodes with the run's pixels, budget, prompt and labeler and
    reproduces the "after GRPO" CE-F1 to the last digit."""
    root = synthetic.generate(str(tmp_path / "demo"), n_train=6, n_val=0, n_test=5, image_size=56, seed=2)
    out = tmp_path / "run"
    results = train.main(["--dataset", "demo", "--data-root", root, "--output-dir", str(out), "--sft-steps", "3",
                          "--sft-batch-size", "2", "--steps", "2", "--batch-size", "2", "--num-generations", "2",
                          "--max-new-tokens", "10", "--min-pixels", "784", "--max-pixels", "3136",
                          "--eval-limit", "5", "--eval-samples", "0", "--eval-batch-size", "3",
                          "--sample-every", "0", "--lora-rank", "4", "--lr", "0.05", "--instruction", "Report."])
    after = capsys.readouterr().out
    scores = evaluate.main(["--dataset", "demo", "--data-root", root, "--policy", str(out / "sft"),
                            "--adapter", str(out / "final"), "--output-dir", str(tmp_path / "eval")])
    assert scores["ce_micro/f1"] == results["after"]["ce_micro/f1"]
    assert scores["ce_example/f1"] == results["after"]["ce_example/f1"]
    assert f"after GRPO: CE-F1 (micro, R2GenCMN convention) {scores['ce_micro/f1']:.4f}" in after
    with open(tmp_path / "eval" / "eval_config.json") as f:
        used = json.load(f)
    assert (used["max_new_tokens"], used["max_pixels"], used["instruction"]) == (10, 3136, "Report.")
    assert os.path.isfile(out / "final" / run_config.CONFIG_FILE)


# ----------------------------------------------------------------------------- --decode

@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """Four demo studies and the untrained demo model drawn for them -> (studies, model, processor)."""
    from mrgr1 import data, pipeline

    root = synthetic.generate(str(tmp_path_factory.mktemp("decode") / "demo"), n_train=4, n_val=0, n_test=0,
                              image_size=56, seed=0)
    studies = data.load_split("demo", root, "train")
    wording = (RunConfig.system_prompt, RunConfig.instruction, RunConfig.sft_think)
    folder = pipeline.demo_policy_folder(str(tmp_path_factory.mktemp("init")), [s.report for s in studies], wording)
    return (studies, *pipeline.load_policy(folder))


def decode_spy(monkeypatch, module) -> list:
    """Record the decode= of every generate call made through `module`, then run it."""
    from mrgr1 import generate

    seen = []

    def spy(*args, decode="auto", **kwargs):
        seen.append(decode)
        return generate.generate(*args, decode=decode, **kwargs)
    monkeypatch.setattr(module, "generate", spy)
    return seen


def test_the_decode_flag_reaches_the_rollouts_and_static_samples_what_eager_samples(tiny_policy, monkeypatch, tmp_path):
    from mrgr1 import pipeline, trainer
    from mrgr1.prompts import PromptEncoder

    studies, model, processor = tiny_policy
    seen = decode_spy(monkeypatch, trainer)
    prompts = PromptEncoder(processor, RunConfig.system_prompt, RunConfig.instruction)(studies)
    drawn = {}
    for mode in ("static", "eager"):
        cfg = train.parse_args(["--decode", mode, "--max-new-tokens", "12", "--output-dir", str(tmp_path)])
        drawn[mode] = trainer.sample_completions(model, prompts, cfg, torch.Generator().manual_seed(3), 2,
                                                 **pipeline.special_ids(processor))
    assert seen == ["static", "eager"]
    for static, eager in zip(drawn["static"], drawn["eager"]):
        assert torch.equal(static, eager)


def test_the_decode_flag_reaches_the_evaluation(tiny_policy, monkeypatch, tmp_path):
    from mrgr1 import evaluation, pipeline
    from mrgr1.prompts import PromptEncoder

    studies, model, processor = tiny_policy
    seen = decode_spy(monkeypatch, evaluation)
    encoder = PromptEncoder(processor, RunConfig.system_prompt, RunConfig.instruction)
    texts = {}
    for mode in ("static", "eager"):
        settings = evaluate.parse_args(["--dataset", "demo", "--decode", mode, "--max-new-tokens", "12"]).settings
        texts[mode] = evaluation.generate_reports(model, processor, encoder, studies, settings,
                                                  **pipeline.special_ids(processor))
    assert seen == ["static", "eager"] and texts["static"] == texts["eager"]


def test_graph_decode_without_cuda_is_refused_by_the_flag_check_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    for device in ([], ["--device", "cpu"]):
        with pytest.raises(UsageError, match=r"--decode graph \(it records a CUDA graph.*use --decode auto, eager "
                                             r"or static\)"):
            train.parse_args(["--decode", "graph", "--output-dir", str(out), *device])
    assert not out.exists()
    args = evaluate.parse_args(["--dataset", "demo", "--decode", "graph"])
    with pytest.raises(evaluate.EvalError, match=r"--decode graph"):
        evaluate.check_flags(args)
