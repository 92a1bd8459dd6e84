"""Speed options: ``compile`` (torch.compile of the network in place) and the ``trainer=gpu``
preset, run on the CPU with a tiny model and a few steps."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from test_configs import compose_train
from vitlab.train import build, compile_network


def load_benchmark():
    """scripts/benchmark.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


TINY = ("model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16", "model.mlp_dim=64", "torch_threads=1")
# A few training steps and nothing else: no validation, no logger, no callbacks.
STEPS = ("trainer.max_steps=2", "trainer.max_epochs=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
         "logger=none", "callbacks=none", "test=false")


def test_compile_is_auto_by_default_and_on_in_the_gpu_preset(tmp_path):
    default = compose_train(tmp=tmp_path)
    assert default.compile.enabled == "auto"
    for accelerator, compiled in (("cpu", False), ("auto", torch.cuda.is_available())):
        net = torch.nn.Linear(2, 2)
        compile_network(net, default.compile, accelerator)
        assert (net._compiled_call_impl is not None) == compiled, f"auto on accelerator={accelerator}"
    gpu = compose_train("trainer=gpu", tmp=tmp_path)
    assert gpu.compile.enabled is True
    assert (gpu.trainer.accelerator, gpu.trainer.precision, gpu.trainer.devices) == ("gpu", "bf16-mixed", 1)
    assert gpu.data.batch_size > default.data.batch_size and gpu.data.pin_memory is True
    # Attention is left to model.attention=auto, which picks SDPA on CUDA.
    assert gpu.model.attention == "auto"
    # The preset sets the batch whichever dataset is chosen, and the command line still wins.
    assert compose_train("data=mnist", "trainer=gpu", tmp=tmp_path).data.batch_size == gpu.data.batch_size
    assert compose_train("trainer=gpu", "data.batch_size=64", "compile.enabled=false", tmp=tmp_path).data.batch_size == 64


def test_unknown_compile_mode_is_refused_before_training():
    with pytest.raises(ValueError, match=r"compile.mode='fastest' is not one of default, reduce-overhead"):
        compile_network(torch.nn.Linear(2, 2), OmegaConf.create({"enabled": True, "mode": "fastest"}))


def fit(cfg):
    torch.manual_seed(0)
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return module, trainer


def test_gpu_preset_on_cpu_compiles_and_checkpoints_load_either_way(tmp_path, data_dir, monkeypatch):
    """The gpu preset's options minus the accelerator train a few steps on the CPU with the
    network compiled; its checkpoint has the plain keys, loads into an uncompiled network with
    the same outputs, and resumes training without compile."""
    monkeypatch.setenv("VITLAB_DATA_DIR", str(data_dir))
    threads = torch.get_num_threads()
    try:
        cfg = compose_train("trainer=gpu", "trainer.accelerator=cpu", "data.batch_size=32", *TINY, *STEPS,
                            f"compile.cache_dir={tmp_path / 'cache'}", tmp=tmp_path)
        module, trainer = fit(cfg)
        assert module.net._compiled_call_impl is not None, "compile.enabled=true compiles the network"
        assert any((tmp_path / "cache" / "fxgraph").rglob("*")), "inductor's caches go to compile.cache_dir"
        assert trainer.global_step == 2
        # One training graph: a compiled network gets whole batches only.
        train_set = trainer.datamodule.train_set
        assert len(train_set) % 32 and len(trainer.datamodule.train_dataloader()) == len(train_set) // 32
        path = tmp_path / "compiled.ckpt"
        trainer.save_checkpoint(path)

        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        plain = compose_train("trainer.accelerator=cpu", "compile.enabled=false", *TINY, *STEPS, tmp=tmp_path)
        eager_data, fresh, _ = build(plain)
        assert fresh.net._compiled_call_impl is None and not eager_data.drop_last
        assert module.pad_eval_batches and not fresh.pad_eval_batches
        assert set(state) == set(fresh.state_dict()), "compiling must not rename the checkpoint's keys"
        fresh.load_state_dict(state)
        images = torch.randn(4, 1, 28, 28)
        module.eval(), fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(module.net(images), fresh.net(images), rtol=1e-4, atol=1e-4)

        # Lightning resumes the compiled run's checkpoint without compile.
        plain.ckpt_path = str(path)
        plain.trainer.max_steps, plain.trainer.max_epochs = 3, 2
        datamodule, resumed, trainer = build(plain)
        trainer.fit(resumed, datamodule=datamodule, ckpt_path=str(path))
        assert trainer.global_step == 3
    finally:
        torch.set_num_threads(threads)


