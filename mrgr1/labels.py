"""The 14 CheXpert observations, and CheXbert's label codes.

CheXbert (Smit et al., 2020) labels a report with one class per observation:
    0 blank (not mentioned), 1 positive, 2 negative, 3 uncertain;
"No Finding" uses only 0 (blank) and 1 (positive).
The order below is CheXbert's own (its `CONDITIONS` list); every [N, 14] label
tensor in mrgr1 uses it.
"""

CONDITIONS = [
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
]
NO_FINDING = CONDITIONS.index("No Finding")  # 13

BLANK, POSITIVE, NEGATIVE, UNCERTAIN = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------
# Rule-based labeler: the demo set's reward model, and an opt-in (`--labeler rules`) stand-in for
# CheXbert on real text. Same interface and codes as mrgr1.chexbert.CheXbert.label.
#
# Per sentence, per clause (split at "but", "however", ";", "which", ...):
#   1. mentions: each observation's finding words ("cardiomegaly", "pleural effusion") and, for
#      the heart and mediastinum, anatomy words ("heart size", "mediastinum") that count only with
#      a descriptor: "enlarged/widened" -> a finding mention, "normal" -> negative.
#   2. the nearest cue before the mention in its clause decides: uncertainty ("may", "possible",
#      "suggest", "likely", "cannot exclude"...) -> 3, negation ("no", "without", "free of",
#      "negative for"...) -> 2; otherwise the first cue after it ("cannot be excluded", "is
#      possible" -> 3; "is not seen", "has resolved" -> 2); otherwise positive 1.
#   3. report level, as CheXpert aggregates mentions: positive > uncertain > negative > blank.
#   4. No Finding (CheXpert's rule): 1 when no observation other than Support Devices is
#      positive or uncertain, else 0. Text that mentions nothing therefore gets No Finding = 1.
#
# Real report language (IU X-Ray, MIMIC-CXR) the rules also read:
#   - IU X-Ray replaces identifying words with "XXXX", device nouns among them. "sternotomy XXXX"
#     (the wires) is a support device; "right chest XXXX" / "left subclavian XXXX" is one when
#     its clause places it ("tip", "terminates", "in place", "placement", "projects over"...).
#     Any other XXXX is a word like any other: it is neither a finding nor a cue.
#   - "borderline" describing the heart or mediastinum ("borderline heart size", "heart size is
#     borderline") is uncertain, as "borderline cardiomegaly" is.
#   - old or healed granulomatous disease / infection, and "sequelae of prior infection", are not
#     pneumonia (the words are masked before mentions are looked for).
# ----------------------------------------------------------------------------------------------
import re

import torch

_FINDING_WORDS = {
    "Enlarged Cardiomediastinum": r"cardiomediastinal enlargement|mediastinal widening",
    "Cardiomegaly": r"cardiomegaly|cardiac enlargement",
    "Lung Opacity": r"opacit(?:y|ies)|opacification|airspace disease|infiltrates?|infiltration",
    "Lung Lesion": r"nodules?|mass(?:es)?|lesions?|neoplasms?|tumou?rs?",
    "Edema": r"edema|(?:pulmonary |vascular )+congestion",
    "Consolidation": r"consolidat\w*",
    "Pneumonia": r"pneumonias?|infectious process|infection",
    "Atelectasis": r"atelecta\w*",
    "Pneumothorax": r"pneumothora\w*",
    "Pleural Effusion": r"(?:pleural )?(?<!pericardial )effusions?|pleural fluid|hydrothorax"
                        r"|blunting of the (?:\w+ )?costophrenic angles?|costophrenic (?:angle )?blunting",
    "Pleural Other": r"pleural (?:thickening|plaques?|scarring|calcifications?)|fibrothorax|apical cap",
    "Fracture": r"fractures?|fractured",
    "Support Devices": r"endotracheal tube|et tube|tracheostomy(?: tube)?|(?:enteric|nasogastric|ng|og"
                       r"|feeding|chest) tubes?|central (?:venous )?(?:line|catheter)|picc(?: line)?"
                       r"|catheters?|pacemaker|pacer|(?:pacing|pacer) (?:leads?|wires?)"
                       r"|(?:sternotomy|sternal) wires|support devices?|port-?a-?cath|drains?|icd|aicd"
                       r"|(?:cardiac |implantable )?defibrillator|sternotomy xxxx",
}
# An anonymised noun ("xxxx") after a body site counts as a device only where its clause places it.
_SITE_XXXX_PATTERN = (r"(?:right|left)(?:-sided)? (?:chest wall|chest|subclavian|internal jugular"
                      r"|jugular|ij|arm|upper extremity) xxxx")
