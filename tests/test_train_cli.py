"""train_grpo.py as a user meets it: a run never trains on the wrong thing (a used output folder,
a resume with other flags, metrics after a resume, the image resolution it records), and every
mistake is one `error: ...` line.

Runs are the smallest that exercise each path: the drawn demo set, 2 studies x 2 completions x 4
tokens, one or two steps."""
import json
import os

import pytest

import evaluate
import train_grpo
from mrgr1 import checkpoint, sft, synthetic
from mrgr1.run_config import UsageError


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return synthetic.generate(str(tmp_path_factory.mktemp("cli") / "demo"), n_train=6, n_val=0, n_test=2,
                              image_size=56, seed=1)


def small_run(demo_root, out, *extra):
    return train_grpo.main(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(out),
                            "--sft-steps", "0", "--num-generations", "2", "--batch-size", "2",
                            "--max-new-tokens", "4", "--eval-limit", "0", "--sample-every", "0",
                            "--lora-rank", "2", "--steps", "1", "--num-iterations", "1", "--beta", "0", *extra])


def one_line_error(argv) -> str:
    """The message train_grpo.py's command line ends with (SystemExit carries it to stderr)."""
    with pytest.raises(SystemExit) as info:
        train_grpo.command_line(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    small_run(demo_root, out)
    return out


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


# ----------------------------------------------------------------------------- the output folder

def test_a_fresh_run_into_a_used_output_dir_is_refused_naming_the_ways_out(demo_root, finished_run):
    with pytest.raises(UsageError) as err:
        small_run(demo_root, finished_run, "--seed", "5")
    message = str(err.value)
    assert str(finished_run) in message and "init" in message and "checkpoint-000001" in message
    assert "--resume" in message and "--output-dir" in message and "--overwrite" in message


def test_overwrite_starts_afresh(demo_root, tmp_path):
    small_run(demo_root, tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    small_run(demo_root, tmp_path, "--overwrite", "--seed", "5")
    assert _rows(tmp_path) == [1]  # not the first run's row followed by this one's
    with open(tmp_path / "checkpoint-000001" / "train_config.json") as f:
        assert json.load(f)["seed"] == 5
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only what a run writes is deleted


def test_resume_with_flags_that_change_the_run_is_refused_listing_each(demo_root, finished_run):
    with pytest.raises(checkpoint.CheckpointError) as err:
        small_run(demo_root, finished_run, "--resume", "--lr", "0.5", "--seed", "3", "--save-every", "9")
    message = str(err.value)
    assert "--lr: " in message and "0.5 now" in message and "--seed: 0 in the checkpoint, 3 now" in message
    assert "--save-every" not in message  # how often a run saves does not change it


def test_after_a_resume_metrics_hold_each_step_once(demo_root, tmp_path):
    small_run(demo_root, tmp_path, "--steps", "2", "--save-every", "1")
    # a crash after step 2 was logged but before its checkpoint was complete
    (tmp_path / "latest").write_text("checkpoint-000001\n")
    small_run(demo_root, tmp_path, "--steps", "2", "--save-every", "1", "--resume")
    assert _rows(tmp_path) == [1, 2]


# ----------------------------------------------------------------------------- image resolution

def test_the_run_records_its_image_resolution_and_evaluate_uses_it(demo_root, tmp_path, monkeypatch):
    small_run(demo_root, tmp_path / "run", "--sft-steps", "1", "--sft-batch-size", "2",
              "--min-pixels", "3136", "--max-pixels", "3136")
    for folder in ("sft", "final", "checkpoint-000001"):
        with open(tmp_path / "run" / folder / "train_config.json") as f:
            config = json.load(f)
        assert (config["min_pixels"], config["max_pixels"]) == (3136, 3136), folder
    evaluate.main(["--dataset", "demo", "--data-root", demo_root, "--policy", str(tmp_path / "run" / "sft"),
                   "--adapter", str(tmp_path / "run" / "final"), "--labeler", "rules", "--max-new-tokens", "2",
                   "--device", "cpu", "--output-dir", str(tmp_path / "eval")])
    with open(tmp_path / "eval" / "eval_config.json") as f:
        config = json.load(f)
    assert (config["min_pixels"], config["max_pixels"]) == (3136, 3136)


def test_grad_checkpointing_applies_to_the_sft_warm_start(demo_root, tmp_path, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def spy(model, *args, **kwargs):
        seen.append(model.gradient_checkpointing)
        raise Stop
    monkeypatch.setattr(sft, "sft_step", spy)
    with pytest.raises(Stop):
        small_run(demo_root, tmp_path, "--sft-steps", "1", "--sft-batch-size", "2", "--grad-checkpointing")
    assert seen == [True]


# ----------------------------------------------------------------------------- one line per mistake

def test_temperature_zero_for_training_is_refused_before_any_work(demo_root, tmp_path):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--temperature", "0"])
    assert "--temperature 0.0 (above 0" in message
    assert not os.listdir(tmp_path)


def test_flag_mistakes_are_listed_in_one_line(demo_root, tmp_path):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--num-generations", "1", "--top-p", "0", "--reward-weights", "0.75"])
    assert "--reward-weights 0.75 (2 comma-separated numbers)" in message and "--num-generations 1" in message
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--num-generations", "1", "--top-p", "0", "--resume", "--overwrite"])
    assert "--num-generations 1 (at least 2" in message and "--top-p 0.0" in message and "choose one" in message


def test_a_margin_that_cannot_shape_is_refused_before_any_work(demo_root, tmp_path):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--mccs-margin", "1.0"])
    assert "--mccs-margin 1.0 (in [-1, 1))" in message
    assert not os.path.exists(tmp_path / "init")  # no policy drawn, no SFT run


def test_an_sft_batch_larger_than_the_training_split_is_one_error_line_before_sft(demo_root, tmp_path):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--batch-size", "2", "--sft-batch-size", "7"])
    assert "--sft-batch-size 7 is larger than the 6 training studies of demo" in message
    assert not os.path.exists(tmp_path / "init")


def test_a_batch_larger_than_the_training_split_is_one_error_line(demo_root, tmp_path):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--batch-size", "7"])
    assert "--batch-size 7 is larger than the 6 training studies of demo" in message


def test_more_micro_batches_than_completions_is_one_error_line(demo_root, tmp_path):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                              "--batch-size", "2", "--num-generations", "2", "--grad-accum", "5"])
    assert "--grad-accum 5 is more than the 4 completions" in message


def test_a_used_output_dir_is_one_error_line(demo_root, finished_run):
    message = one_line_error(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(finished_run)])
    assert f"error: {finished_run} holds an earlier run" in message