def test_compiled_rope_model_is_the_eager_one_without_inductors_complex_warning(tmp_path):
    """RoPE's complex product compiles (inductor runs it as eager does) to the eager model's
    outputs and frequency gradients, and the run shows no warning about it."""
    import warnings

    from vitlab.models import SimpleViT

    torch.manual_seed(0)
    net = SimpleViT(image_size=16, patch_size=4, channels=1, num_classes=3, dim=32, depth=1, heads=2, dim_head=8,
                    mlp_dim=32, pos_emb="rope2d_mixed", reg_tokens=1)
    x = torch.randn(2, 1, 16, 16)
    eager = net(x)
    eager.sum().backward()
    grad = net.rope.freqs.grad.clone()
    net.zero_grad()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_network(net, OmegaConf.create({"enabled": True, "cache_dir": str(tmp_path / "cache")}))
        compiled = net(x)
        compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.rope.freqs.grad, grad, rtol=1e-5, atol=1e-5)
    assert not [w for w in caught if "complex" in str(w.message)]


def test_padded_evaluation_runs_whole_batches_and_scores_as_before(tmp_path):
    """With pad_eval_batches (set for a compiled network), the smaller last batch of a split
    reaches the network padded to the full batch, so one graph serves evaluation; loss and
    accuracy are those of the unpadded evaluation."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from vitlab.models import SimpleViT
    from vitlab.module import ImageClassifier

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(70, 1, 28, 28), torch.randint(0, 10, (70,))), batch_size=32)
    net = SimpleViT(image_size=28, patch_size=7, num_classes=10, dim=32, depth=1, heads=2, dim_head=16, mlp_dim=32,
                    channels=1)
    shapes = []
    net.register_forward_pre_hook(lambda _, args: shapes.append(len(args[0])))
    results = {}
    for pad in (False, True):
        module = ImageClassifier(net=net, num_classes=10, optimizer=None, pad_eval_batches=pad, test_hflip=True)
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)
        shapes.clear()
        results[pad] = trainer.validate(module, data, verbose=False)[0] | trainer.test(module, data, verbose=False)[0]
        assert shapes == ([32, 32, 6] + [32, 32, 32, 32, 6, 6] if not pad else [32] * 9), f"pad={pad}: {shapes}"
    assert results[True] == pytest.approx(results[False], abs=1e-5)


def test_benchmark_script_runs_all_paths_and_ends_with_the_ratio(tmp_path, data_dir):
    """scripts/benchmark.py, shrunk to one step per path: every path is timed, the table lists
    each, the breakdown splits the bare step into matrix products and the rest, and the last
    line is the machine-readable ``full/seed = <ratio>x``."""
    script = REPO / "scripts" / "benchmark.py"
    command = [sys.executable, str(script), "--rounds", "2", "--warmup", "1", "--steps", "1", "--threads", "1",
               "--no-memory", "--breakdown", "--overrides", *TINY[:-1], "data.batch_size=32"]
    env = {**os.environ, "VITLAB_DATA_DIR": str(data_dir)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"full/seed = \d+\.\d\dx", lines[-1]), lines[-1]
    paths = load_benchmark().PATHS
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in paths}
    assert set(table) == set(paths) == {"seed", "timm", "bare", "full"}
    assert all(float(row[1]) > 0 for row in table.values()), table
    # The same model on every path: the FLOP counts of seed, bare and full agree.
    assert table["seed"][3] == table["bare"][3] == table["full"][3]
    assert re.search(r"full/bare = \d+\.\d\dx \(rounds \d+\.\d\d-\d+\.\d\d\)", result.stdout)
    # Training FLOP/s against the matmul peak measured on this device in the same rounds.
    assert re.search(r"full/peak = \d+\.\d% of the measured matmul (bfloat16|float32) peak", result.stdout)
    # The profiled step: the products' share and rate, then the other operators by share.
    found = re.search(r"breakdown of the bare path \(torch profiler, 1 step, [\d.]+ ms a step\): matrix products "
                      r"([\d.]+)% of the time at \d+ GFLOP/s = [\d.]+% of the measured matmul \w+ peak; the rest: (.+)",
                      result.stdout)
    assert found, result.stdout[-3000:]
    rest = [float(share) for share in re.findall(r" ([\d.]+)%", found[2])]
    assert 0 < float(found[1]) < 100 and rest == sorted(rest, reverse=True)
    assert float(found[1]) + sum(rest) <= 100.1


def test_model_flop_utilisation_uses_the_peak_of_the_named_gpu():
    benchmark = load_benchmark()
    peaks = {name: benchmark.peak_bf16(name) for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
                                                           "NVIDIA L40S", "NVIDIA L4", "NVIDIA A100-SXM4-80GB", "Tesla T4")}
    assert peaks == {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,
                     "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA A100-SXM4-80GB": 312e12, "Tesla T4": None}
