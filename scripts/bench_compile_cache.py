"""What a sweep's shared compile cache saves: a 3-job sweep with ``compile.enabled=true`` into a
fresh ``compile.cache_dir`` (job 1 compiles from scratch, jobs 2 and 3 find inductor's caches),
then the same 3 jobs eager, for reference. Prints each job's wall time and training images/s
(over its training steps, the first one's compiling or cache loading included) from its
metrics.json.

    python scripts/bench_compile_cache.py [--jobs 3] [--overrides trainer.max_epochs=1 ...]

By default each job is ``debug=fast`` (4 training batches): nearly all of a compiled job is then
its compilation, so job 1 against job 2 is the warm-up that the cache saves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median

def sweep(folder: Path, jobs: int, overrides: list[str]) -> list[tuple[float, float | None]]:
    """(wall seconds, training images/s) of each job of ``python -m vitlab.train -m
    seed=0,..,jobs-1 <overrides>`` into ``folder``."""
    seeds = "seed=" + ",".join(map(str, range(jobs)))
    command = [sys.executable, "-m", "vitlab.train", "-m", seeds, f"hydra.sweep.dir={folder}", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dirs = sorted((p for p in folder.iterdir() if (p / "metrics.json").is_file()), key=lambda p: int(p.name.split("_")[0]))
    records = [json.loads((job / "metrics.json").read_text()) for job in dirs]
    return [(r["wall_time_s"], r.get("train_images_per_s")) for r in records]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3, help="jobs per sweep (at least 2)")
    parser.add_argument("--overrides", nargs="*", default=["debug=fast", "trainer.enable_progress_bar=false"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env_cache = os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        compiled = sweep(root / "compiled", args.jobs,
                         [*args.overrides, "compile.enabled=true", f"compile.cache_dir={root / 'cache'}"])
        eager = sweep(root / "eager", args.jobs, [*args.overrides, "compile.enabled=false"])
        if env_cache is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = env_cache
    def rate(value: float | None) -> str:
        return f"{value:.0f}" if value else "–"

    print("| job | compiled, shared cache (s) | eager (s) | compiled img/s | eager img/s |\n"
          "| --- | --- | --- | --- | --- |")
    for n, ((c, c_rate), (e, e_rate)) in enumerate(zip(compiled, eager), 1):
        print(f"| {n} | {c:.1f} | {e:.1f} | {rate(c_rate)} | {rate(e_rate)} |")
    walls_c, walls_e = [c for c, _ in compiled], [e for e, _ in eager]
    warm = median(walls_c[1:])
    print(f"compile warm-up: job 1 {walls_c[0] - walls_e[0]:.1f} s, jobs 2-{len(walls_c)} {warm - median(walls_e[1:]):.1f} s "
          f"(median) over eager; job 1 / job 2 = {walls_c[0] / walls_c[1]:.2f}x")


if __name__ == "__main__":
    main()
