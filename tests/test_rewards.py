"""Specification of the rewards (mrgr1/rewards.py): MCCS, format, report extraction, the
ablation rewards (CE-F1, BLEU-4) and the combined reward with its reference-label cache.
Every expected number is worked out by hand in the comments.
"""
import math
import re

import pytest
import torch

from mrgr1.labels import BLANK, CONDITIONS, NEGATIVE, POSITIVE, UNCERTAIN
from mrgr1.rewards import (ccs, ce_f1_reward, compute_rewards, extract_report, format_reward,
                           mccs, sentence_bleu, signed_vectors)

close = dict(rel=1e-4, abs=1e-6)
PAPER = (0.0, 1.0, -1.0, 1.0)  # the paper's value of codes blank, positive, negative, uncertain
M = 0.5                        # a margin (the run configuration's default)
PAPER_REWARD = dict(weights={"mccs": 0.75, "format": 0.25}, margin=M, mapping=PAPER)


def labels(*rows: dict) -> torch.Tensor:
    """CheXbert codes [len(rows), 14] from {"Cardiomegaly": POSITIVE, ...} (unnamed: blank)."""
    out = torch.full((len(rows), len(CONDITIONS)), BLANK, dtype=torch.long)
    for i, row in enumerate(rows):
        for name, code in row.items():
            out[i, CONDITIONS.index(name)] = code
    return out


# ----------------------------------------------------------------------------- MCCS

def test_signed_vectors_map_codes_and_drop_no_finding():
    v = signed_vectors(labels({"Cardiomegaly": POSITIVE, "Edema": NEGATIVE,
                               "Atelectasis": UNCERTAIN, "No Finding": POSITIVE}), PAPER)
    assert v.shape == (1, 13)
    expected = [0.0] * 13
    expected[CONDITIONS.index("Cardiomegaly")] = 1.0
    expected[CONDITIONS.index("Edema")] = -1.0
    expected[CONDITIONS.index("Atelectasis")] = 1.0  # uncertain counts as present
    assert v[0].tolist() == expected


def test_identical_labels_give_mccs_one():
    row = {"Cardiomegaly": POSITIVE, "Pleural Effusion": NEGATIVE, "Edema": UNCERTAIN}
    assert mccs(labels(row), labels(row), margin=M, mapping=PAPER).tolist() == [1.0]


def test_opposite_polarity_gives_mccs_zero():
    # v_hat = (1, -1), v = (-1, 1): CCS = -2 / 2 = -1 -> max((-1 - 0.5) / 0.5, 0) = 0
    gen = labels({"Cardiomegaly": POSITIVE, "Edema": NEGATIVE})
    ref = labels({"Cardiomegaly": NEGATIVE, "Edema": POSITIVE})
    assert ccs(signed_vectors(gen, PAPER), signed_vectors(ref, PAPER)).item() == pytest.approx(-1.0)
    assert mccs(gen, ref, margin=M, mapping=PAPER).tolist() == [0.0]


def test_mccs_worked_example_with_margin():
    # ref: Cardiomegaly, Edema, Consolidation, Pleural Effusion positive -> v = (1, 1, 1, 1)
    # gen misses Edema                                                   -> v_hat = (1, 0, 1, 1)
    # CCS = v_hat.v / (|v_hat| |v|) = 3 / (sqrt(3) * 2) = 0.866025
    # m = 0.5: MCCS = (0.866025 - 0.5) / (1 - 0.5) = 0.732051
    # m = 0.9: CCS < m -> MCCS = 0;   m = 0: MCCS = CCS
    four = ["Cardiomegaly", "Edema", "Consolidation", "Pleural Effusion"]
    ref = labels({n: POSITIVE for n in four})
    gen = labels({n: POSITIVE for n in four if n != "Edema"})
    cos = 3 / (math.sqrt(3) * 2)
    assert mccs(gen, ref, margin=0.5, mapping=PAPER).item() == pytest.approx((cos - 0.5) / 0.5, **close)
    assert mccs(gen, ref, margin=0.9, mapping=PAPER).item() == 0.0
    assert mccs(gen, ref, margin=0.0, mapping=PAPER).item() == pytest.approx(cos, **close)


