"""The gmm base's model card: how close the base is to the true mixture, measured.

For every prompt: the share of ODE samples on its target modes (within HIT_RADIUS) against the
truth's; for 'any mode' and the unconditional branch: the mass and spread of each mode; in
D = 2, KL(truth || base) by the exact ODE log-likelihood on true samples.
"""

import numpy as np
import torch

from common.gmm import world

CARD_STEPS = 20


@torch.no_grad()
def measure(adapter, samples=10000, seed=0, num_steps=CARD_STEPS, guidance=1.0, only=None, with_kl=True):
    """The card's rows (every prompt of the grammar, or those in `only`)."""
    from common.data import Prompt
    from common.evaluate import generate_seeded

    rng = np.random.default_rng(seed)
    rows = []
    for i, (text, tag) in enumerate(world.all_prompts()):
        if only is not None and text not in only:
            continue
        targets = world.parse_prompt(text)
        points = generate_seeded(adapter, [Prompt(text)] * samples, [seed + i * samples + k for k in range(samples)],
                                 num_steps=num_steps, guidance=guidance).numpy()
        truth = world.sample_data([targets] * samples, adapter.dim, rng)[0]
        row = {"prompt": text, "tag": tag, "hit_base": float(world.hard_target(points, [targets] * samples).mean()),
               "hit_truth": float(world.hard_target(truth, [targets] * samples).mean()),
               "soft_base": float(world.soft_target(points, [targets] * samples).mean()),
               "soft_truth": float(world.soft_target(truth, [targets] * samples).mean())}
        if text == "any mode":
            nearest = np.argmin(((points[:, None, :2] - world.mode_centres()[None]) ** 2).sum(-1), axis=1)
            distance = np.linalg.norm(points[:, :2] - world.mode_centres()[nearest], axis=1)
            row["mode_mass"] = [float(((nearest == k) & (distance <= world.HIT_RADIUS)).mean())
                                for k in range(world.NUM_MODES)]
            row["mode_std"] = [float((points[(nearest == k) & (distance <= world.HIT_RADIUS), :2]
                                      - world.mode_centres()[k]).std()) for k in range(world.NUM_MODES)]
            row["off_ring"] = float((distance > world.HIT_RADIUS).mean())
            if adapter.dim > 2:
                row["nuisance_std"] = float(points[:, 2:].std())
        if with_kl and adapter.dim == 2 and i % 6 == 0:
            from common.gmm.frontier import ode_log_likelihood

            few = torch.from_numpy(truth[:2000]).float()
            embeds = adapter.encode_prompts([text] * len(few))
            log_base, _ = ode_log_likelihood(adapter, embeds, few, num_steps, guidance)
            row["kl_truth_base"] = float(np.mean(world.true_log_density(truth[:2000], targets) - log_base.numpy()))
        rows.append(row)
    return rows


def write_card(directory, model, args, minutes):
    from common.models.gmm import GMMAdapter

    adapter = GMMAdapter(model)
    rows = measure(adapter, samples=args.card_samples)
    lines = [f"# gmm base, D = {model.config.dim}", "",
             f"Pretrained by `python -m common.gmm.pretrain --dim {args.dim}` ({args.steps} steps of {args.batch_size} "
             f"points, {minutes:.1f} min here), {sum(p.numel() for p in model.parameters())} parameters. The world: "
             f"{world.NUM_MODES} modes on a ring of radius {world.RADIUS}, std {world.MODE_STD}, label noise "
             f"{world.LABEL_NOISE} (common/gmm/world.py).", "",
             f"Measured with {args.card_samples} Euler-ODE samples per prompt ({CARD_STEPS} steps, no CFG) against "
             "as many samples of the true mixture. hit = share within the hit radius of a target mode "
             "(`gmm_target_strict`), soft = mean `gmm_target`.", "",
             "| prompt | tag | hit base | hit truth | soft base | soft truth | KL(truth‖base) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        kl = f"{r['kl_truth_base']:.3f}" if "kl_truth_base" in r else ""
        lines.append(f"| {r['prompt']} | {r['tag']} | {r['hit_base']:.3f} | {r['hit_truth']:.3f} | {r['soft_base']:.3f} "
                     f"| {r['soft_truth']:.3f} | {kl} |")
    anymode = next(r for r in rows if r["prompt"] == "any mode")
    lines += ["", "'any mode': per-mode mass (truth: 0.120 each within the hit radius) and spread (truth "
              f"{world.MODE_STD}):", "",
              "| mode | " + " | ".join(world.DIRECTIONS) + " |", "|---|" + "---|" * world.NUM_MODES,
              "| mass | " + " | ".join(f"{m:.3f}" for m in anymode["mode_mass"]) + " |",
              "| std | " + " | ".join(f"{s:.3f}" for s in anymode["mode_std"]) + " |", "",
              f"Off the ring (farther than the hit radius from every mode): {anymode['off_ring']:.3f} "
              "(truth: 0.044)."]
    if "nuisance_std" in anymode:
        lines.append(f"Nuisance dims' std: {anymode['nuisance_std']:.3f} (truth {world.NUISANCE_STD}).")
    (directory / "CARD.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
