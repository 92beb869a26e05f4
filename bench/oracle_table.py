"""The README's sampler table: terminal variance vs the truth on Gaussian data, and the noise
each sampler leaves in the final sample. `python bench/oracle_table.py`

Exact (no particles): with the analytic velocity every step is affine, so the recursion of
`common.oracle.exact_moments` gives the final mean and variance. The residual noise is the
final std when the data is a point mass (s² -> 0): whatever remains is injected noise the
sampler failed to remove (ALGORITHMS.md §2.7).
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.oracle import exact_moments  # noqa: E402
from common.sde import make_sigmas  # noqa: E402

DATA_MEAN, DATA_VAR = 0.8, 0.09
SAMPLERS = [("ODE (Euler)", "flow", 0.0), ("flow, a = 0.7", "flow", 0.7), ("cps, a = 0.8", "cps", 0.8),
            ("dance, a = 0.3", "dance", 0.3)]
STEPS = (10, 40, 2000)


def main():
    grids = {n: make_sigmas(dict(num_train_timesteps=1000, shift=3.0), n) for n in STEPS}
    print(f"Gaussian data m = {DATA_MEAN}, s² = {DATA_VAR}; SD3 schedule (shift 3)\n")
    print("| sampler | " + " | ".join(f"variance @ {n}" for n in STEPS) + " | "
          + " | ".join(f"residual noise std @ {n}" for n in STEPS[:2]) + " |")
    print("|---" * (1 + len(STEPS) + 2) + "|")
    for label, sampler, level in SAMPLERS:
        variances = [exact_moments(grids[n], level, sampler, DATA_MEAN, DATA_VAR)[-1][1] for n in STEPS]
        residual = [math.sqrt(exact_moments(grids[n], level, sampler, DATA_MEAN, 0.0)[-1][1]) for n in STEPS[:2]]
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in variances) + " | "
              + " | ".join(f"{r:.4f}" for r in residual) + " |")
    print(f"| truth | {DATA_VAR} | {DATA_VAR} | {DATA_VAR} | 0 | 0 |")


if __name__ == "__main__":
    main()