def test_both_vectors_zero_count_as_agreement_and_one_zero_as_none():
    nothing = labels({})
    effusion = labels({"Pleural Effusion": POSITIVE})
    assert mccs(nothing, nothing, margin=M, mapping=PAPER).tolist() == [1.0]    # both silent: CCS = 1
    assert mccs(nothing, effusion, margin=M, mapping=PAPER).tolist() == [0.0]   # one silent: CCS = 0
    assert mccs(effusion, nothing, margin=M, mapping=PAPER).tolist() == [0.0]


def test_uncertain_mapping_is_configurable():
    # default: uncertain -> 1, so "possible effusion" matches "effusion" exactly
    gen, ref = labels({"Pleural Effusion": UNCERTAIN}), labels({"Pleural Effusion": POSITIVE})
    assert mccs(gen, ref, margin=M, mapping=PAPER).tolist() == [1.0]
    # uncertain -> 0 (blank): gen becomes the zero vector -> CCS = 0
    as_blank = {BLANK: 0.0, POSITIVE: 1.0, NEGATIVE: -1.0, UNCERTAIN: 0.0}
    assert mccs(gen, ref, mapping=as_blank, margin=M).tolist() == [0.0]
    # uncertain -> -1 as a tuple indexed by code: v_hat = -v -> CCS = -1 -> 0
    assert mccs(gen, ref, mapping=(0.0, 1.0, -1.0, -1.0), margin=M).tolist() == [0.0]


def test_no_finding_is_ignored():
    gen = labels({"Cardiomegaly": POSITIVE, "No Finding": POSITIVE})
    ref = labels({"Cardiomegaly": POSITIVE})
    assert mccs(gen, ref, margin=M, mapping=PAPER).tolist() == [1.0]
    assert mccs(labels({"No Finding": POSITIVE}), labels({}), margin=M, mapping=PAPER).tolist() == [1.0]  # both zero


def test_mccs_rejects_labels_that_are_not_chexbert_codes():
    with pytest.raises(ValueError, match=r"shape \[N, 14\]"):
        mccs(torch.zeros(2, 13, dtype=torch.long), torch.zeros(2, 13, dtype=torch.long), margin=M, mapping=PAPER)
    with pytest.raises(ValueError, match="outside 0..3"):
        mccs(torch.full((1, 14), 4), torch.zeros(1, 14, dtype=torch.long), margin=M, mapping=PAPER)


# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("text, reward", [
    ("<think>Heart normal size.</think><report>No acute disease.</report>", 1.0),
    ("  <think>\nlungs clear\n</think>\n\n<report>\nNormal chest.\n</report>\n", 1.0),  # whitespace
    ("<report>Normal.</report>", 0.0),                                   # no think
    ("<think>ok</think>Normal.", 0.0),                                   # no report tags
    ("<think>ok</think><report>Normal.", 0.0),                           # report cut off
    ("<think>  </think><report>Normal.</report>", 0.0),                  # empty think
    ("<think>ok</think><report>\n</report>", 0.0),                       # empty report
    ("Sure! <think>ok</think><report>Normal.</report>", 0.0),            # text before
    ("<think>ok</think><report>Normal.</report> Hope this helps.", 0.0), # text after
    ("<think>ok</think> and so <report>Normal.</report>", 0.0),          # text between
    ("<report>Normal.</report><think>ok</think>", 0.0),                  # wrong order
    ("<think>a<think>b</think></think><report>Normal.</report>", 0.0),   # nested think
    ("<think>ok</think><report>a</report><report>b</report>", 0.0),      # duplicated report
    ("<think>a</think><think>b</think><report>Normal.</report>", 0.0),   # duplicated think
    ("<think>ok</think><report>see <report>x</report>", 0.0),            # tag inside report
])
def test_format_reward(text, reward):
    assert format_reward([text]).tolist() == [reward]


