"""BitFit, LayerNorm tuning, SSF, VPT-deep and AdaptFormer (nanopeft/methods/{bitfit,layernorm,ssf,vpt,adaptformer}.py)
on tiny DINOv3s written by transformers (conftest.tiny_ckpt: SwiGLU without q/k/v bias like the 7B, GELU with
q/v bias like ViT-S/B/L), full precision and NF4, and on the meta device for the released ViT-B/16 and ViT-7B/16.

Trainable counts (head excluded; VPT n_p = 10, AdaptFormer r = 64), from the formulas in `expected_count`:
    method        ViT-B/16    ViT-7B/16   per block (+ outside the blocks)
    BitFit          93,696    1,318,912   biased q/k/v/o·d + MLP biases + 2d (+ 2d)   B: 6d + h, 7B: 4d + 2h
    LayerNorm       38,400      663,552   4d (+ 2d)
    SSF            205,824    3,620,864   14d + 2h GELU, 14d + 4h SwiGLU (+ 4d)
    VPT-deep        92,160    1,638,400   n_p·d
    AdaptFormer  1,189,632   21,137,920   2dr + r + d
"""

import copy
import math

import pytest
import torch
import torch.nn as nn

from nanopeft import load_dinov3
from nanopeft.backbones import dinov3
from nanopeft.backbones.dinov3 import DINOv3ViT, rotate_half
from nanopeft.config import PRESETS
from nanopeft.methods.adaptformer import AdaptFormerBlock, adaptformer_blocks, add_adaptformer, unwrap_adaptformer
from nanopeft.methods.bitfit import add_bitfit, bitfit_names
from nanopeft.methods.layernorm import LN_TARGETS, add_layernorm, layernorm_names
from nanopeft.methods.ssf import SSF, add_ssf, ssf_layers
from nanopeft.methods.vpt import PromptedBlock, add_vpt, unwrap_vpt, vpt_blocks
from nanopeft.nf4_linear import NF4Linear

NP, R = 3, 8  # tiny-model prompts and AdaptFormer rank
METHODS = ["bitfit", "layernorm", "ssf", "vpt", "adaptformer"]
IDENTITY = ["bitfit", "layernorm", "ssf", "adaptformer"]  # every method but VPT is the base model at init


def add(method, model, n_p=NP, r=R):
    return {"bitfit": add_bitfit, "layernorm": add_layernorm, "ssf": add_ssf,
            "vpt": lambda m: add_vpt(m, n_p), "adaptformer": lambda m: add_adaptformer(m, r)}[method](model)


def expected_count(method, cfg, n_p=NP, r=R):
    d, h, L, gated = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.use_gated_mlp
    if method == "bitfit":  # every bias; + the patch conv's and the final norm's
        attn = (cfg.query_bias + cfg.key_bias + cfg.value_bias + cfg.proj_bias) * d
        mlp = cfg.mlp_bias * ((2 * h if gated else h) + d)
        return L * (attn + mlp + 2 * d) + 2 * d
    if method == "layernorm":  # γ, β of norm1, norm2; + the final norm
        return L * 4 * d + 2 * d
    if method == "ssf":  # γ, β after norm1, q, k, v, o, norm2, (gate,) up, down; + patch conv, final norm
        return L * (14 * d + (4 if gated else 2) * h) + 4 * d
    if method == "vpt":
        return L * n_p * d
    return L * (2 * d * r + r + d)  # adaptformer: down (d·r + r), up (r·d + d)


PUBLISHED = {("bitfit", "vitb16"): 93_696, ("bitfit", "vit7b16"): 1_318_912,
             ("layernorm", "vitb16"): 38_400, ("layernorm", "vit7b16"): 663_552,
             ("ssf", "vitb16"): 205_824, ("ssf", "vit7b16"): 3_620_864,
             ("vpt", "vitb16"): 92_160, ("vpt", "vit7b16"): 1_638_400,
             ("adaptformer", "vitb16"): 1_189_632, ("adaptformer", "vit7b16"): 21_137_920}


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def load(tiny_ckpt):
    """load(gated=True, nf4=False, dtype=None) -> a fresh nanopeft DINOv3ViT (eval) from the tiny checkpoint."""
    def build(gated=True, nf4=False, dtype=None):
        return load_dinov3(tiny_ckpt(gated=gated)[0], quantize="nf4" if nf4 else None, dtype=dtype).eval()
    return build


