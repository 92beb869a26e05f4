"""The gmm world's truth: 8 Gaussian modes on a ring, the prompts that name them, the data the
base is pretrained on, and the rewards (pure numpy functions of the points).

Points live in R^D: dims 0 and 1 are the ring's plane, dims 2.. are nuisance dims (N(0, s_n²),
independent of the prompt) that add sampled dimensions without adding anything to learn, so
the cost of dimension for the policy-gradient estimator can be measured (bench/claims.py).

Prompts are a closed grammar over compass names: "north", "north-east or south-west",
"the east half", "any mode". A prompt names a set of target modes. The data behind a prompt
are noisy captions: with probability 1 - LABEL_NOISE the point comes from one of its targets,
otherwise from any of the 8 modes. So the base puts only part of its mass on the targets and
an RL reward on the targets has room to rise, while the KL-regularised optimum
(common/gmm/frontier.py) stays a known function of the base.
"""

import math

import numpy as np

NUM_MODES = 8
RADIUS = 2.0           # ring radius; neighbouring modes are 2R·sin(pi/8) = 1.53 apart
MODE_STD = 0.2         # per-dim std of each mode in the ring plane
NUISANCE_STD = 0.5     # per-dim std of the nuisance dims
LABEL_NOISE = 0.6      # share of a prompt's data drawn from all modes instead of its targets
HIT_RADIUS = 0.5       # hard reward: within this distance (ring plane) of a target mode (2.5 std)
BUMP_WIDTH = 0.3       # soft reward: exp(-d² / (2 w²)), d = distance to the nearest target mode

DIRECTIONS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")
CARDINALS = ("north", "east", "south", "west")
VOCAB = frozenset(DIRECTIONS) | {"or", "the", "half", "any", "mode"}


def mode_angles():
    """Mode k sits at angle pi/2 - k·pi/4: north first, then clockwise."""
    return np.pi / 2 - np.arange(NUM_MODES) * np.pi / 4


def mode_centres():
    """(8, 2) centres on the ring."""
    angles = mode_angles()
    return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def check_words(text):
    """The words of `text` that are not in the gmm vocabulary."""
    return [word for word in text.lower().split() if word not in VOCAB]


def parse_prompt(text):
    """The target modes a prompt names, as a sorted tuple of mode indices; ValueError naming
    the words when it is not in the grammar."""
    words = text.lower().split()
    unknown = check_words(text)
    if unknown:
        raise ValueError(f"words {unknown} are not in the gmm vocabulary ({sorted(VOCAB)}); prompt: {text!r}")
    if words == ["any", "mode"]:
        return tuple(range(NUM_MODES))
    if len(words) == 1 and words[0] in DIRECTIONS:
        return (DIRECTIONS.index(words[0]),)
    if len(words) == 3 and words[1] == "or" and words[0] in DIRECTIONS and words[2] in DIRECTIONS \
            and words[0] != words[2]:
        return tuple(sorted((DIRECTIONS.index(words[0]), DIRECTIONS.index(words[2]))))
    if len(words) == 3 and words[0] == "the" and words[2] == "half" and words[1] in CARDINALS:
        centre = DIRECTIONS.index(words[1])
        return tuple(sorted({(centre - 1) % NUM_MODES, centre, (centre + 1) % NUM_MODES}))
    raise ValueError(f"{text!r} is not a gmm prompt: use a direction ('north-east'), 'A or B', "
                     "'the north|east|south|west half' or 'any mode'")


def all_prompts():
    """Every prompt of the grammar the world uses, with its category tag: 8 single modes,
    12 pairs (4 opposite, 8 adjacent), 4 halves, 'any mode'."""
    rows = [(name, "single") for name in DIRECTIONS]
    for k in range(4):
        rows.append((f"{DIRECTIONS[k]} or {DIRECTIONS[k + 4]}", "pair"))
    for k in range(NUM_MODES):
        rows.append((f"{DIRECTIONS[k]} or {DIRECTIONS[(k + 1) % NUM_MODES]}", "pair"))
    rows += [(f"the {name} half", "half") for name in CARDINALS]
    rows.append(("any mode", "any"))
    return rows