def test_format_reward_is_one_value_per_completion():
    out = format_reward(["<think>a</think><report>b</report>", "b", ""])
    assert out.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("text, report", [
    ("<think>a</think><report> Normal chest. </report>", "Normal chest."),
    ("<think>a</think><report>Small effusion.", "Small effusion."),      # cut off: to the end
    ("<think>a</think> Small effusion.", "Small effusion."),             # no report tags
    ("Small effusion.", "Small effusion."),                              # plain text
    ("reasoning</think> Small effusion.", "Small effusion."),            # think opened in prompt
    ("<think>still thinking when cut off", ""),                          # all thinking
    ("<think>a</think><report>x</report> trailing", "x"),
    ("<think>I will write <report> here</think><report>x</report>", "x"),  # tag inside thinking
    ("<report>x</report><think>a</think>", "x"),                         # wrong order
])
def test_extract_report(text, report):
    assert extract_report(text) == report


# ----------------------------------------------------------------------------- ablation rewards

def test_ce_f1_reward_worked_example():
    # gen positive {Cardiomegaly, Edema}, ref positive {Cardiomegaly, Pleural Effusion}
    # TP = 1 (Cardiomegaly), FP = 1 (Edema), FN = 1 (Effusion): F1 = 2 / (2 + 1 + 1) = 0.5
    gen = labels({"Cardiomegaly": POSITIVE, "Edema": POSITIVE, "Atelectasis": NEGATIVE})
    ref = labels({"Cardiomegaly": POSITIVE, "Pleural Effusion": POSITIVE,
                  "Atelectasis": UNCERTAIN})  # negative/uncertain are not positives
    assert ce_f1_reward(gen, ref).tolist() == [0.5]


def test_ce_f1_reward_counts_no_finding_and_defines_zero_over_zero_as_one():
    normal = labels({"No Finding": POSITIVE})
    assert ce_f1_reward(normal, normal).tolist() == [1.0]                       # TP = 1
    assert ce_f1_reward(normal, labels({"Edema": POSITIVE})).tolist() == [0.0]  # TP = 0
    assert ce_f1_reward(labels({}), labels({"Edema": NEGATIVE})).tolist() == [1.0]  # 0 / 0


def test_sentence_bleu_worked_example_with_brevity_penalty():
    # hyp "the heart is normal" (c = 4) inside ref "the heart is normal size" (r = 5):
    # p_1 = 4/4; p_2..p_4 smoothed (3+1)/(3+1), (2+1)/(2+1), (1+1)/(1+1) = 1
    # BP = exp(1 - 5/4) -> BLEU = exp(-0.25) = 0.778801
    assert sentence_bleu("The heart is normal", "the heart is normal size") == pytest.approx(
        math.exp(-0.25), **close)


def test_sentence_bleu_clips_repeated_words_and_smooths_higher_orders():
    # hyp "the the the the", ref "the heart": c = 4 > r = 2 -> BP = 1
    # p_1 = min(4, 1) / 4 = 1/4; p_2 = (0 + 1)/(3 + 1) = 1/4; p_3 = (0 + 1)/(2 + 1) = 1/3;
    # p_4 = (0 + 1)/(1 + 1) = 1/2 -> BLEU = (1/4 * 1/4 * 1/3 * 1/2) ** (1/4) = (1/96) ** 0.25
    assert sentence_bleu("the the the the", "the heart") == pytest.approx((1 / 96) ** 0.25, **close)


