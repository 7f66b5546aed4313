"""Evaluation metrics for generated reports: clinical efficacy (CE) and language (NLG).

Clinical efficacy compares CheXbert labels of the generated and the reference
reports: code matrices [N, 14] (0 blank, 1 positive, 2 negative, 3 uncertain,
columns in `mrgr1.labels.CONDITIONS` order). Papers disagree on how to turn
them into one number, so `ce_scores` computes every convention in use and
names each one:

  ce_micro/*    positive only (uncertain, negative, blank -> 0), the 14
                observations, counts summed over classes then P/R/F1: the
                R2GenCMN `compute_ce.py` convention (sklearn average="micro").
  ce_macro/*    same binarisation, P/R/F1 per observation then the mean over
                the 14 (sklearn average="macro"): R2GenCMN `compute_ce.py`.
  ce_example/*  same binarisation, P/R/F1 per report then the mean over
                reports: the PromptMRG `metrics_clinical.py` convention.
  ce_micro_13/*, ce_macro_13/*
                ce_micro / ce_macro over the 13 observations other than No
                Finding (the ones MCCS rewards). No Finding is positive in most
                references of both data sets (and in an empty report's labels),
                so it alone lifts the 14-observation figures of reports that
                say nothing; these two leave it out.
  chexbert_14/*, chexbert_5/*
                uncertain counted as positive (codes 1 and 3 -> 1): the
                f1chexbert / RadEval "rrg" convention; micro and macro F1 over
                all 14 and over the 5 (Cardiomegaly, Edema, Consolidation,
                Atelectasis, Pleural Effusion), and the 5-label exact-match
                accuracy (sklearn accuracy_score on multilabel rows).

Division by zero gives 0 everywhere (sklearn's zero_division=0 behaviour), so
an observation with no positives in either matrix scores P = R = F1 = 0 and
still counts in the macro mean; a report with no positives in either scores 0
in ce_example, as in PromptMRG. The MRG-R1 paper reports CE-F1 51.88 (IU X-Ray)
and 40.39 (MIMIC-CXR) without saying which convention it used.

Language metrics follow the COCO caption evaluation (pycocoevalcap): corpus
BLEU-1..4 with the "closest" reference length, ROUGE-L (LCS F-measure,
beta 1.2) and CIDEr-D (sigma 6, clipping, length penalty, x10). Its PTB
tokenizer is Java; `coco_tokenize` is a documented Python approximation.
METEOR (Java + WordNet in its reference implementation) is left out.
Note: R2Gen-family code (R2Gen, R2GenCMN, PromptMRG) skips the PTB tokenizer
and keeps "." as a token, so their BLEU is not directly comparable with ours;
pass `tokenize=str.split` on text cleaned their way to reproduce it.

Example:
    >>> from mrgr1.metrics import ce_scores, nlg_scores, format_table
    >>> scores = ce_scores(gen_labels, ref_labels)        # [N, 14] each
    >>> scores.update(nlg_scores(gen_reports, ref_reports))
    >>> print(format_table(scores))
"""
import math
import re
from collections import Counter

import numpy as np

from mrgr1.labels import CONDITIONS, NO_FINDING, POSITIVE, UNCERTAIN

FIVE_OBSERVATIONS = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
_FIVE_IDX = [CONDITIONS.index(name) for name in FIVE_OBSERVATIONS]
_THIRTEEN_IDX = [c for c in range(len(CONDITIONS)) if c != NO_FINDING]  # the observations MCCS uses

# ----------------------------------------------------------------------------
# Clinical efficacy
# ----------------------------------------------------------------------------


