"""What a sweep's shared compile cache saves: a 3-job sweep with ``compile.enabled=true`` into a
fresh ``compile.cache_dir`` (job 1 compiles from scratch, jobs 2 and 3 find inductor's caches),
then the same 3 jobs eager, for reference. Prints each job's wall time from its metrics.json.

    python scripts/bench_compile_cache.py [--overrides trainer.max_epochs=1 ...]

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

JOBS = "seed=0,1,2"


def sweep(folder: Path, overrides: list[str]) -> list[float]:
    """Wall seconds of each job of ``python -m vitlab.train -m <overrides>`` into ``folder``."""
    command = [sys.executable, "-m", "vitlab.train", "-m", JOBS, f"hydra.sweep.dir={folder}", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs = sorted((p for p in folder.iterdir() if (p / "metrics.json").is_file()), key=lambda p: int(p.name.split("_")[0]))
    return [json.loads((job / "metrics.json").read_text())["wall_time_s"] for job in jobs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overrides", nargs="*", default=["debug=fast", "trainer.enable_progress_bar=false"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env_cache = os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        compiled = sweep(root / "compiled", [*args.overrides, "compile.enabled=true", f"compile.cache_dir={root / 'cache'}"])
        eager = sweep(root / "eager", [*args.overrides, "compile.enabled=false"])
        if env_cache is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = env_cache
    print("| job | compiled, shared cache (s) | eager (s) |\n| --- | --- | --- |")
    for n, (c, e) in enumerate(zip(compiled, eager), 1):
        print(f"| {n} | {c:.1f} | {e:.1f} |")
    warm = median(compiled[1:])
    print(f"compile warm-up: job 1 {compiled[0] - eager[0]:.1f} s, jobs 2-{len(compiled)} {warm - median(eager[1:]):.1f} s "
          f"(median) over eager; job 1 / job 2 = {compiled[0] / compiled[1]:.2f}x")


if __name__ == "__main__":
    main()
