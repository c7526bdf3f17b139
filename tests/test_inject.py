"""nanopeft/methods/inject.py: adapters in a whole DINOv3 ViT, against PEFT on transformers' DINOv3ViTModel."""

import pytest
import torch
import torch.nn as nn

from nanopeft.files.load import load_dinov3
from nanopeft.config import PRESETS
from nanopeft.methods.dora import DoRALinear
from nanopeft.methods.inject import adapter_layers, add_adapters, init_dora_magnitudes, merge_adapters
from nanopeft.methods.lora import LoRALinear
from nanopeft.backbones.dinov3 import DINOv3ViT
from nanopeft.nf4_linear import NF4Linear

R, ALPHA = 4, 8  # conftest's peft_model defaults


def ours_like(ckpt, pm, method, targets, nf4=False, dropout=0.0):
    """Our model with the same adapters, A, B, m copied from PEFT's."""
    model = load_dinov3(ckpt, quantize="nf4" if nf4 else None)
    add_adapters(model, method=method, rank=R, alpha=ALPHA, dropout=dropout, targets=targets)
    with torch.no_grad():
        for name, w in adapter_layers(model):
            theirs = pm.base_model.model.get_submodule("model." + name)  # transformers 5: blocks under .model
            w.lora_A.weight.copy_(theirs.lora_A["default"].weight)
            w.lora_B.weight.copy_(theirs.lora_B["default"].weight)
            if method == "dora":
                w.lora_magnitude_vector.copy_(theirs.lora_magnitude_vector["default"].weight)
    return model


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("targets", ["q_proj", "all-linear"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_forward_equals_peft(tiny_ckpt, peft_model, pixels, method, targets, nf4):
    ckpt, _ = tiny_ckpt(gated=True)
    pm = peft_model(ckpt, method, targets, nf4).eval()
    ours = ours_like(ckpt, pm, method, targets, nf4).eval()
    assert len(adapter_layers(ours)) == (2 if targets == "q_proj" else 14)
    assert all(isinstance(w.base_layer, NF4Linear if nf4 else nn.Linear) for _, w in adapter_layers(ours))
    with torch.no_grad():
        ref = pm(pixel_values=pixels).last_hidden_state
        with pm.disable_adapter():
            plain = pm(pixel_values=pixels).last_hidden_state
        out = ours(pixels)
    assert (ref - plain).abs().max() > 1e-2  # the adapters change the output ...
    assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()  # ... exactly as PEFT's do


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_gelu_model_all_linear_and_train_mode_dropout_equal_peft(tiny_ckpt, peft_model, pixels, method):
    """GELU blocks (6 Linears, q/v biases), train mode with dropout: same RNG draws, same output."""
    ckpt, _ = tiny_ckpt(gated=False)
    pm = peft_model(ckpt, method, "all-linear", dropout=0.2, pos_embed_rescale=None)  # no RoPE jitter
    ours = ours_like(ckpt, pm, method, "all-linear", dropout=0.2)
    ours.set_rope_augmentation(None, None, None)
    assert len(adapter_layers(ours)) == 12
    pm.train(), ours.train()
    torch.manual_seed(3)
    ref = pm(pixel_values=pixels).last_hidden_state
    torch.manual_seed(3)
    out = ours(pixels)
    assert (out - ref).abs().max() <= 1e-5, (out - ref).abs().max()
    torch.manual_seed(4)
    assert (ours(pixels) - out).abs().max() > 1e-4  # another mask, another output: dropout is live


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_one_adamw_step_equals_peft_and_leaves_the_base_alone(tiny_ckpt, peft_model, pixels, tmp_path, method):
    from safetensors.torch import load_file

    from nanopeft.files.save import save_adapter

    ckpt, _ = tiny_ckpt(gated=True)
    pm = peft_model(ckpt, method, "all-linear", dropout=0.1, pos_embed_rescale=None)
    ours = ours_like(ckpt, pm, method, "all-linear", dropout=0.1)
    ours.set_rope_augmentation(None, None, None)
    frozen = {k: v.clone() for k, v in ours.state_dict().items() if "lora_" not in k}
    grads = []
    for model, run in ((pm, lambda: pm(pixel_values=pixels).last_hidden_state), (ours, lambda: ours(pixels))):
        model.train()
        named = sorted((n.replace("base_model.model.model.", "").replace(".default", ""), p)
                       for n, p in model.named_parameters() if p.requires_grad)  # same names, same order
        params = [p for _, p in named]
        # eps 1e-4, not 1e-8: Adam's first step is ≈ lr·sign(g), which would blow a 1e-9 summation-order
        # difference in a 1e-8 gradient up to a visible difference in the update
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, eps=1e-4)
        torch.manual_seed(7)
        run().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
        opt.step()
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[0].abs().max()
    pm.save_pretrained(tmp_path / "peft")
    save_adapter(ours, tmp_path / "ours")
    a, b = (load_file(tmp_path / who / "adapter_model.safetensors") for who in ("peft", "ours"))
    assert sorted(a) == sorted(b) and len(a) == 14 * (3 if method == "dora" else 2)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    after = ours.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # W0, biases, norms, tokens: untouched
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


COUNTS = {("lora", "q_proj", 8): 2_621_440, ("lora", "q_proj", 16): 5_242_880,
          ("lora", "all-linear", 16): 44_564_480, ("lora", "all-linear", 64): 178_257_920,
          ("dora", "q_proj", 8): 2_785_280, ("dora", "q_proj", 16): 5_406_720,
          ("dora", "all-linear", 16): 46_039_040, ("dora", "all-linear", 64): 179_732_480}


@pytest.mark.parametrize("method,targets,rank", sorted(COUNTS))
def test_vit7b_trainable_counts_on_meta(method, targets, rank):
    """The exact counts PEFT's print_trainable_parameters gives for ViT-7B/16 (no weights needed)."""
    with torch.device("meta"):
        model = DINOv3ViT(PRESETS["vit7b16"])
    assert add_adapters(model, method=method, rank=rank, alpha=2 * rank, targets=targets) == \
        COUNTS[method, targets, rank]
    assert len(adapter_layers(model)) == (40 if targets == "q_proj" else 280)


class WithHead(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(64, 3)


def test_targets_and_freezing():
    model = WithHead(DINOv3ViT(PRESETS["tiny"]))
    n = add_adapters(model, method="lora", rank=2, alpha=4, targets="all-linear")
    names = [name for name, _ in adapter_layers(model)]
    assert len(names) == 14 and all(".layer." in x for x in names)
    assert n == 2 * (4 * 2 * (64 + 64) + 3 * 2 * (64 + 128))  # per block: 4 attention (64→64), 3 MLP (64↔128)
    assert isinstance(model.head, nn.Linear) and not model.head.weight.requires_grad
    assert {p.requires_grad for name, p in model.named_parameters()} == {True, False}
    assert all(("lora_A" in name or "lora_B" in name) == p.requires_grad for name, p in model.named_parameters())
    model = DINOv3ViT(PRESETS["tiny"])
    add_adapters(model, method="dora", rank=2, alpha=4,
                 targets=["q_proj", "mlp.down_proj", "layer.1.attention.v_proj"])
    assert [x for x, _ in adapter_layers(model)] == [
        "layer.0.attention.q_proj", "layer.0.mlp.down_proj", "layer.1.attention.q_proj", "layer.1.attention.v_proj",
        "layer.1.mlp.down_proj"]
    assert all(isinstance(w, DoRALinear) for _, w in adapter_layers(model))


def test_eval_model_stays_in_eval_mode():
    model = DINOv3ViT(PRESETS["tiny"]).eval()
    add_adapters(model, method="dora", rank=2, alpha=4, dropout=0.5, targets="q_proj")
    assert not any(m.training for m in model.modules())
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), model(x))  # no dropout at eval


