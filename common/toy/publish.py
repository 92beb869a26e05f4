"""Publish a pretraining snapshot as the embedded toy base model, with its card.

    python -m common.toy.publish --snapshot runs/toy_pretrain2/step_003992 --history runs/toy_pretrain/step_006794

Copies the snapshot's `transformer/` and `text_encoder/` into `common/toy/weights/`, runs the
canonical evaluation (test split, ODE 20 steps, CFG 4, 64 images per category, seed 0), and
writes `base_eval.json`, the card `README.md` and the sample grid `docs/toy_base_grid.png`.
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
from common.models.toy import WEIGHTS_DIR
from common.outputs import save_grid
from common.rewards import MultiReward, parse_reward_spec
from common.toy.model import TRANSFORMER_CONFIG
from common.toy.world import TAGS

EVAL = dict(num_steps=20, guidance=4.0, seed=0, images_per_category=64)
GRID = Path(__file__).resolve().parents[2] / "docs" / "toy_base_grid.png"


@dataclass
class Args:
    snapshot: str
    """the snapshot directory to publish (from `python -m common.toy.pretrain`)"""
    history: tuple[str, ...] = ()
    """earlier snapshots this one was continued from (their pretrain.json goes on the card)"""


def main(args: Args):
    snapshot = Path(args.snapshot)
    for part in ("transformer", "text_encoder"):
        shutil.rmtree(WEIGHTS_DIR / part, ignore_errors=True)
        shutil.copytree(snapshot / part, WEIGHTS_DIR / part)
    stages = [json.loads((Path(p) / "pretrain.json").read_text()) for p in (*args.history, snapshot)]
    adapter = load_adapter("toy")
    reward = MultiReward(parse_reward_spec("shapes"))
    start = time.time()
    metrics, images, prompts = evaluate(adapter, load_prompts("toy", "test"), reward, **EVAL)
    metrics["eval_seconds"] = round(time.time() - start, 1)
    (WEIGHTS_DIR / "base_eval.json").write_text(json.dumps({**metrics, "settings": EVAL}, indent=2) + "\n")
    picked = [i for tag in TAGS for i in [j for j, p in enumerate(prompts) if p.metadata["tag"] == tag][:6]]
    scores = reward(images[picked], [prompts[i].text for i in picked], [prompts[i].metadata for i in picked])
    GRID.parent.mkdir(exist_ok=True)
    save_grid(GRID, images[picked], [f"{prompts[i].text.replace('a photo of ', '')} "
                                     f"[{'ok' if s else 'x'} {p:.2f}]"
                                     for i, s, p in zip(picked, scores["shapes_strict"], scores["shapes"])], columns=6)
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*.safetensors"))
    table = "| " + " | ".join(TAGS) + " | overall |\n|" + "---|" * (len(TAGS) + 1) + "\n| " + " | ".join(
        f"{metrics[f'eval/accuracy/{t}']:.3f}" for t in TAGS) + f" | **{metrics['eval/accuracy']:.3f}** |"
    lines = [f"- stage {i + 1}: {s['steps_done']} steps in {s['minutes']} min wall time, seed {s['seed']}, "
             f"batch {s['batch_size']}, peak lr {s['lr']} (warm-up {s['warmup_steps']}, cosine to 5 %), "
             f"caption dropout {s['caption_dropout']}" + (f", continued from stage {i}" if i else "")
             for i, s in enumerate(stages)]
    card = f"""# Toy base model card

The embedded base of `--model toy`: diffusers `SD3Transformer2DModel` in pixel space
({TRANSFORMER_CONFIG['num_layers']} layers, patch {TRANSFORMER_CONFIG['patch_size']}, width
{TRANSFORMER_CONFIG['num_attention_heads'] * TRANSFORMER_CONFIG['attention_head_dim']}) and the word-level
`ToyTextEncoder`, {size / 2**20:.1f} MB of safetensors.

## How it was produced
`python -m common.toy.pretrain` (rectified-flow matching on renders of the *train* split's
prompts only, logit-normal sigma, AdamW, 2 CPU cores, torch {_torch_version()}):
{chr(10).join(lines)}
- total: {sum(s['steps_done'] for s in stages)} steps, {sum(s['minutes'] for s in stages):.1f} min wall time
  (the 2 cores were partly shared with other work, so steps/minute varied). At the
  uncontended 0.30 s/step measured for this configuration the same steps take
  ≈ {sum(s['steps_done'] for s in stages) * 0.30 / 60:.0f} min: over the 45-minute budget the issue set. Stage 1 alone
  (≈ 34 min uncontended) reached only 0.16 test accuracy, below the required 0.2.

The stages are reproducible with their seeds and arguments (`pretrain.json` of each snapshot);
stage 2 was launched with `--init-from` on stage 1's last snapshot.

## Base accuracy (strict GenEval-style, test split)
Evaluation: ODE (Euler), {EVAL['num_steps']} steps, CFG {EVAL['guidance']}, {EVAL['images_per_category']} images
per category, seeds 0..N (`common/toy/publish.py`; the test `tests/test_toy_base.py` re-runs it).

{table}

Mean partial-credit score (the training reward): {metrics['eval/shapes_mean']:.3f}.
Sample grid: `docs/toy_base_grid.png`.
"""
    (WEIGHTS_DIR / "README.md").write_text(card)
    print(card)


def _torch_version():
    import torch

    return torch.__version__


if __name__ == "__main__":
    main(tyro.cli(Args))
