"""A plain (non-editable) install from a wheel: the configs travel inside the package."""

import os
import shutil
import subprocess
import sys

from conftest import REPO


def test_a_wheel_ships_the_configs_and_runs_outside_the_checkout(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Built from a copy of what the package is made of, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for name in ("src", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, source], check=True, cwd=tmp_path)
    (wheel,) = wheels.glob("vitlab-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True)
    assert len(list((site / "vitlab" / "conf").rglob("*.yaml"))) == len(list((REPO / "conf").rglob("*.yaml")))

    # Only the wheel's vitlab on the path, run from a folder that is not the checkout.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import vitlab; print(vitlab.__file__)"], env=env, cwd=elsewhere,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site))
    composed = subprocess.run([sys.executable, "-m", "vitlab.train", "data=synthetic", "model.patch_size=8", "--cfg", "job"],
                              env=env, cwd=elsewhere, capture_output=True, text=True)
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "patch_size: 8" in composed.stdout and "_target_: vitlab.data.SyntheticDataModule" in composed.stdout
