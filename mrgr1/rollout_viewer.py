"""See what GRPO sees: one static HTML page per logged step, and an index with the run's curves.

    <run>/rollouts/step-000010.html   one GRPO step: per study its views, the reference report and
                                      its labels, then its G completions sorted by advantage, each
                                      with its labels, CCS, MCCS, format reward, total reward,
                                      advantage, length and truncation (write_rollout_page)
    <run>/rollouts/index.html         links to those pages, and <run>/curves.png (write_index)

The numbers on a step page are the rollout's own tensors (trainer.Rollout), shown as they are:
nothing is recomputed, so the page shows exactly what the step trained on. Chips, completion text
and thumbnails come from mrgr1/pages.py; the curves from mrgr1/charts.py.

Example:
    stats, rollout = trainer.grpo_step(...)
    rollout_viewer.write_rollout_page("runs/demo", step, rollout, studies, stats)  # and the index
    rollout_viewer.write_index("runs/demo", results)   # at the end: the before/after CE-F1 on top
"""
from __future__ import annotations

import glob
import html
import math
import os

from . import charts
from .pages import chart, chips, completion_html, legend, thumbnail, write_page


def rollout_page_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, "rollouts", f"step-{step:06d}.html")


def _group_rows(rollout, b: int, G: int, content: str) -> str:
    """The G completions of study b, sorted by advantage (highest first), as table rows."""
    rows = range(b * G, (b + 1) * G)
    ref = None if rollout.ref_labels is None else rollout.ref_labels[b * G]
    out = []
    for i in sorted(rows, key=lambda i: -float(rollout.advantages[i])):
        adv, reward = float(rollout.advantages[i]), float(rollout.rewards[i])
        fmt = float(rollout.reward_terms["format"][i])
        cells = [f'<td class="num adv">{adv:+.4f}</td>', f'<td class="num">{reward:.4f}</td>']
        if rollout.ccs is not None:
            cells.append(f'<td class="num">{float(rollout.ccs[i]):.4f}</td>')
        cells += [f'<td class="num">{float(rollout.reward_terms[content][i]):.4f}</td>',
                  f'<td class="num">{fmt:g}</td>',
                  f'<td class="num">{int(rollout.completion_mask[i].sum())}</td>',
                  f'<td>{"yes" if bool(rollout.truncated[i]) else "no"}</td>']
        labels = "" if rollout.labels is None else chips(rollout.labels[i], ref) + "<br>"
        bad = '<span class="bad">malformed: format reward 0</span> ' if fmt == 0 else ""
        cells.append(f'<td>{labels}{bad}<span class="completion">{completion_html(rollout.texts[i])}</span></td>')
        sign = "pos" if adv > 0 else "neg" if adv < 0 else "zero"
        out.append(f'<tr class="completion-row {sign}" data-row="{i}" data-advantage="{adv!r}" '
                   f'data-reward="{reward!r}">{"".join(cells)}</tr>')
    return "\n".join(out)


def _study_section(rollout, study, b: int, G: int, content: str) -> str:
    rewards = [float(rollout.rewards[i]) for i in range(b * G, (b + 1) * G)]
    mean = sum(rewards) / G
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (G - 1)) if G > 1 else 0.0  # as reward_std
    ref_chips = "" if rollout.ref_labels is None else "<br>" + chips(rollout.ref_labels[b * G])
    views = "".join(thumbnail(p) for p in study.image_paths)
    head = [f'<section class="study" id="study-{html.escape(str(study.id))}">',
            f"<h2>Study {html.escape(str(study.id))} <small>group of {G}: mean reward {mean:.4f}, "
            f"std {std:.4f}</small></h2>",
            f'<div class="top"><div class="views">{views}</div><div class="text"><b>Reference report</b><br>'
            f"{html.escape(study.report)}{ref_chips}</div></div>"]
    if max(rewards) == min(rewards):
        head.append(f'<p class="nosignal">No signal from this study: all {G} completions earned reward '
                    f"{rewards[0]:.4f}, so every advantage is 0 and this group does not move the policy.</p>")
    ccs = "<th>CCS</th>" if rollout.ccs is not None else ""
    header = (f"<tr><th>advantage</th><th>reward</th>{ccs}<th>{charts.PART_NAMES.get(content, content)}</th>"
              f"<th>format</th><th>length</th><th>truncated</th><th>labels and completion</th></tr>")
    return "\n".join(head + [f'<table class="group">{header}', _group_rows(rollout, b, G, content),
                             "</table></section>"])


