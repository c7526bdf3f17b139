"""nanopeft/methods/lora.py against HF PEFT's LoRA on single layers (docs/DORA.md "LoRA", "Merging").

Tests that need PEFT or bitsandbytes skip one by one when they are missing (the helpers in conftest.py).
"""

import copy
import math

import pytest
import torch
import torch.nn as nn
from conftest import ADAPTER_ALPHA as ALPHA
from conftest import ADAPTER_IN as IN
from conftest import ADAPTER_OUT as OUT
from conftest import ADAPTER_R as R
from conftest import assert_outputs_and_grads_equal, close, copy_from_peft, make_bnb4, make_linear, peft_layer

from nanopeft.methods.inject import add_adapters, merge_adapters
from nanopeft.methods.dropout import SKIPS_MAX_P, BitsDropout, keep_mask, skips_keep_mask
from nanopeft.methods.lora import LoRALinear
from nanopeft.nf4_linear import NF4Linear


def twin(base, dropout=0.0, rslora=False):
    pm, layer = peft_layer(base, dropout=dropout, rslora=rslora)
    return pm, layer, copy_from_peft(LoRALinear(copy.deepcopy(base), R, ALPHA, dropout, rslora), layer)


def test_init_is_kaiming_uniform_and_zero_b_so_step0_is_the_base():
    base = make_linear()
    torch.manual_seed(1)
    lo = LoRALinear(base, rank=16, alpha=32)
    A, B = lo.lora_A.weight, lo.lora_B.weight
    bound = 1 / math.sqrt(IN)  # kaiming_uniform_(a=√5) on (r, in) = U(±1/√in)
    assert A.shape == (16, IN) and B.shape == (OUT, 16)
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # std of U(±b) = b/√3
    assert torch.count_nonzero(B) == 0
    assert lo.scaling == 2.0 and LoRALinear(make_linear(), 16, 32, use_rslora=True).scaling == 8.0
    x = torch.randn(3, 5, IN)
    assert torch.equal(lo(x), base(x))
    assert A.dtype == B.dtype == torch.float32 and A.requires_grad and not lo.base_layer.weight.requires_grad


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_equal_peft(dropout, rslora):
    base = make_linear()
    pm, layer, ours = twin(base, dropout, rslora)
    assert ours.scaling == layer.scaling["default"]
    x = torch.randn(3, 7, IN, requires_grad=True)
    assert_outputs_and_grads_equal(pm, ours, x, [layer.lora_A["default"].weight, layer.lora_B["default"].weight],
                                   [ours.lora_A.weight, ours.lora_B.weight])
    if dropout:  # the mask really is applied in train mode, and only there
        ours.train()
        assert not torch.equal(ours(x), ours(x))


def test_bf16_base_keeps_fp32_adapters_and_matches_peft():
    base = make_linear(torch.bfloat16)
    pm, layer, ours = twin(base)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype
    assert ours.lora_A.weight.dtype == ours.lora_B.weight.dtype == torch.float32
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    y, y_ref = ours(x), pm(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)


def test_nf4_base_equals_peft_on_bitsandbytes():
    base = make_linear()
    q = make_bnb4(base)
    pm, layer = peft_layer(q)
    pm.train()  # bnb's eval path on CPU repacks the weight (docs/NF4.md "bitsandbytes CPU traps")
    ours = copy_from_peft(LoRALinear(NF4Linear.from_linear(base), R, ALPHA), layer)
    x = torch.randn(2, 5, IN)
    assert torch.allclose(ours(x), pm(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "bf16", "nf4"])
def test_merged_equals_unmerged(kind):
    base = make_linear(torch.bfloat16 if kind == "bf16" else torch.float32)
    if kind == "nf4":
        base = NF4Linear.from_linear(base)
    lo = LoRALinear(base, R, ALPHA)
    with torch.no_grad():
        lo.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(6, IN, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    merged = lo.eval().merged()
    assert type(merged) is nn.Linear and not merged.weight.requires_grad
    tol = 2e-2 if kind == "bf16" else 1e-5
    assert torch.allclose(merged(x).float(), lo(x).float(), atol=tol, rtol=0)
    if kind == "nf4":  # re-quantized: the merged weight, rounded to NF4 again
        W = merged.weight
        rq = lo.merged(requantize=True)
        assert isinstance(rq, NF4Linear)
        assert torch.equal(rq.dequantize(), NF4Linear.from_weight(W, merged.bias.detach()).dequantize())


def test_training_moves_only_the_adapter():
    lo = LoRALinear(make_linear(), R, ALPHA, dropout=0.1)
    before = {k: v.clone() for k, v in lo.base_layer.state_dict().items()}
    A0 = lo.lora_A.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in lo.parameters() if p.requires_grad], lr=1e-2)
    assert {n for n, p in lo.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}
    for _ in range(2):
        lo(torch.randn(8, IN)).square().mean().backward()
        opt.step(), opt.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in lo.base_layer.state_dict().items())
    assert not torch.equal(lo.lora_A.weight, A0) and torch.count_nonzero(lo.lora_B.weight) > 0


