"""mrgr1/rollout_viewer.py, eval_report.py, pages.py, charts.py and tracking.py: rollout pages, the
index, curves, the eval report, TensorBoard.

The rollout is a stand-in with trainer.Rollout's field names and hand-chosen values (advantages
that are NOT what group_advantages would give, to show the page takes them as they are).
"""
import html.parser
import json
import os
import types

import pytest
import torch
from PIL import Image

from mrgr1 import charts, eval_report, pages, rollout_viewer, tracking
from mrgr1.data import Study

G = 4


class Page(html.parser.HTMLParser):
    """Collects the completion rows (their data-* attributes), the referenced files and the text."""

    def __init__(self):
        super().__init__()
        self.rows, self.sources, self.text, self.open = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in ("img", "br", "meta", "rect", "polyline", "div"):
            self.open.append(tag)
        if tag == "tr" and "data-row" in attrs:
            self.rows.append(attrs)
        for key in ("src", "href"):
            if attrs.get(key) and not attrs[key].startswith(("data:", "#")):
                self.sources.append(attrs[key])

    def handle_endtag(self, tag):
        if tag in ("img", "br", "meta", "rect", "polyline", "div"):
            return
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    page = Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    page.close()
    assert page.open == [], f"unclosed tags {page.open}"
    page.text = " ".join(page.text)
    folder = os.path.dirname(path)
    missing = [s for s in page.sources if not os.path.exists(os.path.join(folder, s))]
    assert missing == [], f"{path} links files that do not exist: {missing}"
    return page


def image(path, size=(60, 50)):
    Image.new("L", size, 128).save(path)
    return str(path)


@pytest.fixture
def studies(tmp_path):
    return [Study(id=f"s{b}", report=f"Reference report {b}. No effusion.",
                  image_paths=[image(tmp_path / f"s{b}-{v}.png") for v in range(2)], split="train")
            for b in range(2)]


@pytest.fixture
def rollout():
    """Study 0: four different rewards; study 1: four equal rewards (zero spread)."""
    rewards = torch.tensor([0.25, 0.95, 0.5, 0.0, 0.625, 0.625, 0.625, 0.625])
    labels = torch.zeros(2 * G, 14, dtype=torch.long)
    labels[1, 1] = 1  # completion 1 finds cardiomegaly, as the reference does
    labels[2, 9] = 3  # completion 2: uncertain effusion, the reference says negative
    ref = torch.zeros(2 * G, 14, dtype=torch.long)
    ref[:G, 1], ref[:, 9] = 1, 2
    mask = torch.zeros(2 * G, 10, dtype=torch.long)
    for i, n in enumerate([3, 10, 7, 5, 4, 4, 4, 4]):
        mask[i, :n] = 1
    return types.SimpleNamespace(
        texts=["<think>heart</think><report>Normal.</report>",
               "<think>big heart</think><report>Cardiomegaly. No effusion.</report>",
               "<think>maybe fluid</think><report>Possible effusion.</report>",
               "Normal chest, no tags at all.", *["<think>a</think><report>Clear lungs.</report>"] * G],
        rewards=rewards,
        reward_terms={"mccs": torch.tensor([0.0, 1.0, 0.4, 0.0] + [0.5] * G),
                      "format": torch.tensor([1.0, 1.0, 1.0, 0.0] + [1.0] * G)},
        advantages=torch.tensor([-0.3125, 1.3125, 0.5, -1.5, 0.0, 0.0, 0.0, 0.0]),
        truncated=torch.tensor([False, True, False, False] + [False] * G),
        completion_mask=mask, labels=labels, ref_labels=ref,
        ccs=torch.tensor([0.5, 1.0, 0.7, 0.0] + [0.75] * G))


