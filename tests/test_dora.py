"""nanopeft/methods/dora.py against HF PEFT's DoRA on single layers (docs/DORA.md "DoRA (Eq. 5)",
"Dropout semantics"), and the fast forward against the textbook one.

Tests that need PEFT or bitsandbytes skip one by one when they are missing (the helpers in conftest.py).
"""

import copy

import pytest
import torch
import torch.nn as nn
from conftest import ADAPTER_ALPHA as ALPHA
from conftest import ADAPTER_IN as IN
from conftest import ADAPTER_OUT as OUT
from conftest import ADAPTER_R as R
from conftest import assert_outputs_and_grads_equal, close, copy_from_peft, make_bnb4, make_linear, peft_layer

from nanopeft.methods.dora import DoRALinear
from nanopeft.methods.lora import base_weight
from nanopeft.nf4_linear import NF4Linear


def twin(base, dropout=0.0, rslora=False, ours_base=None):
    """PEFT's DoRA (B != 0) and ours with PEFT's A, B and a perturbed m copied in."""
    pm, layer = peft_layer(base, dora=True, dropout=dropout, rslora=rslora)
    with torch.no_grad():  # m != ‖W0 + sBA‖, so that g != 1 and every term of the forward matters
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn(OUT))
    ours = DoRALinear(copy.deepcopy(base) if ours_base is None else ours_base, R, ALPHA, dropout, rslora)
    return pm, layer, copy_from_peft(ours, layer)


def test_magnitude_init_is_the_row_norm_of_w0():
    base = make_linear()
    do = DoRALinear(base, R, ALPHA)
    m = do.lora_magnitude_vector
    assert m.shape == (OUT,) and m.dtype == torch.float32 and m.requires_grad
    assert torch.allclose(m, torch.linalg.norm(base.weight, dim=1), rtol=1e-6, atol=0)
    x = torch.randn(4, IN)
    assert torch.allclose(do(x), base(x), atol=1e-6, rtol=0)  # B = 0 and g = 1: step 0 is the base model
    # PEFT's init_lora_weights=False: m = ‖W0 + s·BA‖ with its random B; ours recomputes the same
    _, layer = peft_layer(base, dora=True)
    copy_from_peft(do, layer)
    do.init_magnitude()
    assert torch.allclose(m, layer.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_grads_equal_peft(dropout, rslora):
    base = make_linear()
    pm, layer, ours = twin(base, dropout, rslora)
    x = torch.randn(3, 7, IN, requires_grad=True)
    theirs = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
              layer.lora_magnitude_vector["default"].weight]
    mine = [ours.lora_A.weight, ours.lora_B.weight, ours.lora_magnitude_vector]
    assert_outputs_and_grads_equal(pm, ours, x, theirs, mine)


@pytest.mark.parametrize("mode", ["peft", "lora"])
def test_dropout_reaches_the_terms_its_mode_says(mode):
    base = make_linear()
    _, _, do = twin(base, dropout=0.5)
    do.dora_dropout = mode
    x = torch.randn(5, IN)
    do.train()
    torch.manual_seed(0)
    y = do(x)
    torch.manual_seed(0)
    xd = nn.functional.dropout(x, 0.5, True)
    W, b, A, B, s = base.weight, base.bias, do.lora_A.weight, do.lora_B.weight, do.scaling
    g = do.lora_magnitude_vector / torch.linalg.norm(W + s * B @ A, dim=1)
    if mode == "peft":  # PEFT's semantics: the frozen path sees x, the rescaling and LoRA term x̃
        ref = x @ W.T + b + (g - 1) * (xd @ W.T) + g * s * (xd @ A.T @ B.T)
    else:               # only the low-rank path sees x̃
        ref = g * (x @ W.T + s * (xd @ A.T @ B.T)) + b
    assert torch.allclose(y, ref, atol=1e-5, rtol=0)
    do.eval()  # eval: Eq. 5 exactly, W' = m·(W0 + sBA)/‖W0 + sBA‖
    Wp = g[:, None] * (W + s * B @ A)
    assert torch.allclose(do(x), x @ Wp.T + b, atol=1e-5, rtol=0)


