"""The toy world's data: a closed vocabulary, GenEval-shaped prompts with GenEval metadata, and
a renderer that draws a random scene satisfying a prompt.

Images are 32x32 RGB on black with circles, squares and triangles in four colours. Prompts
cover GenEval's six tags (single_object, two_object, counting, colors, position, color_attr)
and carry GenEval's jsonl schema (`tag`, `include` with class/count/color/position, `exclude`),
so the reward and data code that reads real GenEval files reads these too. A quarter of each
tag's prompts is held out as the test split: those prompt strings never appear in training.
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MIN_SIZE, MAX_SIZE = 7, 10
# margin (pixels) between object centres for a relation to hold; the detector uses the same
POSITION_MARGIN = 3.0

VOCAB = ("<pad>", "<s>", "a", "photo", "of", "and", *SHAPES, *(s + "s" for s in SHAPES), *COLORS,
         *NUMBERS.values(), "left", "right", "above", "below")
SPLIT_SEED = 1234
DATA_DIR = Path(__file__).parent / "data"


def _noun(shape, count=1, color=None):
    words = ([color] if color else []) + [shape + ("s" if count > 1 else "")]
    return " ".join(words)


def _article(shape, color=None):
    return "a " + _noun(shape, 1, color)


def enumerate_prompts():
    """Every prompt of the world, as GenEval metadata dicts, grouped by tag (deterministic order)."""
    out = {tag: [] for tag in TAGS}
    for shape in SHAPES:
        out["single_object"].append(
            {"tag": "single_object", "include": [{"class": shape, "count": 1}], "exclude": [],
             "prompt": f"a photo of {_article(shape)}"})
    for first, second in itertools.permutations(SHAPES, 2):
        out["two_object"].append(
            {"tag": "two_object", "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
             "exclude": [], "prompt": f"a photo of {_article(first)} and {_article(second)}"})
    for count, shape, color in itertools.product(NUMBERS, SHAPES, COLORS):
        out["counting"].append(
            {"tag": "counting", "include": [{"class": shape, "count": count, "color": color}],
             "exclude": [{"class": shape, "count": count + 1}],
             "prompt": f"a photo of {NUMBERS[count]} {_noun(shape, count, color)}"})
    for shape, color in itertools.product(SHAPES, COLORS):
        out["colors"].append(
            {"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}], "exclude": [],
             "prompt": f"a photo of {_article(shape, color)}"})
    # distinct shapes, as in GenEval (its counts are per class); colours make the pairs varied
    for (s1, s2), c1, c2 in itertools.product(itertools.permutations(SHAPES, 2), COLORS, COLORS):
        for relation in RELATIONS:
            # GenEval: include[0] is the reference object, include[1] is placed relative to it
            out["position"].append(
                {"tag": "position",
                 "include": [{"class": s2, "count": 1, "color": c2},
                             {"class": s1, "count": 1, "color": c1, "position": [relation, 0]}],
                 "exclude": [], "prompt": f"a photo of {_article(s1, c1)} {relation} {_article(s2, c2)}"})
    for (s1, s2), (c1, c2) in itertools.product(itertools.permutations(SHAPES, 2),
                                                itertools.permutations(COLORS, 2)):
        out["color_attr"].append(
            {"tag": "color_attr",
             "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}],
             "exclude": [], "prompt": f"a photo of {_article(s1, c1)} and {_article(s2, c2)}"})
    return out


def split_prompts():
    """(train, test) lists of metadata: per tag, a seeded quarter (rounded up) is held out."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for tag, prompts in enumerate_prompts().items():
        order = rng.permutation(len(prompts))
        n_test = math.ceil(len(prompts) / 4)
        test += [prompts[i] for i in sorted(order[:n_test])]
        train += [prompts[i] for i in sorted(order[n_test:])]
    return train, test


def write_split_files(directory=DATA_DIR):
    """Write the splits as GenEval-style `{train,test}_metadata.jsonl` files."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "test"), split_prompts()):
        with open(directory / f"{name}_metadata.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


# ---------------------------------------------------------------------------- rendering


def shape_mask(shape, size):
    """Boolean (size, size) footprint of a shape whose bounding box is size x size."""
    centres = np.arange(size) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    if shape == "triangle":  # apex up: half-width grows linearly from the top row to the base
        return np.abs(xx - size / 2) <= yy / 2 + 0.25
    raise ValueError(f"unknown shape {shape!r}")


def _relation_holds(relation, a, b, margin=POSITION_MARGIN):
    """Does object centre a stand in `relation` to object centre b? (x right, y down)."""
    (ay, ax), (by, bx) = a, b
    return {"left of": ax < bx - margin, "right of": ax > bx + margin,
            "above": ay < by - margin, "below": ay > by + margin}[relation]


def sample_scene(meta, rng, max_tries=200):
    """A random list of objects (shape, colour, top, left, size) that satisfies `meta` exactly."""
    for _ in range(max_tries):
        objects, ok = [], True
        for clause in meta["include"]:
            for _ in range(clause["count"]):
                color = clause.get("color") or rng.choice(list(COLORS))
                size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
                placed = False
                for _ in range(50):
                    top, left = (int(v) for v in rng.integers(1, IMAGE_SIZE - size, size=2))
                    box = (top - 1, left - 1, top + size + 1, left + size + 1)  # 1 px gap
                    if any(box[0] < o[2] + o[4] and o[2] < box[2] and box[1] < o[3] + o[4] and o[3] < box[3]
                           for o in objects):
                        continue
                    if "position" in clause:
                        relation, ref = clause["position"]
                        ref_obj = objects[sum(c["count"] for c in meta["include"][:ref])]
                        centre = (top + size / 2, left + size / 2)
                        ref_centre = (ref_obj[2] + ref_obj[4] / 2, ref_obj[3] + ref_obj[4] / 2)
                        if not _relation_holds(relation, centre, ref_centre, POSITION_MARGIN + 1):
                            continue
                    objects.append((clause["class"], color, top, left, size))
                    placed = True
                    break
                ok &= placed
        if ok:
            return objects
    raise RuntimeError(f"could not place a scene for {meta['prompt']!r}")


def render(objects):
    """Float32 (3, 32, 32) image in [0, 1]."""
    image = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for shape, color, top, left, size in objects:
        mask = shape_mask(shape, size)
        for channel, value in enumerate(COLORS[color]):
            image[channel, top:top + size, left:left + size][mask] = value
    return image


def render_prompt(meta, rng):
    return render(sample_scene(meta, rng))
