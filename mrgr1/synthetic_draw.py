"""Drawing the demo set's chest X-rays with numpy (used by mrgr1/synthetic.py).

Every shape is a vectorised mask over a normalised grid (y down, x right, both in [0, 1]).
Intensities are in [0, 1] (bright = dense, as on a radiograph). The frontal view is a PA film:
the patient's right lung is on the image's left. Anatomy varies a little per study (jitter), and
each finding changes a clear, measurable region: the heart's width, the brightness of a lung
base, a dark apical rim, a bright blob.

Example:
    >>> import numpy as np; from mrgr1.synthetic import Finding
    >>> img = frontal([Finding("Cardiomegaly", 1)], np.random.default_rng(0), 112)  # uint8 [112, 112]
"""
from __future__ import annotations

import numpy as np
from PIL import Image

LUNG_X = {"right": 0.31, "left": 0.69}          # lung centres on a PA image (patient's right = left)
LUNG_CY, LUNG_RY, LUNG_RX = 0.45, 0.31, 0.155
ZONE_Y = {"upper": 0.30, "middle": 0.45, "lower": 0.58}
HEART_RX = {None: 0.14, "mild": 0.195, "moderate": 0.225}  # half-width of the heart shadow
HEART_CY, HEART_CX, HEART_RY = 0.56, 0.55, 0.12
MEDIASTINUM_HALF_WIDTH = 0.065                 # upper mediastinum; widened by +0.06
EFFUSION_HEIGHT = {"small": 0.12, "moderate": 0.2, "large": 0.3}
PTX_RIM = {"small": 0.2, "moderate": 0.3}     # rim width, in units of the lung's radius


def _grid(size: int):
    c = (np.arange(size) + 0.5) / size
    return c[:, None], c[None, :]  # yy [S, 1], xx [1, S]


def _ellipse(yy, xx, cy, cx, ry, rx):
    """Normalised radius: < 1 inside the ellipse."""
    return np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)


def _blend(img, mask, value, strength=1.0):
    """Move pixels towards `value` by `strength` * mask (mask may be soft, in [0, 1])."""
    return img + strength * mask * (value - img)


def _smooth_noise(rng, size, cells=8):
    coarse = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _segments(yy, xx, points, half_width):
    """Mask of a polyline through (y, x) points, `half_width` thick."""
    mask = np.zeros(np.broadcast_shapes(yy.shape, xx.shape), bool)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:]):
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / (dy * dy + dx * dx), 0, 1)
        mask |= np.hypot(yy - (y0 + t * dy), xx - (x0 + t * dx)) < half_width
    return mask