def test_rollout_page_shows_each_completions_reward_and_advantage_in_advantage_order(tmp_path, rollout, studies):
    path = rollout_viewer.write_rollout_page(str(tmp_path / "run"), 10, rollout, studies)
    assert path == str(tmp_path / "run" / "rollouts" / "step-000010.html")
    rows = parse(path).rows
    assert sorted(int(r["data-row"]) for r in rows) == list(range(2 * G))  # each completion once
    for r in rows:
        i = int(r["data-row"])
        assert float(r["data-advantage"]) == float(rollout.advantages[i])
        assert float(r["data-reward"]) == float(rollout.rewards[i])
    first_group = [int(r["data-row"]) for r in rows[:G]]
    assert first_group == [1, 2, 0, 3]  # advantages 1.3125, 0.5, -0.3125, -1.5


def test_rollout_page_prints_the_numbers_of_each_completion(tmp_path, rollout, studies):
    text = parse(rollout_viewer.write_rollout_page(str(tmp_path), 1, rollout, studies)).text
    for i in range(G):
        for shown in (f"{float(rollout.advantages[i]):+.4f}", f"{float(rollout.rewards[i]):.4f}",
                      f"{float(rollout.ccs[i]):.4f}", f"{float(rollout.reward_terms['mccs'][i]):.4f}"):
            assert shown in text
    assert "malformed: format reward 0" in text  # completion 3 has no tags


def test_a_zero_spread_group_is_marked_and_the_other_is_not(tmp_path, rollout, studies):
    with open(rollout_viewer.write_rollout_page(str(tmp_path), 1, rollout, studies), encoding="utf-8") as f:
        page = f.read()
    first, second = page.split('id="study-s1"')
    assert "No signal from this study" not in first
    assert "No signal from this study: all 4 completions earned reward 0.6250" in second


def test_label_chips_mark_the_codes_that_differ_from_the_reference(rollout):
    row = pages.chips(rollout.labels[2], rollout.ref_labels[2])
    chips = row.split("</span>")[:-1]
    assert len(chips) == 14
    differing = [c for c, html in enumerate(chips) if " diff" in html]
    assert differing == [1, 9]  # cardiomegaly missed, effusion uncertain instead of negative
    assert 'class="chip c3 diff" title="Pleural Effusion: uncertain (reference: negative)"' in chips[9]


def test_completion_text_tells_think_report_and_stray_text_apart():
    shown = pages.completion_html("<think>a &lt;</think> <report>b</report> thanks")
    assert '<span class="think">a &amp;lt;</span>' in shown
    assert '<span class="report">b</span>' in shown
    assert '<span class="stray"> thanks</span>' in shown


def write_metrics(out, steps=(1, 2)):
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "reward": 0.1 * step, "rewards/mccs/mean": 0.1,
                                "rewards/format/mean": 1.0, "reward_std": 0.2, "frac_reward_zero_std": 0.5,
                                "completions/mean_length": 9.0, "completions/clipped_ratio": 0.0,
                                "clip_ratio/region_mean": 0.0}) + "\n")