def test_bad_arguments():
    for kw, msg in [(dict(rank=0, alpha=8), "rank"), (dict(rank=2.0, alpha=8), "rank"),
                    (dict(rank=4, alpha=0), "alpha"), (dict(rank=4, alpha=8, dropout=1.0), "dropout")]:
        with pytest.raises(ValueError, match=msg):
            LoRALinear(make_linear(), **kw)
    with pytest.raises(TypeError, match="Conv2d"):
        LoRALinear(nn.Conv2d(3, 8, 3), 4, 8)


# ---- the bits dropout sampler ---------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.05, 0.3])
def test_bits_dropout_keeps_with_probability_exactly_one_minus_p(p):
    d = BitsDropout(p)
    assert abs((d.threshold + 2**31) / 2**32 - (1 - p)) <= 2**-33  # P(keep) at the sampler's resolution
    torch.manual_seed(0)
    n = 2_000_003  # odd: the last int64 supplies one int32 lane
    keep = keep_mask((n,), d.threshold, "cpu").double().mean().item()
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # within 5 standard errors
    x = torch.randn(3, 1001)
    y = d.train()(x)
    kept = y != 0
    assert torch.equal(y[kept], (x * (1 / (1 - p)))[kept])  # kept entries scaled by 1/(1 − p), as nn.Dropout
    assert torch.equal(d.eval()(x), x)
    torch.manual_seed(7)
    a = keep_mask((4, 5, 6), d.threshold, "cpu")
    torch.manual_seed(7)
    assert torch.equal(a, keep_mask((4, 5, 6), d.threshold, "cpu"))  # torch's generator: seeds replay


@pytest.mark.parametrize("p", [0.05, SKIPS_MAX_P])
def test_skips_sampler_drops_each_entry_independently_with_probability_p(p):
    torch.manual_seed(0)
    n = 3_000_001
    keep = skips_keep_mask((n,), p, "cpu")
    se = math.sqrt(p * (1 - p) / n)
    assert keep.shape == (n,) and keep.dtype == torch.bool
    assert abs((~keep).double().mean().item() - p) < 5 * se
    both = (~keep[1:] & ~keep[:-1]).double().mean().item()  # neighbours independent: P(both dropped) = p²
    assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
    # every position, the first and the last included, is dropped with probability p (the edges of the
    # gap arithmetic: a drop at 0, one exactly at the end, gaps that run past it)
    torch.manual_seed(1)
    draws = 40_000
    rate = torch.stack([~skips_keep_mask((3, 3), p, "cpu") for _ in range(draws)]).double().mean(0)
    assert (rate - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / draws), rate
    torch.manual_seed(7)
    a = skips_keep_mask((4, 5, 6), p, "cpu")
    torch.manual_seed(7)
    assert torch.equal(a, skips_keep_mask((4, 5, 6), p, "cpu"))  # torch's generator: seeds replay
    assert skips_keep_mask((0, 4), p, "cpu").shape == (0, 4)


def test_bits_dropout_uses_skips_on_cpu_at_small_p():
    for p, sampler in [(0.05, skips_keep_mask), (SKIPS_MAX_P, skips_keep_mask), (0.3, keep_mask)]:
        d = BitsDropout(p).train()
        torch.manual_seed(3)
        got = d.mask((6, 50), torch.device("cpu"))
        torch.manual_seed(3)
        want = sampler((6, 50), p, "cpu") if sampler is skips_keep_mask else sampler((6, 50), d.threshold, "cpu")
        assert torch.equal(got, want), p
        torch.manual_seed(3)
        x = torch.randn(6, 50)
        torch.manual_seed(3)
        assert torch.equal(d(x) != 0, got & (x != 0))


def test_bits_dropout_gradient_is_the_mask_times_the_scale():
    d = BitsDropout(0.25).train()
    x = torch.randn(8, 33, requires_grad=True)
    y = d(x)
    (g,) = torch.autograd.grad(y.sum() * 3, [x])
    assert torch.equal(g, (y != 0).float() * (3 / 0.75))
    assert abs((y != 0).float().mean().item() - 0.75) < 0.05


