"""Pretrain the toy world's base model: `python -m common.toy.pretrain`.

Rectified-flow matching on rendered scenes of the *train* split's prompts only (test prompts stay
unseen, so test accuracy measures compositional generalisation), in pixel space (x0 = the render
in [-1, 1], the committed default base) or, with `--vae`, on the frozen toy VAE's latents
(x0 = encode(render), `common/toy/weights_latent/`): x_s = (1 - s)·x0 + s·eps,
target v = eps - x0, s ~ logit-normal(0, 1) as in SD3, 10 % caption dropout for CFG. The text
encoder trains jointly. AdamW with warm-up and cosine decay; a snapshot every `save_every` steps
so the base can be chosen by its accuracy (see the cards in `common/toy/weights*/README.md`). With
`--vae`, each snapshot holds the VAE too, so it is a whole model directory for `--pretrained`.
"""

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

from common.toy.model import ToyTextEncoder, WordTokenizer, build_transformer, images_to_latents
from common.toy.vae import encode
from common.toy.world import TAGS, render_prompt, split_prompts


@dataclass
class Args:
    output_dir: str = "runs/toy_pretrain"
    """where snapshots (`step_XXXXXX/`) and `log.jsonl` go"""
    steps: int = 9000
    """optimizer steps (the cosine schedule spans exactly these)"""
    batch_size: int = 64
    lr: float = 6e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    """probability of training on the empty prompt (makes classifier-free guidance possible)"""
    seed: int = 0
    save_every: int = 1000
    max_minutes: float = 60.0
    """stop early (after saving) if the wall-clock budget runs out"""
    threads: int = 2
    init_from: Optional[str] = None
    """continue from a snapshot directory (weights only; a fresh warm-up + cosine schedule)"""
    vae: Optional[str] = None
    """sample the latents of this frozen toy VAE (`python -m common.toy.vae` trains one; the latent
    base used common/toy/weights_latent/vae) instead of pixels"""


def sample_batch(train_by_tag, batch_size, rng):
    """Rendered images (B, 3, 32, 32) and prompts; tags are drawn uniformly, then prompts."""
    metas = []
    for _ in range(batch_size):
        prompts = train_by_tag[TAGS[rng.integers(len(TAGS))]]
        metas.append(prompts[rng.integers(len(prompts))])
    images = np.stack([render_prompt(meta, rng) for meta in metas])
    return torch.from_numpy(images), [meta["prompt"] for meta in metas]


def warmup_cosine(step, peak, warmup_steps, steps, floor):
    """Linear warm-up to `peak`, then cosine decay to `floor`·peak at `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def flow_matching_loss(transformer, text_encoder, tokenizer, vae, images, prompts, generator, caption_dropout):
    with torch.no_grad():
        x0 = images_to_latents(images) if vae is None else encode(vae, images)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))
    drop = torch.rand(x0.shape[0], generator=generator) < caption_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    hidden, pooled = text_encoder(tokenizer(prompts))
    x_sigma = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    prediction = transformer(x_sigma, hidden, pooled, sigma * 1000, return_dict=False)[0]
    return ((prediction - (noise - x0)) ** 2).mean()


def save_snapshot(directory, transformer, text_encoder, vae_dir, meta):
    tmp = Path(str(directory) + ".tmp")
    transformer.save_pretrained(tmp / "transformer")
    text_encoder.save_pretrained(tmp / "text_encoder")
    if vae_dir is not None:
        shutil.copytree(vae_dir, tmp / "vae")
    (tmp / "pretrain.json").write_text(json.dumps(meta, indent=2))
    tmp.rename(directory)


def main(args: Args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, _ = split_prompts()
    train_by_tag = {tag: [m for m in train if m["tag"] == tag] for tag in TAGS}
    transformer = build_transformer(args.seed, latent=bool(args.vae))
    text_encoder, tokenizer = ToyTextEncoder(), WordTokenizer()
    if args.init_from:
        from diffusers import SD3Transformer2DModel

        transformer = SD3Transformer2DModel.from_pretrained(Path(args.init_from) / "transformer")
        text_encoder = ToyTextEncoder.from_pretrained(Path(args.init_from) / "text_encoder")
    vae = None
    if args.vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    transformer.train()
    text_encoder.train()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    def lr_at(step):
        return warmup_cosine(step, args.lr, args.warmup_steps, args.steps, floor=0.05)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    start, running = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        images, prompts = sample_batch(train_by_tag, args.batch_size, rng)
        loss = flow_matching_loss(transformer, text_encoder, tokenizer, vae, images, prompts, generator,
                                  args.caption_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        running.append(loss.item())
        elapsed = (time.time() - start) / 60
        done = step + 1 == args.steps or elapsed > args.max_minutes
        if (step + 1) % 100 == 0 or done:
            record = dict(step=step + 1, loss=float(np.mean(running)), lr=lr_at(step), minutes=round(elapsed, 2))
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
            running = []
        if (step + 1) % args.save_every == 0 or done:
            meta = dict(vars(args), steps_done=step + 1, minutes=round(elapsed, 2))
            transformer.eval(), text_encoder.eval()
            save_snapshot(out / f"step_{step + 1:06d}", transformer, text_encoder, args.vae, meta)
            transformer.train(), text_encoder.train()
        if done:
            break


if __name__ == "__main__":
    main(tyro.cli(Args))
