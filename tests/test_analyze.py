"""vitlab.analyze: the attention hook reads the weights every kernel uses, the numbers behind the
figures match values computed by hand, and the command analyses a checkpoint and a sweep of real
(tiny) runs, refusing bad input with one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from einops import rearrange

from conftest import run_entry
from inprocess import assert_short_failure, run_in_process
# Imported here, not inside a test: Lightning binds its log handler to the stderr of the moment.
from vitlab.analysis import (analyse, attention_distance, output_token_norms, patch_distances, patch_embedding_filters,
                             position_tables, principal_components, query_view, require_simple_vit, rollout)
from vitlab.analyze import main as analyze_main
from vitlab.models import SimpleViT
from vitlab.models.attention import Attention, recording_attention
from vitlab.results import load_runs
from vitlab.summarize import main as summarize_main

TINY = ("model.dim=32", "model.depth=2", "model.heads=2", "model.dim_head=16", "model.mlp_dim=64", "torch_threads=1",
        "trainer.enable_progress_bar=false", "logger=none")


def vit(**switches) -> SimpleViT:
    torch.manual_seed(0)
    cfg = dict(image_size=8, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, dim_head=8, mlp_dim=16,
               channels=1) | switches
    return SimpleViT(**cfg).eval()


SWITCHES = [{}, {"pool": "cls", "reg_tokens": 2, "qk_norm": True, "pos_emb": "sincos2d+rope2d_mixed"},
            {"pos_emb": "rope2d_axial", "layer_scale": 0.1}]


# --------------------------------------------------------------------------- the hook
@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("kind", ["math", "sdpa", "auto"])
def test_recorded_weights_times_values_are_the_attention_output(kind, switches):
    net = vit(attention=kind, **switches)
    images = torch.randn(3, 1, 8, 8)
    inputs, mixed = [], []
    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs: inputs.append((m, args, kwargs)), with_kwargs=True)
             for m in net.modules() if isinstance(m, Attention)]
    hooks += [m.to_out.register_forward_pre_hook(lambda m, args: mixed.append(args[0]))
              for m in net.modules() if isinstance(m, Attention)]
    with torch.no_grad():
        plain = net(images)
        inputs.clear(), mixed.clear()
        with recording_attention(net) as maps:
            recorded = net(images)
    for hook in hooks:
        hook.remove()
    assert torch.equal(plain, recorded), "recording changes nothing the model computes"
    assert len(maps) == len(inputs) == 2
    for weights, (module, args, kwargs), out in zip(maps, inputs, mixed):
        n = images.shape[0], 2, out.shape[1], out.shape[1]
        assert weights.shape == n and torch.allclose(weights.sum(-1), torch.ones(()))
        with torch.no_grad():
            _, _, v = module.qkv(*args, **kwargs)
        torch.testing.assert_close(rearrange(weights @ v, "b h n d -> b n (h d)"), out, rtol=1e-5, atol=1e-5)
    assert all(not m._forward_hooks for m in net.modules()), "the hooks leave with the block"


@pytest.mark.parametrize("switches", SWITCHES)
def test_the_weights_are_the_same_for_math_sdpa_and_auto(switches):
    net, images, seen = vit(**switches), torch.randn(2, 1, 8, 8), {}
    for kind in ("math", "sdpa", "auto"):
        for module in net.modules():
            if isinstance(module, Attention):
                module.attention = kind
        with torch.no_grad(), recording_attention(net) as maps:
            net(images)
        seen[kind] = maps
    for kind in ("sdpa", "auto"):
        for a, b in zip(seen["math"], seen[kind]):
            torch.testing.assert_close(a, b)


def test_a_model_without_vitlab_attention_is_named_in_one_line():
    from timm.models.vision_transformer import VisionTransformer

    timm_vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1,
                                 num_heads=2)
    with pytest.raises(ValueError, match="has no vitlab attention module"):
        with recording_attention(timm_vit):
            pass
    with pytest.raises(ValueError, match="VisionTransformer, not vitlab's SimpleViT: .* model=simple_vit"):
        require_simple_vit(timm_vit)


# --------------------------------------------------------------------------- values by hand
def test_uniform_attention_has_the_mean_pixel_distance_of_all_patch_pairs():
    """q = k = 0 gives every score 0: uniform attention. On a 2x2 grid of 4-pixel patches, of the 16
    ordered pairs 4 are 0 apart, 8 are 4 px and 4 are 4*sqrt(2) px: mean (2 + sqrt 2) px. The class
    token and 2 registers take 3 of the 7 tokens' attention, and the rest is still uniform."""
    expected = (8 * 4 + 4 * 4 * math.sqrt(2)) / 16
    assert patch_distances((2, 2), 4).mean().item() == pytest.approx(expected)
    for switches, share in (({}, 0.0), ({"pool": "cls", "reg_tokens": 2}, 3 / 7)):
        net = vit(depth=3, **switches)
        for module in net.modules():
            if isinstance(module, Attention):
                torch.nn.init.zeros_(module.to_qkv.weight)
        images = torch.randn(5, 1, 8, 8)
        result = analyse(net, lambda: images.split(2), images[:2], components=28)
        distance = result["attention_distance"]
        assert np.asarray(distance["per_head"]).shape == (3, 2) and distance["images"] == 5
        np.testing.assert_allclose(distance["per_head"], expected, atol=1e-4)
        np.testing.assert_allclose(distance["attention_to_non_patch_tokens"], share, atol=1e-4)
        assert distance["uniform_attention"] == pytest.approx(expected, abs=1e-4)
        np.testing.assert_allclose(result["attention_maps"]["last_block"], 1 / 4, atol=1e-5)
        np.testing.assert_allclose(result["attention_maps"]["rollout"], 1 / 4, atol=1e-5)


