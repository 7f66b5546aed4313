"""python -m mrgr1.ablation on a 2-study, 2-step demo: every row trained and scored, resumable, and
its table made of the rows' own metric files.

The jobs (`python -m mrgr1.train` / `-m mrgr1.evaluate`) run in this process here, through the same
main() functions the subprocesses call, to spare CI one Python start per job; test_run_job_*
covers the subprocess runner itself."""
import json
import os
import sys

import pytest

from mrgr1 import ablation, evaluate, synthetic, train
from mrgr1.processing import Processor

ARGS = ["--dataset", "demo", "--seeds", "1", "--sft-steps", "2", "--steps", "2", "--batch-size", "2",
        "--num-generations", "2", "--max-new-tokens", "8", "--sft-batch-size", "2", "--eval-limit", "2"]


def in_process(jobs):
    """A run_job that runs the command line's main() here and records the command."""
    mains = {"mrgr1.train": train.main, "mrgr1.evaluate": evaluate.main}

    def run(cmd, log_path):
        assert cmd[:2] == [sys.executable, "-m"]  # library code: no path into the repository
        jobs.append(cmd)
        mains[cmd[2]](cmd[3:])
        return 0.0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The command three times: from nothing; again (nothing to do); after one row's metrics.json
    was deleted. Returns the output folder, the jobs of each run and the metrics mtimes."""
    base = tmp_path_factory.mktemp("ablation")
    root = synthetic.generate(str(base / "demo"), n_train=8, n_val=2, n_test=2, image_size=56, seed=0)
    out = str(base / "out")
    argv = ARGS + ["--data-root", root, "--output-dir", out]
    patch = pytest.MonkeyPatch()
    jobs = [[], [], []]
    try:
        patch.setattr(ablation, "run_job", in_process(jobs[0]))
        table = ablation.main(argv)
        mtimes = {row: os.path.getmtime(metrics_path(out, row)) for row, _, _ in ablation.ROWS}
        patch.setattr(ablation, "run_job", in_process(jobs[1]))
        ablation.main(argv)
        mtimes_after = {row: os.path.getmtime(metrics_path(out, row)) for row, _, _ in ablation.ROWS}
        os.remove(metrics_path(out, "grpo_bleu"))
        patch.setattr(ablation, "run_job", in_process(jobs[2]))
        ablation.main(argv)
    finally:
        patch.undo()
    return {"out": out, "jobs": jobs, "table": table, "mtimes": mtimes, "mtimes_after": mtimes_after}


def metrics_path(out, row, seed=0):
    return os.path.join(out, f"seed{seed}", row, "eval", "metrics.json")


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def output_dir(cmd):
    return os.path.basename(os.path.normpath(flag(cmd, "--output-dir")))


def test_every_row_is_trained_from_one_sft_start_and_scored(runs):
    train = [c for c in runs["jobs"][0] if c[2] == "mrgr1.train"]
    scored = [c for c in runs["jobs"][0] if c[2] == "mrgr1.evaluate"]
    assert [output_dir(c) for c in train] == ["sft", "sft_more", "grpo_mccs_format", "grpo_mccs",
                                              "grpo_format", "grpo_ce_f1", "grpo_bleu", "grpo_dynamic"]
    start = os.path.join(runs["out"], "seed0", "sft", "sft")
    assert all(flag(c, "--policy") == start for c in train[1:])  # the one shared SFT start
    assert [flag(c, "--steps") for c in train[:2]] == ["0", "0"]  # the SFT rows train SFT alone
    rewards = {output_dir(c): (flag(c, "--reward"), flag(c, "--reward-weights")) for c in train[2:]}
    assert rewards == {"grpo_mccs_format": ("mccs", "0.75,0.25"), "grpo_mccs": ("mccs", "1,0"),
                       "grpo_format": ("mccs", "0,1"), "grpo_ce_f1": ("ce_f1", "0.75,0.25"),
                       "grpo_bleu": ("bleu", "0.75,0.25"), "grpo_dynamic": ("mccs", "0.75,0.25")}
    assert len(scored) == 8 and {flag(c, "--limit") for c in scored} == {"2"}
    for row, _, _ in ablation.ROWS:
        assert os.path.isfile(metrics_path(runs["out"], row))


def test_the_dynamic_sampling_row_is_the_papers_row_with_dynamic_sampling_on(runs):
    train = {output_dir(c): c for c in runs["jobs"][0] if c[2] == "mrgr1.train"}
    assert [row for row, cmd in train.items() if "--dynamic-sampling" in cmd] == ["grpo_dynamic"]
    paper, dynamic = train["grpo_mccs_format"], train["grpo_dynamic"]
    assert [t for t in dynamic if t not in paper and t != flag(dynamic, "--output-dir")] == ["--dynamic-sampling"]
    with open(os.path.join(runs["out"], "seed0", "grpo_dynamic", "metrics.jsonl")) as f:
        assert all("dynamic/rounds" in json.loads(line) for line in f)


def test_with_flags_replaces_options_and_keeps_switches():
    flags = ["--steps", "2", "--dynamic-sampling", "--lr", "-1e-3"]
    assert ablation.with_flags(flags, "--steps", "3") == ["--dynamic-sampling", "--lr", "-1e-3", "--steps", "3"]
    assert ablation.with_flags(flags, "--dynamic-sampling") == ["--steps", "2", "--lr", "-1e-3", "--dynamic-sampling"]


def test_extra_sft_passes_as_many_sequences_as_grpo(runs):
    more = next(c for c in runs["jobs"][0] if "sft_more" in flag(c, "--output-dir"))
    updates = train.parse_args(["--dataset", "demo"]).num_iterations  # the demo's default
    # GRPO: 2 steps x 2 studies x 2 completions x updates; SFT: 2 sequences per step
    assert flag(more, "--sft-steps") == str(2 * 2 * 2 * updates // 2)


def test_extra_sft_steps_for_the_demo_defaults():
    settings = train.parse_args(["--dataset", "demo", "--beta", "0"])
    settings.steps, settings.batch_size, settings.num_generations, settings.sft_batch_size = 40, 8, 8, 16
    settings.num_iterations = 1
    assert ablation.extra_sft_steps(settings) == 160  # 40 x 8 x 8 / 16
    settings.num_iterations = 2
    assert ablation.extra_sft_steps(settings) == 320


def test_writes_the_table_and_the_plot(runs):
    with open(os.path.join(runs["out"], "ablation.md"), encoding="utf-8") as f:
        text = f.read()
    for _, label, _ in ablation.ROWS:
        assert f"| {label} |" in text
    with open(os.path.join(runs["out"], "ablation.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_runs_nothing_again(runs):
    assert runs["jobs"][1] == []
    assert runs["mtimes_after"] == runs["mtimes"]


def test_a_row_whose_training_finished_is_only_scored_again(runs):
    assert [(c[2], os.path.basename(os.path.dirname(flag(c, "--output-dir"))))
            for c in runs["jobs"][2]] == [("mrgr1.evaluate", "grpo_bleu")]


def test_other_settings_on_the_same_folder_stop_before_any_work(runs, monkeypatch):
    jobs = []
    monkeypatch.setattr(ablation, "run_job", in_process(jobs))
    argv = ARGS + ["--output-dir", runs["out"], "--data-root", flag(runs["jobs"][0][0], "--data-root")]
    with pytest.raises(ablation.AblationError, match=r"--steps: '2' then, '3' now.*another --output-dir"):
        ablation.main(with_steps(argv, "3"))
    assert jobs == []


def with_steps(argv, steps):
    return [steps if i > 0 and argv[i - 1] == "--steps" else a for i, a in enumerate(argv)]


def test_a_row_stopped_before_its_first_checkpoint_starts_afresh(runs, tmp_path, monkeypatch):
    jobs = []
    monkeypatch.setattr(ablation, "run_job", lambda cmd, log: jobs.append(cmd) or 0.0)
    folder = tmp_path / "row"
    (folder / "init").mkdir(parents=True)  # what a job killed during SFT leaves
    ablation.train_row("sft", ["--dataset", "demo"], str(folder), str(folder / "sft" / "config.json"))
    assert jobs[0][-1] == "--overwrite"


def table_rows(path):
    """{row label: [cell, ...]} of a markdown table."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.startswith("| ") and not line.startswith("| row")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                              for line in lines)}