def condition_vectors(target_sets):
    """The text encoding: the uniform distribution over a prompt's targets, (B, 8); the empty
    prompt (None) is the zero vector, the unconditional branch of CFG."""
    out = np.zeros((len(target_sets), NUM_MODES), dtype=np.float32)
    for i, targets in enumerate(target_sets):
        if targets:
            out[i, list(targets)] = 1.0 / len(targets)
    return out


def sample_data(target_sets, dim, rng, label_noise=LABEL_NOISE):
    """Points (B, dim) from the data behind each prompt (None = the unconditional data: any mode)."""
    batch = len(target_sets)
    modes = rng.integers(0, NUM_MODES, size=batch)
    for i, targets in enumerate(target_sets):
        if targets and rng.random() >= label_noise:
            modes[i] = targets[rng.integers(0, len(targets))]
    points = np.empty((batch, dim), dtype=np.float64)
    points[:, :2] = mode_centres()[modes] + MODE_STD * rng.standard_normal((batch, 2))
    points[:, 2:] = NUISANCE_STD * rng.standard_normal((batch, dim - 2))
    return points, modes


def target_mass(targets, label_noise=LABEL_NOISE):
    """The true data's share of mass on a prompt's target modes."""
    return (1 - label_noise) + label_noise * len(targets) / NUM_MODES


# ------------------------------------------------------------------------------------- rewards


def target_distances(points, target_sets):
    """Distance (ring plane) from each point to the nearest of its prompt's target modes."""
    xy = np.asarray(points, dtype=np.float64)[:, :2]
    centres = mode_centres()
    return np.array([np.min(np.linalg.norm(centres[list(t)] - p, axis=1)) for p, t in zip(xy, target_sets)])


def soft_target(points, target_sets):
    """exp(-d² / (2 w²)) in [0, 1]: a bump at each target mode, about the width of the mode,
    so leaving the data lowers it as surely as missing the target does."""
    return np.exp(-target_distances(points, target_sets) ** 2 / (2 * BUMP_WIDTH**2))


def hard_target(points, target_sets):
    """1 if the point lands within HIT_RADIUS of a target mode (the world's strict accuracy)."""
    return (target_distances(points, target_sets) <= HIT_RADIUS).astype(np.float64)


def proxy_projection(points, target_sets):
    """The hackable proxy: max over target modes of the projection on the mode's direction,
    over the ring radius. It agrees with the target on the way to a mode and keeps rising past
    it, off the data (unbounded)."""
    xy = np.asarray(points, dtype=np.float64)[:, :2]
    units = mode_centres() / RADIUS
    return np.array([np.max(units[list(t)] @ p) for p, t in zip(xy, target_sets)]) / RADIUS


def true_log_density(points, targets, label_noise=LABEL_NOISE):
    """log p_data(x | prompt) of the true mixture (targets None = unconditional)."""
    points = np.asarray(points, dtype=np.float64)
    weights = np.full(NUM_MODES, label_noise / NUM_MODES if targets else 1 / NUM_MODES)
    if targets:
        weights[list(targets)] += (1 - label_noise) / len(targets)
    d2 = ((points[:, None, :2] - mode_centres()[None]) ** 2).sum(-1)
    log_ring = np.log(weights)[None] - d2 / (2 * MODE_STD**2) - 2 * math.log(MODE_STD) - math.log(2 * math.pi)
    top = log_ring.max(axis=1, keepdims=True)
    ring = (top + np.log(np.exp(log_ring - top).sum(axis=1, keepdims=True)))[:, 0]
    nuisance = points[:, 2:]
    dims = nuisance.shape[1]
    return ring + (-(nuisance**2).sum(1) / (2 * NUISANCE_STD**2) - dims * math.log(NUISANCE_STD)
                   - 0.5 * dims * math.log(2 * math.pi))