def test_lora_with_bits_dropout_equals_nn_dropout_with_the_same_mask(monkeypatch):
    """The sampler only changes how the mask is drawn: with nn.Dropout forced to BitsDropout's mask,
    outputs and gradients are equal. The bits path also takes LoRALinear.lowrank_folded (s/(1 − p) on
    the rank-r tensor instead of on x and on the output), so equal up to fp32 rounding, not bit for bit."""
    calls = []
    folded = LoRALinear.lowrank_folded
    monkeypatch.setattr(LoRALinear, "lowrank_folded", lambda self, xa: calls.append(1) or folded(self, xa))
    base = make_linear()
    fast = LoRALinear(copy.deepcopy(base), R, ALPHA, 0.3, dropout_sampler="bits").train()
    ref = LoRALinear(copy.deepcopy(base), R, ALPHA, 0.3).train()
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.lora_B.weight.normal_(0, 0.1), ref.lora_B.weight.copy_(fast.lora_B.weight)
    x = torch.randn(3, 7, IN, requires_grad=True)
    torch.manual_seed(1)
    y = fast(x)
    torch.manual_seed(1)
    mask = fast.lora_dropout.mask(x.shape, x.device)
    monkeypatch.setattr(nn.functional, "dropout", lambda t, p, training, inplace=False: t * mask / (1 - p))
    y_ref = ref(x)
    assert calls == [1] and torch.allclose(y, y_ref, atol=1e-6, rtol=0)
    g = torch.autograd.grad(y.square().sum(), [x, fast.lora_A.weight, fast.lora_B.weight])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, ref.lora_A.weight, ref.lora_B.weight])
    for a, b in zip(g, g_ref):
        assert close(a, b), (a - b).abs().max()
    with pytest.raises(ValueError, match="dropout_sampler"):
        LoRALinear(make_linear(), R, ALPHA, 0.1, dropout_sampler="fast")


def test_merge_adapters_into_another_dtype():
    model = nn.Sequential(nn.Module())
    model[0].layer = nn.ModuleList([nn.Module()])
    model[0].layer[0].fc = NF4Linear.from_linear(make_linear())
    add_adapters(model, method="lora", rank=R, alpha=ALPHA, targets="all-linear")
    w = model.get_submodule("0.layer.0.fc")
    with torch.no_grad():
        w.lora_B.weight.normal_(0, 0.1)
    x = torch.randn(5, IN)
    y = w.eval()(x)
    assert merge_adapters(model, dtype=torch.bfloat16) == 1
    merged = model.get_submodule("0.layer.0.fc")
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
    assert torch.allclose(merged(x.bfloat16()).float(), y, atol=3e-2, rtol=0)


@pytest.mark.parametrize("sampler", ["torch", "bits"])
@pytest.mark.parametrize("method,dora_dropout", [("lora", "peft"), ("dora", "peft"), ("dora", "lora")])
def test_checkpointed_qlora_skips_each_blocks_last_frozen_product_with_the_same_gradients(
        sampler, method, dora_dropout, monkeypatch):
    """Under gradient checkpointing the recomputation stops at a block's last saved tensor: the MLP's
    down projection runs its low-rank path, then its frozen product, which backward never reads (LoRA)
    or whose results for m's gradient the down projection keeps past the checkpoint (DoRA, ends_block),
    so that product is not recomputed. Gradients (dropout on, same seed) are bit-identical to no
    checkpointing, and the recomputation runs every block's frozen products but the down projection's."""
    import nanopeft.nf4_linear as nf4_linear
    from nanopeft import DINOv3ViT, PRESETS

    torch.manual_seed(0)
    model = DINOv3ViT(PRESETS["tiny"].replace(num_hidden_layers=2, drop_path_rate=0.0))
    model.set_rope_augmentation(None, None, None)
    for block in model.layer:  # NF4 bases, as QLoRA trains them
        for parent in (block.attention, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, NF4Linear.from_linear(child))
    add_adapters(model, method=method, rank=4, alpha=8, dropout=0.1, targets="all-linear", dropout_sampler=sampler,
                 dora_dropout=dora_dropout)
    assert [n for n, m in model.named_modules() if getattr(m, "ends_block", False)] == \
        ([f"layer.{i}.mlp.down_proj" for i in range(len(model.layer))] if method == "dora" else [])
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.02)  # B ≠ 0, so every gradient is non-trivial
    model.train()
    calls = []
    real = nf4_linear.NF4Matmul.forward
    monkeypatch.setattr(nf4_linear.NF4Matmul, "forward", staticmethod(lambda *a: calls.append(1) or real(*a)))
    x = torch.randn(2, 3, 32, 32)
    grads, counts = {}, {}
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_gradient_checkpointing(ckpt)
        calls.clear()
        torch.manual_seed(1)
        model(x).square().mean().backward()
        counts[ckpt] = len(calls)
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    linears = sum(isinstance(m, NF4Linear) for m in model.modules())
    assert counts[False] == linears                        # one forward product per layer
    assert counts[True] == 2 * linears - len(model.layer)  # recomputed: all but each block's down_proj
    assert grads[True].keys() == grads[False].keys() and len(grads[False]) == (2 if method == "lora" else 3) * linears
    for n, g in grads[False].items():
        assert torch.equal(g, grads[True][n]), n
