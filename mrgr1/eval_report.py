"""The evaluation report: evaluate.py's scores and every study with both reports, as one HTML page.

    <eval>/report.html           the CE and NLG tables (as metrics.format_table prints them), the
                                 per-observation chart, then every study: its views, the reference
                                 and the generated report, both label rows side by side
    <eval>/per_observation.png   that chart (mrgr1/charts.py; none without matplotlib)
    <eval>/report_views/         the studies' thumbnails, linked, so a report of thousands of
                                 MIMIC-CXR studies stays light

Example:
    eval_report.write_eval_report("runs/demo/eval", records, scores, labeler="rules",
                                  image_paths={s.id: s.image_paths for s in studies})
"""
from __future__ import annotations

import html
import os

from . import charts
from .metrics import format_table
from .pages import SHORT_NAMES, chart, chip, completion_html, legend, thumbnail, write_page


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


def _study(record: dict, image_paths: list, folder: str, n: int, open_: bool) -> str:
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
    page = os.path.join(output_dir, "report.html")
    os.makedirs(output_dir, exist_ok=True)
    png = charts.plot_observations(scores["per_observation"], os.path.join(output_dir, "per_observation.png"))
    body = ["<h1>Evaluation report</h1>",
            f'<p class="muted">{len(records)} studies, labels from {html.escape(str(labeler))}.</p>',
            f"<pre>{html.escape(format_table(scores, labeler=labeler))}</pre>",
            chart(png, page, "precision, recall and F1 per observation"), legend(), "<h2>Studies</h2>"]
    folder = os.path.join(output_dir, "report_views")
    body += [_study(r, image_paths.get(r["id"], []), folder, n, len(records) < open_below)
             for n, r in enumerate(records)]
    return write_page(page, "Evaluation report", "\n".join(body))