def test_factored_norm_is_exact_even_under_cancellation():
    base = make_linear()
    do = DoRALinear(base, R, ALPHA)
    A, B, s = do.lora_A.weight, do.lora_B.weight, do.scaling
    with torch.no_grad():
        B.normal_(0, 0.1)
        # rows 0-2: s·(BA)_i = −W0_i + a little, so ‖W0_i + s(BA)_i‖ is ~1e-4 of its parts (cancellation)
        W = base.weight
        for i in range(3):
            W[i] = -s * (B[i] @ A) + 1e-4 * torch.randn(IN) * W[i].norm() / IN ** 0.5
        do.init_magnitude()  # also exercises the cache: the base changed in place above
    f64 = lambda t: t.detach().double()
    ref = torch.linalg.norm(f64(W) + s * (f64(B) @ f64(A)), dim=1)
    dense32 = torch.linalg.norm(W + s * (B @ A), dim=1).detach()  # PEFT's way, in fp32
    expanded = (W.square().sum(1) + 2 * s * ((W @ A.T) * B).sum(1)
                + s * s * ((B @ (A @ A.T)) * B).sum(1)).clamp_min(0).sqrt().detach()  # no guard
    n = do.weight_norm()
    rel = lambda t: ((f64(t) - ref).abs() / ref).max().item()
    assert n.dtype == torch.float32 and n.shape == (OUT,)
    assert rel(expanded) > 1e-2  # the naive expansion really loses the cancelling rows ...
    assert rel(n) <= 2 * rel(dense32) + 1e-6, (rel(n), rel(dense32))  # ... ours is as good as dense fp32
    assert torch.allclose(do.lora_magnitude_vector, n, rtol=1e-6, atol=0)
    with torch.no_grad():  # load new base weights: the cached ‖W0_i‖² must not go stale
        base.weight.mul_(2.0)
    ref2 = torch.linalg.norm(f64(base.weight) + s * (f64(B) @ f64(A)), dim=1)
    assert ((f64(do.weight_norm()) - ref2).abs() / ref2).max() < 1e-4


def cancelling_dora(base, rows):
    """A DoRA layer whose `rows` have s·(BA)_i = −W0_i + a little (cancellation in the expanded norm)."""
    do = DoRALinear(base, R, ALPHA, 0.0)
    A, B, s = do.lora_A.weight, do.lora_B.weight, do.scaling
    with torch.no_grad():
        B.normal_(0, 0.1)
        W = base.weight
        for i, r in enumerate(rows):  # each row cancels to a different depth, so the ratios order them
            W[r] = -s * (B[r] @ A) + 10.0 ** (-2 - i) * torch.randn(IN) * W[r].norm() / IN ** 0.5
    return do


