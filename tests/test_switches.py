"""The design-space switches of the SimpleViT (registers, QK-norm, LayerScale, 2-D RoPE, SwiGLU,
patch dropout, MAP pooling, FlexiViT), each proved against a reference implementation loaded
with the same weights (fp32, 1e-5), or by its defining property where there is none."""

from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import SwiGLU
from torch import nn

from vitlab.models import SimpleViT
from vitlab.models.attention import Attention
from vitlab.models.parts import MAPPool, SwiGLUFeedForward, swiglu_hidden
from vitlab.models.patch_embed import pi_resize_matrix
from vitlab.models.position import Rope2d, posemb_sincos_2d, rotate_pairs

SMALL = dict(image_size=28, patch_size=4, channels=1, num_classes=10, dim=32, depth=2, heads=2, dim_head=16, mlp_dim=64)
EVERY_SWITCH = dict(reg_tokens=3, qk_norm=True, layer_scale=0.1, pos_emb="sincos2d+rope2d_mixed", mlp="swiglu",
                    patch_dropout=0.25, pool="map", patch_norm=False, flexi_patch_sizes=[4, 7])


def make(**overrides):
    torch.manual_seed(0)
    return SimpleViT(**{**SMALL, **overrides})


def randomize(module: nn.Module, seed: int = 1) -> None:
    """Every parameter drawn at random, so that no part sits at a neutral value (gains at 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def images(n=4, size=28, seed=0):
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# --- off by default: today's model, key for key -------------------------------------------------

def test_switches_off_add_no_keys_and_change_no_logits():
    plain = make()
    off = make(reg_tokens=0, qk_norm=False, layer_scale=None, mlp="gelu", patch_dropout=0.0, patch_norm=True,
               flexi_patch_sizes=None)
    assert list(off.state_dict()) == list(plain.state_dict())
    off.load_state_dict(plain.state_dict())
    torch.testing.assert_close(off(images()), plain(images()), rtol=0, atol=0)


@pytest.mark.parametrize("switch", [dict(reg_tokens=4), dict(qk_norm=True), dict(layer_scale=1e-5),
                                    dict(pos_emb="rope2d_mixed"), dict(mlp="swiglu"), dict(pool="map")])
def test_each_switch_trains(switch):
    model = make(**switch)
    model(images()).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# --- references with the same weights -----------------------------------------------------------

def test_registers_same_logits_as_vit_pytorch():
    reference = pytest.importorskip("vit_pytorch.simple_vit_with_register_tokens")
    cfg = dict(image_size=28, patch_size=4, num_classes=10, dim=64, depth=3, heads=4, mlp_dim=128, channels=1, dim_head=16)
    torch.manual_seed(0)
    theirs = reference.SimpleViT(**cfg, num_register_tokens=4).eval()
    ours = SimpleViT(**cfg, reg_tokens=4, attention="math").eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes
    with torch.no_grad():
        torch.testing.assert_close(ours(images(8)), theirs(images(8)), rtol=1e-5, atol=1e-5)


def test_patch_dropout_same_logits_as_vit_pytorch_in_training_and_evaluation():
    """With the same seed the same patches are kept (vit-pytorch's draw); evaluation keeps all."""
    reference = pytest.importorskip("vit_pytorch.simple_vit_with_patch_dropout")
    cfg = dict(image_size=28, patch_size=4, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, channels=1, dim_head=16)
    torch.manual_seed(0)
    theirs = reference.SimpleViT(**cfg, patch_dropout=0.5)
    ours = SimpleViT(**cfg, patch_dropout=0.5, attention="math")
    ours.load_state_dict(theirs.state_dict())
    for training in (True, False):
        ours.train(training), theirs.train(training)
        torch.manual_seed(3)
        want = theirs(images(8))
        torch.manual_seed(3)
        torch.testing.assert_close(ours(images(8)), want, rtol=1e-5, atol=1e-5)
    full = SimpleViT(**cfg).eval()
    full.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(images(8)), full(images(8)), rtol=0, atol=0)