def test_a_real_bug_keeps_its_traceback(demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "sft_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_grpo.command_line(["--dataset", "demo", "--data-root", demo_root, "--output-dir", str(tmp_path),
                                 "--batch-size", "2", "--sft-steps", "1", "--sft-batch-size", "2"])


# ----------------------------------------------------------------------------- the update

def _record_policy_loss(monkeypatch):
    """grpo.policy_loss that keeps, per call, the micro-batch's token count, its normaliser and stats."""
    from mrgr1 import grpo

    calls, real = [], grpo.policy_loss

    def recording(logps, old, ref, adv, mask, **kw):
        loss, stats = real(logps, old, ref, adv, mask, **kw)
        calls.append({"tokens": float(mask.sum()), "normalizer": kw["normalizer"], **stats})
        return loss, stats
    monkeypatch.setattr(grpo, "policy_loss", recording)
    return calls


def test_bnpo_normalises_each_micro_batch_by_its_own_tokens(demo_root, tmp_path, monkeypatch):
    calls = _record_policy_loss(monkeypatch)
    small_run(demo_root, tmp_path, "--loss-type", "bnpo", "--grad-accum", "2")
    assert len(calls) == 2
    assert [c["normalizer"] for c in calls] == [max(c["tokens"], 1.0) * 2 for c in calls]
