"""The ablation configs compose into the sweeps they promise, and the report turns sweep
folders into tables, figures and verdicts computed from the numbers."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CONFIG_DIR, REPO
from omegaconf import OmegaConf, open_dict
from test_configs import compose_train

ABLATIONS = sorted(p.stem for p in (CONFIG_DIR / "experiment" / "ablation").glob("*.yaml") if p.stem != "base")


def _load_report():
    spec = importlib.util.spec_from_file_location("ablation_report", REPO / "scripts" / "ablation_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def resolved(cfg):
    with open_dict(cfg):
        sweeper = OmegaConf.to_container(cfg.hydra.sweeper.params)
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True), sweeper


def test_every_ablation_has_a_report_section():
    # patch_size_32 is the patch-size ablation for 32 px datasets (CIFAR), not on the Fashion-MNIST page.
    assert [a for a in ABLATIONS if a != "patch_size_32"] == sorted(a.name for a in _load_report().ABLATIONS)


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_sweeps_three_seeds_into_a_fixed_folder(name, tmp_path):
    data = ["data=cifar10"] if name.endswith("_32") else []
    cfg, params = resolved(compose_train(f"experiment=ablation/{name}", *data, tmp=tmp_path))
    assert cfg["sweep"] == f"ablation_{name}"
    assert [int(s) for s in str(params.pop("seed")).split(",")] == [0, 1, 2]
    assert params, "an ablation sweeps something besides the seed"
    # The shared scale of conf/experiment/ablation/base.yaml.
    assert cfg["trainer"]["max_epochs"] == 1
    assert cfg["data"]["_target_"].endswith("CIFAR10DataModule" if data else "FashionMNISTDataModule")
    if "model.patch_size" in params:  # every swept patch size divides the image
        assert all(cfg["data"]["image_size"] % int(p) == 0 for p in str(params["model.patch_size"]).split(","))


def test_heads_keep_the_inner_width():
    for heads in (1, 2, 4, 8):
        model = resolved(compose_train("experiment=ablation/heads", f"model.heads={heads}"))[0]["model"]
        assert model["heads"] * model["dim_head"] == model["dim"] == 96


def test_heads_that_do_not_divide_the_width_are_refused():
    with pytest.raises(Exception, match="96 is not divisible by 5"):
        resolved(compose_train("experiment=ablation/heads", "model.heads=5"))


def test_shapes_hold_compute_and_the_sweep_can_change_them():
    from vitlab.config import instantiate_model
    from vitlab.models import count_parameters, flops_per_image

    costs = []
    for shape in ("d2_w136", "d4_w96", "d8_w68", "d16_w48"):
        model = resolved(compose_train("experiment=ablation/depth_width", f"shape={shape}"))[0]["model"]
        assert f"d{model['depth']}_w{model['dim']}" == shape
        net = instantiate_model(model)
        costs.append((count_parameters(net), flops_per_image(net, 28, 1)))
    params, flops = zip(*costs)
    assert max(params) / min(params) < 1.02 and max(flops) / min(flops) < 1.2


def test_vs_deit_sweeps_simple_vit_against_a_deit_style_vit_of_the_same_shape():
    """The three settings of experiment=ablation/vs_deit build the networks and recipes its header names."""
    from timm.layers import DropPath
    from timm.models.vision_transformer import VisionTransformer

    from vitlab.config import instantiate_model
    from vitlab.models import SimpleViT, count_parameters

    key = "experiment/ablation/vs_deit"
    cfg, params = resolved(compose_train("experiment=ablation/vs_deit"))
    assert params[key].split(",") == ["simple_vit", "deit", "deit_recipe"]
    built = {}
    for setting in ("simple_vit", "deit", "deit_recipe"):
        cfg = compose_train("experiment=ablation/vs_deit", f"{key}={setting}")
        built[setting] = (instantiate_model(cfg.model), resolved(cfg)[0])
    (simple, base), (deit, same), (own, recipe) = built.values()
    # SimpleViT is the ablations' base setting, unchanged (so that a kept base run can stand in for it).
    assert resolved(compose_train("experiment=ablation/mlp", "model.mlp=gelu"))[0] | {"sweep": base["sweep"]} == base
    assert isinstance(simple, SimpleViT) and count_parameters(simple) == 300_618
    assert base["model"]["name"] == "simple_vit" and base["model"]["pool"] == "mean"
    # The DeiT-style ViT: timm's VisionTransformer of the same width, depth, heads, MLP and patch, with
    # a class token, a learned position embedding over it and the 49 patches, and qkv bias.
    assert isinstance(deit, VisionTransformer) and same["model"]["name"] == "deit_tiny_patch16_224"
    assert deit.embed_dim == 96 and len(deit.blocks) == 4 and deit.patch_embed.patch_size == (4, 4)
    assert {b.attn.num_heads for b in deit.blocks} == {4} and {b.mlp.fc1.out_features for b in deit.blocks} == {192}
    assert deit.cls_token.shape == (1, 1, 96) and deit.global_pool == "token"
    assert deit.pos_embed.requires_grad and deit.pos_embed.shape == (1, 1 + 49, 96)
    assert all(b.attn.qkv.bias is not None for b in deit.blocks)
    # Parameters differ by the class token, the position embedding and the attention biases, less
    # SimpleViT's two stem LayerNorms (16 and 96 wide).
    assert count_parameters(deit) == 306_826 == 300_618 + 96 + 50 * 96 + 4 * (3 * 96 + 96) - 2 * (16 + 96)
    assert {k: v for k, v in same.items() if k not in ("model", "shape")} == \
        {k: v for k, v in base.items() if k not in ("model", "shape")}, "one recipe for both networks"
    # DeiT's own recipe (Touvron et al. 2021, Table 9) where it differs from the ablation recipe.
    assert count_parameters(own) == 306_826 and isinstance(own.blocks[-1].drop_path1, DropPath)
    assert own.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert recipe["optimizer"]["lr"] == pytest.approx(5e-4 * recipe["data"]["batch_size"] / 512)
    assert recipe["optimizer"]["weight_decay"] == 0.05 and recipe["module"]["label_smoothing"] == 0.1
    assert recipe["scheduler"]["warmup_fraction"] == pytest.approx(5 / 300, abs=1e-4)
    augment = recipe["data"]["augment"]
    assert set(augment) == {"crop_flip", "randaugment", "random_erasing", "mixup_cutmix"}
    assert augment["randaugment"]["m"] / (augment["randaugment"]["num_magnitude_bins"] - 1) == pytest.approx(0.9)
    assert augment["random_erasing"]["p"] == 0.25
    assert (augment["mixup_cutmix"]["mixup_alpha"], augment["mixup_cutmix"]["cutmix_alpha"]) == (0.8, 1.0)


def test_ablate_sh_refuses_an_unknown_name():
    result = subprocess.run(["bash", "scripts/ablate.sh", "patchsize"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown ablation 'patchsize'" in result.stderr and "patch_size" in result.stderr
    # A setting of an ablation's own config group (conf/experiment/ablation/vs_deit/deit.yaml) is no ablation.
    result = subprocess.run(["bash", "scripts/ablate.sh", "vs_deit/deit"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "unknown ablation 'vs_deit/deit'" in result.stderr


def fake_sweep(root, name, settings, acc, seeds=(0, 1, 2), precision=lambda seed: None, extra=lambda o, seed: {},
               model=lambda o: {}):
    """A sweep folder as a multirun leaves it: per job .hydra/overrides.yaml, config.yaml (its model
    section updated with ``model``), metrics.json (with the fields ``extra`` gives a job)."""
    sweep = root / f"ablation_{name}"
    for num, (overrides, seed) in enumerate((o, s) for o in settings for s in seeds):
        job = sweep / f"{num}_job"
        (job / ".hydra").mkdir(parents=True)
        items = [f"{k}={v}" for k, v in overrides.items()] + [f"seed={seed}"]
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(items))
        config = {"model": {"image_size": 28, "patch_size": 4, "dim": 8, **model(overrides)}}
        if precision(seed):
            config["trainer"] = {"precision": precision(seed)}
        (job / "config.yaml").write_text(yaml.safe_dump(config))
        metrics = {"status": "completed", "test/acc": acc(overrides) + 0.001 * seed, "best_val_acc": acc(overrides),
                   "flops_per_image": 1e6 * overrides.get("model.patch_size", 4) ** -2, "wall_time_s": 10.0,
                   "train_images_per_s": 100.0, "params": 1000, "machine": "Test CPU, 1 thread", **extra(overrides, seed)}
        (job / "metrics.json").write_text(json.dumps(metrics))
        if overrides.get("model.pos_emb") == "learned":
            (job / "checkpoints").mkdir()
            torch.save({"state_dict": {"net.pos_embedding": torch.randn(49, 8)}}, job / "checkpoints" / "best.ckpt")
    return sweep


def write_report(runs, docs):
    """Run scripts/ablation_report.py on the sweeps below ``runs``; the page it wrote into ``docs``."""
    result = subprocess.run([sys.executable, "scripts/ablation_report.py", "--multirun", str(runs), "--docs", str(docs)],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return (docs / "ablations.md").read_text()


def test_report_writes_tables_figures_and_verdicts_from_the_numbers(tmp_path):
    runs = tmp_path / "multirun"
    fake_sweep(runs, "patch_size", [{"model.patch_size": p} for p in (2, 4, 7, 14)],
               lambda o: 0.9 - 0.01 * o["model.patch_size"])
    fake_sweep(runs, "pos_emb", [{"model.pos_emb": k} for k in ("sincos2d", "learned", "none")],
               lambda o: {"sincos2d": 0.85, "learned": 0.85, "none": 0.80}[o["model.pos_emb"]])
    fake_sweep(runs, "pool", [{"model.pool": p, "optimizer.lr": lr} for p in ("mean", "cls") for lr in (0.001, 0.002)],
               lambda o: 0.85 + (0.02 if o["model.pool"] == "mean" else 0) + (0.01 if o["optimizer.lr"] == 0.002 else 0))
    docs = tmp_path / "docs"
    text = write_report(runs, docs)
    assert "**Reproduced**: each smaller patch is better" in text
    assert "**Reproduced**: position information helps" in text
    assert "**Learned and fixed embeddings tie**" in text
    assert "mean (lr 0.002) − cls (lr 0.002)" in text and "mean pooling beats the class token" in text
    # Mean ± std over the three seeds: 0.9 - 0.02 + (0, 0.001, 0.002) -> 88.10 ± 0.10.
    assert "| 2 | 196 | 3/3 | 88.10 ± 0.10 |" in re.sub(r" +", " ", text), "a table row, padding aside"
    # Every ablation at 10 epochs, and all but these three at 1 epoch.
    assert text.count("Not run yet.") == 2 * len(_load_report().ABLATIONS) - 3
    assert "carried over" not in text  # every section comes from records
    for figure in ("patch_size.png", "pos_emb.png", "pos_emb_similarity.png", "pool.png"):
        assert (docs / "ablations" / figure).stat().st_size > 10_000


def test_report_of_the_design_space_switches(tmp_path):
    """Registers, QK-norm, RoPE at larger test images and FlexiViT at every patch size: tables with
    their own columns, and verdicts against the base setting from the numbers."""
    runs = tmp_path / "multirun"
    fake_sweep(runs, "registers", [{"model.reg_tokens": n} for n in (0, 4)], lambda o: 0.80 + 0.01 * (o["model.reg_tokens"] > 0))
    fake_sweep(runs, "qk_norm", [{"model.qk_norm": q, "optimizer.lr": lr} for q in ("false", "true") for lr in (0.002, 0.01)],
               lambda o: 0.80)
    rope = {"sincos2d": 0.80, "rope2d_axial": 0.80, "rope2d_mixed": 0.82}
    fake_sweep(runs, "rope", [{"model.pos_emb": k} for k in rope], lambda o: rope[o["model.pos_emb"]],
               extra=lambda o, seed: {f"test/acc@{s}px": rope[o["model.pos_emb"]] - (0.3 if o["model.pos_emb"] == "sincos2d" else 0.05)
                                      + 0.001 * seed for s in (36, 44, 56)})
    fake_sweep(runs, "flexivit", [{"model.patch_size": p, "model.flexi_patch_sizes": f} for p in (4, 7) for f in ("null", "[4,7,14]")],
               lambda o: 0.80,
               extra=lambda o, seed: {f"test/acc@p{s}": (0.80 if o["model.flexi_patch_sizes"] != "null" or s == o["model.patch_size"]
                                                         else 0.2) + 0.001 * seed for s in (4, 7, 14)})
    # What the rope table measured on each job's checkpoint with the patches interpolated, kept
    # beside its records (no checkpoints here, so the kept files are what the report reads).
    interpolated = {"sincos2d": 0.75, "rope2d_axial": 0.70, "rope2d_mixed": 0.75}
    for num, (kind, seed) in enumerate((k, s) for k in rope for s in (0, 1, 2)):
        kept = tmp_path / "docs" / "ablations" / "runs" / "ablation_rope" / f"{num}_job"
        kept.mkdir(parents=True)
        (kept / "interpolated.json").write_text(json.dumps({f"{s}px": interpolated[kind] + 0.001 * seed
                                                            for s in (36, 44, 56)}))
    text = re.sub(r" +", " ", write_report(runs, tmp_path / "docs"))
    assert "**Reproduced**: registers cost nothing and help here (4 − 0 = +1.00" in text
    assert "| largest / median patch-token norm |" in text.replace("| largest", "| largest")
    assert "at lr 0.01: no clear difference" in text
    assert "| rope2d_mixed | 77.10 ± 0.10 | 77.10 ± 0.10 | 77.10 ± 0.10 | 75.10 ± 0.10 | 75.10 ± 0.10 | 75.10 ± 0.10 " \
           "| 3/3 | 82.10 ± 0.10 |" in text
    assert "At 56 px (2x) with interpolated positions: rope2d_axial − sincos2d = -5.00" in text
    assert "at 56 px (2x) with interpolated positions 0 of 2 RoPE variants beat sincos2d and 1 is worse" in text
    assert ("Interpolated instead of extended, the same checkpoints at 56 px: sincos2d +25.0, rope2d_axial -5.0, "
            "rope2d_mixed -2.0 points") in text
    assert (tmp_path / "docs" / "ablations" / "rope.png").stat().st_size > 10_000
    assert "At 56 px (2x): rope2d_axial − sincos2d = +25.00" in text
    assert ("at the training size (28 px) 1 of 2 RoPE variants beat sincos2d and none is worse; "
            "at 56 px (2x) every RoPE variant beats sincos2d") in text
    assert "| FlexiViT | 4 | 80.10 ± 0.10 | 80.10 ± 0.10 | 80.10 ± 0.10 |" in text
    assert "| fixed | 7 | 20.10 ± 0.10 | 80.10 ± 0.10 | 20.10 ± 0.10 |" in text
    assert "p14: FlexiViT − patch-14 model" not in text  # no model trained at 14 alone here
    # The summary at the top: each setting against the base, other keys held equal, bold where real.
    glance = text[text.index("## At a glance"):text.index("## Patch size, 10 epochs")]
    assert "| Register tokens | reg_tokens=4 | 0 | – | **+1.00 ± 0.08** (p = 0.00026) |" in glance
    assert "| QK-norm against learning rate | qk_norm=true | false (lr 0.01) | – | +0.00 ± 0.08 (p = 1) |" in glance
    assert "| 2-D rotary position embedding | pos_emb=rope2d_mixed | sincos2d | – | **+2.00 ± 0.08**" in glance
    assert "| FlexiViT" not in glance  # compared in its own section


def test_report_keeps_the_records_of_completed_jobs_and_the_sections_it_cannot_recompute(tmp_path):
    runs, docs = tmp_path / "multirun", tmp_path / "docs"
    sweep = fake_sweep(runs, "heads_10ep", [{"model.heads": h} for h in (1, 4)],
                       lambda o: 0.80 + 0.02 * o["model.heads"])
    fake_sweep(runs, "pos_emb_10ep", [{"model.pos_emb": k} for k in ("sincos2d", "learned")],
               lambda o: 0.85)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"params": {
        "seed": "0,1,2", "model.heads": "1,2,4,8"}}}}))  # 12 jobs planned
    # A job still running is neither kept nor counted as done.
    (sweep / "6_job" / ".hydra").mkdir(parents=True)
    (sweep / "6_job" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["model.heads=8", "seed=0"]))
    (sweep / "6_job" / "metrics.json").write_text(json.dumps({"status": "interrupted"}))
    # A section of an earlier generation whose sweep folder is gone keeps its table.
    docs.mkdir()
    (docs / "ablations.md").write_text("# Ablations\n\n## Position embedding, 1 epoch (early training)\n\n"
                                       "| position embedding | test acc (%) |\n| --- | --- |\n| none | 71.44 |\n\n"
                                       "## Patch size, 1 epoch (early training)\n\nNot run yet.\n")

    def report():
        return re.sub(r" +", " ", write_report(runs, docs))

    first = report()
    kept = docs / "ablations" / "runs" / "ablation_heads_10ep"
    assert sorted(p.name for p in kept.iterdir() if p.is_dir()) == [f"{n}_job" for n in range(6)]
    assert all((kept / f"{n}_job" / name).is_file() for n in range(6) for name in ("metrics.json", "config.yaml",
                                                                                     ".hydra/overrides.yaml"))
    assert "## Number of heads at fixed inner width, 10 epochs" in first and "| 4 | 24 | 3/3 | 88.10 ± 0.10 |" in first
    assert "| none | 71.44 |" in first
    # The carried-over section was judged by the rule of its time, and the page says so.
    assert "sections carried over from an earlier generation" in first
    assert "6 of 12 jobs completed; 1 min of job time in all, on Test CPU, 1 thread." in first
    assert (docs / "ablations" / "heads_10ep.png").stat().st_size > 10_000
    # The learned position embedding is kept too, for the similarity figure without checkpoints.
    assert "![pos_emb_similarity_10ep](ablations/pos_emb_similarity_10ep.png)" in first
    # A sweep run again (here with another override) skips the kept jobs but writes their
    # overrides.yaml anew: the kept records stay as they were.
    overrides = (sweep / "0_job" / ".hydra" / "overrides.yaml")
    kept_overrides = (kept / "0_job" / ".hydra" / "overrides.yaml").read_text()
    overrides.write_text(overrides.read_text() + "- torch_threads=1\n")
    assert report().split("\n", 3)[3] == first.split("\n", 3)[3]
    assert (kept / "0_job" / ".hydra" / "overrides.yaml").read_text() == kept_overrides
    # Without the sweep's folder (a new checkout), the same tables come from the kept records.
    shutil.rmtree(runs)
    assert first.split("\n", 3)[3] == report().split("\n", 3)[3]  # all but the generation time


def test_a_setting_with_one_seed_is_in_the_table_but_in_no_verdict(tmp_path):
    runs, docs = tmp_path / "multirun", tmp_path / "docs"
    sweep = fake_sweep(runs, "pos_emb", [{"model.pos_emb": k} for k in ("sincos2d", "learned", "none")],
                       lambda o: {"sincos2d": 0.85, "learned": 0.80, "none": 0.70}[o["model.pos_emb"]])
    for job in ("4_job", "5_job"):  # learned: seed 0 only
        shutil.rmtree(sweep / job)
    text = re.sub(r" +", " ", write_report(runs, docs))
    assert "| learned | 1/1 | 80.00 |" in text
    assert "**Reproduced**: position information helps" in text  # sincos2d and none have 3 seeds each
    assert "sincos2d − learned" not in text and "fewer than 2 completed seeds are in the table" in text


def test_pool_with_one_seed_names_the_learning_rates_chosen_so_far_and_waits_for_the_verdict(tmp_path):
    # The 10-epoch pool sweep after its first seed: every setting has one completed job.
    runs, docs = tmp_path / "multirun", tmp_path / "docs"
    fake_sweep(runs, "pool_10ep", [{"model.pool": p, "optimizer.lr": lr} for p in ("mean", "cls") for lr in (0.001, 0.004)],
               lambda o: 0.85 + (0.01 if (o["model.pool"] == "mean") == (o["optimizer.lr"] == 0.001) else 0), seeds=(0,))
    text = write_report(runs, docs)
    assert ("Learning rate with the best mean validation accuracy so far: mean 0.001 (1 seed), cls 0.004 (1 seed); "
            "the verdict waits for 2 seeds of each.") in text
    assert "mean pooling beats" not in text and "poolings tie" not in text and "class token is better" not in text


def test_report_names_the_precision_of_a_table_and_flags_a_table_that_mixes_two(tmp_path):
    runs, docs = tmp_path / "multirun", tmp_path / "docs"
    fake_sweep(runs, "pos_emb_10ep", [{"model.pos_emb": k} for k in ("sincos2d", "none")], lambda o: 0.85,
               precision=lambda seed: "32-true")
    fake_sweep(runs, "heads_10ep", [{"model.heads": h} for h in (1, 4)], lambda o: 0.85,
               precision=lambda seed: "bf16-mixed" if seed == 2 else "32-true")
    text = write_report(runs, docs)
    assert "6 of 6 jobs completed; 1 min of job time in all, on Test CPU, 1 thread; precision 32-true." in text
    assert ("on Test CPU, 1 thread; **precisions mixed** (32-true: 4 jobs, bf16-mixed: 2 jobs): a difference "
            "between settings may be the precision's") in text
    assert "`scripts/ablate.sh heads trainer.max_epochs=10 trainer.precision=32-true`" in text


def test_report_counts_jobs_that_took_the_results_of_the_same_run_elsewhere(tmp_path):
    runs, docs = tmp_path / "multirun", tmp_path / "docs"
    sweep = fake_sweep(runs, "heads_10ep", [{"model.heads": h} for h in (1, 4)], lambda o: 0.85)
    for job in ("3_job", "4_job", "5_job"):  # heads=4 is the base setting, run in another sweep
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        (sweep / job / "metrics.json").write_text(json.dumps(metrics | {"reused_from": "elsewhere", "wall_time_s": 600}))
    text = write_report(runs, docs)
    assert ("6 of 6 jobs completed (3 of them the same run as a job of another sweep, whose results they took: "
            "`reused_from` in their metrics.json); 0 min of job time in all") in text
    # Their speed and time were measured in the other sweep, under other load: marked, not mixed in.
    rows = re.sub(r" +", " ", text)
    assert "| 1 | 96 | 3/3 | 85.10 ± 0.10 | 85.00 ± 0.00 | 0.1 | 100 | 10 |" in rows
    assert "| 4 | 24 | 3/3 | 85.10 ± 0.10 | 85.00 ± 0.00 | 0.1 | 100 ‡ | 600 ‡ |" in rows
    assert "‡ Speed and time of the other sweep's run whose results these jobs took" in text


def test_report_of_simple_vit_against_a_deit_style_vit(tmp_path):
    """Rows named by setting, network and recipe, parameters, images/s of the sweep's own jobs, and the
    three verdicts from the numbers."""
    runs, key = tmp_path / "multirun", "experiment/ablation/vs_deit"
    acc = {"simple_vit": 0.80, "deit": 0.77, "deit_recipe": 0.60}
    speed = {"simple_vit": 300.0, "deit": 100.0, "deit_recipe": 90.0}
    fake_sweep(runs, "vs_deit", [{key: k} for k in acc], lambda o: acc[o[key]],
               model=lambda o: {"name": "simple_vit" if o[key] == "simple_vit" else "deit_tiny_patch16_224"},
               extra=lambda o, seed: {"train_images_per_s": speed[o[key]],
                                      "params": 300_618 if o[key] == "simple_vit" else 306_826})
    text = re.sub(r" +", " ", write_report(runs, tmp_path / "docs"))
    assert "## SimpleViT against a DeiT-style ViT, 1 epoch (early training)" in text
    assert "`scripts/ablate.sh vs_deit reuse=null`" in text and "Table 1" in text and "76.5" in text
    assert ("| simple_vit | SimpleViT: mean pooling, sincos2d, no qkv bias | simple_vit | ablation (SimpleViT's own) "
            "| 300,618 | 3/3 | 80.10 ± 0.10 |") in text
    assert ("| deit_recipe | DeiT-style: class token, learned position embedding, qkv bias | deit_tiny_patch16_224 "
            "| DeiT's | 306,826 | 3/3 | 60.10 ± 0.10 |") in text
    assert "| 90 | 10 |" in text  # images/s and job time
    assert "**Beyer et al.'s direction reproduced**: under one recipe SimpleViT beats the DeiT-style ViT " \
           "(simple_vit − deit = +3.00" in text
    assert "DeiT's recipe is worse at this length" in text and "(deit_recipe − deit = -17.00" in text
    assert "Each network with its own recipe: SimpleViT is better (simple_vit − deit_recipe = +20.00" in text
    assert "SimpleViT 300 images/s, the DeiT-style ViT 100 (3.00x)" in text
    assert (tmp_path / "docs" / "ablations" / "vs_deit.png").stat().st_size > 10_000


def test_verdicts_use_welchs_t_test_over_the_seeds():
    report = _load_report()
    a, b = report.Stat(0.90, 0.01, 3), report.Stat(0.88, 0.01, 3)
    # 2 points with a standard error of 0.82: beyond twice the standard error, but with 3 seeds
    # a side Welch's test gives p = 0.07, so it is no clear difference.
    sign, text = report.verdict(a, b, "a", "b")
    assert sign == 0 and "a − b = +2.00 ± 0.82 points, Welch's t-test p = 0.07 (p ≥ 0.05: no clear difference)" in text
    assert report.verdict(report.Stat(0.91, 0.01, 3), b, "a", "b")[0] == 1  # 3 points: p = 0.02
    assert report.verdict(b, report.Stat(0.91, 0.01, 3), "b", "a")[0] == -1
    assert report.verdict(report.Stat(0.9, 0.0, 2), report.Stat(0.9, 0.0, 2), "a", "b")[0] == 0
    # p that two digits would round to 0.05 gets a third, so a verdict never sits beside "p = 0.05"
    assert report.verdict(report.Stat(0.9027, 0.01, 3), b, "a", "b") == (1, "a − b = +2.27 ± 0.82 points, Welch's t-test p = 0.0498")
    assert "p = 0.0504 (p ≥ 0.05" in report.verdict(report.Stat(0.9026, 0.01, 3), b, "a", "b")[1]
