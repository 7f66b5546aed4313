"""The embedded demo data set: procedurally drawn chest X-rays with templated reports.

It makes the whole pipeline (SFT warm start, GRPO, evaluation) run on a laptop CPU with no
download. Each study has two grayscale views, like IU X-Ray: a frontal (PA) view and a lateral
view, drawn with numpy as a thorax with two lung fields (faint vessel texture), ribs, mediastinum,
heart shadow and diaphragm domes. Its report is written from templates about what is drawn:
positive, negative and uncertain statements. Each report section without a finding states its
pertinent negative (heart size, consolidation, effusion / pneumothorax, rib fracture), so the
negatives, too, follow from the image.

Two properties of real reports are modelled on purpose (both ours in degree, see README):
- Reports are incomplete: each drawn finding is stated with probability `stated_share` (0.7);
  an unstated finding is left out, not negated, and its section then states no negative about it.
- Normal statements are templated, findings are not: each pertinent negative has one wording
  (`normal_wordings="one"`, as the stock normal sentences of IU X-Ray), each finding several.
  Together they let a token-level (MLE) model see a finding and still not write it greedily: its
  probability is split over the finding's wordings, while leaving it out continues with one stock
  sentence (measured in the README, "Why it rises"). This is the gap between token-level training
  and a clinical reward that MRG-R1 targets.
`stated_share=1, normal_wordings="varied"` draws reports without either property.

Drawn (13 of the 14 CheXpert observations; the patient's right is the image's left, as on a PA film):
    Enlarged Cardiomediastinum  wide upper mediastinum
    Cardiomegaly                wide heart shadow (mild / moderate)
    Lung Opacity                a patchy cluster of faint blobs
    Lung Lesion                 a small round, sharp nodule
    Edema                       diffuse bilateral haze, densest at the hila
    Consolidation               one dense lobar patch (its report may add "concerning for pneumonia")
    Atelectasis                 a thin bright band at a lung base
    Pneumothorax                a dark apical/lateral rim without lung markings, with a pleural line
    Pleural Effusion            a bright base with a meniscus that blunts the costophrenic angle
    Pleural Other               pleural thickening: a bright apical cap or lateral strip
    Fracture                    a rib with a gap and a step-off
    Support Devices             endotracheal tube, right jugular central line or pacemaker with lead
    No Finding                  the normal studies
Not drawn: Pneumonia is a clinical reading, not a picture; it only appears as an uncertain clause
after a drawn consolidation. The lateral view shows the heart, effusion, edema, lung patches,
atelectasis and devices; pneumothorax, fracture, pleural thickening and mediastinal width are
frontal-only, as they are hard to see on a real lateral film too.

Uncertain statements ("possible", "may", "cannot be excluded") describe a finding that IS drawn,
at half strength (our choice: the image then carries a fainter version of the same sign).

Prevalence (ours): 40% normal studies, the rest 1-3 findings weighted towards cardiomegaly,
effusion, opacity, atelectasis and devices (see PREVALENCE); 15% of drawn findings uncertain.
Labels: findings.json beside annotation.json maps study id -> the 14 codes of the REPORT in
CONDITIONS order (0 blank, 1 positive, 2 negative, 3 uncertain; No Finding by CheXpert's rule);
a finding that is drawn but not stated is blank there. demo.json records the generator's settings.

Example:
    python -m mrgr1.synthetic --out data/demo --train 600 --val 60 --test 100 --image-size 112 --seed 0
    python -m mrgr1.synthetic --out data/demo-complete --stated-share 1 --normal-wordings varied
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mrgr1 import synthetic_draw as draw
from mrgr1.data import DataError
from mrgr1.files import read_json
from mrgr1.labels import BLANK, CONDITIONS, NEGATIVE, NO_FINDING, POSITIVE, UNCERTAIN, no_finding

EC, CARD, OPAC, LESION, EDEMA, CONS, PNA, ATEL, PTX, EFF, PLO, FX, DEV = CONDITIONS[:NO_FINDING]
assert (EC, CARD, DEV) == ("Enlarged Cardiomediastinum", "Cardiomegaly", "Support Devices")

PREVALENCE = {CARD: 18, EFF: 14, OPAC: 12, ATEL: 12, DEV: 10, EDEMA: 7, CONS: 6, LESION: 6,
              PTX: 5, EC: 4, FX: 3, PLO: 3}  # relative weights among abnormal studies (ours)
P_NORMAL = 0.4        # share of studies with no pathology (IU X-Ray is mostly normal)
P_UNCERTAIN = 0.15    # share of drawn findings that are uncertain (drawn faint, worded uncertain)
P_STATED = 0.7        # share of drawn findings a report states (real reports are incomplete)
MAX_SENTENCES = 5
VERSION = 2           # of the generator: 2 added stated_share, normal_wordings and more wordings


@dataclass
class Finding:
    """One drawn finding and the words its sentence uses."""
    obs: str               # a CONDITIONS name
    status: int            # POSITIVE or UNCERTAIN
    side: str = "right"    # "right" | "left" | "both" (patient's side)
    zone: str = "lower"    # "upper" | "middle" | "lower"
    size: str = ""         # effusion, pneumothorax: small|moderate|large; heart, edema: mild|moderate; "" = smallest
    kind: str = ""         # device: ett | cvc | pacemaker; pleural other: apical | lateral
    rib: int = 6           # fractured rib (4..8)
    cm: float = 1.0        # nodule diameter

    @property
    def strength(self) -> float:
        return 1.0 if self.status == POSITIVE else 0.5


# ---------------------------------------------------------------- report templates
POSITIVE_TEMPLATES = {
    CARD: ["{Sev} cardiomegaly.", "The heart is {sevly} enlarged.", "The cardiac silhouette is enlarged.",
           "Enlarged cardiac silhouette.", "Heart size is {sevly} enlarged.", "Cardiomegaly.",
           "Mildly enlarged heart.", "Cardiac enlargement."],
    EC: ["The mediastinum is widened.", "Widened mediastinum.", "The superior mediastinum is widened.",
         "Enlarged cardiomediastinal silhouette."],
    EDEMA: ["{Sev} pulmonary edema.", "Diffuse interstitial edema.", "There is {sev} pulmonary edema.",
            "Bilateral perihilar haziness consistent with pulmonary edema.",
            "Pulmonary vascular congestion with interstitial edema.", "Interstitial edema.", "Edema in both lungs."],
    CONS: ["{Side} {zone} lobe consolidation.", "Focal consolidation in the {side} {zone} lobe.",
           "There is consolidation in the {side} {zone} lobe.", "Dense {side} {zone} lobe consolidation.",
           "Airspace consolidation in the {side} {zone} lobe.", "Consolidation of the {side} {zone} lobe."],
    OPAC: ["Patchy opacity in the {side} {zone} lung.", "Patchy {side} {zone} lung opacities.",
           "There are patchy airspace opacities in the {side} {zone} lung.", "Hazy {side} {zone} lung opacity.",
           "Opacity in the {side} {zone} lung.", "Airspace opacity in the {side} {zone} lung."],
    LESION: ["{cm} cm nodule in the {side} {zone} lung.", "Rounded {cm} cm {side} {zone} lung nodule.",
             "There is a well-circumscribed nodule in the {side} {zone} lung.",
             "Nodule in the {side} {zone} lung.", "Solitary {side} {zone} lung nodule."],
    ATEL: ["Linear atelectasis at the {side} base.", "{Side} basilar atelectasis.",
           "Subsegmental atelectasis in the {side} lower lobe.", "Atelectasis at the {side} lung base.",
           "Platelike atelectasis at the {side} base.", "Mild {side} basilar atelectasis."],
    EFF: ["{Size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
          "{Side} pleural effusion, {size}.",
          "Blunting of the {side} costophrenic angle from a {size} pleural effusion.",
          "Pleural effusion on the {side}, {size}."],
    PTX: ["{Size} {side} apical pneumothorax.", "There is a {size} {side} pneumothorax.",
          "{Side} pneumothorax with a visible pleural line.", "Pneumothorax on the {side}, {size}.",
          "Apical {side} pneumothorax."],
    PLO: ["{Side} apical pleural thickening.", "Mild {side} apical pleural thickening."],
    FX: ["Fracture of the {side} {ord} rib.", "{Side} {ord} rib fracture.",
         "There is a healing fracture of the {side} {ord} posterior rib."],
}
BILATERAL_TEMPLATES = {EFF: ["{Size} bilateral pleural effusions.", "Bilateral {size} pleural effusions."],
                       ATEL: ["Bibasilar atelectasis.", "Mild bibasilar atelectasis."]}
LATERAL_PLEURAL_TEMPLATES = ["Pleural thickening along the {side} lateral chest wall."]
DEVICE_TEMPLATES = {"ett": ["Endotracheal tube in place.", "Endotracheal tube terminates above the carina."],
                    "cvc": ["Right internal jugular central line in place.",
                            "Right-sided central venous catheter with tip in the lower SVC."],
                    "pacemaker": ["Left-sided pacemaker in place.",
                                  "Dual-chamber pacemaker with leads in expected position."]}
UNCERTAIN_TEMPLATES = {
    CARD: ["Borderline cardiomegaly.", "Heart size is borderline enlarged.", "The heart may be mildly enlarged."],
    EC: ["The mediastinum may be widened.", "Possible widening of the mediastinum."],
    EDEMA: ["Possible mild pulmonary edema.", "Findings may represent early interstitial edema."],
    CONS: ["Possible {side} {zone} lobe consolidation.", "Consolidation in the {side} {zone} lobe cannot be excluded."],
    OPAC: ["Possible patchy opacity in the {side} {zone} lung.", "Questionable opacity in the {side} {zone} lung."],
    LESION: ["Possible nodule in the {side} {zone} lung.", "Questionable {side} {zone} lung nodule."],
    ATEL: ["Possible {side} basilar atelectasis.", "Minimal {side} basilar atelectasis is possible."],
    EFF: ["Possible small {side} pleural effusion.", "A small {side} pleural effusion cannot be excluded."],
    PTX: ["Possible small {side} apical pneumothorax.", "Questionable tiny {side} apical pneumothorax."],
    PLO: ["Possible {side} apical pleural thickening."],
    FX: ["Possible {side} {ord} rib fracture.", "Questionable fracture of the {side} {ord} rib."],
}
PNEUMONIA_CLAUSES = [", concerning for pneumonia.", ", which may represent pneumonia."]  # Pneumonia: uncertain

# Pertinent negatives by report section: (text, observations it states as negative). Every section
# without a finding states its negative, always about the same observations, as the stock normal
# sentences of IU X-Ray reports do: so the negatives of a report follow from the image, and a reward
# that counts negatives (MCCS) can be earned from the pixels (ours). FILLERS words each negative one
# way (normal_wordings="one", the default); VARIED_FILLERS in a few ways ("varied").
FILLERS = [
    [("The heart is normal in size.", {CARD})],
    [("No focal consolidation.", {CONS})],
    [("No pleural effusion or pneumothorax.", {EFF, PTX}), ("No pneumothorax.", {PTX}),
     ("No pleural effusion.", {EFF})],
    [("No displaced rib fracture.", {FX})],
]
IMPRESSIONS = ["No acute cardiopulmonary abnormality."]
VARIED_FILLERS = [
    [("Heart size is normal.", {CARD}), ("The heart is normal in size.", {CARD}), ("Normal heart size.", {CARD})],
    [("No focal consolidation.", {CONS}), ("Lungs are clear without focal consolidation.", {CONS}),
     ("There is no focal consolidation.", {CONS})],
    [("No pleural effusion or pneumothorax.", {EFF, PTX}), ("No pneumothorax or pleural effusion.", {PTX, EFF}),
     ("There is no pleural effusion or pneumothorax.", {EFF, PTX}), ("No pneumothorax.", {PTX}),
     ("No pleural effusion.", {EFF})],
    [("No displaced rib fracture.", {FX}), ("No acute rib fracture.", {FX})],
]
VARIED_IMPRESSIONS = ["No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.",
                      "No active disease."]
NORMAL_WORDINGS = {"one": (FILLERS, IMPRESSIONS), "varied": (VARIED_FILLERS, VARIED_IMPRESSIONS)}
SECTION_OF = {DEV: -1, CARD: 0, EC: 0, EDEMA: 1, CONS: 1, OPAC: 1, LESION: 1, ATEL: 1, EFF: 2, PTX: 2, PLO: 2, FX: 3}
ORDINALS = {4: "fourth", 5: "fifth", 6: "sixth", 7: "seventh", 8: "eighth"}


# ---------------------------------------------------------------- sampling a study
def sample_findings(rng: np.random.Generator) -> list[Finding]:
    """The findings of one study: none (normal) or 1-3 distinct observations with drawn parameters."""
    if rng.random() < P_NORMAL:
        return []
    names, weights = list(PREVALENCE), np.array(list(PREVALENCE.values()), dtype=float)
    k = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    chosen = rng.choice(len(names), size=k, replace=False, p=weights / weights.sum())
    return [_sample_finding(names[i], rng) for i in sorted(chosen)]


def _sample_finding(obs: str, rng: np.random.Generator) -> Finding:
    uncertain = obs != DEV and rng.random() < P_UNCERTAIN
    f = Finding(obs, UNCERTAIN if uncertain else POSITIVE, side=str(rng.choice(["right", "left"])),
                zone=str(rng.choice(["upper", "middle", "lower"])), rib=int(rng.integers(4, 9)),
                cm=round(float(rng.uniform(0.8, 2.0)), 1))
    if obs in (EFF, ATEL) and not uncertain and rng.random() < 0.25:
        f.side = "both"
    if obs == CONS:
        f.zone = str(rng.choice(["upper", "lower"]))
    f.size = "small"
    if obs == EFF:
        f.size = "small" if uncertain else str(rng.choice(["small", "moderate", "large"]))
    elif obs == PTX:
        f.size = "small" if uncertain else str(rng.choice(["small", "moderate"]))
    elif obs in (CARD, EDEMA):
        f.size = str(rng.choice(["mild", "moderate"]))
    if obs == DEV:
        f.kind = str(rng.choice(["ett", "cvc", "pacemaker"]))
    elif obs == PLO:
        f.kind = "apical" if uncertain else str(rng.choice(["apical", "lateral"]))
    return f


def _finding_sentence(f: Finding, rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    if f.obs == DEV:
        options = DEVICE_TEMPLATES[f.kind]
    elif f.status == UNCERTAIN:
        options = UNCERTAIN_TEMPLATES[f.obs]
    elif f.side == "both":
        options = BILATERAL_TEMPLATES[f.obs]
    elif f.obs == PLO and f.kind == "lateral":
        options = LATERAL_PLEURAL_TEMPLATES
    else:
        options = POSITIVE_TEMPLATES[f.obs]
    zone = {"middle": "mid"}.get(f.zone, f.zone)
    text = str(rng.choice(options)).format(
        side=f.side, Side=f.side.capitalize(), zone=zone, size=f.size, Size=f.size.capitalize(),
        sev=f.size, Sev=f.size.capitalize(), sevly=f.size + "ly", ord=ORDINALS[f.rib], cm=f.cm)
    labels = {f.obs: f.status}
    if f.obs == CONS and f.status == POSITIVE and rng.random() < 0.3:
        text = text[:-1] + str(rng.choice(PNEUMONIA_CLAUSES))
        labels[PNA] = UNCERTAIN
    return text, labels


def write_report(findings: list[Finding], rng: np.random.Generator, stated_share: float = P_STATED,
                 normal_wordings: str = "one") -> tuple[str, list[int]]:
    """The report text and its 14 codes (CONDITIONS order).

    Each finding is stated with probability `stated_share`; the others are left out (blank), and no
    pertinent negative is written about an observation that is drawn, stated or not.
    """
    fillers, impressions = NORMAL_WORDINGS[normal_wordings]
    present = {f.obs for f in findings}
    told = [f for f in findings if rng.random() < stated_share]
    stated: dict[str, int] = {}
    sections: list[list[str]] = [[] for _ in range(5)]  # devices, heart, lungs, pleura, bones
    for f in told:
        text, labels = _finding_sentence(f, rng)
        sections[SECTION_OF[f.obs] + 1].append(text)
        stated.update(labels)
    pathology = any(f.obs != DEV for f in told)
    n = len(told)
    for s, options in enumerate(fillers):
        usable = [(t, obs) for t, obs in options if not (obs & (present | set(stated)))]
        widest = max((len(obs) for _, obs in usable), default=0)
        usable = [(t, obs) for t, obs in usable if len(obs) == widest]  # state every negative it can
        if usable and n < MAX_SENTENCES - (not pathology):
            text, obs = usable[int(rng.integers(len(usable)))]
            sections[s + 1].append(text)
            stated.update({o: NEGATIVE for o in obs})
            n += 1
    closing = [str(rng.choice(impressions))] if not pathology else []
    return _finish(sections, closing, stated)


def _finish(sections, closing, stated) -> tuple[str, list[int]]:
    sentences = [t for sec in sections for t in sec] + closing
    codes = [stated.get(obs, BLANK) for obs in CONDITIONS[:NO_FINDING]]
    return " ".join(sentences), codes + [no_finding(codes)]


def make_study(seed: int, split: str, index: int, image_size: int, stated_share: float = P_STATED,
               normal_wordings: str = "one"):
    """(report, codes, frontal uint8 [S, S], lateral uint8 [S, S]) of one study; its own RNG stream."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), index])
    findings = sample_findings(rng)
    report, codes = write_report(findings, rng, stated_share, normal_wordings)
    frontal = draw.frontal(findings, rng, image_size)
    lateral = draw.lateral(findings, rng, image_size)
    return report, codes, frontal, lateral


