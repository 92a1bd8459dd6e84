import pytest
import torch

from vitlab.models import SimpleViT, count_parameters, flops_per_image, posemb_sincos_2d

SMALL = dict(image_size=28, patch_size=7, channels=1, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)


def make(**overrides):
    torch.manual_seed(0)
    return SimpleViT(**{**SMALL, **overrides})


@pytest.mark.parametrize("pool", ["mean", "cls"])
@pytest.mark.parametrize("pos_emb", ["sincos2d", "learned", "none"])
def test_output_shape_and_backward(pool, pos_emb):
    model = make(pool=pool, pos_emb=pos_emb)
    logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_rgb_non_square_patch_grid():
    model = make(image_size=32, patch_size=4, channels=3, num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert model.num_patches == 64


def test_sincos_embedding_is_a_fixed_non_persistent_buffer():
    model = make()
    assert "pos_embedding" in dict(model.named_buffers())
    assert "pos_embedding" not in model.state_dict()
    assert not any("pos_embedding" in n for n, _ in model.named_parameters())
    assert model.pos_embedding.shape == (16, 32)


def test_sincos_values():
    pe = posemb_sincos_2d(2, 3, 8)
    # Row = y * w + x; first quarter sin(x * omega_0) with omega_0 = 1.
    assert pe.shape == (6, 8)
    torch.testing.assert_close(pe[4, 0], torch.sin(torch.tensor(1.0)))  # x = 1
    torch.testing.assert_close(pe[4, 4], torch.sin(torch.tensor(1.0)))  # y = 1
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))


def test_no_weight_decay_names_embeddings_only():
    assert make(pos_emb="learned", pool="cls").no_weight_decay() == {"pos_embedding", "cls_token"}
    assert make().no_weight_decay() == set()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(patch_size=5), "patch_size=5 does not divide image_size=28: choose a patch size from [1, 2, 4, 7, 14, 28]"),
        (dict(dim=30), "dim=30 is not a multiple of 4"),
        (dict(depth=0), "depth=0 must be a positive integer"),
        (dict(heads=-2), "heads=-2 must be a positive integer"),
        (dict(dim=2.5), "dim=2.5 must be a positive integer"),
        (dict(pool="max"), "pool='max' is not one of mean, cls"),
        (dict(pos_emb="rope"), "pos_emb='rope' is not one of sincos2d, learned, none"),
        (dict(attention="flash"), "attention='flash' is not one of math, sdpa, auto"),
    ],
)
def test_invalid_configs_fail_at_construction(overrides, fragment):
    with pytest.raises(ValueError) as info:
        make(**overrides)
    assert fragment in str(info.value)
    assert "model." not in str(info.value), "the model speaks of its own arguments, not of config keys"