def test_norm_fixes_cancelling_rows_without_host_reads(monkeypatch):
    """On every device the norm takes the DENSE_ROWS lowest-ratio rows densely (a fixed-size top-k, never a
    nonzero(), so no op makes the host read a device value): the dense norm while at most DENSE_ROWS rows
    cancel; beyond DENSE_ROWS the deepest cancellations are the ones fixed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import nanopeft.methods.dora as dora_mod

    torch.manual_seed(0)
    do = cancelling_dora(make_linear(), [5, 40, 17])
    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Ops():
        fast = do.weight_norm()
    assert "topk" in seen and not {"nonzero", "_local_scalar_dense", "is_nonzero"} & set(seen), seen
    f64 = lambda t: t.detach().double()
    A, B, s, W = do.lora_A.weight, do.lora_B.weight, do.scaling, do.base_layer.weight
    ref = torch.linalg.norm(f64(W) + s * (f64(B) @ f64(A)), dim=1)
    assert ((f64(fast) - ref).abs() / ref).max() < 1e-4                 # the cancelling rows too
    dense = torch.linalg.vector_norm(W + s * (B @ A), dim=1)             # the fp32 dense rows
    assert torch.allclose(fast[[5, 17, 40]], dense[[5, 17, 40]], rtol=1e-6, atol=0)
    monkeypatch.setattr(dora_mod, "DENSE_ROWS", 2)  # three rows cancel, two are fixed: rows 17 and 40
    few = do.weight_norm()
    assert torch.allclose(few[[17, 40]], dense[[17, 40]], rtol=1e-6, atol=0)
    assert abs(f64(few[5]) - ref[5]) / ref[5] > 1e-6 and torch.equal(few[:5], fast[:5])


def test_norm_cache_follows_assigned_base_tensors_and_pickles(tmp_path):
    base = make_linear()
    _, _, do = twin(base)
    s, A, B = do.scaling, do.lora_A.weight, do.lora_B.weight
    do.weight_norm()  # fills the cache
    for seed in (1, 2, 3):  # new tensors each time, which may land where freed ones were
        do.base_layer.load_state_dict(make_linear(seed=seed).state_dict(), assign=True)
        ref = torch.linalg.norm(base_weight(do.base_layer) + s * (B @ A), dim=1)
        assert torch.allclose(do.weight_norm(), ref, rtol=1e-5, atol=0)
    for _ in range(3):  # free the weight, then a new one of the same size (malloc may reuse the address)
        do.base_layer._parameters["weight"] = None
        w = torch.randn(OUT, IN)
        do.base_layer.weight = nn.Parameter(w, requires_grad=False)
        ref = torch.linalg.norm(w + s * (B @ A), dim=1)
        assert torch.allclose(do.weight_norm(), ref, rtol=1e-5, atol=0)
    torch.save(do, tmp_path / "do.pt")  # the cache's weak references are not pickled
    again = torch.load(tmp_path / "do.pt", weights_only=False)
    x = torch.randn(4, IN)
    assert torch.allclose(again(x), do(x), atol=1e-6, rtol=0)


def test_norm_is_a_constant_in_backward():
    """§4.3: ∂y/∂A and ∂y/∂B flow only through the LoRA term, scaled by g."""
    base = make_linear()
    _, _, do = twin(base)
    x = torch.randn(5, IN)
    W, b, A, B, s, m = base.weight, base.bias, do.lora_A.weight, do.lora_B.weight, do.scaling, do.lora_magnitude_vector
    n = torch.linalg.norm(W + s * B @ A, dim=1).detach()
    ref = (m / n) * (x @ W.T + s * x @ A.T @ B.T) + b
    g_ref = torch.autograd.grad(ref.pow(3).sum(), [A, B, m])
    g = torch.autograd.grad(do(x).pow(3).sum(), [A, B, m])
    for a, r in zip(g, g_ref):
        assert close(a, r)


def test_bf16_base_matches_peft():
    base = make_linear(torch.bfloat16)
    pm, layer, ours = twin(base)
    assert layer.lora_magnitude_vector["default"].weight.dtype == torch.float32
    assert ours.lora_magnitude_vector.dtype == torch.float32
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    y, y_ref = ours(x), pm(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), y_ref.float(), atol=1e-2, rtol=1e-2)  # one bf16 rounding apart


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_nf4_base_equals_peft_on_bitsandbytes(dropout):
    base = make_linear()
    q = make_bnb4(base)
    pm, layer = peft_layer(q, dora=True, dropout=dropout)
    pm.train()  # bnb's eval path on CPU repacks the weight (docs/NF4.md "bitsandbytes CPU traps")
    # m was initialised from the dequantized NF4 weight, on both sides
    ours = DoRALinear(NF4Linear.from_linear(base), R, ALPHA, dropout)
    copy_from_peft(ours, layer)
    m_peft = layer.lora_magnitude_vector["default"].weight.detach().clone()
    ours.init_magnitude()
    assert torch.allclose(ours.lora_magnitude_vector, m_peft, rtol=1e-6, atol=0)
    assert not torch.allclose(m_peft, torch.linalg.norm(base.weight + ours.scaling * (
        ours.lora_B.weight @ ours.lora_A.weight), dim=1), rtol=1e-4, atol=0)  # (not W0 before quantization)
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(1 + 0.2 * torch.randn(OUT))
    copy_from_peft(ours, layer).train()
    x = torch.randn(2, 5, IN)
    torch.manual_seed(5)
    y_ref = pm(x)
    torch.manual_seed(5)
    assert torch.allclose(ours(x), y_ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["linear", "bf16", "nf4"])
def test_merged_equals_unmerged(kind):
    base = make_linear(torch.bfloat16 if kind == "bf16" else torch.float32)
    if kind == "nf4":
        base = NF4Linear.from_linear(base)
    _, _, do = twin(make_linear(), ours_base=base)
    x = torch.randn(6, IN, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)
    merged = do.eval().merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == x.dtype
    tol = 3e-2 if kind == "bf16" else 1e-5
    assert torch.allclose(merged(x).float(), do(x).float(), atol=tol, rtol=0)
    if kind == "nf4":
        rq = do.merged(requantize=True)
        assert isinstance(rq, NF4Linear)
        assert torch.equal(rq.dequantize(), NF4Linear.from_weight(merged.weight, merged.bias.detach()).dequantize())


def test_meta_magnitude_refuses_forward():
    with torch.device("meta"):
        base = nn.Linear(IN, OUT)
    do = DoRALinear(base, R, ALPHA)
    assert do.lora_magnitude_vector.is_meta
    with pytest.raises(RuntimeError, match="init_dora_magnitudes"):
        do(torch.randn(2, IN, device="meta"))


def test_nf4_weight_is_dequantized_no_more_often_than_for_lora(monkeypatch):
    """W0 Aᵀ (and x̃ W0ᵀ) ride along with the base matmul: one dequantize of the whole weight forward, one
    backward (the norm's DENSE_ROWS lowest-ratio rows are dequantized alone: 32 of OUT rows, not counted)."""
    from nanopeft.methods.lora import LoRALinear
    from nanopeft.nf4 import NF4Weight

    calls, dequantize = [], NF4Weight.dequantize

    def counted(self, *a, **k):
        out = dequantize(self, *a, **k)
        if out.numel() == IN * OUT:  # the whole W0
            calls.append(1)
        return out

    monkeypatch.setattr(NF4Weight, "dequantize", counted)
    x = torch.randn(2, 5, IN, requires_grad=True)
    counts = {}
    for cls in (LoRALinear, DoRALinear):
        for dropout in (0.0, 0.1):
            layer = cls(NF4Linear.from_linear(make_linear()), R, ALPHA, dropout).train()
            layer(x).square().sum().backward()  # DoRA caches ‖W0_i‖² here, once
            calls.clear()
            layer(x).square().sum().backward()
            counts[cls.__name__, dropout] = len(calls)
    assert set(counts.values()) == {2}, counts


# ---- the fast forward equals the textbook one; the "lora" dropout mode ------------------------------------

def perturbed(do):
    with torch.no_grad():  # B != 0 and m != ‖W0 + sBA‖: every term of the forward matters
        do.lora_B.weight.normal_(0, 0.1)
        do.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(do.out_features))
    return do