def _finish(img, rng):
    """Soften edges (3x3 box blur), add film noise, convert to uint8."""
    p = np.pad(img, 1, mode="edge")
    s = img.shape[0]
    img = sum(p[i:i + s, j:j + s] for i in range(3) for j in range(3)) / 9.0
    img = img + rng.normal(0.0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _sides(f):
    return ["right", "left"] if f.side == "both" else [f.side]


def _get(findings, obs):
    return next((f for f in findings if f.obs == obs), None)


# ---------------------------------------------------------------- frontal (PA) view
def frontal(findings, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """The PA view of a study with these findings: uint8 [size, size]."""
    yy, xx = _grid(size)
    jy, jx = rng.normal(0, 0.01, 2)
    yy, xx = yy - jy, xx - jx                       # the patient is never perfectly centred
    img = np.full((size, size), 0.05)
    img = _blend(img, _ellipse(yy, xx, 0.56, 0.5, 0.52, 0.45) < 1, 0.40)
    texture = _smooth_noise(rng, size)
    lungs = {}
    for side, cx in LUNG_X.items():
        dome = 0.68 + 0.09 * ((xx - cx) / LUNG_RX) ** 2
        lungs[side] = (_ellipse(yy, xx, LUNG_CY, cx, LUNG_RY, LUNG_RX) < 1) & (yy < dome)
        hilum = np.exp(-_ellipse(yy, xx, LUNG_CY, 0.5 + (cx - 0.5) * 0.55, 0.12, 0.12) ** 2)
        img = np.where(lungs[side], 0.13 + 0.08 * hilum + 0.025 * texture, img)
    img = _ribs(img, yy, xx, lungs, _get(findings, "Fracture"))
    img = _mediastinum_and_heart(img, yy, xx, findings)
    below = (yy > 0.68 + 0.09 * ((xx - 0.5) / 0.35) ** 2 - 0.04) & (_ellipse(yy, xx, 0.56, 0.5, 0.52, 0.45) < 1)
    img = np.where(below & ~lungs["right"] & ~lungs["left"], np.maximum(img, 0.5), img)
    for f in findings:
        img = _draw_frontal_finding(img, yy, xx, lungs, f, rng)
    return _finish(img, rng)


def _ribs(img, yy, xx, lungs, fracture):
    """Six posterior ribs per side, curving down laterally; a fracture is a gap with a step-off."""
    for side, cx in LUNG_X.items():
        lateral = np.sign(cx - 0.5)               # -1 for the image-left (patient's right) lung
        for k, rib in enumerate(range(3, 9)):
            curve = 0.16 + 0.08 * k + 0.10 * ((xx - 0.5) / 0.4) ** 2
            band = np.abs(yy - curve) < 0.011
            if fracture is not None and rib == fracture.rib and side in _sides(fracture):
                xf = cx + lateral * 0.07
                past = (xx - xf) * lateral > 0      # lateral fragment, displaced downwards
                band = np.where(past, np.abs(yy - curve - 0.03 * fracture.strength) < 0.011, band)
                band &= np.abs(xx - xf) > 0.03 * fracture.strength
            img = img + 0.1 * (band & lungs[side])
    return img


def _mediastinum_and_heart(img, yy, xx, findings):
    ec, card = _get(findings, "Enlarged Cardiomediastinum"), _get(findings, "Cardiomegaly")
    upper = MEDIASTINUM_HALF_WIDTH + (0.06 * ec.strength if ec else 0.0)
    half = np.where(yy < 0.45, upper, MEDIASTINUM_HALF_WIDTH)
    img = _blend(img, (np.abs(xx - 0.5) < half) & (yy > 0.06) & (yy < 0.72), 0.56)
    img = _blend(img, (np.abs(xx - 0.5) < 0.025) & (yy > 0.04), 0.64)          # spine
    rx = HEART_RX[None] + ((HEART_RX[card.size or "mild"] - HEART_RX[None]) * card.strength if card else 0.0)
    return _blend(img, _ellipse(yy, xx, HEART_CY, HEART_CX + (rx - HEART_RX[None]) * 0.4,
                                HEART_RY + 0.3 * (rx - HEART_RX[None]), rx) < 1, 0.6)


def _draw_frontal_finding(img, yy, xx, lungs, f, rng):
    s, obs = f.strength, f.obs
    for side in _sides(f):
        cx, lung = LUNG_X[side], lungs[side]
        lateral = np.sign(cx - 0.5)
        if obs == "Pleural Effusion":               # meniscus: fluid climbs higher laterally
            depth = np.abs(xx - (cx + lateral * LUNG_RX)) / (2 * LUNG_RX)
            level = 0.74 - EFFUSION_HEIGHT[f.size or "small"] + 0.07 * depth
            img = _blend(img, lung & (yy > level), 0.55, s)
        elif obs == "Pneumothorax":                 # dark rim, no markings, thin pleural line
            r = _ellipse(yy, xx, LUNG_CY, cx, LUNG_RY, LUNG_RX)
            top = lung & (yy < LUNG_CY + 0.05)
            img = _blend(img, top & (r > 1 - PTX_RIM[f.size or "small"]), 0.02, s)
            img = _blend(img, top & (np.abs(r - 1 + PTX_RIM[f.size or "small"]) < 0.02), 0.32, s)
        elif obs == "Consolidation":
            d = _ellipse(yy, xx, ZONE_Y[f.zone], cx + lateral * 0.03, 0.085, 0.075)
            img = img + s * 0.32 * np.clip((1 - d) * 4, 0, 1) * lung
        elif obs == "Lung Opacity":
            for dy, dx in rng.normal(0, 0.035, (4, 2)):
                d = _ellipse(yy, xx, ZONE_Y[f.zone] + dy, cx + dx, 0.03, 0.03)
                img = img + s * 0.16 * np.exp(-d ** 2) * lung
        elif obs == "Lung Lesion":
            r = 0.012 + 0.018 * f.cm
            d = _ellipse(yy, xx, ZONE_Y[f.zone], cx + lateral * 0.04, r, r)
            img = img + s * 0.42 * np.clip((1 - d) * 3, 0, 1) * lung
        elif obs == "Atelectasis":                  # thin oblique band at the base
            line = 0.6 + rng.uniform(-0.15, 0.15) * (xx - cx)
            img = img + s * 0.3 * ((np.abs(yy - line) < 0.012) & (np.abs(xx - cx) < 0.11) & lung)
        elif obs == "Pleural Other":
            r = _ellipse(yy, xx, LUNG_CY, cx, LUNG_RY, LUNG_RX)
            where = (yy < 0.26) if f.kind == "apical" else ((np.abs(yy - 0.45) < 0.13) & ((xx - cx) * lateral > 0))
            img = img + s * 0.3 * (lung & (r > 0.78) & where)
    if obs == "Edema":                              # bilateral haze, densest at the hila
        for side, cx in LUNG_X.items():
            hilar = np.exp(-_ellipse(yy, xx, LUNG_CY, 0.5 + (cx - 0.5) * 0.55, 0.13, 0.13) ** 2)
            img = img + s * (0.09 + 0.15 * hilar) * lungs[side]
    elif obs == "Support Devices":
        img = np.where(_device_mask(yy, xx, f.kind), 0.95, img)
    return img


def _device_mask(yy, xx, kind):
    if kind == "ett":
        return (np.abs(xx - 0.5) < 0.01) & (yy < 0.27)
    if kind == "cvc":                               # right internal jugular -> SVC
        return _segments(yy, xx, [(0.02, 0.36), (0.22, 0.42), (0.40, 0.46)], 0.008)
    box = (np.abs(yy - 0.20) < 0.035) & (np.abs(xx - 0.80) < 0.05)   # pacemaker, left chest wall
    return box | _segments(yy, xx, [(0.20, 0.78), (0.38, 0.62), (0.58, 0.56)], 0.007)


# ---------------------------------------------------------------- lateral view
def lateral(findings, rng: np.random.Generator, size: int = 112) -> np.ndarray:
    """The lateral view (anterior = image left): uint8 [size, size]."""
    yy, xx = _grid(size)
    yy = yy - rng.normal(0, 0.01)
    img = np.full((size, size), 0.05)
    img = _blend(img, _ellipse(yy, xx, 0.56, 0.5, 0.52, 0.40) < 1, 0.40)
    dome = 0.70 + 0.05 * ((xx - 0.5) / 0.25) ** 2
    lung = (_ellipse(yy, xx, 0.45, 0.5, 0.32, 0.25) < 1) & (yy < dome)
    img = np.where(lung, 0.15 + 0.025 * _smooth_noise(rng, size), img)
    img = _blend(img, (xx > 0.74) & (xx < 0.84) & (yy > 0.12) & (np.sin(yy * 70) > -0.6), 0.6)  # vertebrae
    card = _get(findings, "Cardiomegaly")
    grow = (HEART_RX[card.size or "mild"] - HEART_RX[None]) * card.strength if card else 0.0
    img = _blend(img, _ellipse(yy, xx, 0.58, 0.36 + grow * 0.5, 0.14 + grow * 0.3, 0.13 + grow) < 1, 0.55)
    for f in findings:
        s = f.strength
        if f.obs == "Pleural Effusion":             # posterior costophrenic sulcus fills first
            level = 0.74 - 0.8 * EFFUSION_HEIGHT[f.size or "small"] + 0.15 * np.clip(0.7 - xx, 0, None)
            img = _blend(img, lung & (yy > level), 0.55, s)
        elif f.obs == "Edema":
            img = img + s * (0.09 + 0.12 * np.exp(-_ellipse(yy, xx, 0.45, 0.55, 0.15, 0.15) ** 2)) * lung
        elif f.obs in ("Consolidation", "Lung Opacity", "Lung Lesion"):
            r = {"Consolidation": 0.08, "Lung Opacity": 0.06, "Lung Lesion": 0.012 + 0.018 * f.cm}[f.obs]
            d = _ellipse(yy, xx, ZONE_Y[f.zone], 0.55, r, r)
            img = img + s * 0.28 * np.clip((1 - d) * 3, 0, 1) * lung
        elif f.obs == "Atelectasis":
            img = img + s * 0.3 * ((np.abs(yy - 0.62 + 0.2 * (xx - 0.5)) < 0.012) & lung)
        elif f.obs == "Support Devices":
            mask = {"ett": (np.abs(xx - 0.42 - 0.1 * yy) < 0.01) & (yy < 0.27),
                    "cvc": _segments(yy, xx, [(0.02, 0.50), (0.40, 0.45)], 0.008),
                    "pacemaker": (np.abs(yy - 0.2) < 0.035) & (np.abs(xx - 0.2) < 0.03)}[f.kind]
            img = np.where(mask, 0.95, img)
    return _finish(img, rng)
