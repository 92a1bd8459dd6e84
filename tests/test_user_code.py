"""A user's own model, datamodule and configs, outside the package: the README's example as
written, and the datamodule contract checked at start-up."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_entry
from inprocess import assert_short_failure, run_in_process

from vitlab.train import main as train_main

FAST = ("debug=fast", "trainer.enable_progress_bar=false", "logger=none", "torch_threads=1")
#: The files of "Your own model, data and experiments": a line "`my_lab/nets.py`:" before each block.
FILE_BLOCK = re.compile(r"^`(my_(?:lab|conf)/[\w/.]+)`:\n\n```(?:python|yaml)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def write_readme_example(root: Path) -> Path:
    """The README's user package and config folder, written below ``root``; the config folder."""
    section = (REPO / "README.md").read_text().partition("## Your own model, data and experiments")[2]
    files = dict(FILE_BLOCK.findall(section))
    assert set(files) == {"my_lab/nets.py", "my_lab/data.py", "my_conf/model/patch_mlp.yaml",
                          "my_conf/data/blobs.yaml", "my_conf/experiment/blobs.yaml"}, sorted(files)
    for name, text in {"my_lab/__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "my_conf"


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """The README's example in ``tmp_path``, importable in this process; its config folder."""
    conf = write_readme_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield conf
    for name in [m for m in sys.modules if m == "my_lab" or m.startswith("my_lab.")]:
        del sys.modules[name]


def test_a_sweep_over_a_users_model_and_simple_vit_names_both(tmp_path, data_dir):
    conf = write_readme_example(tmp_path)
    # As the README runs it, from the folder that holds my_lab/ (python -m puts it on the path).
    run_entry("vitlab.train", "--config-dir", str(conf), "-m", "experiment=blobs", "model=patch_mlp,simple_vit",
              *FAST, cwd=tmp_path, data_dir=data_dir)
    sweep = tmp_path / "outputs" / "multirun" / "blobs"
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["model.name"], r["status"]) for r in rows] == [
        ("patch_mlp", "patch_mlp", "completed"), ("simple_vit", "simple_vit", "completed")]
    # Each job trained its own network on the user's data (4 classes), and names it in its config.
    assert rows[0]["params"] != rows[1]["params"] and all(float(r["test_acc"]) >= 0 for r in rows)
    for row in rows:
        config = (sweep / row["job"] / "config.yaml").read_text()
        assert "_target_: my_lab.data.Blobs" in config and "num_classes: 4" in config
        assert f"name: {row['model.name']}" in config
    assert "model.name" in (sweep / "summary.md").read_text()

    # vitlab.eval rebuilds the user's model and data from the checkpoint only when told to trust them.
    (ckpt,) = (sweep / rows[0]["job"] / "checkpoints").glob("best-*.ckpt")
    refused = run_entry("vitlab.eval", f"ckpt_path={ckpt}", cwd=tmp_path, data_dir=data_dir, check=False)
    assert refused.returncode == 1 and "names _target_=my_lab.nets.PatchMLP" in refused.stderr
    assert "allow its package: trusted_targets=[my_lab.]" in refused.stderr
    run_entry("vitlab.eval", f"ckpt_path={ckpt}", "trusted_targets=[my_lab.]", "name=mine",
              "trainer.limit_test_batches=2", cwd=tmp_path, data_dir=data_dir)  # the batches the run tested on
    evaluated = json.loads((tmp_path / "outputs" / "eval" / "mine" / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(float(rows[0]["test_acc"]), abs=1e-4)


def test_a_datamodule_without_class_names_stops_in_one_line(user_code, tmp_path, data_dir, monkeypatch, capsys):
    # The README's datamodule less one attribute, found through hydra.searchpath.
    (tmp_path / "my_lab" / "unnamed.py").write_text(
        "from my_lab.data import Blobs\n\n\nclass Unnamed(Blobs):\n"
        "    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n        del self.class_names\n")
    blobs = (user_code / "data" / "blobs.yaml").read_text()
    (user_code / "data" / "unnamed.yaml").write_text(blobs.replace("my_lab.data.Blobs", "my_lab.unnamed.Unnamed"))
    result = run_in_process(train_main, "vitlab.train", [f"hydra.searchpath=[file://{user_code}]", "experiment=blobs",
                                                         "data=unnamed", "name=unnamed", *FAST],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, "error: ValueError: data._target_=my_lab.unnamed.Unnamed needs class_names, a list "
                                 "of its 4 class names", "set self.class_names in its __init__")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    metrics = json.loads((tmp_path / "outputs" / "runs" / "unnamed" / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "needs class_names" in metrics["error"]
    assert not (tmp_path / "outputs" / "runs" / "unnamed" / "checkpoints").exists(), "stopped before training"


@pytest.mark.parametrize("change, fragment", [
    # The data config lacks a field the model config reads.
    (lambda text: text.replace("num_classes: 4\n", ""),
     "data (my_lab.data.Blobs) has no num_classes: the model config reads"),
    # The datamodule says another size than its config, which the model is built for.
    (lambda text: text.replace("image_size: 28\n", "image_size: 28\nimage_size_seen: 32\n").replace(
        "_target_: my_lab.data.Blobs", "_target_: my_lab.sized.Sized"),
     "data._target_=my_lab.sized.Sized has image_size=32 but its config data.image_size=28"),
])
def test_a_data_config_or_datamodule_that_disagree_stop_in_one_line(user_code, tmp_path, data_dir, monkeypatch,
                                                                     capsys, change, fragment):
    (tmp_path / "my_lab" / "sized.py").write_text(
        "from my_lab.data import Blobs\n\n\nclass Sized(Blobs):\n"
        "    def __init__(self, image_size_seen, **kwargs):\n        super().__init__(**kwargs)\n"
        "        self.image_size = image_size_seen\n")
    path = user_code / "data" / "blobs.yaml"
    path.write_text(change(path.read_text()))
    result = run_in_process(train_main, "vitlab.train", ["--config-dir", str(user_code), "experiment=blobs",
                                                         "name=bad", *FAST],
                            cwd=tmp_path, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert_short_failure(result, f"error: ValueError: {fragment}")
