"""Prompt data: named datasets (the toy splits), txt files and GenEval metadata jsonl files.

Every loader returns a list of `Prompt`s (text + GenEval-style metadata, empty for txt),
so rewards that need metadata (GenEval, the toy `shapes` reward) and those that don't read
the same records. Editing sets (`counting_edit`: `image`, `t2i_prompt`, `prompt`) keep their
source image as metadata `image`, an absolute path resolved against the jsonl file's folder.
Problems are reported with the path and line before any model loads.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

TOY_DATA_DIR = Path(__file__).resolve().parent / "toy" / "data"
GMM_DATA_DIR = Path(__file__).resolve().parent / "gmm" / "data"
DATASETS = {"toy": TOY_DATA_DIR, "gmm": GMM_DATA_DIR}
SPLITS = ("train", "test")


@dataclass
class Prompt:
    text: str
    metadata: dict = field(default_factory=dict)


def _read_txt(path):
    prompts = [Prompt(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    return prompts


def _read_jsonl(path):
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with a string 'prompt'")
        if "image" in row:
            row["image"] = _source_image(row["image"], path, number)
        prompts.append(Prompt(row["prompt"], row))
    return prompts


def _source_image(image, path, number):
    """An editing record's source image: its path resolved against the jsonl file's folder."""
    if not isinstance(image, str) or not image:
        raise ValueError(f"{path}:{number}: 'image' must be a path to the source image (relative to {path.parent})")
    resolved = (path.parent / Path(image).expanduser()).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{path}:{number}: source image {image!r} does not exist (looked for {resolved})")
    return str(resolved)


def _split_file(directory, split):
    for name in (f"{split}_metadata.jsonl", f"{split}.jsonl", f"{split}.txt"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} has no {split}_metadata.jsonl, {split}.jsonl or {split}.txt")


def resolve_prompt_file(spec, split="train"):
    """The file a `--prompts` value names for a split: a dataset name, a directory holding
    `{split}_metadata.jsonl` / `{split}.txt`, or a single .txt / .jsonl file (used for every split)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    spec = split_tag_selector(spec)[0]
    if spec in DATASETS:
        return _split_file(DATASETS[spec], split)
    path = Path(spec)
    if path.is_dir():
        return _split_file(path, split)
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"prompt file {path} must be .txt (one prompt per line) or .jsonl (GenEval metadata)")
        return path
    raise FileNotFoundError(f"--prompts {spec!r} is neither a dataset ({sorted(DATASETS)}) nor an existing path")


def split_tag_selector(spec):
    """'gmm@tag:single+pair' -> ('gmm', {'single', 'pair'}); a spec without '@tag:' -> (spec, None)."""
    base, sep, tags = str(spec).rpartition("@tag:")
    if not sep:
        return str(spec), None
    if not tags:
        raise ValueError(f"--prompts {spec}: name at least one tag after @tag: (e.g. {base}@tag:single+pair)")
    return base, set(tags.split("+"))


def load_prompts(spec, split="train"):
    """The `Prompt`s of a spec; `SPEC@tag:A+B` keeps the records whose metadata `tag` is A or B
    (a task subset of a GenEval-style set, e.g. one Flow-OPD teacher's prompts)."""
    spec, tags = split_tag_selector(spec)
    path = resolve_prompt_file(spec, split)
    prompts = _read_jsonl(path) if path.suffix == ".jsonl" else _read_txt(path)
    if not prompts:
        raise ValueError(f"prompt file {path} contains no prompts")
    if tags is not None:
        prompts = [p for p in prompts if p.metadata.get("tag") in tags]
        if not prompts:
            raise ValueError(f"prompt file {path} has no {split} prompt with tag(s) {sorted(tags)}")
    return prompts


def category_weights(prompts):
    """Per-prompt weights 1 / (prompts sharing its metadata `tag`): every category is drawn
    equally often. GenEval-style splits are dominated by one category (the toy train split is
    73 % `position`), while GenEval's score averages the categories equally."""
    counts = {}
    for prompt in prompts:
        tag = prompt.metadata.get("tag")
        counts[tag] = counts.get(tag, 0) + 1
    return [1.0 / counts[prompt.metadata.get("tag")] for prompt in prompts]


class GroupSampler:
    """Distributed K-repeat sampler (ALGORITHMS.md §8.1): each draw picks m = n·b/k prompts,
    repeats each k times, shuffles the n·b entries and gives rank r the slice [r·b, (r+1)·b).

    Every rank builds the same permutation from (seed, epoch), so groups stay intact across
    ranks and all ranks agree on the prompts; statistics are computed after gathering. The
    sampler is stateless given `epoch` (call `set_epoch(epoch·nb + i)` before each batch), so
    resuming needs only the epoch counter.

    `weights` (one per prompt, e.g. from `category_weights`) makes the m prompts of a draw a
    weighted sample without replacement instead of a uniform one.
    """

    def __init__(self, num_prompts, batch_size, group_size, num_replicas=1, rank=0, seed=0, weights=None):
        total = num_replicas * batch_size
        if total % group_size:
            raise ValueError(f"group_size {group_size} must divide batch_size x processes = {batch_size} x "
                             f"{num_replicas} = {total}: change --group-size or --batch-size")
        if total // group_size > num_prompts:
            raise ValueError(f"each draw needs {total // group_size} distinct prompts but the data has {num_prompts}")
        self.num_prompts, self.batch_size, self.group_size = num_prompts, batch_size, group_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if self.weights is not None and (len(self.weights) != num_prompts or (self.weights <= 0).any()):
            raise ValueError("weights must be one positive number per prompt")
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def global_indices(self):
        """Dataset indices of every rank's batch (rank r's are [r·b, (r+1)·b)) for the current epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        m = self.num_replicas * self.batch_size // self.group_size
        if self.weights is None:
            chosen = torch.randperm(self.num_prompts, generator=generator)[:m]
        else:
            chosen = torch.multinomial(self.weights, m, replacement=False, generator=generator)
        repeated = chosen.repeat_interleave(self.group_size)
        return repeated[torch.randperm(len(repeated), generator=generator)].tolist()

    def indices(self):
        """Dataset indices of this rank's batch for the current epoch."""
        return self.global_indices()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
