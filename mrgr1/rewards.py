"""Rewards for MRG-R1: the clinical MCCS reward, the format reward, and their sum.

MRG-R1 (arXiv 2512.16145) rewards a completion with
    R = 0.75 * MCCS + 0.25 * format                      (weights: config values)
- MCCS (margin-based cosine similarity of CheXbert labels): label the generated
  report and the reference with CheXbert, turn the 13 observations other than
  "No Finding" into signed vectors v_hat (generated) and v (reference), take
  CCS = cos(v_hat, v) and shape it with a margin m:  MCCS = max((CCS - m)/(1 - m), 0).
- format: 1 when the completion is `<think>...</think><report>...</report>`.
For the paper's ablations the clinical part can be swapped for a per-report
CE-F1 reward or a sentence-BLEU-4 lexical reward (`kind="ce_f1" | "bleu"`).

The paper does not publish the margin m: the run configuration's default (0.5) is ours.

Example:
    >>> labeler = CheXbert.from_pretrained(weights, vocab)  # or any object with .label(list[str])
    >>> cache = {}                # reference labels by report text, kept across steps
    >>> total, parts = compute_rewards(completions, ref_reports, labeler, weights={"mccs": 0.75,
    ...     "format": 0.25}, margin=0.5, mapping=(0, 1, -1, 1), cache=cache)
    >>> total.shape, sorted(parts)   # (torch.Size([N]), ['format', 'mccs'])
"""
import math
import re
from collections import Counter

import torch

from mrgr1.labels import BLANK, CONDITIONS, NEGATIVE, NO_FINDING, POSITIVE, UNCERTAIN

KINDS = ("mccs", "ce_f1", "bleu")


# ----------------------------------------------------------------------------- MCCS

