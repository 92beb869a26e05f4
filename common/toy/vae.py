"""The toy world's VAE: a tiny diffusers `AutoencoderKL` mapping 32x32x3 renders to an 8x8x4
latent (256 values, 12x fewer than the pixels), trained here: `python -m common.toy.vae`.

Why a latent world: the policy-gradient estimator's noise grows with the number of sampled
dimensions (docs/gradient_snr.md: no measurable signal at 3,072 pixels), and real pipelines
sample VAE latents too, so the toy now has their shape: prompt -> latent rollout -> VAE decode ->
reward. Only renders of the *train* split's prompts are seen in training; the reconstruction
check below runs the detector on both splits.

Loss: L1 + L2 on pixels plus a small KL (weight `kl_weight`, as in latent diffusion VAEs, so
the latent stays a smooth space a flow model can sample). The latent the transformer samples is
`(mean - shift_factor) * scaling_factor`, both measured on training renders and stored in the
VAE's config like SD3's.
"""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

from common.toy.world import IMAGE_SIZE, TAGS, render_prompt, split_prompts

LATENT_CHANNELS, LATENT_SIZE = 4, IMAGE_SIZE // 4
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
)


def build_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def encode(vae, images):
    """[0, 1] images (B, 3, 32, 32) -> the sampled latent space (the posterior mean, scaled)."""
    mean = vae.encode(images * 2 - 1).latent_dist.mean
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def decode(vae, latents):
    """Sampled latents -> [0, 1] images, the inverse of `encode`."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return ((vae.decode(latents.to(vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def reconstruction_accuracy(vae, metas, rng, per_prompt=1):
    """Strict GenEval accuracy of the detector on decode(encode(render)) of each prompt, and the
    accuracy on the renders themselves (1.0 by construction: the reference)."""
    from common.toy.detector import detect, geneval_score

    hits, ref_hits = [], []
    for start in range(0, len(metas), 64):
        chunk = [m for m in metas[start:start + 64] for _ in range(per_prompt)]
        images = torch.from_numpy(np.stack([render_prompt(m, rng) for m in chunk]))
        recon = decode(vae, encode(vae, images))
        for meta, image, rec in zip(chunk, images, recon):
            hits.append(geneval_score(meta, detect(rec.numpy()))[1])
            ref_hits.append(geneval_score(meta, detect(image.numpy()))[1])
    return float(np.mean(hits)), float(np.mean(ref_hits))


@dataclass
class Args:
    output_dir: str = "runs/toy_vae"
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-6
    seed: int = 0
    threads: int = 2
    max_minutes: float = 20.0


def main(args: Args):
    from common.toy.pretrain import sample_batch, warmup_cosine  # pretrain imports this module

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    train, test = split_prompts()
    train_by_tag = {tag: [m for m in train if m["tag"] == tag] for tag in TAGS}
    vae = build_vae(args.seed).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)

    def lr_at(step):
        return warmup_cosine(step, args.lr, args.warmup_steps, args.steps, floor=0.02)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    start, running = time.time(), []
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        images, _ = sample_batch(train_by_tag, args.batch_size, rng)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        running.append(loss.item())
        minutes = (time.time() - start) / 60
        done = step + 1 == args.steps or minutes > args.max_minutes
        if (step + 1) % 100 == 0 or done:
            record = dict(step=step + 1, loss=float(np.mean(running)), lr=lr_at(step), minutes=round(minutes, 2))
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(record, flush=True)
            running = []
        if done:
            break

    # the latent statistics that make the sampled space ~unit variance (SD3 stores the same two)
    vae.eval()
    with torch.no_grad():
        images, _ = sample_batch(train_by_tag, 1024, rng)
        means = torch.cat([vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mean for i in range(0, 1024, 256)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1 / means.std()))
    check = {split: reconstruction_accuracy(vae, metas, rng, per_prompt=2)[0]
             for split, metas in (("train", train), ("test", test))}
    summary = dict(vars(args), steps_done=step + 1, minutes=round(minutes, 2), shift_factor=vae.config.shift_factor,
                   scaling_factor=vae.config.scaling_factor, reconstruction_accuracy=check,
                   parameters=sum(p.numel() for p in vae.parameters()))
    print(summary, flush=True)
    vae.save_pretrained(out / "vae")
    (out / "vae" / "train.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Args))