def test_bad_arguments():
    model = DINOv3ViT(PRESETS["tiny"])
    for kw, err, msg in [(dict(targets="nope_proj"), ValueError, "nope_proj"),
                         (dict(targets=["q_proj", "qq"]), ValueError, "'qq'"),
                         (dict(targets="attention"), ValueError, "Attention"),
                         (dict(targets=[]), ValueError, "targets"),
                         (dict(rank=0), ValueError, "rank"), (dict(rank=-4), ValueError, "rank"),
                         (dict(alpha=-1.0), ValueError, "alpha"), (dict(dropout=1.5), ValueError, "dropout"),
                         (dict(method="ia3"), ValueError, "method")]:
        with pytest.raises(err, match=msg):
            add_adapters(model, **{**dict(method="lora", rank=2, alpha=4, targets="q_proj"), **kw})
    assert not adapter_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched
    add_adapters(model, method="lora", rank=2, alpha=4, targets="q_proj")
    with pytest.raises(ValueError, match="already has adapters"):
        add_adapters(model, method="dora", rank=2, alpha=4, targets="k_proj")
    with pytest.raises(ValueError, match="all-linear"):  # nothing named layer.N.* here
        add_adapters(nn.Sequential(nn.Linear(4, 4)), method="lora", rank=2, alpha=4, targets="all-linear")