def test_sentence_bleu_extremes():
    # 4 tokens each ("." is a token), case ignored: every p_n = 1 -> BLEU 1
    assert sentence_bleu("No pleural effusion.", "no pleural effusion .") == pytest.approx(1.0)
    # 3 words, a sub-sentence of a 7-word reference: p_1..p_3 = 1, no 4-gram: p_4 = (0+1)/(1+1);
    # BP = exp(1 - 7/3) -> BLEU = exp(-4/3) * 0.5 ** 0.25 = 0.221658
    assert sentence_bleu("lungs are clear", "the lungs are clear . no pneumothorax") == \
        pytest.approx(math.exp(-4 / 3) * 0.5 ** 0.25, **close)
    assert sentence_bleu("Cardiomegaly", "lungs are clear") == 0.0  # no shared word
    assert sentence_bleu("", "lungs are clear") == 0.0


def test_sentence_bleu_matches_nltk_method2_when_available():
    # NLTK's smoothing method 2 is the same Lin & Och add-one for n >= 2 (oracle, test-only)
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    pairs = [("the heart size is normal . no effusion .",
              "heart size normal . no pleural effusion ."),
             ("mild cardiomegaly with small left effusion",
              "cardiomegaly . small left pleural effusion"),
             ("lungs are clear", "the lungs are clear . no pneumothorax"),
             ("effusion effusion effusion . heart", "small effusion . normal heart")]
    smooth = nltk_bleu.SmoothingFunction().method2
    for hyp, ref in pairs:
        expected = nltk_bleu.sentence_bleu([ref.split()], hyp.split(), smoothing_function=smooth)
        assert sentence_bleu(hyp, ref) == pytest.approx(expected, **close)


# ----------------------------------------------------------------------------- combined reward

class CountingLabeler:
    """Fake labeler: a report mentioning "effusion" is Pleural Effusion positive, "enlarged heart"
    Cardiomegaly positive, anything else blank. Records every text it is asked to label."""

    def __init__(self):
        self.seen = []

    def label(self, reports):
        self.seen += reports
        rows = [{**({"Pleural Effusion": POSITIVE} if "effusion" in r else {}),
                 **({"Cardiomegaly": POSITIVE} if "enlarged heart" in r else {})} for r in reports]
        return labels(*rows)


def well(report: str) -> str:
    return f"<think>looking</think><report>{report}</report>"


def test_combined_reward_weights_and_parts():
    # study A's reference mentions effusion only: v = e_effusion
    # 0: well formed, effusion           -> MCCS 1, format 1 -> 0.75 + 0.25 = 1.0
    # 1: well formed, effusion + heart  -> CCS = 1 / sqrt(2) = 0.7071, MCCS = 0.4142 -> 0.5607
    # 2: no tags, effusion               -> MCCS 1 (judged on content), format 0 -> 0.75
    # 3: well formed, nothing mentioned  -> one zero vector: MCCS 0, format 1 -> 0.25
    completions = [well("small effusion"), well("effusion, enlarged heart"), "small effusion",
                   well("clear lungs")]
    total, parts = compute_rewards(completions, ["left effusion"] * 4, CountingLabeler(), **PAPER_REWARD)
    m1 = (1 / math.sqrt(2) - 0.5) / 0.5
    assert parts["mccs"].tolist() == pytest.approx([1.0, m1, 1.0, 0.0], **close)
    assert parts["format"].tolist() == [1.0, 1.0, 0.0, 1.0]
    assert total.tolist() == pytest.approx([1.0, 0.75 * m1 + 0.25, 0.75, 0.25], **close)

    total, _ = compute_rewards(completions, ["left effusion"] * 4, CountingLabeler(),
                               weights={"mccs": 1.0, "format": 0.0}, margin=M, mapping=PAPER)
    assert total.tolist() == pytest.approx([1.0, m1, 1.0, 0.0], **close)


