"""nanopeft/lora.py against HF PEFT's LoRA on single layers (peft_nf4.md §1, §8)."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from nanopeft.lora import LoRALinear
from nanopeft.nf4_linear import NF4Linear

peft = pytest.importorskip("peft")

IN, OUT, R, ALPHA = 128, 64, 4, 8  # in_features % 64 == 0: bitsandbytes' CPU dequant is right (peft_nf4.md §4.8)


class Wrap(nn.Module):
    """PEFT adapts any nn.Module with nn.Linear children: one Linear named `lin`."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def make_linear(dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def make_bnb4(lin):
    """bitsandbytes' NF4 Linear4bit (double quant) holding lin's weight, kept in train mode (§4.8)."""
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(IN, OUT, bias=lin.bias is not None, compute_dtype=lin.weight.dtype,
                          compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4")
    q = q.to("cpu")
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q


def peft_layer(base, *, dora=False, dropout=0.0, rslora=False, r=R, alpha=ALPHA):
    """PEFT's adapter on a copy of `base`, with init_lora_weights=False so that B != 0."""
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=dora, lora_dropout=dropout,
                          use_rslora=rslora, init_lora_weights=False)
    pm = peft.get_peft_model(Wrap(copy.deepcopy(base)), cfg)
    return pm, pm.base_model.model.lin


def copy_from_peft(ours, layer):
    """Put PEFT's A, B (and m) into our adapter, so both compute with the same numbers."""
    with torch.no_grad():
        ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(layer.lora_B["default"].weight)
        if hasattr(ours, "lora_magnitude_vector"):
            ours.lora_magnitude_vector.copy_(layer.lora_magnitude_vector["default"].weight)
    return ours


def close(a, b, tol=1e-5):
    """|a − b| <= tol · max|b| (gradients summed in another order differ by a few ulp of their largest value)."""
    return (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


def twin(base, dropout=0.0, rslora=False):
    pm, layer = peft_layer(base, dropout=dropout, rslora=rslora)
    return pm, layer, copy_from_peft(LoRALinear(copy.deepcopy(base), R, ALPHA, dropout, rslora), layer)


def assert_outputs_and_grads_equal(pm, ours, x, theirs, mine):
    """Eval and train mode (the same dropout mask): outputs, and gradients of x and the adapter tensors."""
    for training in (False, True):
        pm.train(training), ours.train(training)
        torch.manual_seed(123)
        y_ref = pm(x)
        torch.manual_seed(123)  # the same dropout mask
        y = ours(x)
        assert torch.allclose(y, y_ref, atol=1e-6, rtol=0), (y - y_ref).abs().max()
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x] + theirs)
        g = torch.autograd.grad(y.square().sum(), [x] + mine)
        for a, b in zip(g, g_ref):
            assert close(a, b), (a - b).abs().max()


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
    pm.train()  # bnb's eval path on CPU repacks the weight (peft_nf4.md §4.8)
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
