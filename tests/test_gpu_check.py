"""scripts/gpu_check.sh, the prepared GPU check: its dry run composes every step on the CPU."""

import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_dry_run_composes_every_step(tmp_path, data_dir):
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "VITLAB_DATA_DIR": str(data_dir)}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path / "report.md")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    composed = [line for line in result.stdout.splitlines() if line.startswith("composed: ")]
    assert len(composed) == 4 and all("gpu, bf16-mixed" in line for line in composed), result.stdout
    assert "224 px" in composed[0] and "32 px" in composed[1] and "224 px" in composed[2]
    assert "dry run: every step composes" in result.stdout
