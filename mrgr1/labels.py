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