def test_table_numbers_are_the_rows_own_metric_files(runs):
    out = runs["out"]
    cells = table_rows(os.path.join(out, "ablation.md"))
    processor = Processor.from_pretrained(os.path.join(out, "seed0", "sft", "sft"))
    for row, label, _ in ablation.ROWS:
        with open(metrics_path(out, row), encoding="utf-8") as f:
            metrics = json.load(f)
        with open(os.path.join(out, "seed0", row, "eval", "predictions.jsonl"), encoding="utf-8") as f:
            generated = [json.loads(line)["generated"] for line in f]
        expected = [f"{metrics[k]:.4f}" for k in ("ce_micro/f1", "ce_example/f1", "ce_macro/f1",
                                                  "format_reward/mean", "bleu_4", "rouge_l")]
        lengths = [len(processor.encode(t)) for t in generated]
        assert len(lengths) == 2
        assert cells[label] == expected + [f"{sum(lengths) / 2:.1f}"]


def test_per_observation_f1_table_is_the_rows_own_metric_files(runs):
    """Below the main table, F1 per observation for every row: which findings each way of
    training gets into the reports (here one seed, so the seed's own values)."""
    out = runs["out"]
    cells = table_rows(os.path.join(out, "ablation.md"))
    assert cells["observation"] == ["support"] + [row for row, _, _ in ablation.ROWS]
    metrics = {}
    for row, _, _ in ablation.ROWS:
        with open(metrics_path(out, row), encoding="utf-8") as f:
            metrics[row] = json.load(f)["per_observation"]
    assert len(metrics["sft"]) == 14
    for obs, scores in metrics["sft"].items():
        assert cells[obs] == [str(scores["support"])] + [f"{metrics[row][obs]['f1']:.2f}" for row, _, _ in ablation.ROWS]


def test_mean_and_sample_std_over_seeds():
    assert ablation.summarize([0.5, 0.7], 4) == "0.6000 ± 0.1414"  # std with n - 1: sqrt(0.02)
    assert ablation.summarize([0.5], 4) == "0.5000"


def test_run_job_names_the_log_of_a_failed_command(tmp_path):
    log = str(tmp_path / "job.log")
    with pytest.raises(ablation.AblationError) as failed:
        ablation.run_job([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], log)
    message = str(failed.value)
    assert "(exit 3)" in message and log in message and message.rstrip().endswith("\nboom")
    ablation.run_job([sys.executable, "-c", "print('fine')"], log)
    with open(log, encoding="utf-8") as f:
        assert f.read().count("fine") == 2  # the command line and its output, appended