def test_patch_dropout_keeps_the_requested_share_per_image():
    model = make(patch_dropout=0.3, reg_tokens=2, pool="cls").train()
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(images(5))
    assert seen[0] == (5, 1 + int(49 * 0.7) + 2, 32)  # class token, 34 of 49 patches, registers
    x = torch.arange(2 * 10 * 1.0).reshape(2, 10, 1)
    kept, keep = model.patch_dropout(x)
    assert kept.shape == (2, 7, 1) and all(len(set(row.tolist())) == 7 for row in keep)
    torch.testing.assert_close(kept[..., 0], torch.gather(x[..., 0], 1, keep))


@pytest.mark.parametrize("attention", ["math", "sdpa"])
def test_qk_norm_same_output_as_timm_attention(attention):
    from timm.models.vision_transformer import Attention as TimmAttention

    torch.manual_seed(0)
    ours = Attention(32, heads=4, dim_head=8, attention=attention, qk_norm=True)
    randomize(ours)
    theirs = TimmAttention(32, num_heads=4, qkv_bias=False, qk_norm=True, norm_layer=nn.LayerNorm)
    with torch.no_grad():
        theirs.qkv.weight.copy_(ours.to_qkv.weight)
        theirs.proj.weight.copy_(ours.to_out.weight)
        theirs.proj.bias.zero_()
        for name in ("q_norm", "k_norm"):
            getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(ours(x), theirs(ours.norm(x)), rtol=1e-5, atol=1e-5)


def test_layer_scale_block_same_output_as_timm_block():
    from timm.models.vision_transformer import Block

    model = make(layer_scale=1e-5, dim_head=16, heads=2, attention="math")
    randomize(model)
    attn, ff = model.transformer.layers[0]
    block = Block(32, num_heads=2, mlp_ratio=2.0, qkv_bias=False, init_values=1e-5)
    with torch.no_grad():
        block.norm1.load_state_dict(attn.norm.state_dict())
        block.attn.qkv.weight.copy_(attn.to_qkv.weight)
        block.attn.proj.weight.copy_(attn.to_out.weight)
        block.attn.proj.bias.zero_()
        block.ls1.gamma.copy_(attn.layer_scale.gamma)
        block.norm2.load_state_dict(ff.net[0].state_dict())
        block.mlp.fc1.load_state_dict(ff.net[1].state_dict())
        block.mlp.fc2.load_state_dict(ff.net[3].state_dict())
        block.ls2.gamma.copy_(ff.layer_scale.gamma)
    x = torch.randn(3, 49, 32)
    ours = x + attn(x)
    ours = ours + ff(ours)
    torch.testing.assert_close(ours, block(x), rtol=1e-5, atol=1e-5)
    assert torch.all(make(layer_scale=1e-5).transformer.layers[1][1].layer_scale.gamma == 1e-5)


def test_swiglu_is_the_formula_with_matched_weights():
    model = make(mlp="swiglu")
    randomize(model)
    ff = model.transformer.layers[0][1]
    swiglu = ff.net[1]
    x = torch.randn(3, 49, 32)
    y = F.layer_norm(x, (32,), ff.net[0].weight, ff.net[0].bias)
    want = swiglu.fc2(F.silu(swiglu.fc1_g(y)) * swiglu.fc1_x(y))
    torch.testing.assert_close(ff(x), want, rtol=1e-6, atol=1e-6)
    # Three dim x hidden matrices against GELU's two dim x mlp_dim: the same number of weights
    # (up to rounding the hidden width).
    assert swiglu_hidden(192) == 128 and swiglu_hidden(256) == 171
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.ndim == 2)
    gelu, glu = weights(make().transformer.layers[0][1]), weights(ff)
    assert abs(glu - gelu) <= 3 * 32


def test_swiglu_mlp_draws_only_its_own_initial_weights():
    """Building a SwiGLU MLP takes from torch's generator what its own layers take, and no more
    (no GELU MLP built and thrown away first), so its initial weights depend on its layers alone."""
    torch.manual_seed(0)
    SwiGLUFeedForward(32, 64, layer_scale_init=1e-5)
    built = torch.get_rng_state()
    torch.manual_seed(0)
    nn.Sequential(nn.LayerNorm(32), SwiGLU(32, swiglu_hidden(64)))
    assert torch.equal(built, torch.get_rng_state())