def _check_labels(labels: torch.Tensor, name: str) -> None:
    if labels.dim() != 2 or labels.shape[1] != len(CONDITIONS):
        raise ValueError(f"{name} must be CheXbert codes of shape [N, {len(CONDITIONS)}], "
                         f"got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() > 3):
        raise ValueError(f"{name} holds codes outside 0..3 (0 blank, 1 positive, 2 negative, "
                         f"3 uncertain): min {int(labels.min())}, max {int(labels.max())}")


def _mapping_table(mapping) -> torch.Tensor:
    """dict {code: value} or a sequence indexed by code -> float tensor [4]."""
    if isinstance(mapping, dict):
        missing = {BLANK, POSITIVE, NEGATIVE, UNCERTAIN} - set(mapping)
        if missing:
            raise ValueError(f"label mapping lacks codes {sorted(missing)}; give a value for each of "
                             f"0 blank, 1 positive, 2 negative, 3 uncertain")
        mapping = [mapping[c] for c in (BLANK, POSITIVE, NEGATIVE, UNCERTAIN)]
    if len(mapping) != 4:
        raise ValueError(f"label mapping needs 4 values (blank, positive, negative, uncertain), "
                         f"got {len(mapping)}")
    return torch.tensor([float(v) for v in mapping])


def signed_vectors(labels: torch.Tensor, mapping) -> torch.Tensor:
    """CheXbert codes [N, 14] -> signed vectors v [N, 13] (No Finding dropped).

    Worked example (the paper's mapping: positive 1, negative -1, uncertain 1, blank 0):
        Cardiomegaly positive, Edema negative, Atelectasis uncertain, No Finding any
        -> v has 1 at Cardiomegaly, -1 at Edema, 1 at Atelectasis, 0 elsewhere.
    """
    _check_labels(labels, "labels")
    table = _mapping_table(mapping).to(labels.device)
    keep = [i for i in range(len(CONDITIONS)) if i != NO_FINDING]
    return table[labels[:, keep].long()]  # [N, 13]


def ccs(v_hat: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Clinical cosine similarity CCS = v_hat . v / (|v_hat| |v|), per row -> [N].

    Zero vectors (nothing mentioned): both zero -> CCS = 1 (the reports agree),
    exactly one zero -> CCS = 0.
    Worked example: v_hat = (1, 0, 1, 1), v = (1, 1, 1, 1)
        v_hat . v = 3,  |v_hat| = sqrt(3),  |v| = 2,  CCS = 3 / (2 sqrt 3) = 0.8660
    """
    dot = (v_hat * v).sum(-1)                                   # [N]
    norms = v_hat.norm(dim=-1) * v.norm(dim=-1)                 # [N]
    cos = dot / norms.clamp_min(1e-12)
    hat_zero, ref_zero = v_hat.norm(dim=-1) == 0, v.norm(dim=-1) == 0
    cos = torch.where(hat_zero | ref_zero, 0.0, cos)
    return torch.where(hat_zero & ref_zero, 1.0, cos)


def mccs(gen_labels: torch.Tensor, ref_labels: torch.Tensor, margin: float, mapping) -> torch.Tensor:
    """Margin-based CCS: MCCS = max((CCS - m) / (1 - m), 0), per report -> [N] in [0, 1].

    gen_labels, ref_labels: CheXbert codes [N, 14]. m = `margin` (ours: 0.5, not published).
    Worked example with m = 0.5: CCS = 0.8660 (see `ccs`) -> (0.8660 - 0.5) / 0.5 = 0.7321;
    CCS below m -> 0, so only reports that mostly agree with the reference earn reward.
    """
    if not -1.0 <= margin < 1.0:
        raise ValueError(f"MCCS margin must lie in [-1, 1), got {margin}")
    if gen_labels.shape != ref_labels.shape:
        raise ValueError(f"gen_labels {tuple(gen_labels.shape)} and ref_labels "
                         f"{tuple(ref_labels.shape)} must have the same shape [N, 14]")
    c = ccs(signed_vectors(gen_labels, mapping), signed_vectors(ref_labels, mapping))
    return ((c - margin) / (1.0 - margin)).clamp_min(0.0)


def ce_f1_reward(gen_labels: torch.Tensor, ref_labels: torch.Tensor) -> torch.Tensor:
    """Per-report F1 of the positive findings over all 14 observations -> [N] (ablation reward).

    An observation counts as predicted/true when its code is POSITIVE (1); blank, negative and
    uncertain count as absent. F1 = 2 TP / (2 TP + FP + FN). When neither report has a positive
    observation (0/0) we define F1 = 1 (they agree), as CCS does for two zero vectors (ours).
    Worked example: gen positive {Cardiomegaly, Edema}, ref positive {Cardiomegaly, Effusion}
        TP = 1, FP = 1, FN = 1 -> F1 = 2 / (2 + 1 + 1) = 0.5
    """
    _check_labels(gen_labels, "gen_labels")
    _check_labels(ref_labels, "ref_labels")
    pred, true = gen_labels == POSITIVE, ref_labels == POSITIVE          # [N, 14]
    tp = (pred & true).sum(-1).float()
    fp_fn = (pred ^ true).sum(-1).float()
    denom = 2 * tp + fp_fn
    return torch.where(denom == 0, 1.0, 2 * tp / denom.clamp_min(1.0))


# ----------------------------------------------------------------------------- lexical (BLEU)

def _words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks: "No effusion." -> ["no", "effusion", "."]."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def sentence_bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU-4 (Papineni et al., 2002) with add-one smoothing for n >= 2 (Lin & Och, 2004).

    p_n = clipped n-gram matches / hypothesis n-grams; for n >= 2, p_n = (matches + 1) / (count + 1)
    so one missing 4-gram does not zero a short sentence. p_1 is not smoothed: no shared word -> 0.
    A hypothesis with no n-grams of order n (fewer than n words) counts 1 of them, as NLTK does
    (its `SmoothingFunction().method2` gives the same numbers), so p_n = 1/2 there.
    BLEU = BP * exp(mean_n log p_n), BP = 1 if c > r else exp(1 - r / c) (c, r: word counts).
    Worked example: hyp "the heart is normal", ref "the heart is normal size"
        p_1 = 4/4, p_2 = (3+1)/(3+1), p_3 = (2+1)/(2+1), p_4 = (1+1)/(1+1); BP = exp(1 - 5/4)
        BLEU = exp(-0.25) = 0.7788
    """
    hyp, ref = _words(hypothesis), _words(reference)
    if not hyp or not ref:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matches = sum(min(c, r[g]) for g, c in h.items())
        count = max(sum(h.values()), 1)
        if n == 1 and matches == 0:
            return 0.0
        p = matches / count if n == 1 else (matches + 1) / (count + 1)
        log_p += math.log(p) / max_n
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_p)


# ----------------------------------------------------------------------------- format

_TAG = re.compile(r"</?(think|report)>")
_FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<report>(.*?)</report>\s*", re.DOTALL)


def _well_formed(text: str) -> bool:
    m = _FORMAT.fullmatch(text)
    if m is None:
        return False
    think, report = m.group(1), m.group(2)
    # non-empty sections, and no tag inside them (nested or duplicated tags)
    return all(s.strip() and not _TAG.search(s) for s in (think, report))


def format_reward(completions: list[str]) -> torch.Tensor:
    """1.0 for `<think>non-empty</think><report>non-empty</report>` (whitespace around and between
    allowed, nothing else), else 0.0 -> [N]. Decode completions with special tokens skipped.

    Examples: "<think>clear lungs</think>\n<report>Normal chest.</report>" -> 1
              "<report>Normal chest.</report>" -> 0 (no think), "<think> </think><report>x</report>"
              -> 0 (empty think), "...</report> thanks" -> 0 (extra text).
    """
    return torch.tensor([float(_well_formed(c)) for c in completions])


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def extract_report(text: str) -> str:
    """The report a completion gives, to be judged on its content even when badly formatted.

    Think blocks `<think>...</think>` are removed first. Then:
    - with `<report>`: the text after the first `<report>` up to `</report>` (or the end, if cut off);
    - without it: the rest, after a stray `</think>` (thinking opened in the prompt) and before a
      stray `<think>` (thinking cut off: it runs to the end).
    Examples: "<think>a</think><report> Normal. </report>" -> "Normal."
              "<think>a</think> Normal." -> "Normal.",  "Normal." -> "Normal.",  "<think>a" -> ""
    """
    text = _THINK_BLOCK.sub(" ", text)
    if "<report>" in text:
        return text.split("<report>", 1)[1].split("</report>", 1)[0].strip()
    text = text.rsplit("</think>", 1)[-1]
    return text.split("<think>", 1)[0].strip()


# ----------------------------------------------------------------------------- combined

def _label(labeler, reports: list[str]) -> torch.Tensor:
    labels = labeler.label(reports)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (len(reports), len(CONDITIONS)):
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{type(labeler).__name__}.label() must return a LongTensor "
                         f"[{len(reports)}, {len(CONDITIONS)}] for {len(reports)} reports, got {got}")
    return labels.long().cpu()  # rewards are tiny: keep them on the CPU, whatever the labeler uses


