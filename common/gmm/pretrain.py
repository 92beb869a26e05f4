"""Pretrain a gmm base by flow matching, write its prompt splits and its model card.

    python -m common.gmm.pretrain                         # the committed d2 base (about a minute, 2 cores)
    python -m common.gmm.pretrain --dim 16 --output-dir common/gmm/weights/d16

Training: x0 from the noisy-caption data of a uniformly drawn prompt of the whole grammar (the
base has seen every prompt; the RL splits below decide which ones RL trains on), 10 % caption
dropout for the unconditional branch, sigma uniform in (0, 1), x_sigma = (1 - sigma)·x0 +
sigma·eps, loss |v - (eps - x0)|², AdamW with a cosine decay. The card then measures the base
against the truth (common/gmm/card.py).
"""

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from common.gmm.model import GMMVelocityNet
from common.gmm.world import all_prompts, condition_vectors, parse_prompt, sample_data

ROOT = Path(__file__).resolve().parent
TEST_SHARE = 0.25


@dataclass
class Args:
    dim: int = 2
    """dimension D of the points (2 = the ring plane only; more adds nuisance dims)"""
    output_dir: str = str(ROOT / "weights" / "d2")
    """where the base (diffusers save_pretrained) and its CARD.md go"""
    steps: int = 6000
    """optimizer steps"""
    batch_size: int = 1024
    """points per step"""
    learning_rate: float = 2e-3
    """peak AdamW learning rate (cosine decay to 0)"""
    caption_dropout: float = 0.1
    """share of the batch trained unconditionally (the CFG branch)"""
    seed: int = 0
    """seeds the data, the noise and the initialisation"""
    write_splits: bool = False
    """(re)write common/gmm/data/{train,test}_metadata.jsonl"""
    card_samples: int = 10000
    """ODE samples per measurement in the model card"""


def write_splits(directory):
    """Hold out a quarter of each category's prompt strings (at least one) for the test split;
    a category of one prompt ('any mode') is in both."""
    rng = np.random.default_rng(0)
    rows = all_prompts()
    train, test = [], []
    for tag in dict.fromkeys(t for _, t in rows):
        names = [p for p, t in rows if t == tag]
        if len(names) == 1:
            train += [(names[0], tag)]
            test += [(names[0], tag)]
            continue
        held = set(rng.choice(names, size=max(1, round(TEST_SHARE * len(names))), replace=False).tolist())
        train += [(p, tag) for p in names if p not in held]
        test += [(p, tag) for p in names if p in held]
    directory.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train), ("test", test)):
        lines = [json.dumps({"prompt": p, "tag": tag, "targets": list(parse_prompt(p))}) for p, tag in items]
        (directory / f"{split}_metadata.jsonl").write_text("\n".join(lines) + "\n")


def main(args: Args):
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.write_splits:
        write_splits(ROOT / "data")
    prompts = [parse_prompt(p) for p, _ in all_prompts()]
    model = GMMVelocityNet(dim=args.dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
    start = time.time()
    for step in range(args.steps):
        targets = [prompts[i] if rng.random() >= args.caption_dropout else None
                   for i in rng.integers(0, len(prompts), size=args.batch_size)]
        x0 = torch.from_numpy(sample_data(targets, args.dim, rng)[0]).float()
        cond = torch.from_numpy(condition_vectors(targets))
        eps = torch.randn_like(x0)
        sigma = torch.rand(args.batch_size)
        x = (1 - sigma[:, None]) * x0 + sigma[:, None] * eps
        loss = ((model(x, sigma, cond) - (eps - x0)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 500 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    minutes = (time.time() - start) / 60
    output = Path(args.output_dir)
    model.eval().save_pretrained(output)
    from common.gmm.card import write_card

    write_card(output, model, args, minutes)


if __name__ == "__main__":
    main(tyro.cli(Args))