@pytest.fixture
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as where the optional [plot] extra is not installed."""
    import builtins

    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", refuse)


def test_index_links_every_step_page_and_shows_the_curves_png(tmp_path, rollout, studies):
    pytest.importorskip("matplotlib")
    out = str(tmp_path)
    write_metrics(out)
    for step in (1, 2):
        rollout_viewer.write_rollout_page(out, step, rollout, studies)
    page = parse(rollout_viewer.write_index(out, {"before": {"ce_micro/f1": 0.25}, "after": {"ce_micro/f1": 0.5}}))
    assert sorted(page.sources) == ["../curves.png", "step-000001.html", "step-000002.html"]  # all exist
    assert "test CE-F1 (micro) before GRPO 0.2500 -> after GRPO 0.5000" in page.text
    assert "reward 0.2000" in page.text  # each step link with its logged reward


def test_without_matplotlib_the_index_says_how_to_get_the_curves(tmp_path, rollout, studies, no_matplotlib):
    out = str(tmp_path)
    write_metrics(out)
    rollout_viewer.write_rollout_page(out, 1, rollout, studies)  # writes the index too
    page = parse(str(tmp_path / "rollouts" / "index.html"))
    assert page.sources == ["step-000001.html"]
    assert "matplotlib is not installed" in page.text and 'pip install -e ".[plot]"' in page.text
    assert not os.path.exists(tmp_path / "curves.png")


def test_every_curve_panel_has_a_line_or_says_why_not():
    rows = [{"step": s, "reward": 0.5, "kl": 0.0, "completions/mean_length": 7.0} for s in (1, 2, 3)]
    for title, series, empty in charts.curve_panels(rows):
        assert bool(series) != bool(empty), title
    assert charts.curve_panels([])[0][2] == "no steps logged yet"


def test_moving_average_is_the_mean_of_the_last_window_values():
    assert charts.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_curves_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "reward": s / 10, "kl": 0.01 * s}) + "\n" for s in range(1, 6)))
    out = charts.plot_curves(str(log), str(tmp_path / "curves.png"), {"after": {"ce_micro/f1": 0.5}})
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def eval_records(n):
    return [{"id": f"t{k}", "reference": "No effusion.", "generated": "<think>x</think><report>Effusion.</report>",
             "report": "Effusion.", "report_labels": [0] * 9 + [1] + [0] * 4,
             "reference_labels": [0] * 9 + [2] + [0] * 3 + [1]} for k in range(n)]


def test_eval_report_lists_every_study_once_and_writes_its_chart(tmp_path):
    pytest.importorskip("matplotlib")
    from mrgr1.metrics import ce_scores

    records = eval_records(3)
    scores = ce_scores(torch.tensor([r["report_labels"] for r in records]),
                       torch.tensor([r["reference_labels"] for r in records]))
    views = {"t1": [image(tmp_path / "v.png")]}
    path = eval_report.write_eval_report(str(tmp_path / "eval"), records, scores, labeler="rules", image_paths=views)
    with open(path, encoding="utf-8") as f:
        page = f.read()
    assert set(parse(path).sources) == {"per_observation.png", "report_views/1-0.jpg"}  # and they exist
    assert [page.count(f'id="study-t{k}"') for k in range(3)] == [1, 1, 1]
    assert os.path.isfile(tmp_path / "eval" / "per_observation.png")
    assert page.count("12 of 14 observations agree") == 3  # effusion and no finding differ
    assert "ce_micro" in page  # the CE table as format_table prints it


def test_eval_report_without_matplotlib_says_how_to_get_the_chart(tmp_path, no_matplotlib):
    from mrgr1.metrics import ce_scores

    records = eval_records(2)
    scores = ce_scores(torch.tensor([r["report_labels"] for r in records]),
                       torch.tensor([r["reference_labels"] for r in records]))
    page = parse(eval_report.write_eval_report(str(tmp_path), records, scores))
    assert not os.path.exists(tmp_path / "per_observation.png")
    assert "No chart (precision, recall and F1 per observation): matplotlib is not installed" in page.text
    assert "Pleural Effusion" in page.text  # the per-observation numbers are in the table all the same


def test_tensorboard_event_file_holds_the_logged_scalar_names(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tracking.start("tensorboard", str(tmp_path))
    stats = {"step": 1, "reward": 0.5, "rewards/mccs/mean": 0.25, "clip_ratio/low_mean": 0.0}
    log(stats, sample="<think>a</think><report>b</report>")
    log({**stats, "step": 2, "reward": 0.75})
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"reward", "rewards/mccs/mean", "clip_ratio/low_mean"}
    assert [e.value for e in events.Scalars("reward")] == [0.5, 0.75]


def test_report_to_none_starts_nothing(tmp_path):
    assert tracking.start("none", str(tmp_path)) is None
    assert not os.path.exists(tmp_path / "runs")


def test_evaluate_writes_the_report_from_a_predictions_file(tmp_path):
    import evaluate

    records = eval_records(3)
    for r in records[:2]:
        del r["generated"]  # other systems' files may hold the report only
    with open(tmp_path / "preds.jsonl", "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    evaluate.main(["--predictions", str(tmp_path / "preds.jsonl"), "--labeler", "rules"])
    parse(str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert [page.count(f'id="study-t{k}"') for k in range(3)] == [1, 1, 1]
    evaluate.main(["--predictions", str(tmp_path / "preds.jsonl"), "--output-dir", str(tmp_path / "no"),
                   "--no-html"])
    assert not os.path.exists(tmp_path / "no" / "report.html")



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step train_grpo.py run on a drawn demo set, logging to TensorBoard when installed:
    (output folder, the rollout of each step as grpo_step returned it)."""
    import importlib.util

    import train_grpo
    from mrgr1 import synthetic, trainer

    tmp = tmp_path_factory.mktemp("tiny_run")
    root = synthetic.generate(str(tmp / "demo"), n_train=4, n_val=0, n_test=2, image_size=56, seed=0)
    rollouts, real = [], trainer.grpo_step

    def recording(*args, **kwargs):
        stats, rollout = real(*args, **kwargs)
        rollouts.append(rollout)
        return stats, rollout
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "grpo_step", recording)
        train_grpo.main(["--dataset", "demo", "--data-root", root, "--output-dir", str(tmp / "run"),
                         "--sft-steps", "0", "--num-generations", "2", "--batch-size", "2", "--max-new-tokens",
                         "8", "--eval-limit", "0", "--lora-rank", "4", "--num-iterations", "1", "--steps", "2",
                         "--sample-every", "1", "--report-to", report_to])
    return tmp / "run", rollouts