# ---------------------------------------------------------------- writing the folder
def generate(out: str, n_train: int = 600, n_val: int = 60, n_test: int = 100,
             image_size: int = 112, seed: int = 0, stated_share: float = P_STATED,
             normal_wordings: str = "one") -> str:
    """Write the demo set to `out` in R2Gen format (+ findings.json, demo.json); returns `out`.

    Written to a temporary folder first and renamed, so an interrupted run leaves no half set.
    """
    if not 0.0 <= stated_share <= 1.0:
        raise ValueError(f"stated_share is a probability, got {stated_share}")
    if normal_wordings not in NORMAL_WORDINGS:
        raise ValueError(f"normal_wordings must be one of {sorted(NORMAL_WORDINGS)}, got {normal_wordings!r}")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"{out} exists and is not empty; remove it or choose another --out")
    tmp = out.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    annotation, findings = {}, {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        annotation[split] = []
        for i in range(n):
            sid = f"demo_{split}_{i:05d}"
            report, codes, frontal, lateral = make_study(seed, split, i, image_size, stated_share,
                                                         normal_wordings)
            os.makedirs(os.path.join(tmp, "images", sid))
            for view, pixels in enumerate((frontal, lateral)):
                Image.fromarray(pixels).save(os.path.join(tmp, "images", sid, f"{view}.png"))
            annotation[split].append({"id": sid, "report": report,
                                      "image_path": [f"{sid}/0.png", f"{sid}/1.png"], "split": split})
            findings[sid] = codes
    settings = dict(version=VERSION, n_train=n_train, n_val=n_val, n_test=n_test, image_size=image_size,
                    seed=seed, stated_share=stated_share, normal_wordings=normal_wordings)
    for name, obj in (("annotation.json", annotation), ("findings.json", findings), ("demo.json", settings)):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    if os.path.isdir(out):
        os.rmdir(out)  # empty, checked above
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    return out


def ensure_demo(root: str = "data/demo", **kwargs) -> str:
    """Return `root`, generating the demo set there first if it has no annotation.json.

    kwargs go to generate (n_train, n_val, n_test, image_size, seed, stated_share, normal_wordings).
    An existing set is reused when this generator version drew it with the settings in kwargs;
    otherwise a clear error says how to redraw it (results of an older set would not match the README).
    """
    if not os.path.isfile(os.path.join(root, "annotation.json")):
        return generate(root, **kwargs)
    path = os.path.join(root, "demo.json")
    settings = {"version": 1}  # sets drawn before demo.json existed
    if os.path.isfile(path):
        settings = read_json(path, f"remove the set (rm -r {root}) to draw it again", error=DataError)
    differ = {k: (settings.get(k), v) for k, v in dict(kwargs, version=VERSION).items() if settings.get(k) != v}
    if differ:
        said = ", ".join(f"{k}: {have} here, {want} asked" for k, (have, want) in sorted(differ.items()))
        raise DataError(f"{root} holds a demo set drawn with other settings ({said}); remove it "
                        f"(rm -r {root}) to draw the current one, or give another data root")
    return root


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the mrgr1 demo data set (drawn chest X-rays + reports).")
    p.add_argument("--out", default="data/demo", help="output folder (must be absent or empty)")
    p.add_argument("--train", type=int, default=600, help="number of training studies")
    p.add_argument("--val", type=int, default=60, help="number of validation studies")
    p.add_argument("--test", type=int, default=100, help="number of test studies")
    p.add_argument("--image-size", type=int, default=112, help="image side in pixels (14 px patches: 112 = 8x8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--stated-share", type=float, default=P_STATED,
                   help="probability that a report states a drawn finding (ours: 0.7; 1 = complete reports)")
    p.add_argument("--normal-wordings", default="one", choices=sorted(NORMAL_WORDINGS),
                   help="one wording per normal statement (default, as IU X-Ray's stock sentences) or a few")
    a = p.parse_args(argv)
    generate(a.out, a.train, a.val, a.test, a.image_size, a.seed, a.stated_share, a.normal_wordings)
    print(f"wrote {a.train}/{a.val}/{a.test} train/val/test studies to {a.out}")


if __name__ == "__main__":
    main()
