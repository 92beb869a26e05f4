"""Prove the suite tells right from wrong: apply deliberate bugs to a copy of the code, run the
tests that cover the code each bug touches, and report which bugs survive.

    python bench/mutation_check.py                 # every mutation (about 15 minutes on 2 cores)
    python bench/mutation_check.py --only guard_sign dpo_swap

Each mutation replaces one exact snippet (it must occur exactly once, so the list cannot go stale
silently) in a temporary copy of the working tree; the copy's tests then run with `pytest -x`.
A mutation is caught when the tests fail. The table goes to stdout (and `--output` as markdown).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEARN = "tests/test_gmm_learning.py"
ORACLE = "tests/test_policy_gradient_oracle.py"

# name: (file, snippet, replacement, tests, what the bug is)
MUTATIONS = {
    "grpo_sign": ("flow_grpo.py", "policy_loss, step_stats = ppo_clip_loss(out.log_prob, old_all[:, j], adv.to(",
                  "policy_loss, step_stats = ppo_clip_loss(out.log_prob, old_all[:, j], -adv.to(",
                  [f"{LEARN}::test_flow_grpo_learns_and_its_shuffled_control_does_not"],
                  "flow_grpo: advantage sign flipped in the main loop"),
    "grpo_shuffle": ("flow_grpo.py",
                     'x_all, old_all, adv = flat["latents"][rows], flat["log_probs"][rows], flat["advantages"][rows]',
                     'x_all, old_all, adv = flat["latents"][rows], flat["log_probs"][rows], '
                     'flat["advantages"][rows][torch.randperm(len(rows))]',
                     [f"{LEARN}::test_flow_grpo_learns_and_its_shuffled_control_does_not"],
                     "flow_grpo: advantages shuffled within each micro-batch"),
    "grpo_step_off_by_one": ("flow_grpo.py", "prev_sample=x_all[:, j + 1], logprob=args.logprob)\n                        policy_loss",
                             "prev_sample=x_all[:, j + 2], logprob=args.logprob)\n                        policy_loss",
                             [f"{LEARN}::test_flow_grpo_learns_and_its_shuffled_control_does_not"],
                             "flow_grpo: training scores (x_j, x_{j+2})"),
    "grpo_clip_ignored": ("flow_grpo.py", "    loss = torch.maximum(unclipped, clipped).mean()",
                          "    loss = unclipped.mean()", ["tests/test_flow_grpo_math.py", "tests/test_gmm_paths.py"],
                          "flow_grpo: PPO clip ignored"),
    "grpo_kl_dropped": ("flow_grpo.py", "                            loss = loss + args.beta * kl\n",
                        "                            loss = loss + 0 * kl\n",
                        ["tests/test_gmm_kl_ema.py::test_a_large_kl_weight_keeps_the_run_near_its_base[flow_grpo]"],
                        "flow_grpo: KL term dropped"),
    "grpo_ema_not_swapped": ("flow_grpo.py", "    def run_eval(epoch):\n        context = ema.swapped() if ema is not None else nullcontext()",
                             "    def run_eval(epoch):\n        context = nullcontext()",
                             ["tests/test_gmm_kl_ema.py::test_ema_is_what_the_run_evaluates_and_exports_and_it_follows_the_recursion"],
                             "flow_grpo: evaluation on the live weights, not the EMA"),
    "grpo_rank_slice": ("flow_grpo.py", "advantages = torch.tensor(advantages[rank * per_rank:(rank + 1) * per_rank]",
                        "advantages = torch.tensor(advantages[0:per_rank]",
                        ["tests/test_flow_grpo_multiprocess.py", "tests/test_multiprocess_all.py"],
                        "flow_grpo: every rank trains on rank 0's slice"),
    "fast_sign": ("flow_grpo_fast.py", "policy_loss, step_stats = ppo_clip_loss(out.log_prob, old_all[:, k], adv.to(",
                  "policy_loss, step_stats = ppo_clip_loss(out.log_prob, old_all[:, k], -adv.to(",
                  [f"{LEARN}::test_flow_grpo_fast_learns_and_its_shuffled_control_does_not"],
                  "flow_grpo_fast: advantage sign flipped"),
    "guard_sign": ("grpo_guard.py", "policy_loss, step_stats = guard_loss(log_ratio, adv.to(",
                   "policy_loss, step_stats = guard_loss(log_ratio, -adv.to(",
                   [f"{LEARN}::test_grpo_guard_learns_and_its_shuffled_control_does_not"],
                   "grpo_guard: advantage sign flipped in the main loop"),
    "dpo_swap": ("flow_dpo.py", "chosen = np.stack([winners, losers], axis=1)",
                 "chosen = np.stack([losers, winners], axis=1)",
                 [f"{LEARN}::test_online_dpo_learns_and_its_swapped_control_does_not"],
                 "flow_dpo: winners and losers swapped"),
    "sft_worst": ("flow_dpo.py", "            best = select_best(all_reward, all_ids)",
                  "            best = select_best(-all_reward, all_ids)",
                  [f"{LEARN}::test_online_sft_learns_and_its_worst_sample_control_does_not"],
                  "flow_dpo (sft): the worst sample of each group trained"),
    "opd_sign": ("flow_opd.py", "        return distill_weight * kl.mean(), {",
                 "        return -distill_weight * kl.mean(), {",
                 [f"{LEARN}::test_flow_opd_student_learns_from_its_teachers_and_the_flipped_control_does_not"],
                 "flow_opd (gkd): distillation signal's sign flipped"),
    "sde_logprob_sign": ("common/sde.py", "        log_density = (-((next_sample - mean) ** 2) / (2 * safe_std**2)",
                         "        log_density = (((next_sample - mean) ** 2) / (2 * safe_std**2)",
                         [ORACLE], "common.sde: log-density sign flipped"),
}


def copy_tree(destination):
    """The working tree as git sees it (tracked and untracked-but-not-ignored files) + the venv path."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_mutation(name, timeout):
    file, snippet, replacement, tests, _ = MUTATIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        text = (copy / file).read_text()
        if text.count(snippet) != 1:
            return "stale", 0.0, f"snippet found {text.count(snippet)} times in {file}"
        (copy / file).write_text(text.replace(snippet, replacement))
        start = time.time()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                    cwd=copy, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - start, ""
        failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
        verdict = "caught" if result.returncode != 0 else "SURVIVED"
        return verdict, time.time() - start, (failed[0][7:] if failed else result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutation names (default: all)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    parser.add_argument("--output", help="write the markdown table here too")
    args = parser.parse_args()
    names = args.only or list(MUTATIONS)
    unknown = sorted(set(names) - set(MUTATIONS))
    if unknown:
        raise SystemExit(f"unknown mutations {unknown}; choose from {sorted(MUTATIONS)}")
    lines = ["| mutation | bug | verdict | s | first failing test |", "|---|---|---|---|---|"]
    for name in names:
        verdict, seconds, detail = run_mutation(name, args.timeout)
        lines.append(f"| {name} | {MUTATIONS[name][4]} | {verdict} | {seconds:.0f} | {detail} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.output:
        Path(args.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
