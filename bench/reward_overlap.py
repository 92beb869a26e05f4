"""Does a remote reward overlap sampling? `python bench/reward_overlap.py`

A latency-bound reward: our reward server, in its own process, hosting `shapes` behind a sleep
of about one batch's rollout time (a big reward model on another GPU looks like this to the
trainer). In one run, for each --batches value nb, on the toy model:
  S  sampling alone: flow_grpo.py's own `perf/rollout_s`, the summed rollouts of the epoch
  R  reward alone:   nb remote calls in a row on batches of the same size
  P  the real trainer's sampling phase (`perf/sampling_s`): flow_grpo.main with
     `--reward remote:URL`, each batch's reward submitted to a thread right after its rollout
ratio = P / max(S, R); the sum would be (S + R) / max(S, R) ~ 2. The floor of this loop
(printed): the last batch's reward overlaps nothing, and one reward thread scores the batches in
turn, so P >= max(S + R/nb, S/nb + R); with R = S the floor is 1 + 1/nb.
Epochs after the first are measured (the first warms up); evaluation and most training are off.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def serve(delay_s):
    """The latency-bound reward server (runs in the subprocess)."""
    from common.reward_server import RewardServer
    from common.rewards import MultiReward, parse_reward_spec

    shapes = MultiReward(parse_reward_spec("shapes"))

    def slow_shapes(images, prompts, metadata):
        time.sleep(delay_s)
        return shapes(images, prompts, metadata)

    server = RewardServer(slow_shapes, port=0)
    print(f"serving on {server.url}", flush=True)
    server.serve_forever()


def rollout_seconds(batch_size, num_steps):
    """One toy rollout as the trainer runs it (LoRA on, CFG 4, CPS): the server's delay."""
    from common.checkpoint import add_lora
    from common.models import load_adapter
    from common.rollout import initial_latents, rollout

    adapter = load_adapter("toy")
    add_lora(adapter.transformer, adapter.lora_rank, adapter.lora_alpha, adapter.lora_target_modules)
    embeds = adapter.encode_prompts(["a photo of a red circle"] * batch_size)
    latents = initial_latents(adapter.latent_shape(batch_size), range(batch_size))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        rollout(adapter, embeds, adapter.make_sigmas(num_steps), latents, negative=adapter.negative_embeds(),
                guidance=4.0, noise_level=0.5, sampler="cps", generator=torch.Generator().manual_seed(0),
                keep_means=False)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 10], help="batches per epoch to measure")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3, help="trainer epochs per setting (the first is warm-up)")
    parser.add_argument("--delay-factor", type=float, default=1.0, help="server delay / one batch's rollout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)  # internal: server mode
    cli = parser.parse_args()
    if cli.serve is not None:
        return serve(cli.serve)
    torch.set_num_threads(cli.threads)

    import flow_grpo
    from common.outputs import read_metrics
    from common.reward_server import remote_reward

    delay = cli.delay_factor * rollout_seconds(cli.batch_size, cli.num_steps)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(delay)], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split(" on ")[1].strip()
        client = remote_reward(url)
        from common.toy.world import render_prompt, split_prompts

        metas = split_prompts()[0][:cli.batch_size]
        images = torch.from_numpy(np.stack([render_prompt(m, np.random.default_rng(0)) for m in metas]))
        print(f"toy model, batch {cli.batch_size}, {cli.num_steps} steps, CFG 4, {cli.threads} thread(s); "
              f"server delay {delay:.3f} s per request ({cli.delay_factor:g} x one rollout)")
        print(f"{'nb':>3} {'S sampling':>11} {'R reward':>9} {'R/S':>5} {'P overlapped':>13} {'S+R':>7} "
              f"{'P/max(S,R)':>11} {'floor':>6}")
        for nb in cli.batches:
            client(images, [m["prompt"] for m in metas], metas)  # warm-up
            start = time.perf_counter()
            for _ in range(nb):
                client(images, [m["prompt"] for m in metas], metas)
            reward_s = time.perf_counter() - start
            out = Path(tempfile.mkdtemp()) / f"nb{nb}"
            args = flow_grpo.parse_args([
                "--num-epochs", str(cli.epochs), "--batch-size", str(cli.batch_size), "--group-size", "4",
                "--batches-per-epoch", str(nb), "--updates-per-epoch", "1", "--num-steps", str(cli.num_steps),
                "--timestep-fraction", str(1 / cli.num_steps), "--eval-every", "0", "--save-every", "1000",
                "--track", "none", "--reward", f"remote:{url}", "--output-dir", str(out)])
            flow_grpo.main(args)
            records = read_metrics(out / "metrics.jsonl")[1:]
            sampling = statistics.median(r["perf/rollout_s"] for r in records)
            overlapped = statistics.median(r["perf/sampling_s"] for r in records)
            worst = max(sampling, reward_s)
            floor = max(sampling + reward_s / nb, sampling / nb + reward_s) / worst
            print(f"{nb:>3} {sampling:>10.2f}s {reward_s:>8.2f}s {reward_s / sampling:>5.2f} {overlapped:>12.2f}s "
                  f"{sampling + reward_s:>6.2f}s "
                  f"{overlapped / worst:>11.3f} {floor:>6.3f}", flush=True)
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
