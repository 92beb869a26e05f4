"""The claims bench's CI check: `python bench/claims.py --quick` (about 3 minutes on 2 cores).

It re-runs, at 3 seeds, the recipes of the claims that the full run (`python bench/claims.py`,
its numbers in docs/claims.json) found reproduced, and exits non-zero unless each still holds
with a margin of at least 3 standard errors of its per-seed values.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_claims_the_full_run_reproduced_still_hold_by_3_se(tmp_path):
    reproduced = [name for claim in json.loads((ROOT / "docs" / "claims.json").read_text())["claims"].values()
                  for name, test in claim.get("tests", {}).items() if test["verdict"] == "reproduced"]
    result = subprocess.run([sys.executable, "bench/claims.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    report = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    checked = [line for line in result.stdout.splitlines() if "margin" in line and line.rstrip().endswith("ok")]
    assert not reproduced or checked, f"no claim was checked:\n{report}"
