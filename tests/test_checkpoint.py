"""mrgr1.checkpoint: durable saves (fsync order), the resume config check, metrics rows after a resume."""
import json
import os

import pytest
import torch

from mrgr1 import checkpoint


def _save(output_dir, step=3):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return checkpoint.save_checkpoint(str(output_dir), step=step, model=model, optimizer=optimizer,
                                      scheduler=scheduler, trainer_state={"epoch": 0, "batch": step},
                                      config={"lr": 1e-5})


def test_files_are_fsynced_before_the_rename_and_the_parent_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                  real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    final = _save(tmp_path)
    tmp = os.path.join(str(tmp_path), ".checkpoint-000003.tmp")
    rename = events.index(("replace", tmp, final))
    synced_before = {path for kind, path, *_ in events[:rename] if kind == "fsync"}
    for name in os.listdir(final):  # every file of the checkpoint, by its temporary path
        assert os.path.join(tmp, name) in synced_before, name
    assert tmp in synced_before  # the folder's own list of names
    assert ("fsync", str(tmp_path)) in events[rename + 1:]  # the parent, which holds the new name
    latest = events.index(("replace", os.path.join(str(tmp_path), "latest.tmp"), os.path.join(str(tmp_path), "latest")))
    assert latest > rename and ("fsync", str(tmp_path)) in events[latest + 1:]


STORED = {"dataset": "iu_xray", "batch_size": 4, "num_generations": 8, "seed": 0, "lr": 1e-5, "loss_type": "grpo",
          "lora_rank": 64, "lora_alpha": 128.0, "epsilon_high": 0.2, "device": "cuda", "threads": None,
          "resume": False, "save_every": 100, "sample_every": 10, "eval_limit": 200, "eval_samples": 0,
          "output_dir": "runs/iu_xray"}


def test_config_differences_list_each_flag_that_changes_the_run():
    now = {**STORED, "batch_size": 8, "lr": 2e-5, "loss_type": "dapo", "lora_rank": 16}
    assert checkpoint.config_differences(STORED, now) == [
        "--batch-size: 4 in the checkpoint, 8 now", "--lora-rank: 64 in the checkpoint, 16 now",
        "--loss-type: 'grpo' in the checkpoint, 'dapo' now", "--lr: 1e-05 in the checkpoint, 2e-05 now"]


def test_where_and_how_often_a_run_reports_are_not_differences():
    now = {**STORED, "device": "cpu", "threads": 4, "resume": True, "save_every": 5, "sample_every": 0,
           "eval_limit": 10, "eval_samples": 8, "output_dir": "/elsewhere/iu_xray"}
    assert checkpoint.config_differences(STORED, now) == []


def test_values_compare_as_stored_in_json():
    assert checkpoint.config_differences({"mccs_mapping": [0.0, 1.0]}, {"mccs_mapping": (0.0, 1.0)}) == []


def test_check_config_refuses_with_every_difference(tmp_path):
    final = _save(tmp_path)
    with open(os.path.join(final, checkpoint.CONFIG_FILE), "w") as f:
        json.dump(STORED, f)
    checkpoint.check_config(final, dict(STORED))
    with pytest.raises(checkpoint.CheckpointError, match=r"--dataset: 'iu_xray' .*'mimic_cxr' now; --seed: 0 .*1 now"):
        checkpoint.check_config(final, {**STORED, "seed": 1, "dataset": "mimic_cxr"})


def test_a_longer_run_is_allowed_with_a_note(tmp_path):
    final = _save(tmp_path)
    with open(os.path.join(final, checkpoint.CONFIG_FILE), "w") as f:
        json.dump({**STORED, "steps": 1000}, f)
    assert checkpoint.check_config(final, {**STORED, "steps": 1000}) == []
    notes = checkpoint.check_config(final, {**STORED, "steps": 2000})
    assert len(notes) == 1 and notes[0].startswith("note: --steps 2000 (the checkpoint's run had 1000)")


def test_metrics_rows_past_the_checkpoint_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "rew')
    assert checkpoint.drop_metrics_after(str(path), 2) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert checkpoint.drop_metrics_after(str(path), 2) == 0
    assert checkpoint.drop_metrics_after(str(tmp_path / "absent.jsonl"), 2) == 0