def test_each_reference_report_is_labelled_once_across_calls():
    labeler, cache = CountingLabeler(), {}
    refs = {"A": "left effusion", "B": "enlarged heart"}
    ids = ["A", "A", "B", "B"]  # G = 2 rollouts per study
    completions = [well("effusion"), well("clear"), well("enlarged heart"), well("effusion")]
    for _ in range(3):  # three training steps over the same studies
        compute_rewards(completions, [refs[i] for i in ids], labeler, cache=cache, **PAPER_REWARD)
    assert labeler.seen.count("left effusion") == 1
    assert labeler.seen.count("enlarged heart") == 1 + 3  # the reference once, completion 2 thrice
    assert sorted(cache) == ["enlarged heart", "left effusion"]  # keyed by what is labelled


def test_two_studies_sharing_an_id_are_each_scored_against_their_own_reference():
    # the id is the caller's and may repeat (data.load_split refuses that, other callers may not)
    completions = [well("effusion"), well("effusion")]
    cache = {}
    _, parts = compute_rewards(completions, ["left effusion", "heart and lungs normal"],
                               CountingLabeler(), cache=cache, **PAPER_REWARD)
    assert parts["mccs"].tolist() == [1.0, 0.0]  # matches the first reference, not the second
    _, again = compute_rewards(completions[::-1], ["heart and lungs normal", "left effusion"],
                               CountingLabeler(), cache=cache, **PAPER_REWARD)
    assert again["mccs"].tolist() == [0.0, 1.0]  # a later step with the cache filled: the same


def test_empty_report_gets_no_clinical_reward():
    # without this rule "" (nothing mentioned) would score CCS = 1 against a silent reference
    total, parts = compute_rewards([well(""), "<think>only thinking"],
                                   ["heart and lungs normal"] * 2, CountingLabeler(), **PAPER_REWARD)
    assert parts["mccs"].tolist() == [0.0, 0.0] and total.tolist() == [0.0, 0.0]


def test_ablation_kinds_share_the_interface():
    completions = [well("small effusion"), well("enlarged heart")]
    ids, refs = ["A", "A"], ["small effusion"] * 2
    total, parts = compute_rewards(completions, refs, CountingLabeler(), kind="ce_f1", weights={"ce_f1": 0.75, "format": 0.25}, margin=M, mapping=PAPER)
    assert parts["ce_f1"].tolist() == [1.0, 0.0]
    assert total.tolist() == pytest.approx([1.0, 0.25])
    # BLEU needs no labeler: "small effusion" vs itself -> c = r = 2, p_1 = 1, p_2 = 1, and no
    # 3- or 4-grams: p_3 = p_4 = (0 + 1)/(1 + 1) -> BLEU = (1/4) ** (1/4) = 0.7071;
    # "enlarged heart" shares no word -> 0
    total, parts = compute_rewards(completions, refs, None, kind="bleu", weights={"bleu": 0.75, "format": 0.25}, margin=M, mapping=PAPER)
    assert parts["bleu"].tolist() == pytest.approx([0.25 ** 0.25, 0.0], **close)


def test_combined_reward_errors_speak_to_the_user():
    with pytest.raises(ValueError, match="kind must be one of"):
        compute_rewards(["x"], ["y"], CountingLabeler(), kind="rouge", weights={"rouge": 0.75, "format": 0.25}, margin=M, mapping=PAPER)
    with pytest.raises(ValueError, match=re.escape("exactly the keys {'ce_f1', 'format'}")):
        compute_rewards(["x"], ["y"], CountingLabeler(), kind="ce_f1",
                        weights={"mccs": 0.75, "format": 0.25}, margin=M, mapping=PAPER)  # weight named for another kind
    with pytest.raises(ValueError, match="one entry per completion"):
        compute_rewards(["x", "z"], ["y"], CountingLabeler(), **PAPER_REWARD)

    class Broken:
        def label(self, reports):
            return torch.zeros(len(reports), 13, dtype=torch.long)

    with pytest.raises(ValueError, match=r"Broken.label\(\) must return"):
        compute_rewards([well("x")], ["y"], Broken(), **PAPER_REWARD)