def reference_labels(ref_reports: list[str], labeler, cache: dict) -> torch.Tensor:
    """CheXbert codes [N, 14] of the reference reports; each distinct report is labelled once, ever.

    `cache` maps a reference report's text -> LongTensor [14]: the labels are a function of the
    text alone, so the key can never name two different things (a study id can: two studies that
    share one must not share labels). Reports not in it are labelled in one batch and added.
    With G rollouts per study the same report repeats G times in a batch: still one labelling.
    """
    todo = list(dict.fromkeys(r for r in ref_reports if r not in cache))  # distinct, in order
    if todo:
        for report, row in zip(todo, _label(labeler, todo)):
            cache[report] = row
    return torch.stack([cache[r] for r in ref_reports])  # [N, 14]


def clinical_reward(reports: list[str], ref_reports: list[str], labeler, *,
                    kind: str, margin: float, mapping, cache: dict | None = None,
                    details: dict | None = None) -> torch.Tensor:
    """The content part of the reward for extracted reports -> [N]: MCCS, CE-F1 or BLEU-4.

    An empty report scores 0 (ours): otherwise it would label as "nothing mentioned" and earn
    CCS = 1 on every study whose reference mentions nothing either.
    details: a dict to receive what the reward saw: "labels" and "ref_labels" [N, 14] (kinds
    mccs, ce_f1) and "ccs" [N] (mccs), so that a viewer shows them without labelling again.
    """
    if kind == "bleu":
        scores = torch.tensor([sentence_bleu(h, r) for h, r in zip(reports, ref_reports)])
    else:
        ref = reference_labels(ref_reports, labeler, {} if cache is None else cache)
        gen = _label(labeler, reports)
        scores = mccs(gen, ref, margin, mapping) if kind == "mccs" else ce_f1_reward(gen, ref)
        if details is not None:
            details.update(labels=gen, ref_labels=ref)
    empty = torch.tensor([not r.strip() for r in reports])
    if details is not None and kind == "mccs":  # an empty report's CCS is 0 like its reward
        details["ccs"] = torch.where(empty, 0.0, ccs(signed_vectors(gen, mapping), signed_vectors(ref, mapping)))
    return torch.where(empty, 0.0, scores.float())


def compute_rewards(completions: list[str], ref_reports: list[str], labeler, *,
                    weights: dict, margin: float, mapping, kind: str = "mccs", cache: dict | None = None,
                    details: dict | None = None):
    """Total reward R = w_kind * clinical + w_format * format for N completions.

    completions: decoded texts [N]; ref_reports: the reference report of each completion's study
    [N] (repeat it G times for G rollouts). labeler: anything with `.label(list[str]) -> [N, 14]`
    (unused for kind="bleu"). weights: {kind: w, "format": w} (the paper's: 0.75 and 0.25).
    margin, mapping: see `mccs`. cache: a dict kept by the trainer so each reference report is
    labelled once (keyed by its text). details: see `clinical_reward`.
    Returns (total [N], parts {kind: [N], "format": [N]}) so each part can be logged.
    Worked example, m = 0.5, reference "left effusion" (effusion positive):
        "<think>a</think><report>small effusion</report>" -> MCCS 1, format 1 -> R = 0.75 + 0.25 = 1.0
        "small effusion" (no tags)                         -> MCCS 1, format 0 -> R = 0.75
        "<think>a</think><report>clear lungs</report>"   -> no finding of the 13: a zero vector
                                                              against a non-zero one, CCS 0, MCCS 0,
                                                              format 1 -> R = 0.25
    """
    if kind not in KINDS:
        raise ValueError(f"reward kind must be one of {KINDS}, got {kind!r}")
    if set(weights) != {kind, "format"}:
        raise ValueError(f"reward weights need exactly the keys {{{kind!r}, 'format'}} for "
                         f"kind={kind!r}, got {sorted(weights)}")
    if len(completions) != len(ref_reports):
        raise ValueError(f"completions ({len(completions)}) and ref_reports ({len(ref_reports)}) must have "
                         f"one entry per completion")
    reports = [extract_report(c) for c in completions]
    parts = {kind: clinical_reward(reports, ref_reports, labeler, kind=kind,
                                   margin=margin, mapping=mapping, cache=cache, details=details),
             "format": format_reward(completions)}
    total = sum(weights[k] * parts[k] for k in parts)  # [N]
    return total, parts