def _stats_line(stats: dict | None) -> str:
    if not stats:
        return ""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, (int, float)) and k != "step")
    return f'<p class="muted">Step statistics (as in metrics.jsonl): {html.escape(shown)}</p>'


def write_rollout_page(output_dir: str, step: int, rollout, studies: list, stats: dict | None = None) -> str:
    """<output_dir>/rollouts/step-<step>.html for one step's rollout, and the index (with the
    curves so far) updated to link it; returns the page's path.

    rollout: a trainer.Rollout (texts [N], rewards [N], reward_terms {kind, "format"} [N],
    advantages [N], truncated [N], completion_mask [N, C], labels / ref_labels [N, 14] or None,
    ccs [N] or None); row i belongs to studies[i // G]. stats: the step's metrics, shown on top.
    """
    n, B = len(rollout.texts), len(studies)
    if B == 0 or n % B:
        raise ValueError(f"write_rollout_page: {n} completions cannot be split into groups for "
                         f"{B} studies; pass the studies of this rank's batch, in rollout order")
    G = n // B
    content = next(k for k in rollout.reward_terms if k != "format")
    body = [f'<p><a href="index.html">all steps</a></p><h1>GRPO step {step}</h1>', _stats_line(stats),
            f'<p class="muted">{B} studies x {G} completions. Completions are sorted by advantage, highest '
            f"first; every number is the one this step trained on. Completion text: "
            f'<span class="think">think part</span>, <span class="report">report part</span>, '
            f'<span class="stray">text outside the tags</span>.</p>', legend()]
    body += [_study_section(rollout, s, b, G, content) for b, s in enumerate(studies)]
    path = write_page(rollout_page_path(output_dir, step), f"GRPO step {step}", "\n".join(body))
    write_index(output_dir)
    return path


def write_index(output_dir: str, results: dict | None = None) -> str:
    """<output_dir>/rollouts/index.html: the run's curves (drawn again from metrics.jsonl into
    <output_dir>/curves.png by charts.plot_curves, with train_grpo's before/after `results` in its
    title) and a link to every step page written so far, with that step's reward."""
    index = os.path.join(output_dir, "rollouts", "index.html")
    log = os.path.join(output_dir, "metrics.jsonl")
    by_step = {r["step"]: r for r in charts.read_metrics(log)}
    png = charts.plot_curves(log, os.path.join(output_dir, "curves.png"), results)
    body = [f"<h1>GRPO run {html.escape(os.path.basename(os.path.abspath(output_dir)))}</h1>"]
    if charts.ce_summary(results):
        body.append(f"<p><b>{html.escape(charts.ce_summary(results))}</b></p>")
    body.append(chart(png, index, "training curves"))
    links = []
    for path in sorted(glob.glob(os.path.join(output_dir, "rollouts", "step-*.html"))):
        step = int(os.path.basename(path)[5:-5])
        reward = f" reward {by_step[step]['reward']:.4f}" if "reward" in by_step.get(step, {}) else ""
        links.append(f'<li><a href="{os.path.basename(path)}">step {step}</a>{reward}</li>')
    body.append("<h2>Rollouts</h2><ul>" + ("".join(links) or "<li>none written yet</li>") + "</ul>")
    return write_page(index, "GRPO run", "\n".join(body))
