"""Specification of mrgr1.metrics: every CE convention and BLEU / ROUGE-L / CIDEr-D, worked by hand.

Oracles: the hand arithmetic in the comments; where installed (test extras),
sklearn for the CE averages and pycocoevalcap's pure-Python scorers for the
language metrics on pre-tokenised text.
"""
import math

import numpy as np
import pytest
import torch

from mrgr1.labels import CONDITIONS
from mrgr1.metrics import (bleu, ce_scores, cider_d, coco_tokenize, format_table, lcs_length, nlg_scores,
                           rouge_l)

C = {name: i for i, name in enumerate(CONDITIONS)}
CARD, EDEMA, EFF, NF, LO, ATEL = (C["Cardiomegaly"], C["Edema"], C["Pleural Effusion"], C["No Finding"],
                                  C["Lung Opacity"], C["Atelectasis"])


def label_matrices():
    """Three reports; codes 0 blank, 1 positive, 2 negative, 3 uncertain.

    ref  r0: Cardiomegaly 1, Edema 1, Effusion 3 | r1: No Finding 1 | r2: Cardiomegaly 2, Atelectasis 3
    pred p0: Cardiomegaly 1, Edema 2, Effusion 1 | p1: No Finding 1, Lung Opacity 1 | p2: Cardiomegaly 2
    """
    ref = np.zeros((3, 14), dtype=np.int64)
    pred = np.zeros((3, 14), dtype=np.int64)
    ref[0, [CARD, EDEMA, EFF]] = [1, 1, 3]
    ref[1, NF] = 1
    ref[2, [CARD, ATEL]] = [2, 3]
    pred[0, [CARD, EDEMA, EFF]] = [1, 2, 1]
    pred[1, [NF, LO]] = [1, 1]
    pred[2, CARD] = 2
    return pred, ref


# ---------------------------------------------------------------- clinical efficacy


