"""Run a Hydra entry point in the test's own process, as the console would call it.

For cases that stop before any training: starting a fresh Python with torch and Lightning for
each would only cost time (the subprocess path is exercised by the end-to-end tests)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from hydra.core.global_hydra import GlobalHydra


def run_in_process(main, name: str, overrides, *, cwd, data_dir, monkeypatch, capsys) -> SimpleNamespace:
    """``python -m <name> <overrides>`` through ``main()``: returncode, stdout, stderr."""
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("VITLAB_DATA_DIR", str(data_dir))
    monkeypatch.delenv("VITLAB_OUTPUT_DIR", raising=False)
    monkeypatch.setattr(sys, "argv", [name, *overrides, "torch_threads=1"])
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def assert_short_failure(result, *fragments) -> None:
    """Non-zero exit, every fragment in stderr, no traceback."""
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, "a user mistake gets a message, not a traceback"
