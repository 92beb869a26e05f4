"""Which denoising steps drive a Flow-GRPO update: `python bench/step_gradients.py`

One CPS rollout of 16 toy train prompts (toy defaults: 10 steps, a = 0.5, CFG 4), then for each
trainable step j the LoRA gradient norm of -mean(A · log p_j) with advantages ±1. The per-element
log-prob's gradient through the mean is ξ/s, so a step's weight grows like 1/s: with CPS,
s_j = σ_{j+1}·sin(aπ/2), and the step into the last non-zero sigma has a tiny s.

Both CFG gradients side by side: the unconditional half detached (w·∇v_c, the published code and
the default `--train-cfg-detach-uncond`) and both halves trained ((1 - w)·∇v_u + w·∇v_c).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.checkpoint import add_lora  # noqa: E402
from common.data import load_prompts  # noqa: E402
from common.models import load_adapter  # noqa: E402
from common.rollout import initial_latents, rollout  # noqa: E402
from common.sde import sde_step  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sampler", default="cps", choices=["flow", "cps", "dance"])
    parser.add_argument("--noise-level", type=float, default=0.5)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    cli = parser.parse_args()
    torch.manual_seed(0)
    adapter = load_adapter("toy")
    add_lora(adapter.transformer, adapter.lora_rank, adapter.lora_alpha, adapter.lora_target_modules)
    params = [p for p in adapter.transformer.parameters() if p.requires_grad]
    prompts = load_prompts("toy", "train")[:16]
    embeds, negative = adapter.encode_prompts(prompts), adapter.negative_embeds()
    sigmas = adapter.make_sigmas(cli.num_steps, None)
    latents = initial_latents(adapter.latent_shape(len(prompts), None), list(range(len(prompts))))
    with torch.no_grad():
        trajectory = rollout(adapter, embeds, sigmas, latents, negative=negative, guidance=cli.guidance,
                             noise_level=cli.noise_level, sampler=cli.sampler,
                             generator=torch.Generator().manual_seed(1), keep_means=False)
    advantages = torch.tensor([1.0, -1.0] * (len(prompts) // 2))
    print("| step | sigma -> sigma' | s | LoRA grad norm, v_u detached | LoRA grad norm, both halves |\n"
          "|---|---|---|---|---|")
    for j in range(cli.num_steps - 1):  # the last step is never trained
        x, x_next = trajectory.latents[:, j], trajectory.latents[:, j + 1]
        norms = []
        for detach_uncond in (True, False):
            velocity = adapter.predict_velocity(x, sigmas[j].expand(len(prompts)), embeds, negative, cli.guidance,
                                                detach_uncond=detach_uncond)
            out = sde_step(velocity, x, j, sigmas, cli.noise_level, cli.sampler, prev_sample=x_next)
            grads = torch.autograd.grad(-(advantages * out.log_prob).mean(), params)
            norms.append(torch.sqrt(sum((g ** 2).sum() for g in grads)).item())
        print(f"| {j} | {sigmas[j]:.3f} -> {sigmas[j + 1]:.3f} | {out.std.flatten()[0].item():.4f} | "
              f"{norms[0]:.4f} | {norms[1]:.4f} |")


if __name__ == "__main__":
    main()
