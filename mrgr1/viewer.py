"""See what GRPO sees: a rollout viewer, an evaluation report and training curves, as static HTML.

Three outputs, each a plain file a browser opens with no server, no JavaScript and no network:

    <run>/rollouts/step-000010.html   one GRPO step: per study its views, the reference report and
                                      its labels, then its G completions sorted by advantage, each
                                      with its labels, CCS, MCCS, format reward, total reward,
                                      advantage, length and truncation (write_rollout_page)
    <run>/rollouts/index.html         links to those pages, with the training curves (write_index)
    <run>/curves.png                  the same curves with matplotlib, when installed (plot_curves)
    <eval>/report.html                evaluate.py: the CE and NLG tables, a per-observation chart,
                                      then every study with both reports (write_eval_report)

The numbers on a rollout page are the rollout's own tensors (trainer.Rollout), shown as they are:
nothing is recomputed, so the page shows exactly what the step trained on. Labels are CheXbert
codes (0 blank, 1 positive, 2 negative, 3 uncertain) in mrgr1.labels.CONDITIONS order, drawn as 14
coloured chips; a chip outlined in black differs from the reference's.

Example:
    stats, rollout = trainer.grpo_step(...)
    viewer.write_rollout_page("runs/demo", step, rollout, studies, stats)
    viewer.write_index("runs/demo")                     # rollouts/index.html with the curves
    viewer.plot_curves("runs/demo/metrics.jsonl", "runs/demo/curves.png")
"""
from __future__ import annotations

import base64
import glob
import html
import io
import json
import math
import os
import re
import textwrap

from PIL import Image

from .labels import CONDITIONS
from .metrics import format_table

# ----------------------------------------------------------------------------- pieces of a page

SHORT_NAMES = ["EnlCM", "Cardio", "Opac", "Lesion", "Edema", "Consol", "Pneum", "Atel", "PTX",
               "Effus", "PlOth", "Fract", "Device", "NoFind"]  # chip text; the full name is its tooltip
