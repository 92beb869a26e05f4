"""How close flow_grpo.py runs to the bare transformer: `python bench/flow_grpo_speed.py`

In one process: run flow_grpo.py's real loop on the toy model for a few epochs (evaluation
off, no zero-std filter so every micro-batch has the rollout's size), take the median per-epoch
rollout and train-phase times it logs, then time the bare transformer on the same batches:
    rollout ratio = rollout time / (batches x steps x one CFG forward of the batch)
    train ratio   = train-phase time / (micro-batches x trained steps x one forward+backward)
Targets (issue 3): rollout <= 1.05, train <= 1.10.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import flow_grpo  # noqa: E402
from common.checkpoint import add_lora  # noqa: E402
from common.models import load_adapter  # noqa: E402
from common.outputs import read_metrics  # noqa: E402
from common.rollout import initial_latents, rollout  # noqa: E402


def time_it(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    out = Path(tempfile.mkdtemp()) / "speed"
    args = flow_grpo.parse_args(["--num-epochs", str(cli.epochs), "--eval-every", "0", "--track", "none",
                                 "--batch-size", str(cli.batch_size), "--no-filter-zero-std",
                                 "--output-dir", str(out)])
    flow_grpo.main(args)
    records = read_metrics(out / "metrics.jsonl")[1:]  # epoch 0 includes warm-up
    rollout_s = statistics.median(r["perf/rollout_s"] for r in records)
    train_s = statistics.median(r["perf/train_s"] for r in records)
    args = flow_grpo.validate(args)

    adapter = load_adapter("toy")
    add_lora(adapter.transformer, adapter.lora_rank, adapter.lora_alpha, adapter.lora_target_modules)
    batch = args.batch_size
    embeds = adapter.encode_prompts(["a photo of a red circle"] * batch)
    negative = adapter.negative_embeds().repeat(batch)
    both = type(embeds).cat([negative, embeds])
    x = initial_latents(adapter.latent_shape(batch), range(batch))
    x2, sigma2 = torch.cat([x, x]), torch.full((2 * batch,), 0.5)

    def forward():
        with torch.no_grad():
            adapter.transformer_forward(x2, sigma2, both)

    def forward_backward():
        adapter.transformer_forward(x2, sigma2, both).float().pow(2).mean().backward()

    t_forward = time_it(forward, 20)
    t_train = time_it(forward_backward, 10)
    bare_rollout = args.batches_per_epoch * args.num_steps * t_forward

    # the rollout function alone (no reward thread beside it), interleaved with the bare forwards
    sigmas = adapter.make_sigmas(args.num_steps)

    def one_rollout():
        rollout(adapter, embeds, sigmas, x, negative=adapter.negative_embeds(), guidance=args.guidance,
                noise_level=args.noise_level, sampler=args.sampler, generator=torch.Generator().manual_seed(0),
                keep_means=False)

    def bare_steps():
        for _ in range(args.num_steps):
            forward()

    pairs = [(time_it(one_rollout, 1), time_it(bare_steps, 1)) for _ in range(5)]
    isolated = statistics.median(r / b for r, b in pairs)
    bare_train = args.batches_per_epoch * args.num_inner_epochs * len(args.train_steps) * t_train
    print(f"toy model, batch {batch} (CFG: {2 * batch} per forward), {args.num_steps} steps, "
          f"{len(args.train_steps)} trained steps, {args.batches_per_epoch} batches per epoch, {cli.threads} threads")
    print(f"rollout in the loop (reward thread scoring the previous batch beside it): {rollout_s:.3f} s / bare "
          f"{bare_rollout:.3f} s = {rollout_s / bare_rollout:.3f}  (target <= 1.05)")
    print(f"rollout alone, median of 5 interleaved pairs: {isolated:.3f}  (target <= 1.05)")
    print(f"train:   {train_s:.3f} s / bare {bare_train:.3f} s = {train_s / bare_train:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