def test_attention_distance_of_attention_to_oneself_and_to_the_neighbour():
    distances = patch_distances((1, 3), 2)  # three patches in a row, 2 px apart
    assert distances.tolist() == [[0, 2, 4], [2, 0, 2], [4, 2, 0]]
    self_attention = torch.eye(3).expand(1, 1, 3, 3)
    assert attention_distance(self_attention, distances)[0].item() == 0
    right = torch.tensor([[0, 1, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float)[None, None]  # the next patch, or itself
    assert attention_distance(right, distances)[0].item() == pytest.approx(4 / 3)


def test_rollout_of_identity_attention_is_the_identity_and_of_one_uniform_block_half_of_it():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    torch.testing.assert_close(rollout([eye] * 4), torch.eye(5, dtype=torch.float64).expand(2, 5, 5))
    uniform = torch.full((1, 2, 4, 4), 0.25)
    u = torch.full((1, 4, 4), 0.25, dtype=torch.float64)
    torch.testing.assert_close(rollout([uniform]), (u + torch.eye(4)) / 2)
    # Two blocks multiply: ((U + I) / 2)^2 = (3U + I) / 4 for the idempotent U.
    torch.testing.assert_close(rollout([uniform, uniform]), (3 * u + torch.eye(4)) / 4)


def test_query_view_reads_the_class_token_or_the_mean_patch_query():
    # [cls, p0, p1, reg]: the class token looks at p1 only, the patches at p0.
    matrix = torch.tensor([[0, 0, 1, 0], [0, 1, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, 1]], dtype=torch.float)[None]
    assert query_view(matrix, 1, 1, use_cls=True).tolist() == [[0, 1]]
    assert query_view(matrix, 1, 1, use_cls=False).tolist() == [[1, 0]]


def test_patch_filters_fold_the_patch_layernorm_and_see_what_the_model_sees():
    net = vit()
    with torch.no_grad():
        net.to_patch_embedding[1].weight.uniform_(0.5, 2)
        net.to_patch_embedding[1].bias.uniform_(-1, 1)
    filters, note = patch_embedding_filters(net)
    assert filters.shape == (16, 4, 4, 1) and "LayerNorm gain" in note
    patch = torch.randn(16, dtype=torch.float64)
    standard = (patch - patch.mean()) / (patch.var(unbiased=False) + 1e-5).sqrt()
    linear, norm = net.to_patch_embedding[2], net.to_patch_embedding[1]
    with torch.no_grad():
        expected = linear(norm(patch.float())).double() - linear.weight.double() @ norm.bias.double() - linear.bias
    torch.testing.assert_close(torch.from_numpy(filters.reshape(16, 16)) @ standard, expected, rtol=1e-4, atol=1e-4)
    # Without the patch LayerNorm the filters are the Linear's rows.
    plain = vit(patch_norm=False)
    filters, note = patch_embedding_filters(plain)
    np.testing.assert_allclose(filters.reshape(16, 16), plain.to_patch_embedding[2].weight.detach().numpy(), rtol=1e-6)


def test_principal_components_of_filters_along_two_known_directions():
    e1, e2 = np.eye(16)[3], -np.eye(16)[7]
    a = 3.0 * (-1) ** np.arange(64)  # uncorrelated with b, three times its spread
    b = (-1.0) ** (np.arange(64) // 2)
    filters = (a[:, None] * e1 + b[:, None] * e2 + 0.5).reshape(64, 4, 4, 1)
    components, ratio = principal_components(filters, 28)
    assert components.shape == (2, 4, 4, 1), "only as many components as the filters have directions"
    np.testing.assert_allclose(components[0].ravel(), e1, atol=1e-8)
    np.testing.assert_allclose(components[1].ravel(), -e2, atol=1e-8)  # the sign makes the largest entry positive
    np.testing.assert_allclose(ratio, [0.9, 0.1])


def test_position_tables_say_what_is_drawn_for_each_kind():
    assert position_tables(vit(pos_emb="none")) == ({}, "pos_emb=none: the model has no position embedding, "
                                                        "nothing is drawn")
    assert list(position_tables(vit())[0]) == ["sincos2d (fixed)"]
    assert list(position_tables(vit(pos_emb="learned"))[0]) == ["learned"]
    tables, note = position_tables(vit(pos_emb="sincos2d+rope2d_mixed", depth=3))
    assert list(tables) == ["sincos2d (fixed)", "rope2d_mixed rotations, block 1", "rope2d_mixed rotations, block 3"]
    assert tables["rope2d_mixed rotations, block 1"].shape == (4, 2 * 2 * 8) and "first and last block" in note
    # Axial rotations: the similarity depends on the offset of two patches only.
    tables, _ = position_tables(vit(pos_emb="rope2d_axial", image_size=12))
    unit = tables["rope2d_axial rotations"] / np.linalg.norm(tables["rope2d_axial rotations"], axis=1, keepdims=True)
    similarity = (unit @ unit.T).reshape(3, 3, 3, 3)
    assert similarity[0, 0, 1, 1] == pytest.approx(similarity[1, 1, 2, 2])
    assert similarity[0, 0, 0, 0] == pytest.approx(1)


def test_output_token_norms_leave_out_the_class_token_and_registers():
    net = vit(pool="cls", reg_tokens=3)
    norms = output_token_norms(net, torch.randn(2, 1, 8, 8))
    assert norms.shape == (2, 4) and (norms > 0).all()


@pytest.mark.parametrize("switches", [{"pos_emb": "none"}, {"pool": "cls", "reg_tokens": 2, "pos_emb": "rope2d_mixed"},
                                      {"channels": 3, "pos_emb": "learned", "patch_norm": False, "pool": "map"}])
def test_figures_of_every_kind_of_model(switches, tmp_path):
    from vitlab.analysis import plot_attention_maps, plot_figure7, plot_token_norms

    net = vit(**switches)
    channels = switches.get("channels", 1)
    images = torch.randn(4, channels, 8, 8)
    result = analyse(net, lambda: [images], images[:3], components=5)
    assert np.asarray(result["patch_embedding"]["components"]).shape == (5, 4, 4, channels)
    assert result["position_embedding"]["drawn"] == ([] if switches["pos_emb"] == "none" else
                                                     list(position_tables(net)[0]))
    assert result["attention_maps"]["view"].startswith("the class token" if switches.get("pool") == "cls" else
                                                       "the mean over the patch queries")
    plot_figure7(result, tmp_path / "figure7.png")
    plot_attention_maps(result, images[:3].clamp(0, 1).numpy(), ["a", "b", "c"], tmp_path / "maps.png", per_row=2)
    plot_token_norms(result["_all_norms"], result["token_norms"], 0, tmp_path / "norms.png")
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("figure7.png", "maps.png", "norms.png"))


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, data_dir):
    """A 2-job sweep of debug=fast runs (no registers, and 2 registers) on Fashion-MNIST."""
    work = tmp_path_factory.mktemp("analyze")
    run_entry("vitlab.train", "-m", "model.reg_tokens=0,2", "debug=fast", "sweep=tiny", "model.patch_size=7", *TINY,
              cwd=work, data_dir=data_dir)
    sweep = work / "outputs" / "multirun" / "tiny"
    return work, sweep


def listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_analyze_a_checkpoint_writes_figures_and_numbers_and_leaves_the_run_alone(tiny_sweep, data_dir):
    work, sweep = tiny_sweep
    job = next(sweep.glob("1_*"))
    before = listing(job)
    (ckpt,) = (job / "checkpoints").glob("best*.ckpt")  # a path with = and , in it, as the console passes it
    run_entry("vitlab.analyze", f"ckpt_path={ckpt}", "name=one", "images_for_distance=20", "torch_threads=1",
              cwd=work, data_dir=data_dir)
    out = work / "outputs" / "analyze" / "one"
    for figure in ("figure7.png", "attention_maps.png", "token_norms.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "analysis.json").read_text())
    assert record["run_dir"] == str(job.resolve()) and record["model"]["register_tokens"] == 2
    assert record["images"] == [19, 2, 1, 13, 6, 8, 4, 9, 18, 0], "the first test image of each class"
    assert record["labels"] == list(range(10))
    distance = record["attention_distance"]
    assert distance["images"] == 20 and np.asarray(distance["per_head"]).shape == (2, 2)
    assert np.asarray(distance["attention_to_non_patch_tokens"]).shape == (2, 2)
    # 4 x 4 patches of 7 pixels: every head's distance lies between 0 and the image's diagonal.
    assert all(0 < d < 28 * math.sqrt(2) for row in distance["per_head"] for d in row)
    maps = record["attention_maps"]
    for name in ("last_block", "rollout", "token_norms"):
        assert np.asarray(maps[name]).shape == (10, 4, 4)
    np.testing.assert_allclose(np.asarray(maps["rollout"]).sum(axis=(1, 2)), 1, atol=1e-4)
    assert np.asarray(record["patch_embedding"]["components"]).shape[1:] == (7, 7, 1)
    assert np.asarray(record["position_embedding"]["similarity"]["sincos2d (fixed)"]).shape == (16, 16)
    assert set(record["summary"]) >= {"mean_attention_distance", "attention_distance_per_block",
                                      "token_norm_max_over_median"}
    assert listing(job) == before, "nothing is written into the run's folder"


def test_analyze_a_sweep_puts_the_jobs_side_by_side_and_into_the_summary(tiny_sweep, data_dir, monkeypatch, capsys):
    work, sweep = tiny_sweep
    before = listing(sweep)
    result = run_in_process(analyze_main, "vitlab.analyze", [f"sweep={sweep}", "name=sweep", "images_for_distance=8",
                                                             "images=[3,4]"],
                            cwd=work, data_dir=data_dir, monkeypatch=monkeypatch, capsys=capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    out = work / "outputs" / "analyze" / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    for job in jobs:
        record = json.loads((out / job / "analysis.json").read_text())
        assert record["images"] == [3, 4] and (out / job / "figure7.png").is_file()
    assert (out / "attention_distance_by_job.png").read_bytes()[:4] == b"\x89PNG"
    overview = json.loads((out / "analysis.json").read_text())
    assert sorted(overview["jobs"]) == jobs and overview["skipped"] == {} and overview["failed"] == {}
    assert overview["jobs"][jobs[1]]["label"] == "model.reg_tokens=2"

    runs = load_runs(sweep, analysis=out)
    assert runs["mean_attention_distance"].notna().all() and len(runs["attention_distance_per_block"][0]) == 2
    assert "mean_attention_distance" not in load_runs(sweep).columns, "without analysis= the table is as it was"
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("job,model.reg_tokens,status,test_acc,mean_attention_distance") and len(summary) == 3
    assert "mean_attention_distance" in (out / "summary.md").read_text()
    assert listing(sweep) == before, "nothing is written into the sweep's folders"
    # python -m vitlab.summarize <sweep> --analysis <folder>: the numbers as columns of the sweep's own tables.
    assert summarize_main([str(sweep), "--analysis", str(out)]) == 0
    assert "mean_attention_distance" in (sweep / "summary.md").read_text()
    assert "mean_attention_distance" in (sweep / "summary.csv").read_text().splitlines()[0]


def test_bad_input_is_named_in_one_line(tiny_sweep, data_dir, tmp_path, monkeypatch, capsys):
    work, sweep = tiny_sweep
    (ckpt,) = (next(sweep.glob("0_*")) / "checkpoints").glob("best*.ckpt")

    def run(*args):
        return run_in_process(analyze_main, "vitlab.analyze", args, cwd=tmp_path, data_dir=data_dir,
                              monkeypatch=monkeypatch, capsys=capsys)

    assert_short_failure(run(), "error: ValueError: neither ckpt_path nor sweep is set")
    assert_short_failure(run(f"ckpt_path={ckpt}", f"sweep={sweep}"), "are both set")
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint")
    assert_short_failure(run(f"ckpt_path={notes}"), f"ckpt_path={notes} is not a PyTorch checkpoint")
    assert_short_failure(run(f"ckpt_path={tmp_path / 'missing.ckpt'}"), "does not exist")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    assert_short_failure(run(f"ckpt_path={foreign}"), "does not say which model it holds")
    assert_short_failure(run(f"ckpt_path={ckpt}", "images=[2,10000]"),
                         "images=[2, 10000] names test image [10000] but the test split has 10000 images: choose "
                         "indices from 0 to 9999")
    assert_short_failure(run(f"ckpt_path={ckpt}", "images=[a]"), "images=['a'] must be test-set indices")
    assert_short_failure(run(f"ckpt_path={ckpt}", "images_for_distance=0"), "images_for_distance=0 must be a positive")
    assert_short_failure(run(f"sweep={tmp_path / 'nowhere'}"), "is not a folder: pass a multirun folder")
    assert_short_failure(run(f"sweep={tmp_path}"), "has no job folders")
    assert not list(tmp_path.rglob("*.png")), "nothing is drawn before the input is checked"


def test_registers_report_measures_what_vitlab_analyze_measures(tiny_sweep, data_dir, monkeypatch, tmp_path):
    """The registers table's attention and norm columns (scripts/ablation_report.py) agree with
    vitlab.analyze on the same checkpoint and test images, and its attention figure is drawn."""
    from test_ablations import _load_report

    report = _load_report()
    monkeypatch.setenv("VITLAB_DATA_DIR", str(data_dir))
    work, sweep = tiny_sweep
    ckpts = {f"{n} registers": next((next(sweep.glob(f"{i}_*")) / "checkpoints").glob("best*.ckpt"))
             for i, n in ((0, 0), (1, 2))}
    measured = report.measure_registers(ckpts["2 registers"], images=20)
    run_entry("vitlab.analyze", f"ckpt_path={ckpts['2 registers']}", "name=cross", "images_for_distance=20",
              "torch_threads=1", cwd=work, data_dir=data_dir)
    record = json.loads((work / "outputs" / "analyze" / "cross" / "analysis.json").read_text())
    last = np.asarray(record["attention_distance"]["attention_to_non_patch_tokens"])[-1].mean()
    assert 0 < measured["attention_to_registers"] < 1
    assert measured["attention_to_registers"] == pytest.approx(last, abs=1e-4)
    assert measured["max_over_median"] == pytest.approx(record["token_norms"]["max_over_median"], rel=1e-3)
    assert 1 <= measured["attention_peak"] <= 16  # 4 x 4 patches: between uniform and all on one patch
    without = report.measure_registers(ckpts["0 registers"], images=20)
    assert without["attention_to_registers"] == pytest.approx(0, abs=1e-6)
    path = report.register_attention_figure(tmp_path / "maps.png", ckpts, images=3)
    assert path.read_bytes()[:4] == b"\x89PNG"