_DEVICE_CONTEXT = (r"tip|tips|terminat\w*|in (?:\w+ )?(?:place|position)|position\w*|placement|placed"
                   r"|inserted|insertion|courses?|coursing|overl(?:y|ies|ying)|projects?|projecting"
                   r"|extends?|removed|removal")
_ANATOMY_WORDS = {  # count only with a descriptor (see _anatomy_mention)
    "Enlarged Cardiomediastinum": r"cardiomediastinal (?:silhouette|contours?)|(?:superior |upper )?"
                                  r"mediastinum|mediastinal (?:contours?|silhouette|width)",
    "Cardiomegaly": r"heart(?: size)?|cardiac (?:silhouette|size|contours?)",
}
_ABNORMAL = r"enlarged|enlargement|widened|widening|prominent|prominence|large|increased"
_NORMAL = r"normal|unremarkable"
_BORDERLINE = r"borderline"  # "borderline heart size", "heart size is borderline": uncertain
_PRE_UNCERTAIN = (r"may|might|could|possible|possibly|probable|probably|likely|suggests?|suggestive of"
                  r"|suggesting|concerning for|suspicious for|suspected|suspect|questionable|question of"
                  r"|cannot (?:be )?(?:excluded|ruled out)|cannot exclude|can't exclude|not excluded"
                  r"|borderline|equivocal|indeterminate|versus|vs")
_PRE_NEGATION = (r"no|not|without|free of|negative for|absence of|absent|resolution of|resolved|removal of"
                 r"|clear of|rules? out|ruled out")
_POST_UNCERTAIN = (r"(?:cannot|can not|could not) be (?:excluded|ruled out)|not (?:be )?excluded"
                   r"|(?:is|are) (?:possible|likely|suspected|questioned|not excluded)|may be present")
_POST_NEGATION = (r"(?:is|are|was|were) not (?:seen|identified|present|visualized|appreciated|evident)"
                  r"|not seen|(?:has|have) resolved|resolved|(?:is|are) absent|(?:has|have) been removed"
                  r"|removed")
_PSEUDO = (r"no (?:significant |interval )?change|not changed|without (?:interval )?change|unchanged"
           r"|(?:(?:old|healed|remote|prior|previous|chronic) )?granulomatous (?:disease|infection|process|changes?)"
           r"|(?:sequelae?|evidence) of (?:an? )?(?:old|healed|remote|prior|previous) infection")
_CLAUSE_BREAK = r";|\b(?:but|however|although|though|except|which|whereas|apart from|aside from)\b"
_CONJUNCTION_GAP = r"[\s,]*(?:and|or|nor|and/or)?[\s,]*"


def _words(pattern: str) -> re.Pattern:
    return re.compile(rf"\b(?:{pattern})\b")


_FINDING_RE = {k: _words(v) for k, v in _FINDING_WORDS.items()}
_ANATOMY_RE = {k: _words(v) for k, v in _ANATOMY_WORDS.items()}
_DESCRIPTOR_RE = _words(rf"(?P<abn>{_ABNORMAL})|(?P<nor>{_NORMAL})|(?P<unc>{_BORDERLINE})")
_ADJACENT_DESCRIPTOR_RE = re.compile(rf"\b(?:(?P<abn>{_ABNORMAL})|(?P<nor>{_NORMAL})|(?P<unc>{_BORDERLINE}))"
                                     rf"(?:\s+(?:of|the))*\s+$")
_SITE_XXXX_RE = _words(_SITE_XXXX_PATTERN)
_DEVICE_CONTEXT_RE = _words(_DEVICE_CONTEXT)
_PRE_CUE_RE = _words(rf"(?P<unc>{_PRE_UNCERTAIN})|(?P<neg>{_PRE_NEGATION})")
_POST_CUE_RE = _words(rf"(?P<unc>{_POST_UNCERTAIN})|(?P<neg>{_POST_NEGATION})")


def _sentences(report: str) -> list[str]:
    """Lower-cased sentences; a '.' inside a number ("1.5 cm") does not end one."""
    return [s for s in re.split(r"(?<!\d)[.!?](?!\d)|\n", report.lower()) if s.strip()]


def _clauses(sentence: str) -> list[str]:
    return [c for c in re.split(_CLAUSE_BREAK, sentence) if c.strip()]


def _cue_label(before: str, after: str) -> int:
    """Label of a mention from the nearest cue before it, else the first cue after it."""
    pre = list(_PRE_CUE_RE.finditer(before))
    if pre:
        return UNCERTAIN if pre[-1].group("unc") else NEGATIVE
    post = _POST_CUE_RE.search(after)
    if post:
        return UNCERTAIN if post.group("unc") else NEGATIVE
    return POSITIVE