def assert_counts(scores: dict, prefix: str, tp: int, fp: int, fn: int) -> None:
    """precision tp / (tp + fp), recall tp / (tp + fn), F1 2 tp / (2 tp + fp + fn), counted by hand."""
    assert scores[f"{prefix}/precision"] == pytest.approx(tp / (tp + fp))
    assert scores[f"{prefix}/recall"] == pytest.approx(tp / (tp + fn))
    assert scores[f"{prefix}/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))


def test_ce_micro_counts_positive_only_over_all_cells():
    pred, ref = label_matrices()
    s = ce_scores(pred, ref)
    # positives (code 1 only): ref {Card, Edema} {NF} {} ; pred {Card, Eff} {NF, LO} {}
    # tp = Card(r0) + NF(r1) = 2; fp = Eff(p0) + LO(p1) = 2; fn = Edema(r0) = 1
    assert_counts(s, "ce_micro", tp=2, fp=2, fn=1)  # P 2/4, R 2/3, F1 4/7


def test_ce_macro_counts_classes_without_positives_as_zero():
    pred, ref = label_matrices()
    s = ce_scores(pred, ref)
    # per class (P, R, F1): Card (1,1,1), NF (1,1,1), Edema (0/0->0, 0/1, 0), Eff (0/1, 0/0->0, 0),
    # LO (0/1, 0/0->0, 0), the other 9 classes 0/0 -> 0; mean over 14 classes:
    assert s["ce_macro/precision"] == pytest.approx(2 / 14)
    assert s["ce_macro/recall"] == pytest.approx(2 / 14)
    assert s["ce_macro/f1"] == pytest.approx(2 / 14)


def test_ce_example_averages_per_report_and_scores_empty_report_zero():
    pred, ref = label_matrices()
    s = ce_scores(pred, ref)
    # r0: tp 1 (Card), fp 1 (Eff), fn 1 (Edema) -> P 1/2, R 1/2, F1 1/(1 + (1+1)/2) = 1/2
    # r1: tp 1 (NF), fp 1 (LO), fn 0             -> P 1/2, R 1,   F1 1/(1 + 1/2)     = 2/3
    # r2: no positives anywhere                  -> 0/0 -> P 0, R 0, F1 0
    assert s["ce_example/precision"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert s["ce_example/recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert s["ce_example/f1"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)  # 7/18


def test_chexbert_convention_counts_uncertain_as_positive():
    pred, ref = label_matrices()
    s = ce_scores(pred, ref)
    # positives (codes 1 or 3): ref {Card, Edema, Eff} {NF} {Atel} ; pred {Card, Eff} {NF, LO} {}
    # 14 obs: tp Card, Eff, NF = 3; fp LO = 1; fn Edema, Atel = 2 -> micro F1 = 6 / (6 + 1 + 2)
    assert s["chexbert_14/micro_f1"] == pytest.approx(6 / 9)
    # per-class F1: Card 1, Eff 1, NF 1, every other class 0 -> macro = 3/14
    assert s["chexbert_14/macro_f1"] == pytest.approx(3 / 14)
    # 5 obs (Card, Edema, Cons, Atel, Eff): tp Card, Eff = 2; fp 0; fn Edema, Atel = 2 -> 4 / (4 + 0 + 2)
    assert s["chexbert_5/micro_f1"] == pytest.approx(4 / 6)
    # per-class F1: Card 1, Eff 1, Edema 0, Atel 0, Cons 0 (no positives) -> 2/5
    assert s["chexbert_5/macro_f1"] == pytest.approx(2 / 5)
    # exact match on the 5: r0 (1,1,0,0,1) vs (1,0,0,0,1) no; r1 all 0 vs all 0 yes; r2 Atel 1 vs 0 no
    assert s["chexbert_5/accuracy"] == pytest.approx(1 / 3)


def test_per_observation_reports_precision_recall_f1_and_support():
    pred, ref = label_matrices()
    per = ce_scores(pred, ref)["per_observation"]
    assert list(per) == CONDITIONS
    assert per["Cardiomegaly"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per["Edema"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}  # missed
    assert per["Lung Opacity"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # false alarm
    assert per["Atelectasis"]["support"] == 0  # uncertain is not positive in this convention


def test_ce_scores_accepts_torch_and_returns_floats():
    pred, ref = label_matrices()
    s = ce_scores(torch.from_numpy(pred), torch.from_numpy(ref))
    assert s == ce_scores(pred, ref)
    assert s["num_reports"] == 3.0
    assert all(isinstance(v, float) for k, v in s.items() if k != "per_observation")


@pytest.mark.parametrize("pred, ref, message", [
    (np.zeros((2, 13)), np.zeros((2, 13)), "shape"),
    (np.full((2, 14), 4), np.zeros((2, 14)), "codes"),
    (np.zeros((2, 14)), np.zeros((3, 14)), "one generated report per reference"),
    (np.zeros((0, 14)), np.zeros((0, 14)), "0 reports"),
])
def test_ce_scores_rejects_bad_labels_with_clear_error(pred, ref, message):
    with pytest.raises(ValueError, match=message):
        ce_scores(pred, ref)


def test_ce_averages_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pred, ref = rng.integers(0, 4, (40, 14)), rng.integers(0, 4, (40, 14))
    pred[:, 3] = ref[:, 3] = 0  # a class with no positives at all
    s = ce_scores(pred, ref)
    yp, yr = pred == 1, ref == 1
    for avg in ("micro", "macro", "samples"):
        key = {"samples": "ce_example"}.get(avg, f"ce_{avg}")
        assert s[f"{key}/precision"] == pytest.approx(metrics.precision_score(yr, yp, average=avg, zero_division=0))
        assert s[f"{key}/recall"] == pytest.approx(metrics.recall_score(yr, yp, average=avg, zero_division=0))
        assert s[f"{key}/f1"] == pytest.approx(metrics.f1_score(yr, yp, average=avg, zero_division=0))
    up, ur = (pred == 1) | (pred == 3), (ref == 1) | (ref == 3)
    five = [CONDITIONS.index(n) for n in ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")]
    assert s["chexbert_14/macro_f1"] == pytest.approx(metrics.f1_score(ur, up, average="macro", zero_division=0))
    assert s["chexbert_5/micro_f1"] == pytest.approx(metrics.f1_score(ur[:, five], up[:, five], average="micro"))
    assert s["chexbert_5/accuracy"] == pytest.approx(metrics.accuracy_score(ur[:, five], up[:, five]))


# ---------------------------------------------------------------- language metrics


def test_coco_tokenize_lowercases_and_drops_coco_punctuation():
    text = "The heart is normal. No effusion, pneumothorax (or) x-ray's 1.5 cm; don't -- see..."
    assert coco_tokenize(text) == ["the", "heart", "is", "normal", "no", "effusion", "pneumothorax", "or",
                                   "x-ray", "'s", "1.5", "cm", "do", "n't", "see"]


def test_bleu_one_sentence_with_brevity_penalty():
    hyp = "the cat the mat".split()  # 4 tokens
    ref = "the cat sat on the mat".split()  # 6 tokens
    b1, b2, _, _ = bleu([hyp], [[ref]])
    # unigrams: the x2 (ref has 2), cat, mat -> 4/4 matched; BP = exp(1 - 6/4) = exp(-0.5)
    assert b1 == pytest.approx(math.exp(-0.5))  # 0.60653
    # bigrams: "the cat", "cat the", "the mat" -> 2/3 matched; BLEU-2 = BP * sqrt(1 * 2/3)
    assert b2 == pytest.approx(math.exp(-0.5) * math.sqrt(2 / 3))


def test_bleu_clips_repeated_words():
    # hyp "the the cat" vs ref "the cat sat": "the" x2 clipped to 1, "cat" 1 -> 2/3; equal lengths, BP 1
    b1 = bleu([["the", "the", "cat"]], [[["the", "cat", "sat"]]])[0]
    assert b1 == pytest.approx(2 / 3)


def test_bleu_closest_reference_length_breaks_ties_to_shorter():
    # hyp length 4, references of length 3 and 5: both 1 away, coco picks 3 -> c=4 > r=3, no penalty
    # (picking 5 would give BP = exp(1 - 5/4) = 0.7788); every unigram is in some reference -> 4/4
    b1 = bleu([["a", "b", "c", "d"]], [[["a", "b", "c"], ["a", "b", "c", "d", "e"]]])[0]
    assert b1 == pytest.approx(1.0)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    # s1: hyp "a b" vs "a b" -> 2/2; s2: hyp "c x" vs "c d" -> 1/2; corpus p1 = 3/4, c = r = 4, BP 1
    # (the mean of sentence BLEU-1s would be (1 + 0.5)/2 = 0.75 too, so also check BLEU-2:
    # bigrams "a b" matched, "c x" not -> p2 = 1/2; BLEU-2 = sqrt(3/4 * 1/2))
    b1, b2, _, _ = bleu([["a", "b"], ["c", "x"]], [[["a", "b"]], [["c", "d"]]])
    assert b1 == pytest.approx(3 / 4)
    assert b2 == pytest.approx(math.sqrt(3 / 8))


def test_lcs_length_of_known_pair():
    # "the cat is on the mat" vs "the cat sat on mat": LCS "the cat on mat" = 4
    assert lcs_length("the cat is on the mat".split(), "the cat sat on mat".split()) == 4


def test_rouge_l_f_measure_with_beta_1_2():
    hyp, ref = "the cat sat on mat".split(), "the cat is on the mat".split()
    # LCS 4: P = 4/5, R = 4/6; F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 * 0.5333 / (0.6667 + 1.152) = 0.71554
    p, r = 4 / 5, 4 / 6
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert rouge_l([hyp], [[ref]]) == pytest.approx(expected)
    assert expected == pytest.approx(0.71554, abs=1e-5)


def test_rouge_l_takes_best_precision_and_recall_over_references_and_means_over_reports():
    # report 1: hyp "a b" refs ["a b c d", "a"]: P = max(2/2, 1/2) = 1, R = max(2/4, 1/1) = 1 -> F = 1
    # report 2: hyp "x y" ref "z": LCS 0 -> 0; mean = 0.5
    assert rouge_l([["a", "b"], ["x", "y"]], [[["a", "b", "c", "d"], ["a"]], [["z"]]]) == pytest.approx(0.5)


def test_cider_d_two_image_corpus():
    # image A: hyp "a b" = ref "a b"; image B: hyp "c e", ref "c d". N = 2 images.
    # Every reference n-gram occurs in one image's references: idf = log 2 - log 1 = w;
    # hypothesis-only n-grams ("e", "c e") have df 0 -> max(1, 0) = 1 -> idf w as well.
    # A: unigram cosine 1, bigram cosine 1, tri/4-gram empty -> 0; equal lengths -> 10 * (1+1+0+0)/4 = 5
    # B: unigram: dot = w*w ("c"), norms sqrt(2) w each -> 1/2; bigram "c e" vs "c d" -> 0
    #    -> 10 * (0.5 + 0 + 0 + 0)/4 = 1.25; corpus mean = (5 + 1.25)/2 = 3.125
    hyps = [["a", "b"], ["c", "e"]]
    refs = [[["a", "b"]], [["c", "d"]]]
    assert cider_d(hyps, refs) == pytest.approx(3.125)


def test_cider_d_clips_counts_and_penalises_length():
    # image 1: hyp "a a b", ref "a b"; image 2: hyp = ref = "c d"; idf = w = log 2 for every n-gram.
    # image 1 unigrams: hyp {a: 2w, b: w} (norm sqrt(5) w), ref {a: w, b: w} (norm sqrt(2) w);
    #   clipped dot = min(2w, w) w + min(w, w) w = 2 w^2 (3 w^2 unclipped) -> 2/sqrt(10)
    # bigrams: hyp {aa: w, ab: w} (norm sqrt(2) w), ref {ab: w} (norm w) -> 1/sqrt(2)
    # trigram "a a b": ref has none -> 0; 4-grams -> 0
    # length (coco counts bigrams): 2 vs 1 -> delta 1 -> penalty exp(-1 / (2 * 6^2)) = exp(-1/72)
    image1 = 10 * math.exp(-1 / 72) * (2 / math.sqrt(10) + 1 / math.sqrt(2) + 0 + 0) / 4  # 3.3027
    image2 = 10 * (1 + 1 + 0 + 0) / 4  # 5
    got = cider_d([["a", "a", "b"], ["c", "d"]], [[["a", "b"]], [["c", "d"]]])
    assert got == pytest.approx((image1 + image2) / 2)
    assert got == pytest.approx(4.15136, abs=1e-5)


def test_cider_d_is_zero_for_a_single_image_corpus():
    # N = 1: every reference n-gram has df 1 -> idf log 1 - log 1 = 0
    assert cider_d([["a", "b"]], [[["a", "b"]]]) == 0.0


def test_nlg_scores_tokenises_and_returns_all_keys():
    s = nlg_scores(["The heart is normal.", "No effusion, no pneumothorax."],
                   ["the heart is normal", ["No effusion or pneumothorax.", "no effusion"]])
    assert set(s) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
    # report 1 matches its reference exactly after tokenisation; report 2 "no effusion no pneumothorax"
    # (4 tokens) vs refs of 4 and 2 tokens: unigrams no (clipped 1 of 2), effusion, pneumothorax -> 3/4;
    # report 1: 4/4 -> corpus BLEU-1 = 7/8 (c = 8, closest r = 4 + 4, no penalty)
    assert s["bleu_1"] == pytest.approx(7 / 8)


def test_nlg_scores_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one generated report per reference"):
        nlg_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="references\\[0\\]"):
        nlg_scores(["a"], [[]])


def test_language_metrics_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    hyps = ["the heart is normal in size", "no focal consolidation or effusion", "mild cardiomegaly is seen",
            "lungs are clear", "there is a small left pleural effusion and mild edema"]
    refs = [["the heart size is normal", "heart normal"], ["no consolidation no effusion no pneumothorax"],
            ["the heart is mildly enlarged"], ["the lungs are clear bilaterally", "clear lungs"],
            ["small left pleural effusion with mild pulmonary edema"]]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    ours = nlg_scores(hyps, refs, tokenize=str.split)
    coco_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        assert ours[f"bleu_{k + 1}"] == pytest.approx(coco_bleu[k], rel=1e-9)
    assert ours["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-9)
    assert ours["cider_d"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-9)


def test_format_table_names_each_convention():
    pred, ref = label_matrices()
    scores = ce_scores(pred, ref)
    scores.update(nlg_scores(["a b c"], ["a b c"]))
    table = format_table(scores)
    for text in ("R2GenCMN", "PromptMRG", "f1chexbert", "ce_example", "chexbert_5", "No Finding",
                 "BLEU-4", "ROUGE-L", "CIDEr-D", "METEOR not computed"):
        assert text in table


# ---------------------------------------------------------------- No Finding left out


def test_thirteen_observation_conventions_leave_no_finding_out():
    pred, ref = label_matrices()
    s = ce_scores(pred, ref)
    # without No Finding: ref positives {Card, Edema} {} {}; pred {Card, Eff} {LO} {}
    # tp = Card = 1; fp = Eff + LO = 2; fn = Edema = 1
    assert_counts(s, "ce_micro_13", tp=1, fp=2, fn=1)  # P 1/3, R 1/2, F1 2/5
    # macro over 13: only Cardiomegaly scores (P = R = F1 = 1); the other 12 score 0
    assert s["ce_macro_13/f1"] == pytest.approx(1 / 13)
    assert s["ce_macro_13/precision"] == pytest.approx(1 / 13)


def test_thirteen_observation_conventions_match_sklearn_on_the_columns_other_than_no_finding():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    pred, ref = rng.integers(0, 4, (40, 14)), rng.integers(0, 4, (40, 14))
    s = ce_scores(pred, ref)
    keep = [c for c in range(14) if c != NF]
    yp, yr = (pred == 1)[:, keep], (ref == 1)[:, keep]
    for avg in ("micro", "macro"):
        assert s[f"ce_{avg}_13/precision"] == pytest.approx(
            metrics.precision_score(yr, yp, average=avg, zero_division=0))
        assert s[f"ce_{avg}_13/recall"] == pytest.approx(metrics.recall_score(yr, yp, average=avg, zero_division=0))
        assert s[f"ce_{avg}_13/f1"] == pytest.approx(metrics.f1_score(yr, yp, average=avg, zero_division=0))


def test_an_empty_report_scores_on_no_finding_alone():
    # three references: two normal (No Finding), one with cardiomegaly; the prediction is
    # No Finding everywhere (what a labeler gives an empty report)
    ref = np.zeros((3, 14), dtype=np.int64)
    ref[[0, 1], NF] = 1
    ref[2, CARD] = 1
    pred = np.zeros((3, 14), dtype=np.int64)
    pred[:, NF] = 1
    s = ce_scores(pred, ref)
    assert s["ce_micro/f1"] == pytest.approx(2 / 3)  # tp 2 (NF), fp 1 (NF on r2), fn 1 (Card)
    assert s["ce_micro_13/f1"] == 0.0  # nothing found: the 13-observation figure says so


def test_format_table_shows_the_thirteen_observation_rows_and_report_counts():
    pred, ref = label_matrices()
    scores = ce_scores(pred, ref)
    scores.update({"num_empty_reports": 2, "num_unparseable_reports": 1})
    table = format_table(scores, labeler="rules")
    assert "ce_micro_13" in table and "ce_macro_13" in table and "No Finding left out" in table
    assert table.splitlines()[0] == ("Clinical efficacy (3 reports, rules labels; 2 empty, "
                                     "1 without a <report> section)")
