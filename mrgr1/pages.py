"""The parts both HTML pages share (mrgr1/rollout_viewer.py, mrgr1/eval_report.py): the page
frame and its style, label chips, completion text with its parts told apart, image thumbnails.

Pages are static files a browser opens from disk: no server, no JavaScript, no network. Labels
are CheXbert codes (0 blank, 1 positive, 2 negative, 3 uncertain) in mrgr1.labels.CONDITIONS
order, drawn as 14 coloured chips; a chip outlined in black differs from the reference's.
"""
from __future__ import annotations

import base64
import html
import io
import os
import re

from PIL import Image

from .charts import INSTALL_HINT
from .labels import CONDITIONS

SHORT_NAMES = ["EnlCM", "Cardio", "Opac", "Lesion", "Edema", "Consol", "Pneum", "Atel", "PTX",
               "Effus", "PlOth", "Fract", "Device", "NoFind"]  # chip text; the full name is its tooltip
CODE_NAMES = {0: "blank", 1: "positive", 2: "negative", 3: "uncertain"}

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
img.chart{max-width:100%}
"""


def write_page(path: str, title: str, body: str) -> str:
    """An HTML file at `path` (its folder made if needed) with the shared style; returns `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
                f"</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
    return path


def chart(png: str | None, page_path: str, alt: str) -> str:
    """The <img> of a chart PNG (linked relative to the page), or, when matplotlib drew none
    (png None), a line saying how to get it."""
    if png is None:
        return (f'<p class="muted">No chart ({html.escape(alt)}): matplotlib is not installed '
                f"(<code>{html.escape(INSTALL_HINT)}</code>).</p>")
    src = os.path.relpath(png, os.path.dirname(page_path)).replace(os.sep, "/")
    return f'<img class="chart" src="{html.escape(src)}" alt="{html.escape(alt)}">'


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