CODE_NAMES = {0: "blank", 1: "positive", 2: "negative", 3: "uncertain"}
PART_NAMES = {"mccs": "MCCS", "ce_f1": "CE-F1", "bleu": "BLEU", "format": "format"}

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1250px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:.2em 0} h2{font-size:1.15em;margin:.2em 0} small,.muted{color:#666}
section.study{border:1px solid #ccc;border-radius:6px;padding:.7em 1em;margin:1.2em 0}
.views img{height:120px;margin-right:4px;border:1px solid #999;vertical-align:top}
.top{display:flex;gap:1.2em;align-items:flex-start} .top .text{flex:1}
.chip{display:inline-block;font:11px/1.6 monospace;padding:0 4px;margin:1px;border-radius:3px;
      border:2px solid transparent}
.c0{background:#eee;color:#999} .c1{background:#e45756;color:#fff} .c2{background:#54a24b;color:#fff}
.c3{background:#f2b33d;color:#222} .chip.diff{border-color:#000;font-weight:bold}
table{border-collapse:collapse} td,th{padding:3px 6px;border-bottom:1px solid #ddd;vertical-align:top}
th{text-align:left;background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.pos td.adv{color:#1a7f37;font-weight:bold} tr.neg td.adv{color:#c62828;font-weight:bold}
.completion{white-space:pre-wrap;font-size:13px}
.think{color:#777;font-style:italic} .report{color:#000} .tag{color:#36c;font:11px monospace}
.stray{background:#fde2e2;color:#a00;text-decoration:underline wavy #a00}
.bad{background:#c62828;color:#fff;padding:0 4px;border-radius:3px;font-size:12px}
.nosignal{background:#fff4ce;border-left:4px solid #f2b33d;padding:.3em .6em;margin:.5em 0}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}
details{border-bottom:1px solid #ddd;padding:.3em 0} summary{cursor:pointer}
.agree td{text-align:center;padding:1px} .agree td.differ{background:#fde2e2}
svg text{font:11px sans-serif}
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def _write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def chip(c: int, code: int, reference: int | None = None) -> str:
    """The label chip of observation c: coloured by its code, outlined when it differs from `reference`."""
    differs = reference is not None and int(reference) != int(code)
    tip = f"{CONDITIONS[c]}: {CODE_NAMES[int(code)]}"
    if differs:
        tip += f" (reference: {CODE_NAMES[int(reference)]})"
    return f'<span class="chip c{int(code)}{" diff" if differs else ""}" title="{tip}">{SHORT_NAMES[c]}</span>'


def chips(codes, reference=None) -> str:
    """The 14 chips of a label row; where `reference` (14 codes) differs, the chip is outlined."""
    return "".join(chip(c, codes[c], None if reference is None else reference[c]) for c in range(len(CONDITIONS)))


def legend() -> str:
    codes = "".join(f'<span class="chip c{c}">{CODE_NAMES[c]}</span>' for c in (1, 2, 3, 0))
    names = ", ".join(f"{s} = {n}" for s, n in zip(SHORT_NAMES, CONDITIONS))
    return (f'<p class="muted">Labels (CheXbert codes): {codes} <span class="chip c1 diff">outlined</span> '
            f"differs from the reference. {names}.</p>")


_TAGS = re.compile(r"(</?(?:think|report)>)")


def completion_html(text: str) -> str:
    """A completion with its think part (grey), its report part (black) and any text outside the
    two tags (red, wavy: what makes an answer malformed) told apart."""
    out, inside = [], None
    for piece in _TAGS.split(text):
        if _TAGS.fullmatch(piece):
            out.append(f'<span class="tag">{html.escape(piece)}</span>')
            inside = None if piece.startswith("</") else piece[1:-1]
        elif piece.strip():
            out.append(f'<span class="{inside or "stray"}">{html.escape(piece)}</span>')
    return "".join(out) or '<span class="stray">(empty completion)</span>'


def thumbnail(path: str, height: int = 120, folder: str | None = None, name: str = "") -> str:
    """An <img> of an image file, `height` px tall: embedded as base64 JPEG, or (folder given)
    written there as <name>.jpg and linked relatively (for pages with hundreds of studies)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (4 * height, height))  # JPEG: decode at a reduced scale (fast on MIMIC-CXR)
            im = im.convert("RGB")
            im.thumbnail((4 * height, height))
    except (OSError, SyntaxError) as e:
        return f'<span class="bad" title="{html.escape(str(e))}">cannot read {html.escape(path)}</span>'
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    alt = html.escape(os.path.basename(path))
    if folder is None:
        src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    else:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, name + ".jpg"), "wb") as f:
            f.write(buf.getvalue())
        src = f"{os.path.basename(folder)}/{name}.jpg"
    return f'<img src="{src}" alt="{alt}" title="{html.escape(path)}" loading="lazy">'


def _num(value, digits: int = 4) -> str:
    return f"{float(value):.{digits}f}"


# ----------------------------------------------------------------------------- rollout page

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
        cells = [f'<td class="num adv">{adv:+.4f}</td>', f'<td class="num">{_num(reward)}</td>']
        if rollout.ccs is not None:
            cells.append(f'<td class="num">{_num(rollout.ccs[i])}</td>')
        cells += [f'<td class="num">{_num(rollout.reward_terms[content][i])}</td>',
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
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (G - 1)) if G > 1 else 0.0
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
    header = (f"<tr><th>advantage</th><th>reward</th>{ccs}<th>{PART_NAMES.get(content, content)}</th>"
              f"<th>format</th><th>length</th><th>truncated</th><th>labels and completion</th></tr>")
    return "\n".join(head + [f'<table class="group">{header}', _group_rows(rollout, b, G, content),
                             "</table></section>"])


def _stats_line(stats: dict | None) -> str:
    if not stats:
        return ""
    shown = ", ".join(f"{k} {v:.4g}" for k, v in stats.items() if isinstance(v, (int, float)) and k != "step")
    return f'<p class="muted">Step statistics (as in metrics.jsonl): {html.escape(shown)}</p>'


def write_rollout_page(output_dir: str, step: int, rollout, studies: list, stats: dict | None = None) -> str:
    """<output_dir>/rollouts/step-<step>.html for one step's rollout, and the index updated to link
    it; returns the page's path.

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
    path = _write(rollout_page_path(output_dir, step), _page(f"GRPO step {step}", "\n".join(body)))
    write_index(output_dir)
    return path


# ----------------------------------------------------------------------------- curves

def read_metrics(log_path: str) -> list[dict]:
    if not os.path.isfile(log_path):
        return []
    with open(log_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _series(rows: list[dict], key: str, label: str | None = None):
    points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
              and math.isfinite(r[key])]
    return (label or key, [p[0] for p in points], [p[1] for p in points])


def curve_panels(rows: list[dict]) -> list[tuple[str, list, str | None]]:
    """The panels both renderers draw: (title, [(label, steps, values)], why it is empty or None)."""
    kind = next((k.split("/")[1] for r in rows for k in r if k.startswith("rewards/") and "/format/" not in k),
                "mccs")
    def panel(title, keys, missing, zero=None):
        series = [s for s in (_series(rows, k, label) for k, label in keys) if s[1]]
        if not series:
            return title, [], missing
        if zero and all(v == 0 for s in series for v in s[2]):
            return title, [], zero
        return title, series, None
    none = "no steps logged yet"
    return [
        panel("reward and its parts", [("reward", "total"), (f"rewards/{kind}/mean", PART_NAMES.get(kind, kind)),
                                       ("rewards/format/mean", "format")], none),
        panel("reward spread", [("reward_std", "std within a group"),
                                ("frac_reward_zero_std", "share of zero-spread groups")], none),
        panel("KL to the reference", [("kl", "kl")], "no KL term: the run has beta = 0 (no reference policy)",
              "kl is 0 at every step: the policy has not left the reference"),
        panel("clipped tokens", [("clip_ratio/region_mean", "either side"), ("clip_ratio/low_mean", "low"),
                                 ("clip_ratio/high_mean", "high")], "clip ratio not logged",
              "no token was clipped at any step (with one update per batch, --num-iterations 1, "
              "the ratio is exactly 1 and nothing can be clipped)"),
        panel("completion length (tokens)", [("completions/mean_length", "mean length")], none),
        panel("truncated completions", [("completions/clipped_ratio", "share without EOS")], none,
              "no completion was truncated: every one ended with EOS"),
    ]


def ce_summary(results: dict | None) -> str:
    """'test CE-F1 (micro) before GRPO 0.31 -> after 0.42' from train_grpo's results, or ''."""
    parts = [f"{when} GRPO {results[when]['ce_micro/f1']:.4f}" for when in ("before", "after")
             if results and "ce_micro/f1" in results.get(when, {})]
    return "test CE-F1 (micro) " + " -> ".join(parts) if parts else ""


def _window(n: int) -> int:
    """Moving-average window for n logged steps (ours): an eighth of them, from 2 to 25 steps."""
    return max(2, min(25, n // 8))


def smoothing_note(n: int) -> str:
    return f"faint: each step; bold: mean of the last {_window(n)} steps"


COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]


def pyplot():
    """matplotlib.pyplot drawing to files, or None when matplotlib is not installed (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(log_path: str, out: str, results: dict | None = None) -> str | None:
    """The curves of a run's metrics.jsonl as a PNG (raw values faint, moving average bold, the
    before/after test CE-F1 in the title); None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    rows = read_metrics(log_path)
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5))
    for ax, (title, series, empty) in zip(axes.flat, curve_panels(rows)):
        ax.set_title(title, fontsize=10)
        if empty:
            ax.text(0.5, 0.5, textwrap.fill(empty, 42), ha="center", va="center", fontsize=9, color="#555",
                    transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for colour, (label, steps, values) in zip(COLOURS, series):
            window = _window(len(values))
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
            ax.plot(steps, moving_average(values, window), color=colour, linewidth=2, label=label)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle("   ".join(s for s in (ce_summary(results), smoothing_note(len(rows))) if s), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def svg_panel(title: str, series: list, empty: str | None, width: int = 380, height: int = 200) -> str:
    """One curve panel as inline SVG (the same content as a plot_curves panel)."""
    left, right, top, bottom = 44, 8, 20, 34
    w, h = width - left - right, height - top - bottom
    out = [f'<svg width="{width}" height="{height}" role="img"><text x="{width / 2}" y="13" '
           f'text-anchor="middle" font-weight="bold">{html.escape(title)}</text>']
    if empty:
        out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#f7f7f7"/>'
                   f'<foreignObject x="{left + 6}" y="{top + 6}" width="{w - 12}" height="{h - 12}">'
                   f'<div xmlns="http://www.w3.org/1999/xhtml" style="font:12px sans-serif;color:#555">'
                   f"{html.escape(empty)}</div></foreignObject></svg>")
        return "".join(out)
    xs = [x for s in series for x in s[1]]
    ys = [y for s in series for y in s[2]]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def pts(steps, values):
        return " ".join(f"{left + (x - x0) / (x1 - x0) * w:.1f},{top + (1 - (y - y0) / (y1 - y0)) * h:.1f}"
                        for x, y in zip(steps, values))
    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#bbb"/>'
               f'<text x="{left - 3}" y="{top + 8}" text-anchor="end">{y1:.3g}</text>'
               f'<text x="{left - 3}" y="{top + h}" text-anchor="end">{y0:.3g}</text>'
               f'<text x="{left}" y="{top + h + 13}">{x0}</text>'
               f'<text x="{left + w}" y="{top + h + 13}" text-anchor="end">{x1}</text>'
               f'<text x="{left + w / 2}" y="{top + h + 13}" text-anchor="middle">step</text>')
    for k, (colour, (label, steps, values)) in enumerate(zip(COLOURS, series)):
        ma = moving_average(values, _window(len(values)))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-opacity="0.3" points="{pts(steps, values)}"/>'
                   f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts(steps, ma)}"/>'
                   f'<text x="{left + 4 + 120 * k}" y="{top + h + 28}" fill="{colour}">{html.escape(label)}</text>')
    return "".join(out) + "</svg>"


def write_index(output_dir: str, results: dict | None = None) -> str:
    """<output_dir>/rollouts/index.html: the curves (inline SVG, from metrics.jsonl) and a link to
    every step page written so far, with that step's reward."""
    rows = read_metrics(os.path.join(output_dir, "metrics.jsonl"))
    by_step = {r["step"]: r for r in rows}
    body = [f"<h1>GRPO run {html.escape(os.path.basename(os.path.abspath(output_dir)))}</h1>"]
    if ce_summary(results):
        body.append(f"<p><b>{html.escape(ce_summary(results))}</b></p>")
    body.append(f'<p class="muted">{smoothing_note(len(rows)).capitalize()}.</p>')
    body.append("<div>" + "".join(svg_panel(*p) for p in curve_panels(rows)) + "</div>")
    if os.path.isfile(os.path.join(output_dir, "curves.png")):
        body.append('<p>The same curves with matplotlib: <a href="../curves.png">curves.png</a></p>')
    links = []
    for path in sorted(glob.glob(os.path.join(output_dir, "rollouts", "step-*.html"))):
        step = int(os.path.basename(path)[5:-5])
        reward = f" reward {by_step[step]['reward']:.4f}" if "reward" in by_step.get(step, {}) else ""
        links.append(f'<li><a href="{os.path.basename(path)}">step {step}</a>{reward}</li>')
    body.append("<h2>Rollouts</h2><ul>" + ("".join(links) or "<li>none written yet</li>") + "</ul>")
    return _write(os.path.join(output_dir, "rollouts", "index.html"), _page("GRPO run", "\n".join(body)))


# ----------------------------------------------------------------------------- evaluation report

def bar_chart(per_observation: dict, out_png: str) -> str:
    """Precision / recall / F1 per observation: a PNG at out_png (returns an <img>), or inline SVG
    without matplotlib."""
    names = list(per_observation)
    metrics = ("precision", "recall", "f1")
    plt = pyplot()
    if plt is None:
        return _svg_bars(per_observation, metrics)
    fig, ax = plt.subplots(figsize=(12, 3.6))
    for k, m in enumerate(metrics):
        ax.bar([i + (k - 1) * 0.27 for i in range(len(names))], [per_observation[n][m] for n in names],
               width=0.27, color=COLOURS[k], label=m)
    ax.set_xticks(range(len(names)), [f"{n} ({per_observation[n]['support']})" for n in names],
                  rotation=30, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("per observation, positive only (in brackets: reference positives)", fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return f'<img src="{os.path.basename(out_png)}" alt="precision, recall and F1 per observation">'


def _svg_bars(per_observation: dict, metrics) -> str:
    width, row = 640, 15
    out = [f'<svg width="{width}" height="{row * 4 * len(per_observation) + 20}" role="img">']
    y = 10
    for name, m in per_observation.items():
        out.append(f'<text x="0" y="{y + 11}">{html.escape(name)} ({m["support"]})</text>')
        for k, key in enumerate(metrics):
            out.append(f'<rect x="200" y="{y + row * (k + 1) - 12}" width="{400 * m[key]:.1f}" height="{row - 3}" '
                       f'fill="{COLOURS[k]}"/><text x="{205 + 400 * m[key]:.1f}" y="{y + row * (k + 1) - 2}">'
                       f"{key} {m[key]:.3f}</text>")
        y += row * 4
    return "".join(out) + "</svg>"


def _agreement(reference, generated) -> str:
    """Both label rows, one column per observation; the columns where they differ are shaded."""
    differ = [int(a) != int(b) for a, b in zip(reference, generated)]
    cls = ['class="differ"' if d else "" for d in differ]
    rows = [("reference", [chip(c, code) for c, code in enumerate(reference)]),
            ("generated", [chip(c, code, reference[c]) for c, code in enumerate(generated)])]
    table = "".join(f"<tr><th>{name}</th>" + "".join(f"<td {k}>{x}</td>" for k, x in zip(cls, row)) + "</tr>"
                    for name, row in rows)
    return (f'<table class="agree">{table}</table>'
            f'<span class="muted">{len(differ) - sum(differ)} of {len(differ)} observations agree</span>')


def _eval_study(record: dict, image_paths: list, folder: str, n: int, open_: bool) -> str:
    ref, gen = record["reference_labels"], record["report_labels"]
    differ = [SHORT_NAMES[c] for c, (a, b) in enumerate(zip(ref, gen)) if int(a) != int(b)]
    views = "".join(thumbnail(p, 96, folder, f"{n}-{v}") for v, p in enumerate(image_paths))
    text = record.get("generated", record["report"])
    return (f'<details{" open" if open_ else ""} id="study-{html.escape(record["id"])}">'
            f'<summary><b>{html.escape(record["id"])}</b> <span class="muted">'
            f"{len(ref) - len(differ)}/{len(ref)} labels agree{'; differ: ' + ', '.join(differ) if differ else ''}"
            "</span></summary>"
            f'<div class="top"><div class="views">{views}</div><div class="text">'
            f"<b>Reference</b><br>{html.escape(record['reference'])}<br><b>Generated</b><br>"
            f'<span class="completion">{completion_html(text)}</span>{_agreement(ref, gen)}</div></div></details>')


def write_eval_report(output_dir: str, records: list[dict], scores: dict, *, labeler: str = "CheXbert",
                      image_paths: dict | None = None, open_below: int = 20) -> str:
    """<output_dir>/report.html for evaluate.py; returns its path.

    records: predictions records ({"id", "reference", "report", "generated" (optional),
    "report_labels", "reference_labels"}); scores: what evaluate.score_records returned;
    image_paths: {study id: [image files]} (None, e.g. from --predictions: no views shown).
    Each study is a <details> block, open when there are fewer than `open_below` studies.
    """
    image_paths = image_paths or {}
    os.makedirs(output_dir, exist_ok=True)
    chart = bar_chart(scores["per_observation"], os.path.join(output_dir, "per_observation.png"))
    body = ["<h1>Evaluation report</h1>",
            f'<p class="muted">{len(records)} studies, labels from {html.escape(str(labeler))}.</p>',
            f"<pre>{html.escape(format_table(scores, labeler=labeler))}</pre>", chart, legend(),
            "<h2>Studies</h2>"]
    folder = os.path.join(output_dir, "report_views")
    body += [_eval_study(r, image_paths.get(r["id"], []), folder, n, len(records) < open_below)
             for n, r in enumerate(records)]
    return _write(os.path.join(output_dir, "report.html"), _page("Evaluation report", "\n".join(body)))
