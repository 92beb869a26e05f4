"""Publish a latent pretraining snapshot as the embedded latent toy base, with its card.

    python -m common.toy.publish --snapshot runs/toy_pretrain_latent/step_009000

Copies the snapshot's `transformer/`, `text_encoder/` and `vae/` into `common/toy/weights_latent/`, runs
the canonical evaluation (both splits, ODE 20 steps, CFG 4, 64 images per category, seed 0), and
writes `base_eval.json`, the card `README.md` and the sample grid `docs/toy_latent_base_grid.png`.
(The pixel-space default base in `common/toy/weights/` was published by this script's earlier
version, in the history.)
"""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from common.data import load_prompts
from common.evaluate import evaluate
from common.models import load_adapter
from common.models.toy import LATENT_WEIGHTS_DIR as WEIGHTS_DIR
from common.outputs import save_grid
from common.rewards import MultiReward, parse_reward_spec
from common.toy.model import LATENT_TRANSFORMER_CONFIG as TRANSFORMER_CONFIG
from common.toy.vae import LATENT_CHANNELS, LATENT_SIZE
from common.toy.world import TAGS

EVAL = dict(num_steps=20, guidance=4.0, seed=0, images_per_category=64)
GRID = Path(__file__).resolve().parents[2] / "docs" / "toy_latent_base_grid.png"


@dataclass
class Args:
    snapshot: str
    """the snapshot directory to publish (from `python -m common.toy.pretrain`)"""
    history: tuple[str, ...] = ()
    """earlier snapshots this one was continued from (their pretrain.json goes on the card)"""


def main(args: Args):
    snapshot = Path(args.snapshot)
    for part in ("transformer", "text_encoder", "vae"):
        shutil.rmtree(WEIGHTS_DIR / part, ignore_errors=True)
        shutil.copytree(snapshot / part, WEIGHTS_DIR / part)
    stages = [json.loads((Path(p) / "pretrain.json").read_text()) for p in (*args.history, snapshot)]
    vae = json.loads((WEIGHTS_DIR / "vae" / "train.json").read_text())
    adapter = load_adapter("toy", pretrained=str(WEIGHTS_DIR))
    reward = MultiReward(parse_reward_spec("shapes"))
    start = time.time()
    metrics, images, prompts = evaluate(adapter, load_prompts("toy", "test"), reward, **EVAL)
    on_train = evaluate(adapter, load_prompts("toy", "train"), reward, **EVAL)[0]
    metrics.update({"eval/train/" + k[len("eval/"):]: v for k, v in on_train.items() if k.startswith("eval/")})
    metrics["eval_seconds"] = round(time.time() - start, 1)
    (WEIGHTS_DIR / "base_eval.json").write_text(json.dumps({**metrics, "settings": EVAL}, indent=2) + "\n")
    picked = [i for tag in TAGS for i in [j for j, p in enumerate(prompts) if p.metadata["tag"] == tag][:6]]
    scores = reward(images[picked], [prompts[i].text for i in picked], [prompts[i].metadata for i in picked])
    GRID.parent.mkdir(exist_ok=True)
    save_grid(GRID, images[picked], [f"{prompts[i].text.replace('a photo of ', '')} "
                                     f"[{'ok' if s else 'x'} {p:.2f}]"
                                     for i, s, p in zip(picked, scores["shapes_strict"], scores["shapes"])], columns=6)
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*.safetensors"))
    table = "| split | " + " | ".join(TAGS) + " | overall |\n|" + "---|" * (len(TAGS) + 2) + "\n" + "\n".join(
        f"| {split} | " + " | ".join(f"{metrics[f'{prefix}/accuracy/{t}']:.3f}" for t in TAGS)
        + f" | **{metrics[f'{prefix}/accuracy']:.3f}** |" for split, prefix in (("test", "eval"), ("train", "eval/train")))
    lines = [f"- stage {i + 1}: {s['steps_done']} steps in {s['minutes']} min wall time, seed {s['seed']}, "
             f"batch {s['batch_size']}, peak lr {s['lr']} (warm-up {s['warmup_steps']}, cosine to 5 %), "
             f"caption dropout {s['caption_dropout']}" + (f", continued from stage {i}" if i else "")
             for i, s in enumerate(stages)]
    recon = vae["reconstruction_accuracy"]
    card = f"""# Toy base model card

The latent base of `--model toy` (`--pretrained common/toy/weights_latent`), a latent pipeline
like SD3's at toy scale:
- VAE: diffusers `AutoencoderKL` ({vae['parameters'] / 1e6:.2f}M weights), 32x32x3 renders to a
  {LATENT_CHANNELS}x{LATENT_SIZE}x{LATENT_SIZE} latent ({LATENT_CHANNELS * LATENT_SIZE ** 2} values, 12x fewer than the pixels);
  `python -m common.toy.vae`: {vae['steps_done']} steps of batch {vae['batch_size']} in {vae['minutes']} min,
  seed {vae['seed']}, L1 + L2 + {vae['kl_weight']} KL, train-split renders only. Scaling factor
  {vae['scaling_factor']:.4f}, shift {vae['shift_factor']:.4f} (measured on 1,024 renders). The detector on
  decode(encode(render)) is right for {recon['train']:.3f} (train prompts) / {recon['test']:.3f} (test prompts)
  of the renders (2 per prompt): the reward sees what the latent can express.
- transformer: diffusers `SD3Transformer2DModel` on the latent ({TRANSFORMER_CONFIG['num_layers']} layers, patch
  {TRANSFORMER_CONFIG['patch_size']}, width {TRANSFORMER_CONFIG['num_attention_heads'] * TRANSFORMER_CONFIG['attention_head_dim']}: {(LATENT_SIZE // TRANSFORMER_CONFIG['patch_size']) ** 2} image tokens), and the word-level `ToyTextEncoder`.
- {size / 2**20:.1f} MB of safetensors in all.

## How it was produced
`python -m common.toy.pretrain --vae common/toy/weights_latent/vae` (rectified-flow matching on the VAE latents of renders of the
*train* split's prompts only, logit-normal sigma, AdamW, 2 CPU cores, torch {_torch_version()}):
{chr(10).join(lines)}
- total: {sum(s['steps_done'] for s in stages)} steps, {sum(s['minutes'] for s in stages):.1f} min wall time
  (the 2 cores were partly shared with other work, so steps/minute varied).

The runs are reproducible with their seeds and arguments (`pretrain.json` of each snapshot,
`vae/train.json`).

## Base accuracy (strict GenEval-style)
Evaluation: ODE (Euler), {EVAL['num_steps']} steps, CFG {EVAL['guidance']}, {EVAL['images_per_category']} images
per category, seeds 0..N (`common/toy/publish.py`; the test `tests/test_toy_vae.py` re-runs it).
Test prompts were never seen in pretraining.

{table}

Mean partial-credit score (the training reward): {metrics['eval/shapes_mean']:.3f} (test),
{metrics['eval/train/shapes_mean']:.3f} (train).
Sample grid (test prompts): `docs/toy_latent_base_grid.png`.
"""
    (WEIGHTS_DIR / "README.md").write_text(card)
    print(card)


def _torch_version():
    import torch

    return torch.__version__


if __name__ == "__main__":
    main(tyro.cli(Args))
