"""Any timm model as vitlab's network (``model=timm model.name=<timm name>``).

``create`` builds it through ``timm.create_model`` with the image size, channels and classes of
the data config, so a timm model trains, records its parameters and FLOPs, checkpoints, resumes,
evaluates and predicts like SimpleViT. What vitlab decides before training, in one line each: an
unknown name, a patch size that does not divide the image, a model that takes no image size or
patch size, pretrained weights that cannot be fetched (no network), and a SimpleViT switch
(``model.reg_tokens=4``, ...), with the timm argument that does the same where there is one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitlab.errors import close_matches, first_line


#: The SimpleViT switches (``conf/model/simple_vit.yaml``), which ``conf/model/timm.yaml`` holds at
#: null so that a sweep over both models composes: what a timm model takes instead, if anything.
SIMPLE_VIT_SWITCHES = {
    "reg_tokens": "timm's ViTs take +model.kwargs.reg_tokens=<n>",
    "qk_norm": "timm's ViTs take +model.kwargs.qk_norm=true",
    "layer_scale": "timm's ViTs take +model.kwargs.init_values=<gain>",
    "pos_emb": "timm's RoPE ViTs are chosen by name (timm.list_models('*rope*'), e.g. "
               "model.name=vit_small_patch16_rope_224); +model.kwargs.pos_embed=none drops the learned one",
    "mlp": "timm's SwiGLU ViTs are chosen by name (e.g. model.name=eva02_tiny_patch14_224)",
    "patch_dropout": "timm's ViTs take +model.kwargs.patch_drop_rate=<share>",
    "pool": "timm's ViTs take +model.kwargs.global_pool=avg|token|map",
    "patch_norm": "timm's patch embedding is a convolution with no LayerNorm over the pixels: there is no "
                  "such switch",
    "flexi_patch_sizes": "timm trains at one patch size (its flexivit_* models are FlexiViT's weights, not its "
                         "training)",
}
#: What supports them, for the messages.
SIMPLE_VIT_MODELS = "model=simple_vit, vit_tiny_28, vit_small_32, vit_ti, vit_s, vit_b or vit_l"


def check_simple_vit_switches(switches: dict[str, Any]) -> None:
    """Refuse, in one line, a SimpleViT switch set for a timm model (or a field ``model=timm`` does not have)."""
    for key, value in switches.items():
        if key not in SIMPLE_VIT_SWITCHES:
            raise ValueError(f"model.{key} is not a field of model=timm: timm's own arguments go under model.kwargs "
                             f"(+model.kwargs.{key}={value}).")
        if value is not None:
            raise ValueError(f"model.{key}={value} is a switch of vitlab's SimpleViT ({SIMPLE_VIT_MODELS}), not "
                             f"of model=timm: {SIMPLE_VIT_SWITCHES[key]}.")


ATTENTION = ("auto", "math", "sdpa")


def attention_by_device(net: nn.Module, args: tuple) -> None:
    """Forward pre-hook of ``attention: auto``: SDPA on an accelerator, timm's explicit softmax on a
    CPU (there the backward of SDPA's CPU kernel is most of a training step: README, "Throughput").
    A module-level function that reads the modules from the hook's own argument, so that a deep
    copy (EMA) or a pickled model switches its own modules."""
    device = next((a.device.type for a in args if hasattr(a, "device")), None)
    if device is None or getattr(net, "_vitlab_attention_device", None) == device:
        return
    set_fused_attention(net, device != "cpu")
    net._vitlab_attention_device = device


def set_fused_attention(net: nn.Module, fused: bool) -> None:
    """timm's ``fused_attn`` flag on every attention module that has one."""
    for module in net.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def check_attention(attention: str) -> None:
    if attention not in ATTENTION:
        raise ValueError(f"model.attention={attention!r} is not one of {', '.join(ATTENTION)}: auto (SDPA on a "
                         f"GPU, the explicit softmax on a CPU), math or sdpa.")


def set_attention(net: nn.Module, attention: str) -> nn.Module:
    """Set how timm's attention modules (those with timm's ``fused_attn`` flag) compute: ``sdpa``
    (``F.scaled_dot_product_attention``, timm's default), ``math`` (timm's explicit softmax, the same
    function) or ``auto`` (by the input's device, on every forward)."""
    check_attention(attention)
    if attention == "auto":
        net.register_forward_pre_hook(attention_by_device)
    else:
        set_fused_attention(net, attention == "sdpa")
    return net


def create(*, name: str, image_size: int, channels: int, num_classes: int, patch_size: int | None = None,
           pretrained: bool = False, checkpoint_path: str | None = None, kwargs: dict[str, Any] | None = None,
           attention: str = "auto", **simple_vit_switches: Any) -> nn.Module:
    """``timm.create_model(name, img_size=image_size, in_chans=channels, num_classes=num_classes,
    patch_size=patch_size, pretrained=..., checkpoint_path=..., **kwargs)``; ``patch_size`` null
    keeps the name's own, and a model without an image size (a CNN) is built without it.
    ``attention``: how its attention modules compute (``set_attention``).
    ``simple_vit_switches``: SimpleViT's switches, which must be null (``check_simple_vit_switches``)."""
    check_simple_vit_switches(simple_vit_switches)
    check_attention(attention)
    import timm

    if not timm.is_model(name):
        close = close_matches(name, timm.list_models())
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"model.name={name!r} is not a timm model: list them with python -c \"import timm; "
                         f"print(timm.list_models('*vit*'))\".{hint}")
    options = dict(kwargs or {})
    if patch_size is not None:
        options["patch_size"] = patch_size
    options |= {"img_size": image_size, "in_chans": channels, "num_classes": num_classes}
    if checkpoint_path:
        options["checkpoint_path"] = str(checkpoint_path)
    try:
        try:
            net = timm.create_model(name, pretrained=bool(pretrained), **options)
        except TypeError as error:
            if "img_size" not in str(error):
                raise
            # A model with no fixed input size (a CNN) reads any image as it is.
            net = timm.create_model(name, pretrained=bool(pretrained), **{k: v for k, v in options.items()
                                                                           if k != "img_size"})
    except TypeError as error:
        if "patch_size" in str(error):
            raise ValueError(f"model.patch_size={patch_size}: {name} takes no patch size (it is not a patch-based "
                             f"model): set model.patch_size=null.") from None
        raise ValueError(f"model.kwargs={dict(kwargs or {})} do not fit {name}: {first_line(error)}.") from None
    except (OSError, RuntimeError, ValueError) as error:
        if not pretrained:
            raise
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        where = (getattr(cfg, "hf_hub_id", None) and f"the Hugging Face Hub ({cfg.hf_hub_id})") or \
            (getattr(cfg, "url", None) or "nowhere: the name has no pretrained weights")
        raise ValueError(f"model.pretrained=true: timm could not fetch the weights of {name} from {where} "
                         f"({first_line(error)}). Without a network, download them elsewhere and pass "
                         f"model.checkpoint_path=<file> with model.pretrained=false.") from None
    embed = getattr(net, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is not None:
        sides = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if any(image_size % side for side in sides):
            divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
            raise ValueError(f"model.name={name} cuts {sides[0]}x{sides[1]} patches, which do not divide "
                             f"data.image_size={image_size}: set model.patch_size to one of {divisors}.")
    return set_attention(net, attention)


__all__ = ["ATTENTION", "SIMPLE_VIT_SWITCHES", "attention_by_device", "check_attention", "check_simple_vit_switches",
           "create", "set_attention", "set_fused_attention"]