def test_map_pool_is_big_visions_map_head():
    """MAP head: a learned query attends over the tokens (qkv with biases, torch's
    MultiheadAttention as the reference), then x + MLP(LayerNorm(x))."""
    torch.manual_seed(0)
    pool = MAPPool(32, heads=4, mlp_dim=64)
    randomize(pool)
    mha = nn.MultiheadAttention(32, 4, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q.weight, pool.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q.bias, pool.kv.bias]))
        mha.out_proj.load_state_dict(pool.proj.state_dict())
    x = torch.randn(3, 49, 32)
    y, _ = mha(pool.latent.expand(3, -1, -1), x, x, need_weights=False)
    want = (y + pool.mlp(pool.norm(y)))[:, 0]
    torch.testing.assert_close(pool(x), want, rtol=1e-5, atol=1e-5)


def test_map_pool_sees_patches_only():
    """Registers are dropped before pooling: the pooled features do not change with them."""
    model = make(pool="map", reg_tokens=2).eval()
    seen = []
    model.map_pool.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    model(images(2))
    assert seen == [(2, 49, 32)]


# --- 2-D RoPE ----------------------------------------------------------------------------------

def test_rope_axial_table_is_timms_rotary_embedding_cat():
    from timm.layers import RotaryEmbeddingCat

    ours = Rope2d("rope2d_axial", dim_head=16, heads=2, depth=3).table(5, 6)
    theirs = RotaryEmbeddingCat(16, in_pixels=False, temperature=100, feat_shape=[5, 6]).get_embed()
    torch.testing.assert_close(ours[0, 0], theirs, rtol=1e-6, atol=1e-6)


def test_rope_mixed_table_is_timms_rotary_embedding_mixed():
    from timm.layers import RotaryEmbeddingMixed

    torch.manual_seed(0)
    ours = Rope2d("rope2d_mixed", dim_head=16, heads=2, depth=3)
    theirs = RotaryEmbeddingMixed(32, depth=3, num_heads=2, temperature=10, feat_shape=[5, 6])
    theirs.freqs.data.copy_(ours.freqs)
    torch.testing.assert_close(ours.table(5, 6), theirs.get_embed(), rtol=1e-6, atol=1e-6)
    assert ours.freqs.shape == (2, 3, 2, 8)


