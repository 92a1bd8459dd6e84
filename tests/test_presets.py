"""Model presets (conf/model/*.yaml): they compose, build, match the published sizes and the
figures in their own headers, and every field stays overridable."""

import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, run_entry
from vitlab.config import instantiate_model
from vitlab.models import count_parameters, flops_per_image

# Published parameter counts at 224 px, 1000 classes (DeiT Table 1; ViT paper Table 1).
PUBLISHED_PARAMS = {"vit_ti": 5.7e6, "vit_s": 22e6, "vit_b": 86e6, "vit_l": 307e6}
# Small-image presets and the data each is meant for.
SMALL = {"vit_tiny_28": ("data=fashion_mnist",), "vit_small_32": ("data=synthetic", "data.image_size=32")}
# "At 224 px, 3 channels, 1000 classes: 5.67 M parameters, 2.49 GFLOPs per image"
FIGURES = re.compile(r"At (\d+) px[^,]*, (\d+) channels?, (\d+) classes[^:]*: ([\d.]+) M(?: parameters)?, ([\d.]+) GFLOPs")


def compose_train(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def header_figures(preset):
    text = (CONFIG_DIR / "model" / f"{preset}.yaml").read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    return [tuple(int(g) for g in m.groups()[:3]) + tuple(float(g) for g in m.groups()[3:]) for m in FIGURES.finditer(header)]


def test_every_preset_is_covered_here():
    presets = {p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")}
    # model=timm (any timm model by name) is covered by tests/test_timm_model.py.
    assert presets == {"simple_vit", "timm", *PUBLISHED_PARAMS, *SMALL}


def test_default_model_is_unchanged_and_vit_tiny_28_names_its_size():
    default = OmegaConf.to_container(compose_train().model)
    expected = dict(patch_size=4, dim=128, depth=6, heads=4, dim_head=32, mlp_dim=256, pool="mean", pos_emb="sincos2d",
                    attention="auto", head_init="xavier", dropout=0.0, drop_path=0.0)
    assert {k: default[k] for k in expected} == expected
    assert OmegaConf.to_container(compose_train("model=vit_tiny_28").model) == default


@pytest.mark.parametrize("preset", ["simple_vit", *PUBLISHED_PARAMS, *SMALL])
def test_header_figures_are_measured(preset):
    """Parameters and GFLOPs stated in each preset's header are what vitlab counts."""
    figures = header_figures(preset)
    assert figures, f"conf/model/{preset}.yaml states no 'At <size> px, ...: <params> M, <flops> GFLOPs' line"
    for image_size, channels, num_classes, params_m, gflops in figures:
        cfg = compose_train(f"model={preset}", "data=synthetic", f"data.image_size={image_size}",
                            f"data.channels={channels}", f"data.num_classes={num_classes}")
        with torch.device("meta"):  # shapes are all counting needs: ViT-L in a fraction of a second
            net = instantiate_model(cfg.model)
        assert count_parameters(net) / 1e6 == pytest.approx(params_m, rel=0.01, abs=0.005), preset
        assert flops_per_image(net, image_size, channels) / 1e9 == pytest.approx(gflops, rel=0.01), preset


@pytest.mark.parametrize("preset", ["vit_ti", "vit_s", "vit_b"])
def test_standard_presets_build_at_224_with_published_sizes(preset):
    cfg = compose_train(f"model={preset}", "data=synthetic", "data.image_size=224", "data.channels=3", "data.num_classes=1000")
    torch.manual_seed(0)
    net = instantiate_model(cfg.model)
    assert count_parameters(net) == pytest.approx(PUBLISHED_PARAMS[preset], rel=0.02)
    assert (cfg.model.patch_size, net.num_patches) == (16, 196)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_vit_l_has_the_published_size():
    cfg = compose_train("model=vit_l", "data=synthetic", "data.image_size=224", "data.channels=3", "data.num_classes=1000")
    with torch.device("meta"):
        net = instantiate_model(cfg.model)
    # No class token, no learned position embedding, no qkv bias: 1 % under the published 307 M.
    assert count_parameters(net) == pytest.approx(PUBLISHED_PARAMS["vit_l"], rel=0.015)


@pytest.mark.parametrize("preset", SMALL)
def test_small_presets_train_on_their_data_shape(preset):
    cfg = compose_train(f"model={preset}", *SMALL[preset])
    torch.manual_seed(0)
    net = instantiate_model(cfg.model)
    images = torch.randn(4, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    loss = torch.nn.functional.cross_entropy(net(images), torch.arange(4) % cfg.data.num_classes)
    loss.backward()
    assert torch.isfinite(loss) and net.linear_head.weight.grad.abs().sum() > 0
    assert net.num_patches == (cfg.data.image_size // 4) ** 2


def test_every_field_stays_overridable():
    cfg = compose_train("model=vit_s", "model.patch_size=4", "model.depth=2", "model.dim=64", "model.heads=2",
                        "model.mlp_dim=128", "model.head_init=zero", "model.dropout=0.1", "model.drop_path=0.1",
                        "model.pool=cls")
    assert cfg.model.dim_head == 64, "fields not overridden keep the preset's value"
    net = instantiate_model(cfg.model)  # Fashion-MNIST's 28 px: patch 4 divides it
    assert (net.num_patches, len(net.transformer.layers), net.pool) == (49, 2, "cls")
    assert net.transformer.drop_paths[-1].p == pytest.approx(0.1)
    assert not net.linear_head.weight.any()
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_224_preset_on_28px_data_fails_in_one_line(tmp_path, data_dir):
    result = run_entry("vitlab.train", "model=vit_s", "torch_threads=1", cwd=tmp_path, data_dir=data_dir, check=False)
    assert result.returncode == 1
    assert ("error: ValueError: model.patch_size=16 does not divide model.image_size=28: choose a patch size from "
            "[1, 2, 4, 7, 14, 28], or images whose side is a multiple of 16. (model.image_size follows "
            "data.image_size.)\n") in result.stderr
    assert "Traceback" not in result.stderr