@pytest.mark.parametrize("kind", ["linear", "nf4", "nobias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("mode", ["peft", "lora"])
@pytest.mark.parametrize("sampler", ["torch", "bits"])
def test_fast_forward_equals_textbook_eq5(kind, dropout, mode, sampler):
    """forward_fast (row-append + cached ‖W0‖²) == forward_textbook (dense W0 + s·BA): outputs and grads."""
    base = make_linear(bias=kind != "nobias")
    if kind == "nf4":
        base = NF4Linear.from_linear(base)
    fast = perturbed(DoRALinear(base, R, ALPHA, dropout, dropout_sampler=sampler, dora_dropout=mode))
    slow = copy.deepcopy(fast)
    slow.fast = False
    x = torch.randn(3, 7, IN, requires_grad=True)
    mine = [fast.lora_A.weight, fast.lora_B.weight, fast.lora_magnitude_vector]
    theirs = [slow.lora_A.weight, slow.lora_B.weight, slow.lora_magnitude_vector]
    assert_outputs_and_grads_equal(slow, fast, x, theirs, mine, atol=2e-6)


def test_the_two_dropout_modes_differ_in_training_only():
    do = perturbed(DoRALinear(make_linear(), R, ALPHA, 0.5, dora_dropout="lora")).train()
    peft_mode = copy.deepcopy(do)
    peft_mode.dora_dropout = "peft"
    x = torch.randn(5, IN)
    torch.manual_seed(0)
    y = do(x)
    torch.manual_seed(0)
    assert not torch.allclose(peft_mode(x), y, atol=1e-3)
    do.eval(), peft_mode.eval()
    assert torch.equal(do(x), peft_mode(x))
    with pytest.raises(ValueError, match="dora_dropout"):
        DoRALinear(make_linear(), R, ALPHA, 0.1, dora_dropout="none")


def test_lora_dropout_mode_multiplies_with_w0_once(monkeypatch):
    """One frozen pass ([x; A] W0ᵀ) in "lora" mode, two row blocks of x in "peft" mode."""
    import nanopeft.methods.dora as dora

    rows, frozen = [], dora.frozen_matmul
    monkeypatch.setattr(dora, "frozen_matmul", lambda base, t: rows.append(t.shape[0]) or frozen(base, t))
    x = torch.randn(10, IN)
    for mode in ("lora", "peft"):
        DoRALinear(make_linear(), R, ALPHA, 0.1, dora_dropout=mode).train()(x)
    assert rows == [R, 10 + R, R, 10 + 10 + R]  # (init's A W0ᵀ, then the forward) per mode


def test_lora_mode_folds_the_dropout_scale_onto_the_rank_r_tensor(monkeypatch):
    """In "lora" mode with BitsDropout, s/(1 − p) scales A x̃ (LoRALinear.lowrank_folded, as for LoRA);
    "peft" mode needs x̃ itself for its second frozen product, and nn.Dropout draws its own mask: neither
    folds. test_fast_forward_equals_textbook_eq5[...-bits-lora-0.3-...] checks the folded numbers."""
    calls, folded = [], DoRALinear.lowrank_folded
    monkeypatch.setattr(DoRALinear, "lowrank_folded",
                        lambda self, xa: calls.append(self.dora_dropout) or folded(self, xa))
    x = torch.randn(10, IN)
    for mode in ("lora", "peft"):
        for sampler in ("bits", "torch"):
            do = DoRALinear(make_linear(), R, ALPHA, 0.1, dropout_sampler=sampler, dora_dropout=mode)
            do.train()(x), do.eval()(x)
    assert calls == ["lora"]


# ---- on a CUDA GPU (pytest -m cuda; bench/gpu.py runs these) -------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def adapter_on(device, cls, dropout=0.0):
    from nanopeft.methods.lora import LoRALinear

    torch.manual_seed(0)
    layer = {"lora": LoRALinear, "dora": DoRALinear}[cls](NF4Linear.from_linear(make_linear()), R, ALPHA, dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    return layer.to(device)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("cls", ["lora", "dora"])
def test_cuda_adapter_on_nf4_equals_cpu(cls):
    cpu, gpu = adapter_on("cpu", cls), adapter_on("cuda", cls)
    x = torch.randn(3, 7, IN, requires_grad=True)
    xg = x.detach().cuda().requires_grad_()
    y, yg = cpu(x), gpu(xg)
    assert torch.allclose(yg.cpu(), y, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(y.square().sum(), [x, cpu.lora_A.weight, cpu.lora_B.weight])
    gg = torch.autograd.grad(yg.square().sum(), [xg, gpu.lora_A.weight, gpu.lora_B.weight])
    for a, b in zip(gg, g):
        assert close(a.cpu(), b, tol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("cls,mode", [("lora", None), ("dora", "peft"), ("dora", "lora")])
def test_cuda_adapter_training_pass_makes_no_host_sync(cls, mode):
    """Forward and backward of an adapted NF4 layer in training (bits dropout) never wait on the GPU:
    torch's sync debug mode turns any host sync into an error (DoRA's norm: DENSE_ROWS, not nonzero())."""
    from nanopeft.methods.lora import LoRALinear

    torch.manual_seed(0)
    kw = {"dora_dropout": mode} if mode else {}
    layer = {"lora": LoRALinear, "dora": DoRALinear}[cls](NF4Linear.from_linear(make_linear()), R, ALPHA, 0.1,
                                                           dropout_sampler="bits", **kw).to("cuda").train()
    x = torch.randn(4, 9, IN, device="cuda", requires_grad=True)
    layer(x).square().sum().backward()  # warm-up: kernels compiled, the ‖W0‖² cache filled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("cls", ["lora", "dora"])
def test_cuda_bf16_autocast_is_close_to_fp32_and_keeps_fp32_adapters(cls):
    layer = adapter_on("cuda", cls, dropout=0.0)
    x = torch.randn(4, 9, IN, device="cuda")
    y32 = layer(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = layer(x)
    assert y16.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    assert (y16.float() - y32).abs().max() <= 2e-2 * y32.abs().max()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("cls", ["lora", "dora"])
def test_cuda_fp16_gradscaler_step_moves_only_the_adapter(cls):
    layer = adapter_on("cuda", cls, dropout=0.1).train()
    frozen = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    params = [p for p in layer.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt, scaler = torch.optim.AdamW(params, lr=1e-2), torch.amp.GradScaler("cuda")
    x = torch.randn(8, IN, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = layer(x).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss) and scaler.get_scale() > 0
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(frozen[k], v) for k, v in layer.base_layer.state_dict().items())