def _mentions(clause: str) -> list[tuple[int, int, str, bool]]:
    """(start, end, observation, is_anatomy) of every mention, in text order."""
    found = [(m.start(), m.end(), obs, False) for obs, rx in _FINDING_RE.items() for m in rx.finditer(clause)]
    found += [(m.start(), m.end(), obs, True) for obs, rx in _ANATOMY_RE.items() for m in rx.finditer(clause)]
    if _DEVICE_CONTEXT_RE.search(clause):  # "right chest xxxx with its tip in the svc"
        found += [(m.start(), m.end(), "Support Devices", False) for m in _SITE_XXXX_RE.finditer(clause)]
    return sorted(found)


def _window_end(clause: str, mentions: list, i: int) -> int:
    """A mention's text reaches to the next mention, unless only 'and'/'or'/',' separates them
    (then the list shares what follows: "effusion or pneumothorax is seen")."""
    prev_end = mentions[i][1]
    for start, end, _, _ in mentions[i + 1:]:
        if start < prev_end:  # overlapping match
            continue
        if not re.fullmatch(_CONJUNCTION_GAP, clause[prev_end:start]):
            return start
        prev_end = end
    return len(clause)


def _anatomy_label(clause: str, start: int, after: str, after_offset: int) -> int:
    """Anatomy words need a descriptor: right before ("normal heart size", "widened mediastinum")
    or after ("heart size is normal", "the heart is not enlarged"). No descriptor -> blank."""
    adjacent = _ADJACENT_DESCRIPTOR_RE.search(clause[:start])
    desc = adjacent or _DESCRIPTOR_RE.search(after)
    if desc is None:
        return BLANK
    if desc.group("nor"):
        return NEGATIVE
    if desc.group("unc"):
        return UNCERTAIN
    cue_at = desc.start() if adjacent else after_offset + desc.start()
    desc_end = desc.end() if adjacent else after_offset + desc.end()
    return _cue_label(clause[:cue_at], clause[desc_end:])


def _label_clause(clause: str, votes: dict[str, list[int]]) -> None:
    clause = re.sub(_PSEUDO, lambda m: "_" * len(m.group()), clause)
    mentions = _mentions(clause)
    for i, (start, end, obs, is_anatomy) in enumerate(mentions):
        stop = _window_end(clause, mentions, i)
        if is_anatomy:
            label = _anatomy_label(clause, start, clause[end:stop], end)
        else:
            label = _cue_label(clause[:start], clause[end:stop])
        if label != BLANK:
            votes.setdefault(obs, []).append(label)


def _aggregate(votes: dict[str, list[int]]) -> list[int]:
    """CheXpert's precedence over one report's mentions: positive > uncertain > negative."""
    row = []
    for obs in CONDITIONS[:NO_FINDING]:
        v = votes.get(obs, [])
        row.append(POSITIVE if POSITIVE in v else UNCERTAIN if UNCERTAIN in v else NEGATIVE if v else BLANK)
    return row + [no_finding(row)]


def no_finding(codes: list[int]) -> int:
    """CheXpert's No Finding from the 13 other codes (CONDITIONS order): POSITIVE when no observation
    other than Support Devices is positive or uncertain, else BLANK."""
    found = any(c in (POSITIVE, UNCERTAIN) for obs, c in zip(CONDITIONS[:NO_FINDING], codes)
                if obs != "Support Devices")
    return BLANK if found else POSITIVE


def rule_labels(reports: list[str]) -> torch.Tensor:
    """Label reports with rules: LongTensor [N, 14] in CONDITIONS order and CheXbert's codes.

    >>> rule_labels(["Mild cardiomegaly. No pneumothorax. May represent atelectasis."])[0].tolist()
    [0, 1, 0, 0, 0, 0, 0, 3, 2, 0, 0, 0, 0, 0]
    """
    rows = []
    for report in reports:
        votes: dict[str, list[int]] = {}
        for sentence in _sentences(report):
            for clause in _clauses(sentence):
                _label_clause(clause, votes)
        rows.append(_aggregate(votes))
    return torch.tensor(rows, dtype=torch.long).reshape(len(reports), len(CONDITIONS))  # [N, 14]


class RuleLabeler:
    """Drop-in for mrgr1.chexbert.CheXbert where only `.label(reports)` is used."""

    def label(self, reports: list[str]) -> torch.Tensor:
        return rule_labels(reports)  # [N, 14]