def perturb(model, seed=1):
    """Move every method parameter off its init (B ≠ 0, γ ≠ 1, ...) so the methods really act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# ---- 1. the base model at init; VPT is not ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gated", "plain", "gated-nf4", "plain-nf4", "gated-bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_init_is_the_base_model_except_vpt(method, kind, load, pixels):
    gated, nf4, dtype = kind.startswith("gated"), "nf4" in kind, torch.bfloat16 if "bf16" in kind else None
    base = load(gated, nf4, dtype)
    with torch.no_grad():
        y0 = base(pixels)
        model = add(method, copy.deepcopy(base))
        y = model(pixels)
    assert y.dtype == y0.dtype and y.shape == y0.shape
    if method == "vpt":
        assert (y - y0).abs().max() > 1e-3  # the prompts change attention from block 0 on
    else:
        assert torch.equal(y, y0)
    if method in ("ssf", "vpt", "adaptformer"):  # new parameters are fp32 whatever the base dtype
        assert {p.dtype for p in trainable(model).values()} == {torch.float32}


# ---- 2. only the method trains; counts --------------------------------------------------------------------

@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_only_the_method_trains_and_counts(method, gated, load):
    model = add(method, load(gated))
    names, cfg, L = set(trainable(model)), model.config, model.config.num_hidden_layers
    assert sum(p.numel() for p in trainable(model).values()) == expected_count(method, cfg)
    blocks = [f"layer.{i}." for i in range(L)]
    if method == "bitfit":
        assert sorted(names) == sorted(bitfit_names(model)) and all(n.endswith(".bias") for n in names)
        assert {"embeddings.patch_embeddings.bias", "norm.bias", "layer.1.norm2.bias",
                "layer.0.attention.o_proj.bias", "layer.0.mlp.down_proj.bias"} <= names
        assert ("layer.0.attention.q_proj.bias" in names) == (not gated)  # the 7B-like model has no q bias
        assert not any("lambda1" in n or "norm1.weight" in n for n in names)
    elif method == "layernorm":
        assert names == set(layernorm_names(model)) == {f"{b}{ln}.{k}" for b in blocks for ln in ("norm1", "norm2")
                                                         for k in ("weight", "bias")} | {"norm.weight", "norm.bias"}
    elif method == "ssf":
        mlp = ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj")
        per_block = ["norm1", *(f"attention.{p}_proj" for p in "qkvo"), "norm2", *(f"mlp.{p}" for p in mlp)]
        assert list(ssf_layers(model)) == ["embeddings.patch_embeddings", *(b + t for b in blocks for t in per_block),
                                           "norm"]
        assert names == {f"{n}.ssf_{k}" for n in ssf_layers(model) for k in ("scale", "shift")}
    elif method == "vpt":
        assert names == {f"{b}prompts" for b in blocks} and list(vpt_blocks(model)) == [b[:-1] for b in blocks]
    else:
        assert names == {f"{b}{ud}.{k}" for b in blocks for ud in ("down", "up") for k in ("weight", "bias")}


@pytest.mark.parametrize("preset", ["vitb16", "vit7b16"])
@pytest.mark.parametrize("method", METHODS)
def test_counts_of_the_released_sizes_on_meta(method, preset):
    """The numbers for docs/METHODS.md, counted on the real module trees (no weights needed)."""
    with torch.device("meta"):
        model = DINOv3ViT(PRESETS[preset])
    add(method, model, n_p=10, r=64)
    n = sum(p.numel() for p in trainable(model).values())
    assert n == expected_count(method, model.config, n_p=10, r=64) == PUBLISHED[method, preset]


def test_ln_targets_train_what_peft_ln_tuning_trains(tiny_ckpt, load):
    peft = pytest.importorskip("peft")
    hf = copy.deepcopy(tiny_ckpt(gated=True)[1])
    with pytest.warns(UserWarning, match="Unsupported layer type"):  # PEFT's LN tuning warns for nn.LayerNorm
        pm = peft.get_peft_model(hf, peft.LNTuningConfig(target_modules=list(LN_TARGETS)))
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert theirs == sum(p.numel() for p in trainable(add_layernorm(load(True))).values()) == 2 * 4 * 64 + 2 * 64


# ---- 3. SSF merging and WiSE ------------------------------------------------------------------------------

def ssf_case(kind, seed=0):
    torch.manual_seed(seed)
    if kind.startswith(("linear", "nf4")):
        base = nn.Linear(128, 64, bias="nobias" not in kind)
        x = torch.randn(3, 5, 128)
        if kind.startswith("nf4"):
            base = NF4Linear.from_linear(base)
    elif kind == "layernorm":
        base, x = nn.LayerNorm(64), torch.randn(3, 5, 64)
        with torch.no_grad():
            base.weight.normal_(1, 0.3), base.bias.normal_(0, 0.3)
    else:
        base, x = nn.Conv2d(3, 32, 4, stride=4, bias="nobias" not in kind), torch.randn(2, 3, 16, 12)
    ssf = SSF(base)
    with torch.no_grad():
        ssf.ssf_scale.normal_(1, 0.3), ssf.ssf_shift.normal_(0, 0.3)
    return ssf, base, x


def merged_tensors(layer):
    w = layer.dequantize(torch.float32) if isinstance(layer, NF4Linear) else layer.weight.float()
    return w, (layer.bias.float() if layer.bias is not None else torch.zeros(w.shape[0]))


SSF_KINDS = ["linear", "linear-nobias", "nf4", "nf4-nobias", "layernorm", "conv", "conv-nobias"]


@pytest.mark.parametrize("kind", SSF_KINDS)
def test_ssf_merged_equals_wrapped(kind):
    ssf, base, x = ssf_case(kind)
    y = ssf(x)
    assert (y - base(x)).abs().max() > 0.05                  # γ, β really act
    merged = ssf.merged()
    assert type(merged) is {"layernorm": nn.LayerNorm, "conv": nn.Conv2d}.get(kind.split("-")[0], nn.Linear)
    assert merged.bias is not None and not any(p.requires_grad for p in merged.parameters())
    assert torch.allclose(merged(x), y, atol=2e-6, rtol=1e-5), (merged(x) - y).abs().max()


@pytest.mark.parametrize("kind", SSF_KINDS)
def test_ssf_wise_interpolates_the_merged_weights(kind):
    ssf, base, x = ssf_case(kind)
    y1, (W1, b1) = ssf(x), merged_tensors(ssf.merged())
    W0, b0 = merged_tensors(base)                            # the pretrained layer (b0 = 0 where it had none)
    s0 = copy.deepcopy(ssf).wise_(0.0)
    assert torch.equal(s0(x), base(x))                       # α = 0: the base layer, exactly
    assert torch.equal(merged_tensors(s0.merged())[0], W0)
    s1 = copy.deepcopy(ssf).wise_(1.0)
    assert torch.equal(s1.ssf_scale, ssf.ssf_scale) and torch.equal(s1.ssf_shift, ssf.ssf_shift)
    sh = copy.deepcopy(ssf).wise_(0.5)
    Wh, bh = merged_tensors(sh.merged())
    assert torch.allclose(Wh, (W0 + W1) / 2, atol=1e-6) and torch.allclose(bh, (b0 + b1) / 2, atol=1e-6)
    assert torch.allclose(sh(x), (base(x) + y1) / 2, atol=1e-5)
    assert not torch.allclose(Wh, W1, atol=1e-3) and not torch.allclose(bh, b0, atol=1e-3)


@pytest.mark.parametrize("nf4", [False, True])
def test_ssf_merged_into_the_whole_model(nf4, load, pixels):
    model = add_ssf(load(True, nf4))
    perturb(model)
    with torch.no_grad():
        y = model(pixels)
        for name, layer in ssf_layers(model).items():
            model.set_submodule(name, layer.merged())
        assert not ssf_layers(model) and model.layer[0].attention.k_proj.bias is not None  # β needed a k bias
        assert torch.allclose(model(pixels), y, atol=1e-5, rtol=1e-4)


# ---- 4. gradients, and gradient checkpointing --------------------------------------------------------------

def loss_of(model, pixels):
    P = model.config.patch_size
    N = model.num_prefix_tokens + (pixels.shape[-2] // P) * (pixels.shape[-1] // P)
    target = torch.randn(N, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    return (model(pixels) * target).sum()             # a fixed random direction: every token counts


@pytest.mark.parametrize("kind", ["gated", "plain", "gated-nf4"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_only_the_method(method, kind, load, pixels):
    model = add(method, load(kind.startswith("gated"), "nf4" in kind))
    loss_of(model, pixels).backward()
    params = trainable(model)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)  # frozen stays frozen
    for n, p in params.items():
        if method == "adaptformer" and ".down." in n:
            assert torch.count_nonzero(p.grad) == 0, n       # W_up = 0 at init: nothing reaches W_down yet
        else:
            assert p.grad.abs().max() > 0, n
    if method == "adaptformer":                              # one step makes W_up ≠ 0, then W_down learns
        torch.optim.SGD(params.values(), lr=0.1).step()
        model.zero_grad()
        loss_of(model, pixels).backward()
        assert all(p.grad.abs().max() > 0 for p in params.values())


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method, load, pixels, monkeypatch):
    model = add(method, load(True)).train()                  # dropout and RoPE rescaling on
    perturb(model)
    calls = []
    real = dinov3.checkpoint
    monkeypatch.setattr(dinov3, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(ckpt, seed=0):
        model.set_gradient_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = loss_of(model, pixels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}

    (l0, g0), (l1, g1) = run(False), run(True)
    assert len(calls) == len(model.layer)                    # every block really was checkpointed
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7), n
    assert not torch.equal(run(False, seed=1)[0], l0)        # randomness is on, and reproduced above


# ---- 5. VPT and AdaptFormer specifics -----------------------------------------------------------------------

def block_inputs(model, pixels):
    with torch.no_grad():
        x = model.embeddings(pixels)                         # (B, 1 + R + h·w, D)
    cos, sin = model.rope_embeddings(pixels.shape[-2] // 16, pixels.shape[-1] // 16, x.dtype)
    return x, cos, sin


def reference_block(blk, x, cos, sin):
    """Block.forward written out with RoPE on the last h·w tokens only."""
    a, (B, N, D), n_rot = blk.attention, x.shape, cos.shape[0]
    h = blk.norm1(x)
    q, k, v = (p(h).view(B, N, a.num_heads, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
    def rot(t):  # (B, H, N, hd): the first N − h·w tokens as they are, the patches rotated
        pre, patches = t[:, :, :N - n_rot], t[:, :, N - n_rot:]
        return torch.cat([pre, patches * cos + rotate_half(patches) * sin], 2)
    q, k = rot(q), rot(k)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(a.head_dim), -1) @ v  # (B, H, N, hd)
    x = x + blk.layer_scale1(a.o_proj(att.transpose(1, 2).reshape(B, N, D)))
    return x + blk.layer_scale2(blk.mlp(blk.norm2(x)))


def test_vpt_prompts_sit_after_the_registers_unrotated(load, pixels):
    model = add_vpt(load(True), NP)
    x, cos, sin = block_inputs(model, pixels)
    pb = model.layer[0]
    P, pre = pb.prompts.detach().expand(x.shape[0], -1, -1), 1 + model.config.num_register_tokens
    drop = lambda y, at: torch.cat([y[:, :at], y[:, at + NP:]], 1)
    with torch.no_grad():
        y = pb(x, cos, sin)
        after_regs = torch.cat([x[:, :pre], P, x[:, pre:]], 1)             # [CLS, regs, P | patches]
        assert y.shape == x.shape and torch.equal(y, drop(pb.base_layer(after_regs, cos, sin), pre))
        assert torch.allclose(y, drop(reference_block(pb.base_layer, after_regs, cos, sin), pre), atol=1e-5)
        front = pb.base_layer(torch.cat([P, x], 1), cos, sin)                # the study's [P, CLS, regs | patches]
        assert torch.allclose(y, front[:, NP:], atol=1e-5)                  # un-rotated tokens: order is free
        rotated = torch.cat([cos[:1].expand(NP, -1), cos]), torch.cat([sin[:1].expand(NP, -1), sin])
        assert (drop(pb.base_layer(after_regs, *rotated), pre) - y).abs().max() > 1e-4  # rotating them shows
        assert (y - pb.base_layer(x, cos, sin)).abs().max() > 1e-3


def test_vpt_alpha_and_dropout(load, pixels):
    base = load(True)
    model = add_vpt(copy.deepcopy(base), NP, dropout=0.5)
    with torch.no_grad():
        y, y0 = model(pixels), base(pixels)
        outputs = {}
        for alpha in (0.5, 0.0):
            for b in model.layer:
                b.alpha = alpha
            outputs[alpha] = model(pixels)
        assert torch.equal(outputs[0.0], y0)                 # alpha 0: no prompts, the base model exactly
        assert not torch.allclose(outputs[0.5], y, atol=1e-4) and not torch.allclose(outputs[0.5], y0, atol=1e-4)
        pb = model.layer[0].train()
        pb.alpha = 1.0
        x, cos, sin = block_inputs(model, pixels)
        torch.manual_seed(0)
        a = pb(x, cos, sin)
        torch.manual_seed(1)
        assert not torch.equal(a, pb(x, cos, sin))           # prompt dropout acts in training
        assert torch.equal(pb.eval()(x, cos, sin), pb(x, cos, sin))


def test_adaptformer_alpha_zero_is_the_base_and_the_branch_follows_the_study(load, pixels):
    base = load(True)
    model = add_adaptformer(copy.deepcopy(base), R, scale=0.2)
    perturb(model)
    blk = model.layer[1]
    assert isinstance(blk, AdaptFormerBlock) and blk.scale == 0.2
    x, cos, sin = block_inputs(model, pixels)
    with torch.no_grad():
        b = blk.base_layer
        x1 = x + b.layer_scale1(b.attention(b.norm1(x), cos, sin))          # x′
        want = x1 + b.layer_scale2(b.mlp(b.norm2(x1)) + 0.2 * blk.up(torch.relu(blk.down(x1))))
        assert torch.allclose(blk(x, cos, sin), want, atol=1e-6)            # reads x′ un-normalised, through λ2
        assert (model(pixels) - base(pixels)).abs().max() > 1e-3
        for blk in model.layer:
            blk.alpha = 0.0
        assert torch.equal(model(pixels), base(pixels))


# ---- 6. unwrap --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("method", ["vpt", "adaptformer"])
def test_unwrap_restores_the_base_model(method, nf4, load, pixels):
    base = load(True, nf4)
    model = add(method, copy.deepcopy(base))
    loss_of(model, pixels).backward()
    torch.optim.SGD(trainable(model).values(), lr=0.1).step()  # a trained adapter; the base must not move
    unwrap = unwrap_vpt if method == "vpt" else unwrap_adaptformer
    tensors = unwrap(model)
    assert list(model.state_dict()) == list(base.state_dict())
    assert not vpt_blocks(model) and not adaptformer_blocks(model) and isinstance(model.layer[0], dinov3.Block)
    d, L = model.config.hidden_size, model.config.num_hidden_layers
    if method == "vpt":
        assert sorted(tensors) == [f"layer.{i}.prompts" for i in range(L)]
        assert tensors["layer.0.prompts"].shape == (NP, d)
    else:
        assert len(tensors) == 4 * L and tensors["layer.1.up.weight"].shape == (d, R)
        assert tensors["layer.1.up.weight"].abs().max() > 0
    with torch.no_grad():
        assert torch.equal(model(pixels), base(pixels))


def test_wrappers_reject_bad_arguments(load):
    model = load(True)
    with pytest.raises(TypeError):
        SSF(nn.ReLU())
    with pytest.raises(ValueError):
        add_vpt(model, 0)
    with pytest.raises(ValueError):
        add_adaptformer(model, 4, dropout=1.0)
    add_vpt(model, 2)
    with pytest.raises(ValueError):
        add_vpt(model, 2)
    assert isinstance(model.layer[0], PromptedBlock)