def test_config_layer_names_the_config_keys():
    from omegaconf import OmegaConf

    from vitlab.config import instantiate_model

    node = OmegaConf.create({"_target_": "vitlab.models.SimpleViT", "image_size": 28, "patch_size": 5, "num_classes": 10,
                             "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "channels": 1, "dim_head": 16})
    with pytest.raises(ValueError) as info:
        instantiate_model(node)
    assert str(info.value).startswith("model.patch_size=5 does not divide model.image_size=28: choose a patch size")
    assert str(info.value).endswith("(model.image_size follows data.image_size.)")


def test_dim_not_multiple_of_four_is_fine_without_sincos():
    assert make(dim=30, pos_emb="learned")(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_math_and_sdpa_attention_agree(pool):
    torch.manual_seed(1)
    x = torch.randn(4, 1, 28, 28)
    reference = make(attention="math", pool=pool)
    fast = make(attention="sdpa", pool=pool)
    fast.load_state_dict(reference.state_dict())
    out_ref, out_fast = reference(x), fast(x)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out_fast.square().sum().backward()
    for (name, p_ref), (_, p_fast) in zip(reference.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_auto_attention_picks_math_on_cpu():
    model = make(attention="auto")
    attn = model.transformer.layers[0][0]
    assert not attn.use_sdpa(torch.zeros(1))


def _qkv(batch, heads, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, d, generator=gen, dtype=torch.float64).float().requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("batch, max_bytes, chunks", [(7, 3 * 49 * 49 * 4 * 2, 4), (7, 3 * 49 * 49 * 4 * 3 - 1, 4), (7, 1, 7), (7, 10**9, 1), (128, None, 1)])
def test_chunked_attention_equals_explicit_in_values_and_gradients(batch, max_bytes, chunks, monkeypatch):
    """The batch slices (uneven ones included: 7 images in slices of 2, 2, 2, 1; a slice never
    above the budget, at least one image) compute the
    reference's function: the same outputs and q, k, v gradients as the whole-batch explicit
    attention and as SDPA, to fp32 rounding."""
    from vitlab.models import attention as simple_vit

    calls = []
    reference = simple_vit.explicit_attention
    monkeypatch.setattr(simple_vit, "explicit_attention", lambda *a: calls.append(a[0].shape[0]) or reference(*a))
    q, k, v = _qkv(batch, 3, 49, 16)
    scale = 16**-0.5
    grad = torch.randn(batch, 3, 49, 16, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, fn in {
        "explicit": lambda: reference(q, k, v, scale),
        "chunked": lambda: simple_vit.chunked_attention(q, k, v, scale, max_bytes),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale),
    }.items():
        calls.clear()
        out = fn()
        results[name] = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
        if name == "chunked":
            assert len(calls) == chunks and sum(calls) == batch
            assert max(calls) * 3 * 49 * 49 * 4 <= (max_bytes or simple_vit.CPU_CHUNK_BYTES) or calls == [1] * batch
    for name in ("chunked", "sdpa"):
        for what, got, want in zip(("out", "dq", "dk", "dv"), results[name], results["explicit"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, w=f"{name} {what}": f"{w}: {m}")


def test_default_chunk_keeps_49_tokens_whole_and_slices_196():
    """At the default model (heads 4) and batch 128: 49 tokens in one piece, as measured fastest;
    196 tokens in slices whose fp32 scores stay within CPU_CHUNK_BYTES."""
    from vitlab.models.attention import CPU_CHUNK_BYTES

    assert 128 * 4 * 49 * 49 * 4 <= CPU_CHUNK_BYTES < 128 * 4 * 196 * 196 * 4


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_auto_attention_on_cpu_slices_the_batch_and_agrees_with_math_and_sdpa(pool, monkeypatch):
    """The model's CPU default (auto: explicit attention in batch slices) against the
    whole-batch reference and SDPA: the same logits and parameter gradients in fp32."""
    from vitlab.models import attention as simple_vit

    # 16 patches (+ a class token), 2 heads, 5 images, a budget of 2 images' scores: slices of 2, 2, 1.
    tokens = 16 + (pool == "cls")
    monkeypatch.setattr(simple_vit, "CPU_CHUNK_BYTES", 2 * 2 * tokens * tokens * 4)
    calls = []
    reference = simple_vit.explicit_attention
    monkeypatch.setattr(simple_vit, "explicit_attention", lambda *a: calls.append(a[0].shape[0]) or reference(*a))
    torch.manual_seed(1)
    x = torch.randn(5, 1, 28, 28)
    models = {path: make(attention=path, pool=pool) for path in ("math", "auto", "sdpa")}
    grads = {}
    for path, model in models.items():
        model.load_state_dict(models["math"].state_dict())
        calls.clear()
        out = model(x)
        out.square().sum().backward()
        grads[path] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
        if path == "auto":
            assert calls == [2, 2, 1] * SMALL["depth"]
        elif path == "math":
            assert calls == [5] * SMALL["depth"]
    for path in ("auto", "sdpa"):
        out, named = grads[path]
        torch.testing.assert_close(out, grads["math"][0], rtol=1e-5, atol=1e-5)
        for name, g in named.items():
            torch.testing.assert_close(g, grads["math"][1][name], rtol=1e-4, atol=1e-5, msg=lambda m, n=f"{path} {name}": f"{n}: {m}")


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_same_logits_as_lucidrains_simple_vit(attention):
    """Same weights in vit_pytorch.SimpleViT give the same logits (fp32, 1e-5)."""
    vit_pytorch = pytest.importorskip("vit_pytorch")
    cfg = dict(image_size=28, patch_size=4, num_classes=10, dim=64, depth=3, heads=4, mlp_dim=128, channels=1, dim_head=16)
    torch.manual_seed(0)
    theirs = vit_pytorch.SimpleViT(**cfg).eval()
    ours = SimpleViT(**cfg, attention=attention).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: identical parameter names and shapes
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_parameter_and_flop_counts():
    model = make()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    flops = flops_per_image(model, 28, 1)
    # Two matmul FLOPs per weight per token is the bulk; attention adds a little.
    per_token_weights = 2 * (32 * 96 + 32 * 32 + 2 * 32 * 64)
    assert 2 * 16 * per_token_weights < flops < 4 * 16 * per_token_weights


def test_flops_of_a_compiled_network_are_counted_without_compiling():
    model = make()
    eager = flops_per_image(model, 28, 1)
    model.compile()

    def compiled_call(*args, **kwargs):
        raise AssertionError("counting FLOPs ran the compiled network")

    model._compiled_call_impl = compiled_call
    assert flops_per_image(model, 28, 1) == eager


# --- Recipe knobs: head initialisation, dropout, stochastic depth --------------------------


def test_zero_head_gives_uniform_initial_logits():
    x = torch.randn(5, 1, 28, 28)
    zero = make(head_init="zero")
    logits = zero(x)
    torch.testing.assert_close(logits, torch.zeros(5, 10), rtol=0, atol=0)
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(loss, torch.log(torch.tensor(10.0)))
    # The head still learns: its weight gets a gradient on the first step.
    loss.backward()
    assert zero.linear_head.weight.grad.abs().sum() > 0
    # The default Xavier head does not start uniform.
    assert make()(x).std(dim=1).min() > 0


def test_zero_head_changes_only_the_head():
    xavier, zero = make(), make(head_init="zero")
    for name, value in xavier.state_dict().items():
        if name.startswith("linear_head."):
            assert not zero.state_dict()[name].any(), name
        else:
            torch.testing.assert_close(zero.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("knob", ["dropout", "drop_path"])
def test_regularisers_act_in_train_mode_only(knob):
    x = torch.randn(16, 1, 28, 28)
    plain = make().eval()
    regularised = make(**{knob: 0.5})
    # No parameters of their own: the same checkpoint keys, so weights load either way.
    assert list(regularised.state_dict()) == list(plain.state_dict())
    regularised.load_state_dict(plain.state_dict())
    with torch.no_grad():
        reference = plain(x)
        regularised.eval()
        torch.testing.assert_close(regularised(x), reference, rtol=0, atol=0)
        regularised.train()
        torch.manual_seed(0)
        first = regularised(x)
        torch.manual_seed(1)
        second = regularised(x)
    assert not torch.allclose(first, reference)
    assert not torch.allclose(first, second)


def test_default_train_mode_is_deterministic():
    model, x = make().train(), torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.eval()(x), rtol=0, atol=0)


def test_stochastic_depth_rises_linearly_and_drops_per_sample():
    model = make(depth=4, drop_path=0.3)
    rates = [m.p for m in model.transformer.drop_paths]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(m.mode == "row" for m in model.transformer.drop_paths)
    # One image repeated: in train mode each copy draws its own blocks, so the rows differ;
    # in eval mode they are identical.
    x = torch.randn(1, 1, 28, 28).expand(32, -1, -1, -1)
    torch.manual_seed(0)
    with torch.no_grad():
        train_rows = model.train()(x)
        eval_rows = model.eval()(x)
    assert (eval_rows - eval_rows[0]).abs().max() < 1e-5
    # Rows differ, yet copies that drew the same blocks agree: a mask per sample, not per batch.
    distinct = torch.unique(train_rows.round(decimals=4), dim=0)
    assert 1 < len(distinct) < len(x)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(dropout=1.0), "dropout=1.0 is not a probability in [0, 1): use 0 to turn it off"),
        (dict(drop_path=-0.1), "drop_path=-0.1 is not a probability in [0, 1)"),
        (dict(drop_path="0.1"), "drop_path='0.1' is not a probability in [0, 1)"),
        (dict(dropout=True), "dropout=True is not a probability in [0, 1)"),
        (dict(head_init="normal"), "head_init='normal' is not one of xavier, zero"),
        (dict(patch_size=16), "patch_size=16 does not divide image_size=28: choose a patch size from "
                              "[1, 2, 4, 7, 14, 28], or images whose side is a multiple of 16."),
    ],
)
def test_invalid_recipe_knobs_fail_at_construction(overrides, fragment):
    with pytest.raises(ValueError) as info:
        make(**overrides)
    assert fragment in str(info.value)


def test_zero_rates_are_accepted_as_integers():
    assert make(dropout=0, drop_path=0)(torch.randn(1, 1, 28, 28)).shape == (1, 10)
