"""The toy world's object detector and GenEval's scoring rules.

`detect` finds objects the way GenEval's detector would report them (class, colour, centre):
bright pixels are assigned the nearest palette colour, each colour's 4-connected components
are objects, and the shape is read from geometry (bounding-box fill ratio and aspect).
`geneval_score` is GenEval's partial-credit score and strict correctness, written against
detections, so the same function scores toy images and any detector's output.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.toy.world import COLORS, POSITION_MARGIN, _relation_holds

PALETTE = np.array(list(COLORS.values()), dtype=np.float32)
COLOR_NAMES = list(COLORS)
BRIGHTNESS = 0.5          # a pixel belongs to an object when its brightest channel exceeds this
MIN_AREA = 12             # smaller components are speckle, not objects
SIDE_RANGE = (4, 16)      # objects are 7-10 px; larger blobs are smears, not shapes
ASPECT_RANGE = (0.6, 1.6)
# bounding-box fill ratio: square 1.0, circle ~0.78, triangle ~0.5-0.6
FILL_SQUARE, FILL_CIRCLE, FILL_TRIANGLE = 0.9, 0.68, 0.38


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    centre: tuple  # (y, x) of the bounding-box centre, in pixels


def classify_shape(component):
    """Shape name from a boolean component mask cropped to its bounding box, or None."""
    height, width = component.shape
    if not (SIDE_RANGE[0] <= height <= SIDE_RANGE[1] and SIDE_RANGE[0] <= width <= SIDE_RANGE[1]):
        return None
    if not ASPECT_RANGE[0] <= width / height <= ASPECT_RANGE[1]:
        return None
    fill = component.sum() / (height * width)
    if fill >= FILL_SQUARE:
        return "square"
    if fill >= FILL_CIRCLE:
        return "circle"
    if fill >= FILL_TRIANGLE:
        return "triangle"
    return None


def colour_labels(image):
    """Per pixel of a (3, H, W) image, flattened: the index of the nearest palette colour, or -1
    where the pixel is too dark to belong to an object."""
    pixels = np.asarray(image, dtype=np.float32).reshape(3, -1).T
    bright = pixels.max(axis=1) > BRIGHTNESS
    nearest = ((pixels[:, None, :] - PALETTE[None]) ** 2).sum(-1).argmin(1)
    return np.where(bright, nearest, -1)


def detect(image):
    """Detections in one float image (3, H, W) in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    labels_of_colour = colour_labels(image).reshape(image.shape[1:])
    detections = []
    for colour_index, colour in enumerate(COLOR_NAMES):
        labels, count = ndimage.label(labels_of_colour == colour_index)  # 4-connected
        for box_index, box in enumerate(ndimage.find_objects(labels), start=1):
            component = labels[box] == box_index
            if component.sum() < MIN_AREA:
                continue
            shape = classify_shape(component)
            if shape is None:
                continue
            # GenEval compares bounding-box centres
            centre = ((box[0].start + box[0].stop) / 2, (box[1].start + box[1].stop) / 2)
            detections.append(Detection(shape, colour, centre))
    return detections


def geneval_score(meta, detections):
    """GenEval partial credit (the published training reward) and strict correctness.

    Per include clause (class c, count n) with F the detections of class c: append
    1 - |n - |F||/n (negative when |F| > 2n: a published quirk kept for parity). If |F| != n the
    clause fails and a clause with colour or position appends 0. Otherwise colour appends
    1 - |n - #F of that colour|/n, and position appends 0 at the first violated pair (or when
    the reference clause failed) and then 1 regardless, so a failed position averages 0.5
    (also a published quirk). `exclude` clauses (class, count) fail strictness when at least
    `count` such objects are found.
    """
    scores, strict = [], True
    matched = []  # per clause: its detections when the clause passed its count, else None
    for clause in meta["include"]:
        found = [d for d in detections if d.shape == clause["class"]]
        n = clause["count"]
        scores.append(1 - abs(n - len(found)) / n)
        if len(found) != n:
            strict = False
            matched.append(None)
            if "color" in clause or "position" in clause:
                scores.append(0.0)
            continue
        matched.append(found)
        if "color" in clause:
            right_colour = sum(d.color == clause["color"] for d in found)
            scores.append(1 - abs(n - right_colour) / n)
            strict &= right_colour == n
        if "position" in clause:
            relation, reference = clause["position"]
            if matched[reference] is None:
                scores.append(0.0)
                strict = False
                continue
            for a in found:
                if any(not _relation_holds(relation, a.centre, b.centre, POSITION_MARGIN) for b in matched[reference]):
                    scores.append(0.0)
                    strict = False
                    break
            scores.append(1.0)
    for clause in meta.get("exclude", []):
        if sum(d.shape == clause["class"] for d in detections) >= clause["count"]:
            strict = False
    return float(np.mean(scores)), strict


def score_images(images, metadata):
    """(partial-credit scores, strict correctness) for a batch of images and their metadata."""
    results = [geneval_score(meta, detect(image)) for image, meta in zip(images, metadata)]
    return np.array([r[0] for r in results], dtype=np.float32), np.array([r[1] for r in results], dtype=bool)


def colour_coverage(images, metadata, saturation=0.3):
    """A deliberately hackable proxy reward: the fraction of pixels painted in the prompt's
    colours (any palette colour when it names none), divided by `saturation` and capped at 1.
    A correct render covers ~5-20 % of the image; flooding the canvas with the colour scores 1
    while destroying the shapes. Used to study over-optimisation (GRPO-Guard's demonstration)."""
    images = np.asarray(images, dtype=np.float32)
    scores = []
    for image, meta in zip(images, metadata):
        wanted = {clause["color"] for clause in meta.get("include", []) if clause.get("color")}
        indices = [COLOR_NAMES.index(c) for c in wanted] if wanted else list(range(len(COLOR_NAMES)))
        coverage = np.isin(colour_labels(image), indices).mean()
        scores.append(min(1.0, coverage / saturation))
    return np.array(scores, dtype=np.float32)