@pytest.mark.parametrize("kind", ["rope2d_axial", "rope2d_mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_pairs_is_timms_apply_rot_embed_cat(kind, dtype):
    """The model's rotation (a complex product with Rope2d's rotations) is timm's x cos + rot(x) sin
    with Rope2d's [sin, cos] table: values, dtype and gradients (of x and the learned frequencies),
    also with kept patches (patch dropout) and unrotated prefix tokens."""
    from timm.layers import apply_keep_indices_nlc, apply_rot_embed_cat

    torch.manual_seed(0)
    rope = Rope2d(kind, dim_head=16, heads=2, depth=3)
    keep = torch.stack([torch.randperm(20)[:12] for _ in range(4)])
    x = torch.randn(4, 2, 1 + 12, 16, dtype=dtype, requires_grad=True)
    table = apply_keep_indices_nlc(keep, rope.table(4, 5), keep)  # (4, blocks, heads, 12, 32)
    identity = torch.cat([table.new_zeros(*table.shape[:-2], 1, 16), table.new_ones(*table.shape[:-2], 1, 16)], -1)
    table = torch.cat([identity, table], dim=-2)
    ours = [rotate_pairs(x, rotations) for rotations in rope(4, 5, keep=keep, prefix=1)]
    theirs = [apply_rot_embed_cat(x, table[:, i if table.shape[1] > 1 else 0]) for i in range(3)]
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(ours[0], dtype=torch.float32)
    grads = [torch.autograd.grad(sum((t.float() * weights).sum() for t in out), [x, *rope.parameters()])
             for out in (ours, theirs)]
    for a, b in zip(*grads):
        # A bf16 x gets its gradient rounded to bf16: timm rounds each of its two terms, the complex
        # product their sum once, so they may differ by one bf16 step of the largest value.
        tol = 1e-5 if a.dtype == torch.float32 else b.abs().max().item() * 2**-7
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["rope2d_axial", "rope2d_mixed"])
def test_rope_scores_depend_only_on_the_offset(kind):
    """The same query and key content at every position: the score of two tokens is a function of
    their offset (dy, dx) alone; a token without a position (class token, register) is not rotated."""
    torch.manual_seed(0)
    rope = Rope2d(kind, dim_head=16, heads=2, depth=2)
    h = w = 5
    table = rope(h, w, prefix=1)[1]  # block 1, heads (or 1), 1 + 25 tokens
    q = rotate_pairs(torch.randn(2, 1, 16).expand(2, 26, 16), table)
    k = rotate_pairs(torch.randn(2, 1, 16).expand(2, 26, 16), table)
    scores = q @ k.transpose(-1, -2)  # (heads, 26, 26)
    pos = [(i // w, i % w) for i in range(h * w)]
    by_offset = {}
    for i, (yi, xi) in enumerate(pos):
        for j, (yj, xj) in enumerate(pos):
            by_offset.setdefault((yi - yj, xi - xj), []).append(scores[:, 1 + i, 1 + j])
    assert len(by_offset) == 81
    for values in by_offset.values():
        torch.testing.assert_close(torch.stack(values), values[0].expand(len(values), -1), rtol=1e-4, atol=1e-4)
    v = torch.randn(2, 1, 16)
    torch.testing.assert_close(rotate_pairs(v, table[..., :1, :]), v, rtol=0, atol=0)
    assert not torch.allclose(scores[:, 1, 2], scores[:, 1, 3])  # positions do matter


@pytest.mark.parametrize("overrides", [dict(pos_emb="rope2d_axial"), dict(pos_emb="sincos2d+rope2d_mixed", reg_tokens=2,
                                                                           qk_norm=True, pool="cls")])
def test_rope_model_reads_larger_images(overrides):
    model = make(**overrides).eval()
    assert model(images(2, size=40)).shape == (2, 10)


# --- every switch, every attention path --------------------------------------------------------

@pytest.mark.parametrize("pool", ["mean", "cls", "map"])
def test_math_sdpa_and_auto_agree_with_every_switch(pool):
    torch.manual_seed(1)
    switches = {**EVERY_SWITCH, "pool": pool, "patch_dropout": 0.0}
    models = {path: make(attention=path, **switches) for path in ("math", "sdpa", "auto")}
    randomize(models["math"])
    results = {}
    for path, model in models.items():
        model.load_state_dict(models["math"].state_dict())
        out = model(images(3), patch_size=7)
        out.square().sum().backward()
        results[path] = (out.detach(), {n: p.grad for n, p in model.named_parameters()})
    for path in ("sdpa", "auto"):
        torch.testing.assert_close(results[path][0], results["math"][0], rtol=1e-5, atol=1e-5)
        for name, grad in results[path][1].items():
            torch.testing.assert_close(grad, results["math"][1][name], rtol=1e-4, atol=1e-5)


def test_every_switch_in_bf16_autocast():
    model = make(**EVERY_SWITCH).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(3), patch_size=7)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --- FlexiViT ----------------------------------------------------------------------------------

def test_pi_resize_keeps_the_token_of_an_upsampled_patch():
    """<PI-resize(w), resize(x)> = <w, x> for patches upsampled bilinearly (FlexiViT Sec. 3.4), so a
    model cut at patch 8 on each patch of its 28 px image upsampled 2x gives the same tokens."""
    model = make(patch_norm=False, flexi_patch_sizes=[4])  # patch 8: its matrix built when asked
    randomize(model)
    x = images(2)
    patches = rearrange(x, "b c (h p1) (w p2) -> (b h w) c p1 p2", p1=4, p2=4)
    up = F.interpolate(patches, size=(8, 8), mode="bilinear", align_corners=False, antialias=False)
    x_up = rearrange(up, "(b h w) c p1 p2 -> b c (h p1) (w p2)", b=2, h=7)
    embed = model.to_patch_embedding
    torch.testing.assert_close(embed(x_up, 8), embed(x), rtol=1e-4, atol=1e-4)
    # The same matrix as resizing the kernel itself with timm's function.
    from timm.layers import resample_patch_embed

    kernel = torch.randn(5, 3, 4, 4)
    want = resample_patch_embed(kernel, [7, 7], interpolation="bilinear", antialias=False)
    got = (kernel.reshape(5, 3, 16) @ pi_resize_matrix(4, 7)).reshape(5, 3, 7, 7)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flexi_model_at_its_own_patch_size_is_the_plain_model():
    plain = make(patch_norm=False)
    flexi = make(patch_norm=False, flexi_patch_sizes=[2, 4, 7, 14])
    assert list(flexi.state_dict()) == list(plain.state_dict())
    flexi.load_state_dict(plain.state_dict())
    torch.testing.assert_close(flexi(images()), plain(images()), rtol=0, atol=0)
    torch.testing.assert_close(flexi(images(), patch_size=4), plain(images()), rtol=0, atol=0)
    for size in (2, 7, 14):
        assert flexi(images(), patch_size=size).shape == (4, 10)


def test_flexi_positions_follow_the_image():
    """At another patch size the fixed embedding is evaluated where the patches lie: patch 7 puts
    its patches (i, j) at 7/4 (i, j) of the model's patch-4 grid."""
    from vitlab.models.position import absolute_position

    table = posemb_sincos_2d(7, 7, 32)
    got = absolute_position("sincos2d", table, 7, 4, 4, step=7 / 4)
    torch.testing.assert_close(got[5], posemb_sincos_2d(8, 8, 32, step=0.25)[7 * 8 + 7], rtol=1e-5, atol=1e-5)
    learned = torch.randn(49, 32)
    assert absolute_position("learned", learned, 7, 4, 4, step=7 / 4).shape == (16, 32)
    assert absolute_position("learned", learned, 7, 7, 7) is learned


def test_interpolated_positions_span_the_trained_grid():
    """positions=interpolate (EVA-02's scheme): the patches of a 2x image lie half a trained patch
    apart, so its patch (2i, 2j) gets the trained (i, j)'s sincos embedding and rotations; the
    rotations are timm's RotaryEmbeddingCat with ref_feat_shape, which defines the scheme."""
    from timm.layers import RotaryEmbeddingCat

    from vitlab.models.position import absolute_position

    table = posemb_sincos_2d(7, 7, 32)
    wide = absolute_position("sincos2d", table, 7, 14, 14, step=(0.5, 0.5)).reshape(14, 14, 32)
    torch.testing.assert_close(wide[::2, ::2].reshape(49, 32), table, rtol=1e-6, atol=1e-6)
    rope = Rope2d("rope2d_axial", dim_head=16, heads=2, depth=2)
    theirs = RotaryEmbeddingCat(16, in_pixels=False, temperature=100, feat_shape=[14, 10], ref_feat_shape=[7, 5])
    torch.testing.assert_close(rope.table(14, 10, step=(0.5, 0.5))[0, 0], theirs.get_embed(), rtol=1e-6, atol=1e-6)
    mixed = Rope2d("rope2d_mixed", dim_head=16, heads=2, depth=2)
    half = mixed.rotations(14, 14, step=(0.5, 0.5)).reshape(2, 2, 14, 14, 8)
    torch.testing.assert_close(half[:, :, ::2, ::2].reshape(2, 2, 49, 8), mixed.rotations(7, 7))


def test_model_places_other_grids_by_its_positions_field():
    """The model asks for its positions as its field says: at 56 px, one trained patch apart
    (extend) or half of one (interpolate); at its own size and at FlexiViT's other patch sizes
    the two give the same logits. A checkpoint may be read with either (no weights depend on it)."""
    switches = dict(pos_emb="sincos2d+rope2d_mixed", patch_norm=False, flexi_patch_sizes=[4, 7])
    extend, interpolate = make(**switches).eval(), make(**switches, positions="interpolate").eval()
    randomize(extend)
    interpolate.load_state_dict(extend.state_dict())
    for kwargs in (dict(), dict(patch_size=7)):
        torch.testing.assert_close(interpolate(images(), **kwargs), extend(images(), **kwargs), rtol=0, atol=0)
    asked = []
    for model in (extend, interpolate):
        with mock.patch.object(model.rope, "forward", wraps=model.rope.forward) as rope:
            model(images(2, size=56))
        asked.append(rope.call_args.args[:3])
    assert asked == [(14, 14, 1.0), (14, 14, (0.5, 0.5))]
    assert not torch.allclose(interpolate(images(2, size=56)), extend(images(2, size=56)))


# --- bad values: one line naming the field and the fix -----------------------------------------

@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(pos_emb="rope"), "pos_emb='rope' is not one of sincos2d, learned, none, rope2d_axial, rope2d_mixed"),
        (dict(pos_emb="sincos2d+learned"), "nor one absolute and one rotary kind joined by '+'"),
        (dict(pos_emb="rope2d_axial", dim_head=10), "needs a multiple of 4 as dim_head=10: use dim_head=8 or 12"),
        (dict(patch_dropout=1.0), "patch_dropout=1.0 is not a probability in [0, 1)"),
        (dict(reg_tokens=-1), "reg_tokens=-1 must be a whole number of register tokens"),
        (dict(qk_norm="yes"), "qk_norm='yes' must be true or false"),
        (dict(layer_scale=0), "layer_scale=0 must be null (off) or the gains' positive initial value"),
        (dict(mlp="geglu"), "mlp='geglu' is not one of gelu, swiglu"),
        (dict(positions="stretch"), "positions='stretch' is not one of extend, interpolate"),
        (dict(pool="map", heads=3), "pool=map splits dim=32 over heads=3, which does not divide it"),
        (dict(patch_norm=False, flexi_patch_sizes=[4, 5]), "[5] do not divide image_size=28: choose patch sizes from"),
        (dict(flexi_patch_sizes=[4, 7]), "flexi_patch_sizes=[4, 7] needs patch_norm=false"),
        (dict(patch_norm=False, flexi_patch_sizes=4), "flexi_patch_sizes=4 must be null (off) or a list of patch sizes"),
    ],
)
def test_bad_switch_values_fail_at_construction(overrides, fragment):
    with pytest.raises(ValueError) as info:
        make(**overrides)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# --- training-side pieces ------------------------------------------------------------------------