def _as_codes(labels, name: str) -> np.ndarray:
    """Any torch tensor / numpy array / nested list of CheXbert codes -> int64 [N, 14]."""
    if hasattr(labels, "detach"):  # torch.Tensor, without importing torch here
        labels = labels.detach().cpu().numpy()
    codes = np.asarray(labels)
    if codes.ndim != 2 or codes.shape[1] != len(CONDITIONS):
        raise ValueError(f"{name}: expected CheXbert codes of shape [N, {len(CONDITIONS)}] "
                         f"(columns in mrgr1.labels.CONDITIONS order), got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() > 3 or not np.all(codes == np.round(codes))):
        raise ValueError(f"{name}: CheXbert codes must be integers 0 blank, 1 positive, 2 negative, "
                         f"3 uncertain; got values {sorted(set(np.unique(codes).tolist()))}")
    return codes.astype(np.int64)


def binarize(codes: np.ndarray, uncertain_positive: bool = False) -> np.ndarray:
    """Codes [N, C] -> bool [N, C]: positive (and, if asked, uncertain) -> True."""
    positive = codes == POSITIVE
    return positive | (codes == UNCERTAIN) if uncertain_positive else positive


def _div(num, den):
    """num / den elementwise, 0 where den == 0 (sklearn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _counts(pred: np.ndarray, ref: np.ndarray, axis: int):
    """True/false positives and false negatives of bool [N, C] summed along `axis`."""
    tp = (pred & ref).sum(axis)
    fp = (pred & ~ref).sum(axis)
    fn = (~pred & ref).sum(axis)
    return tp, fp, fn


def _prf(tp, fp, fn):
    """Precision tp/(tp+fp), recall tp/(tp+fn), F1 2tp/(2tp+fp+fn) (= 2PR/(P+R)); 0/0 -> 0."""
    return _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)


def _triple(prefix: str, p, r, f) -> dict:
    return {f"{prefix}/precision": float(p), f"{prefix}/recall": float(r), f"{prefix}/f1": float(f)}


def ce_micro(pred: np.ndarray, ref: np.ndarray, prefix: str = "ce_micro") -> dict:
    """Micro P/R/F1: counts summed over all reports and observations, bool [N, C] inputs.

    Example: tp=2, fp=2, fn=1 -> P = 2/4, R = 2/3, F1 = 4/7.
    """
    tp, fp, fn = (c.sum() for c in _counts(pred, ref, axis=0))
    return _triple(prefix, *_prf(tp, fp, fn))


def ce_macro(pred: np.ndarray, ref: np.ndarray, prefix: str = "ce_macro") -> dict:
    """Macro P/R/F1: P/R/F1 of each observation (column), then the plain mean over columns.

    Columns without any positive (support 0) score 0 and still count.
    """
    p, r, f = _prf(*_counts(pred, ref, axis=0))  # each [C]
    return _triple(prefix, p.mean(), r.mean(), f.mean())


def ce_example(pred: np.ndarray, ref: np.ndarray) -> dict:
    """Example-based P/R/F1: P/R/F1 of each report's positive set, then the mean over reports.

    F1_i = tp_i / (tp_i + (fp_i + fn_i) / 2); a report with no positives in
    either matrix scores 0 (PromptMRG's nan_to_num), not 1.
    """
    p, r, f = _prf(*_counts(pred, ref, axis=1))  # each [N]
    return _triple("ce_example", p.mean(), r.mean(), f.mean())


def chexbert_f1(pred: np.ndarray, ref: np.ndarray, prefix: str) -> dict:
    """Micro and macro F1 over the given columns (f1chexbert's classification_report)."""
    tp, fp, fn = _counts(pred, ref, axis=0)  # each [C]
    micro = _prf(tp.sum(), fp.sum(), fn.sum())[2]
    macro = _prf(tp, fp, fn)[2].mean()
    return {f"{prefix}/micro_f1": float(micro), f"{prefix}/macro_f1": float(macro)}


def exact_match_accuracy(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of reports whose bool label rows match exactly (multilabel accuracy_score)."""
    return float(np.all(pred == ref, axis=1).mean())


def per_observation(pred: np.ndarray, ref: np.ndarray) -> dict:
    """{condition: {precision, recall, f1, support}} with support = reference positives."""
    tp, fp, fn = _counts(pred, ref, axis=0)
    p, r, f = _prf(tp, fp, fn)
    return {name: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                   "support": int(tp[c] + fn[c])} for c, name in enumerate(CONDITIONS)}


def ce_scores(pred_labels, ref_labels) -> dict:
    """Every CE convention from CheXbert codes of generated and reference reports.

    Args:
        pred_labels, ref_labels: [N, 14] CheXbert codes (torch or numpy).
    Returns a flat dict of floats (keys in the module docstring, plus
    "num_reports") and "per_observation": {condition: {precision, recall, f1,
    support}} under the positive-only binarisation of ce_micro / ce_macro.
    """
    pred, ref = _as_codes(pred_labels, "pred_labels"), _as_codes(ref_labels, "ref_labels")
    if pred.shape != ref.shape:
        raise ValueError(f"pred_labels has {pred.shape[0]} reports but ref_labels has "
                         f"{ref.shape[0]}: give one generated report per reference")
    if pred.shape[0] == 0:
        raise ValueError("ce_scores got 0 reports: nothing to score")
    pos_pred, pos_ref = binarize(pred), binarize(ref)
    unc_pred, unc_ref = binarize(pred, uncertain_positive=True), binarize(ref, uncertain_positive=True)
    scores = {"num_reports": float(pred.shape[0])}
    scores.update(ce_micro(pos_pred, pos_ref))
    scores.update(ce_macro(pos_pred, pos_ref))
    scores.update(ce_example(pos_pred, pos_ref))
    pos_pred_13, pos_ref_13 = pos_pred[:, _THIRTEEN_IDX], pos_ref[:, _THIRTEEN_IDX]  # [N, 13]
    scores.update(ce_micro(pos_pred_13, pos_ref_13, "ce_micro_13"))
    scores.update(ce_macro(pos_pred_13, pos_ref_13, "ce_macro_13"))
    scores.update(chexbert_f1(unc_pred, unc_ref, "chexbert_14"))
    five_pred, five_ref = unc_pred[:, _FIVE_IDX], unc_ref[:, _FIVE_IDX]  # [N, 5]
    scores.update(chexbert_f1(five_pred, five_ref, "chexbert_5"))
    scores["chexbert_5/accuracy"] = exact_match_accuracy(five_pred, five_ref)
    scores["per_observation"] = per_observation(pos_pred, pos_ref)
    return scores


# ----------------------------------------------------------------------------
# Language metrics (COCO caption evaluation)
# ----------------------------------------------------------------------------

# Tokens pycocoevalcap drops after PTB tokenisation, plus the raw characters
# that PTB first rewrites into one of them ("(" -> -LRB-, '"' -> `` or '').
_PUNCTUATION = {"''", "'", "``", "`", '"', "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_TOKEN = re.compile(
    r"\d+(?:[.,]\d+)+"           # numbers stay whole: 1.5, 1,000
    r"|\w+(?=n't\b)|n't"         # don't -> do n't
    r"|'(?:s|re|ve|ll|d|m)\b"    # clitics split off: patient's -> patient 's
    r"|\w+(?:[-/]\w+)*"          # words, hyphen/slash compounds stay whole: x-ray, pa/lateral
    r"|\.\.\.|--|\S"             # anything else: one punctuation mark per token
)


def coco_tokenize(text: str) -> list[str]:
    """Approximate pycocoevalcap's PTBTokenizer (Java, -lowerCase) + punctuation removal.

    Lowercase, split words from punctuation as PTB does for report text, drop
    the tokens pycocoevalcap drops (. , ; : ? ! - -- ... quotes, brackets).
    An approximation: PTB keeps abbreviations like "e.g." whole (we split
    them) and rewrites square brackets to -lsb-/-rsb- (we keep "[" "]").
    Example: "No effusion, pneumothorax (or) x-ray's 1.5 cm." ->
             ["no", "effusion", "pneumothorax", "or", "x-ray", "'s", "1.5", "cm"]
    """
    return [t for t in _TOKEN.findall(text.lower()) if t not in _PUNCTUATION]


def ngram_counts(tokens: list[str], n: int) -> Counter:
    """Counts of every 1..n-gram (as tuples) of a token list."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _closest_length(ref_lengths: list[int], hyp_length: int) -> int:
    """The reference length closest to the hypothesis; ties go to the shorter (coco's min of tuples)."""
    return min(ref_lengths, key=lambda length: (abs(length - hyp_length), length))


def bleu(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's BleuScorer(option="closest").

    p_k = sum_i clipped k-gram matches_i / sum_i hypothesis k-grams_i,
    BLEU-n = BP * (p_1 * ... * p_n) ** (1/n),
    BP = exp(1 - r/c) if c < r else 1, c = total hypothesis length, r = total
    closest reference length. Like coco, 1e-15 / 1e-9 are added to numerators
    / denominators so a zero count gives a tiny score instead of 0/0.
    """
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        max_ref = Counter()  # clip each n-gram at its largest count in any one reference
        for r in rs:
            max_ref |= ngram_counts(r, n)
        for gram, count in ngram_counts(hyp, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(1, n + 1):
            guess[k - 1] += max(0, len(hyp) - k + 1)
        hyp_len += len(hyp)
        ref_len += _closest_length([len(r) for r in rs], len(hyp))
    ratio = (hyp_len + tiny) / (ref_len + small)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(brevity * product ** (1 / (k + 1)))
    return scores


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hyps: list[list[str]], refs: list[list[list[str]]], beta: float = 1.2) -> float:
    """Mean over reports of ROUGE-L F = (1 + beta^2) P R / (R + beta^2 P), as pycocoevalcap.

    P = max over references of LCS / |hyp|, R = max over references of LCS / |ref|
    (the two maxima may come from different references). Empty text scores 0.
    """
    scores = []
    for hyp, rs in zip(hyps, refs):
        lcs = [lcs_length(ref, hyp) for ref in rs]
        p = max(_div(lcs, [len(hyp)] * len(rs)))
        r = max(_div(lcs, [len(ref) for ref in rs]))
        scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
    return float(np.mean(scores))


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float, n: int):
    """n-gram counts -> per-order tf-idf vectors, their norms, and coco's "length".

    idf(g) = log(N) - log(max(1, df(g))), df counted over the reference sets.
    coco's length counts bigrams (a quirk kept here: for 2+ words it differs
    from the word count by 1 on both sides, so the length gap is the same).
    """
    vecs = [dict() for _ in range(n)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vecs]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, norms, length


def _cider_similarity(hyp, ref, sigma: float) -> np.ndarray:
    """Clipped cosine per n-gram order times the Gaussian length penalty exp(-delta^2 / 2 sigma^2)."""
    (h_vecs, h_norms, h_len), (r_vecs, r_norms, r_len) = hyp, ref
    sims = np.zeros(len(h_vecs))
    for k, (hv, rv) in enumerate(zip(h_vecs, r_vecs)):
        dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in hv.items())  # clipped
        sims[k] = dot / (h_norms[k] * r_norms[k]) if h_norms[k] and r_norms[k] else 0.0
    return sims * math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))


def cider_d(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D as pycocoevalcap's CiderScorer (document frequencies from these references).

    CIDEr-D_i = 10 * mean_k (1/M_i) sum_j clipped_cos_k(hyp_i, ref_ij) * exp(-delta_ij^2 / (2 sigma^2));
    the corpus score is the mean over reports. With one report, idf is 0 and so is CIDEr-D.
    """
    ref_counts = [[ngram_counts(r, n) for r in rs] for rs in refs]
    doc_freq = Counter(g for rs in ref_counts for g in set().union(*rs))
    log_num_docs = math.log(len(refs))
    scores = []
    for hyp, rs in zip(hyps, ref_counts):
        h = _tfidf(ngram_counts(hyp, n), doc_freq, log_num_docs, n)
        total = sum(_cider_similarity(h, _tfidf(r, doc_freq, log_num_docs, n), sigma) for r in rs)
        scores.append(10.0 * float(np.mean(total)) / len(rs))
    return float(np.mean(scores))


def _as_reference_lists(references) -> list[list[str]]:
    """Each reference may be one string or a non-empty list of strings."""
    out = []
    for i, ref in enumerate(references):
        rs = [ref] if isinstance(ref, str) else list(ref)
        if not rs or not all(isinstance(r, str) for r in rs):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings, got {ref!r}")
        out.append(rs)
    return out


def nlg_scores(hypotheses: list[str], references, tokenize=coco_tokenize) -> dict:
    """BLEU-1..4, ROUGE-L and CIDEr-D of generated reports, COCO style.

    Args:
        hypotheses: one generated report per study.
        references: one reference (a string, or a list of strings) per study.
        tokenize: text -> tokens; `coco_tokenize` (default) approximates the
            COCO PTB tokenizer; `str.split` scores pre-tokenised text as is.
    Returns {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}.
    """
    if isinstance(hypotheses, str) or not all(isinstance(h, str) for h in hypotheses):
        raise ValueError("hypotheses must be a list of strings (one generated report per study)")
    refs = _as_reference_lists(references)
    if len(hypotheses) != len(refs) or not refs:
        raise ValueError(f"got {len(hypotheses)} hypotheses and {len(refs)} references: "
                         "give one generated report per reference, at least one")
    hyp_tokens = [tokenize(h) for h in hypotheses]
    ref_tokens = [[tokenize(r) for r in rs] for rs in refs]
    scores = {f"bleu_{k + 1}": b for k, b in enumerate(bleu(hyp_tokens, ref_tokens))}
    scores["rouge_l"] = rouge_l(hyp_tokens, ref_tokens)
    scores["cider_d"] = cider_d(hyp_tokens, ref_tokens)
    return scores


# ----------------------------------------------------------------------------
# Report table
# ----------------------------------------------------------------------------

_CE_ROWS = [
    ("ce_micro", "positive only, micro over 14 obs (R2GenCMN compute_ce)"),
    ("ce_macro", "positive only, macro over 14 obs (R2GenCMN compute_ce)"),
    ("ce_example", "positive only, per report then mean (PromptMRG)"),
    ("ce_micro_13", "positive only, micro over 13 obs (No Finding left out)"),
    ("ce_macro_13", "positive only, macro over 13 obs (No Finding left out)"),
]
_CHEXBERT_ROWS = [
    ("chexbert_14", "uncertain = positive, 14 obs (f1chexbert / RadEval rrg)"),
    ("chexbert_5", "uncertain = positive, 5 obs (f1chexbert / RadEval rrg)"),
]
_NLG_ROWS = [("bleu_1", "BLEU-1"), ("bleu_2", "BLEU-2"), ("bleu_3", "BLEU-3"), ("bleu_4", "BLEU-4"),
             ("rouge_l", "ROUGE-L (LCS F, beta 1.2)"), ("cider_d", "CIDEr-D (sigma 6, x10)")]


# F1 columns of the baseline comparison: (score key, column title)
_BASELINE_COLUMNS = [("ce_micro/f1", "micro14"), ("ce_macro/f1", "macro14"), ("ce_example/f1", "example"),
                     ("ce_micro_13/f1", "micro13"), ("ce_macro_13/f1", "macro13"),
                     ("chexbert_14/micro_f1", "chxb14"), ("chexbert_5/micro_f1", "chxb5")]
BASELINES = [("empty", "an empty report"), ("most_common", "the most common training report"),
             ("random", "a random training report")]  # key in "baseline/<key>/...", what it is


def _ce_header(scores: dict, labeler: str) -> str:
    """'Clinical efficacy (100 reports, rules labels; 2 empty, 5 without a <report> section)'."""
    counts = [f"{int(scores[key])} {what}" for key, what in (
        ("num_empty_reports", "empty"), ("num_unparseable_reports", "without a <report> section"))
        if key in scores]
    return (f"Clinical efficacy ({int(scores.get('num_reports', 0))} reports, {labeler} labels"
            + ("; " + ", ".join(counts) if counts else "") + ")")


def _baseline_lines(scores: dict) -> list[str]:
    """F1 of the scored reports beside the trivial baselines' (keys "baseline/<name>/<score key>")."""
    rows = [(what, f"baseline/{key}/") for key, what in BASELINES if f"baseline/{key}/ce_micro/f1" in scores]
    if not rows:
        return []
    lines = ["", "F1 beside reports that need no model (same studies, same labeler)",
             f"{'':<34}" + "".join(f"{title:>9}" for _, title in _BASELINE_COLUMNS)]
    for what, prefix in [("the scored reports", "")] + rows:
        lines.append(f"{what:<34}" + "".join(f"{scores[prefix + key]:9.4f}" for key, _ in _BASELINE_COLUMNS))
    return lines


def format_table(scores: dict, labeler: str = "CheXbert") -> str:
    """A readable table of whatever `ce_scores` / `nlg_scores` keys `scores` holds; `labeler` names
    what produced the labels (the rule-based labeler for the demo). Keys from
    `mrgr1.baselines.trivial_baselines` add the baseline comparison; "num_empty_reports" /
    "num_unparseable_reports" (`mrgr1.baselines.report_counts`) go into the CE header."""
    lines, W = [], 72  # W: width of the convention column
    if "ce_micro/f1" in scores:
        lines += [_ce_header(scores, labeler), f"{'convention':<{W}}{'P':>8}{'R':>8}{'F1':>8}"]
        for key, what in _CE_ROWS:
            p, r, f = (scores[f"{key}/{m}"] for m in ("precision", "recall", "f1"))
            lines.append(f"{key + '  ' + what:<{W}}{p:8.4f}{r:8.4f}{f:8.4f}")
        lines.append(f"{'':<{W}}{'micro F1':>12}{'macro F1':>12}{'acc':>8}")
        for key, what in _CHEXBERT_ROWS:
            acc = f"{scores[key + '/accuracy']:8.4f}" if key + "/accuracy" in scores else ""
            lines.append(f"{key + '  ' + what:<{W}}{scores[key + '/micro_f1']:12.4f}"
                         f"{scores[key + '/macro_f1']:12.4f}{acc}")
        lines += _baseline_lines(scores)
    if "per_observation" in scores:
        lines += ["", f"{'per observation (positive only)':<32}{'P':>8}{'R':>8}{'F1':>8}{'support':>9}"]
        for name, m in scores["per_observation"].items():
            lines.append(f"{name:<32}{m['precision']:8.4f}{m['recall']:8.4f}{m['f1']:8.4f}{m['support']:9d}")
    nlg = [(what, scores[key]) for key, what in _NLG_ROWS if key in scores]
    if nlg:
        lines += ["", "Language (COCO caption evaluation, approximate PTB tokens; METEOR not computed)"]
        lines += [f"{what:<32}{value:8.4f}" for what, value in nlg]
    return "\n".join(lines)