def test_a_two_step_run_writes_the_page_of_what_each_step_trained_on(tiny_run):
    out, rollouts = tiny_run
    index = parse(str(out / "rollouts" / "index.html"))
    assert {"step-000001.html", "step-000002.html"} <= set(index.sources)
    for step, rollout in enumerate(rollouts, start=1):
        rows = parse(str(out / "rollouts" / f"step-{step:06d}.html")).rows
        assert {int(r["data-row"]): (float(r["data-reward"]), float(r["data-advantage"])) for r in rows} == {
            i: (float(rollout.rewards[i]), float(rollout.advantages[i])) for i in range(len(rollout.texts))}


def test_report_to_tensorboard_logs_every_metric_under_its_metrics_jsonl_name(tiny_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = tiny_run
    with open(out / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f]
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(logged[0]) - {"step"}
    assert [e.value for e in events.Scalars("reward")] == pytest.approx([r["reward"] for r in logged])
    assert events.Tags()["tensors"] == ["sample/text_summary"]  # a text sample per logged step


def test_report_to_tensorboard_without_the_package_stops_before_any_work(monkeypatch, capsys):
    import importlib.util

    import train_grpo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        train_grpo.parse_args(["--report-to", "tensorboard"])
    assert info.value.code == 2
    assert "pip install -e '.[tensorboard]'" in capsys.readouterr().err


def test_the_curves_show_where_each_steps_time_went_stacked_by_phase():
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "reward": 0.5, "step_time": 2.0 + s, "timing/prompts": 0.1, "timing/rollout": 1.0 * s,
             "timing/reward": 0.2, "timing/inputs": 0.1, "timing/reference": 0.0, "timing/update": 1.5}
            for s in (1, 2, 3)]
    fig = charts.curves_figure(rows)
    panel = next(ax for ax in fig.axes if ax.get_title().startswith("where the time went"))
    # beta = 0: no reference phase; the stack bottom to top in the step's order, the step's time above
    assert [t.get_text() for t in panel.get_legend().get_texts()] == [
        "whole step", "update", "inputs", "reward", "rollout", "prompts"]
    assert len(panel.collections) == 5 and panel.get_ylabel() == "seconds"
    top = panel.collections[-1].get_paths()[0].vertices[:, 1].max()  # the stack's height at its highest
    assert top == pytest.approx(0.1 + 3.0 + 0.2 + 0.1 + 1.5)


def test_the_time_panel_of_a_log_without_timing_says_so():
    steps, phases, empty = charts.time_panel([{"step": 1, "reward": 0.5}])
    assert (steps, phases) == ([], []) and "no timing/" in empty