def test_flexi_patch_size_is_a_function_of_seed_and_step_and_draws_every_size():
    from collections import Counter

    from vitlab.module import flexi_patch_size

    draws = [flexi_patch_size([4, 7, 14], seed=0, step=s) for s in range(600)]
    assert draws == [flexi_patch_size([4, 7, 14], seed=0, step=s) for s in range(600)]  # resume draws the same
    assert draws != [flexi_patch_size([4, 7, 14], seed=1, step=s) for s in range(600)]
    assert all(150 < n < 250 for n in Counter(draws).values()) and set(draws) == {4, 7, 14}


def test_every_model_field_added_since_the_first_records_is_neutral_at_its_default():
    """A SimpleViT field that the first kept records (the patch-size table) lack must be in
    ``NEUTRAL`` at the value conf/model/simple_vit.yaml gives it, or no kept run would be reused
    by a run of today's defaults (and every ablation would train its base setting again)."""
    import yaml

    from vitlab.results import NEUTRAL

    repo = Path(__file__).resolve().parents[1]
    first = yaml.safe_load(next((repo / "docs/ablations/runs/ablation_patch_size").glob("*/config.yaml")).read_text())
    defaults = yaml.safe_load((repo / "conf/model/simple_vit.yaml").read_text())
    added = {k: v for k, v in defaults.items() if k not in first["model"]}
    assert added and "positions" in added
    assert {k: NEUTRAL["model"].get(k, "missing") for k in added} == added


def test_records_without_the_switches_are_the_same_experiment_as_switches_off():
    """A run recorded before the switches existed (its config.yaml lacks them) is reused by a run
    that has them all off; one with a switch on is another experiment."""
    from vitlab.results import deciding_config

    old = {"seed": 0, "model": {"dim": 96, "pool": "mean"}, "module": {"label_smoothing": 0.1}}
    new = {"seed": 0, "model": {"dim": 96, "pool": "mean", "reg_tokens": 0, "qk_norm": False, "layer_scale": None,
                                "mlp": "gelu", "patch_dropout": 0.0, "patch_norm": True, "flexi_patch_sizes": None,
                                "positions": "extend"},
           "module": {"label_smoothing": 0.1, "seed": 0, "test_image_sizes": [], "test_patch_sizes": None}}
    assert deciding_config(new) == deciding_config(old)
    for field, value in (("reg_tokens", 4), ("qk_norm", True), ("mlp", "swiglu"), ("patch_norm", False),
                         ("positions", "interpolate")):
        changed = {**new, "model": {**new["model"], field: value}}
        assert deciding_config(changed) != deciding_config(old), field
    tested = {**new, "module": {**new["module"], "test_image_sizes": [36]}}
    assert deciding_config(tested) != deciding_config(old)