def test_dora_built_on_meta_is_initialised_after_loading():
    torch.manual_seed(0)
    real = nn.Linear(64, 32)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 32))
    assert add_adapters(model, method="dora", rank=4, alpha=8, targets="0") == 4 * (64 + 32) + 32
    w = model[0]
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="base layer"):
        init_dora_magnitudes(model)
    w.base_layer.weight = nn.Parameter(real.weight.detach().clone(), requires_grad=False)  # "load" it
    w.base_layer.bias = nn.Parameter(real.bias.detach().clone(), requires_grad=False)
    with pytest.raises(RuntimeError, match="init_dora_magnitudes"):
        model(x)
    assert init_dora_magnitudes(model) == 1
    assert not any(p.is_meta for p in model.parameters())
    assert torch.allclose(w.lora_magnitude_vector, torch.linalg.norm(real.weight, dim=1), rtol=1e-6, atol=0)
    assert torch.count_nonzero(w.lora_B.weight) == 0 and w.lora_A.weight.abs().max() <= 1 / 8
    assert w.lora_A.weight.requires_grad and w.lora_magnitude_vector.requires_grad
    assert torch.allclose(model(x), real(x), atol=1e-6)


@pytest.mark.parametrize("nf4", [False, True], ids=["fp32", "nf4"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_equals_unmerged(tiny_ckpt, pixels, method, nf4):
    ckpt, _ = tiny_ckpt(gated=True)
    model = load_dinov3(ckpt, quantize="nf4" if nf4 else None)
    add_adapters(model, method=method, rank=R, alpha=ALPHA, targets="all-linear")
    torch.manual_seed(0)
    with torch.no_grad():
        for _, w in adapter_layers(model):
            w.lora_B.weight.normal_(0, 0.05)
            if method == "dora":
                w.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(w.lora_magnitude_vector))
        before = model(pixels)
        assert merge_adapters(model) == 14
        after = model(pixels)
    assert not adapter_layers(model)
    assert all(type(model.get_submodule(f"layer.{i}.mlp.up_proj")) is nn.Linear for i in range(2))
    assert (before - after).abs().max() <= 1e-5
    if nf4:  # requantize: NF4 again, outputs within quantization noise of the merged model
        model = load_dinov3(ckpt, quantize="nf4")
        add_adapters(model, method=method, rank=R, alpha=ALPHA, targets="q_proj")
        merge_adapters(model, requantize=True)
        assert isinstance(model.get_submodule("layer.0.attention.q_proj"), NF4Linear)
        assert not any(isinstance(m, (LoRALinear, DoRALinear)) for m in model.modules())
