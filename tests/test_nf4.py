"""nanopeft/nf4.py and nf4_linear.py against bitsandbytes (bit for bit) and against the dequantize formula
(docs/NF4.md ("Double quantization"))."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanopeft.nf4 as nf4
from nanopeft.nf4 import NF4Weight, quantize_nf4
from nanopeft.nf4_linear import NF4Linear, nf4_nbytes

from conftest import NF4_DTYPES, NF4_EDGE_CASES, NF4_SHAPES, nf4_edge_case

DTYPES, SHAPES = NF4_DTYPES, NF4_SHAPES


def bnb():
    """bitsandbytes, or skip the calling test when it is not installed."""
    return pytest.importorskip("bitsandbytes")


def formula(w: NF4Weight) -> torch.Tensor:
    """Ŵ_i = NF4[q_i] · c_{i // 64}, with c = DYN[k] · c2 + offset when double-quantized (fp32, then dtype)."""
    p = w.packed.view(-1)
    q = torch.stack([p >> 4, p & 15], 1).view(-1)[: w.numel].long()
    c = w.absmax
    if w.double_quant:
        c = w.nested_quant_map[w.absmax.long()] * w.nested_absmax.repeat_interleave(256)[: c.numel()] + w.offset
    return (w.quant_map[q] * c[torch.arange(w.numel) // w.blocksize]).to(w.dtype).view(w.shape)


def bnb_quant(t, double_quant):
    return bnb().functional.quantize_4bit(t, blocksize=64, compress_statistics=double_quant, quant_type="nf4")


def assert_equals_bnb(t, double_quant=True):
    q, st = bnb_quant(t, double_quant)
    w = quantize_nf4(t, 64, double_quant)
    assert w.packed.shape == q.shape == ((t.numel() + 1) // 2, 1) and w.packed.dtype == torch.uint8
    assert torch.equal(w.packed, q)
    assert torch.equal(w.absmax, st.absmax)  # uint8 codes (double quant) or fp32 absmax
    assert torch.equal(w.quant_map, st.code)
    if double_quant:
        assert torch.equal(w.offset, st.offset)
        assert torch.equal(w.nested_absmax, st.state2.absmax)
        assert torch.equal(w.nested_quant_map, st.state2.code)
    else:
        assert w.offset is None and w.nested_absmax is None
    deq = w.dequantize()
    assert deq.dtype == t.dtype and deq.shape == t.shape
    assert torch.equal(deq, formula(w))
    if t.dim() >= 2 and t.shape[-1] % 16 == 0 and t.shape[-1] % 64:
        return w  # bnb's CPU dequantize is wrong for these shapes; the formula above is the oracle
    if t.shape[-1] % 2:
        return w  # bnb falls back to its torch.compile'd default kernel (the formula), seconds per dtype
    assert torch.equal(deq, bnb().functional.dequantize_4bit(q, st).reshape(t.shape))
    return w


def test_codebooks_equal_bitsandbytes():
    assert torch.equal(torch.tensor(nf4.NF4_CODES), bnb().functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_map(), bnb().functional.create_dynamic_map())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_exact_with_bitsandbytes(shape, dtype, double_quant):
    torch.manual_seed(sum(shape))
    assert_equals_bnb(torch.randn(*shape, dtype=dtype) * 0.02, double_quant)


@pytest.mark.parametrize("chunk,rows", [(64, 300), (192, 300), (1 << 17, 1100)])
def test_chunked_loops_are_exact(monkeypatch, chunk, rows):
    """The CPU loops work in steps of _chunk values: several steps and a short last one change nothing."""
    monkeypatch.setattr(nf4, "_chunk", lambda device, cpu_log2: chunk)
    torch.manual_seed(0)
    for dtype in DTYPES:
        assert_equals_bnb(torch.randn(rows, 128, dtype=dtype), True)  # 600 / 2200 blocks: 3 / 9 nested


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NF4_EDGE_CASES)
def test_edge_cases_equal_bitsandbytes(case, dtype):
    t = nf4_edge_case(case, dtype)  # values exactly on a decision threshold (tie -> lower code), and one ulp off
    for dq in (True, False):
        assert_equals_bnb(t, dq)
    if case == "ties" and dtype == torch.float32:  # the codes themselves: a tie goes to the lower code
        p = quantize_nf4(t).packed.view(-1)
        q = torch.stack([p >> 4, p & 15], 1).view(-1)
        assert q[:15].tolist() == list(range(15)) and q[30:46].tolist() == list(range(16))


def test_packing_layout():
    w = quantize_nf4(torch.tensor([1.0, -1.0, 0.0]))
    assert w.packed.view(-1).tolist() == [0xF0, 0x77]  # first value in the high nibble; odd n padded with 0
    assert quantize_nf4(torch.zeros(64)).packed.view(-1).tolist() == [0x77] * 32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_raise_with_name_and_count(bad):
    t = torch.randn(3, 70)
    t[0, 5] = t[2, 69] = bad  # one in a whole block, one in the ragged tail
    with pytest.raises(ValueError, match=r"layer\.0\.q_proj\.weight: 2 of 210 values are NaN or inf"):
        quantize_nf4(t, name="layer.0.q_proj.weight")
    with pytest.raises(ValueError, match="1 of 5 values"):
        quantize_nf4(torch.tensor([1.0, 2.0, bad, 3.0, 4.0]), name="x")


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="float32"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    huge = torch.full((4, 64), torch.finfo(torch.float32).max / 2)
    with pytest.raises(ValueError, match="mean absmax overflows"):  # bnb returns NaNs
        quantize_nf4(huge)
    assert torch.equal(quantize_nf4(huge, double_quant=False).dequantize(), huge)
    w = quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match="contiguous"):
        w.dequantize(out=torch.empty(8, 64, dtype=torch.bfloat16))


def test_other_blocksizes_equal_bitsandbytes():
    t = torch.randn(40, 70)
    for bs in (32, 128, 4096):
        q, st = bnb().functional.quantize_4bit(t, blocksize=bs, compress_statistics=True, quant_type="nf4")
        w = quantize_nf4(t, bs)
        assert torch.equal(w.packed, q) and torch.equal(w.absmax, st.absmax)
        assert torch.equal(w.dequantize(), formula(w))


def test_dequantize_into_buffer_and_dtypes():
    t = torch.randn(96, 128)
    w = quantize_nf4(t)
    for dtype in DTYPES:
        out = torch.full((96, 128), 7.0, dtype=dtype)
        assert w.dequantize(dtype, out=out) is not None
        assert torch.equal(out, w.dequantize().to(dtype)) and torch.equal(out, formula(w).to(dtype))


@pytest.mark.parametrize("double_quant", [True, False])
def test_rows_dequantize_to_the_same_rows(double_quant):
    """NF4Weight.rows(idx).dequantize() is dequantize()[idx] bit for bit (any order, repeats), and
    NF4Linear.dequantize(rows=...) takes it; a weight whose blocks straddle rows is refused by rows()
    and dequantized whole by NF4Linear."""
    t = torch.randn(300, 192) * 0.02          # 900 blocks: four of the nested blocks of 256, the last ragged
    w = quantize_nf4(t, double_quant=double_quant)
    idx = torch.tensor([299, 0, 7, 7, 150])
    for dtype in DTYPES:
        assert torch.equal(w.rows(idx).dequantize(dtype), w.dequantize(dtype)[idx])
    assert torch.equal(w.rows(idx[:0]).dequantize(), torch.empty(0, 192))
    layer = NF4Linear.from_weight(t, compute_dtype=torch.float32, double_quant=double_quant)
    assert torch.equal(layer.dequantize(rows=idx), layer.dequantize()[idx])
    odd = NF4Linear.from_weight(torch.randn(10, 96), compute_dtype=torch.float32)  # 96 = 1.5 blocks a row
    with pytest.raises(ValueError, match="whole blocks of 64"):
        odd.nf4_weight().rows(idx[:2])
    assert torch.equal(odd.dequantize(rows=torch.tensor([9, 3])), odd.dequantize()[[9, 3]])


def test_roundtrip_error_bound():
    torch.manual_seed(0)
    t = torch.randn(256, 320) * 0.02
    c = t.view(-1, 64).abs().amax(1, keepdim=True)
    half_gap = (torch.tensor(nf4.NF4_CODES).diff().max() / 2).item()  # 0.1385: worst rounding of x / c
    err = (quantize_nf4(t, double_quant=False).dequantize() - t).view(-1, 64).abs()
    assert (err <= c * half_gap * (1 + 1e-6)).all()
    w = quantize_nf4(t)
    c_dq = w.absmax_fp32()[:, None]
    c2 = w.nested_absmax.repeat_interleave(256)[: c.numel(), None]
    assert ((c_dq - c).abs() <= c2 * 0.0071).all()  # the dynamic map's codes are <= 0.014 apart
    err = (w.dequantize() - t).view(-1, 64).abs()
    assert (err <= c * half_gap + (c_dq - c).abs() + 1e-7).all()
    rel_rmse = ((w.dequantize() - t).pow(2).mean().sqrt() / t.std()).item()
    assert 0.05 < rel_rmse < 0.15  # ~0.1 for Gaussian weights


def test_storage_size():
    w = quantize_nf4(torch.randn(512, 512))
    n = 512 * 512
    data = w.packed.numel() + w.absmax.numel() + 4 * w.nested_absmax.numel()
    assert data * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))  # 4.127 bits per value
    assert w.nbytes == data + 4 + 4 * 16 + 4 * 256  # + offset + both maps
    assert quantize_nf4(torch.randn(512, 512), double_quant=False).nbytes * 8 / n == pytest.approx(4.5, abs=1e-2)


# ---------------------------------------------------------------------------- NF4Linear
IN, OUT = 128, 48


def make_bnb4(lin, double_quant=True):
    """bitsandbytes' Linear4bit holding lin's weight; kept in train mode (docs/NF4.md ("bitsandbytes CPU traps"))."""
    q = bnb().nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                          compress_statistics=double_quant, quant_type="nf4", quant_storage=torch.uint8)
    q.weight = bnb().nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=double_quant,
                                 quant_type="nf4")
    q = q.to("cpu").train()
    q.support_avx512bf16_for_cpu = False
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q


def make_linear(dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias).to(dtype)
    with torch.no_grad():
        if bias:
            lin.bias.normal_()
    return lin


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_equals_bitsandbytes(double_quant, bias):
    lin = make_linear(bias=bias)
    theirs = make_bnb4(lin, double_quant).state_dict()
    ours = NF4Linear.from_linear(lin, double_quant=double_quant).state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    meta = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4" and meta["shape"] == [OUT, IN] and meta["dtype"] == "float32"
    assert ("nested_offset" in meta) == double_quant


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_loads_bitsandbytes_state_dict_and_matches_its_forward(double_quant):
    lin = make_linear()
    q = make_bnb4(lin, double_quant)
    layer = NF4Linear(IN, OUT, double_quant=not double_quant)  # the checkpoint's layout wins
    assert layer.load_state_dict(q.state_dict()) is not None
    assert layer.double_quant == double_quant and layer.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
    x = torch.randn(3, 5, IN)
    assert torch.equal(layer(x), q(x))
    assert torch.equal(layer.dequantize(), bnb().functional.dequantize_4bit(q.weight.data, q.weight.quant_state))


def test_loads_a_checkpoint_written_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    bcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32)
    m = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=bcfg, device_map="cpu",
                                                      dtype=torch.float32)
    m.save_pretrained(tmp_path / "nf4")
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    p = "model.layers.0.mlp.down_proj."
    layer = NF4Linear(128, 64, bias=False)
    layer.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
    ref = m.model.layers[0].mlp.down_proj.train()
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), ref(x))
    fp = load_file(tmp_path / "fp" / "model.safetensors")[p + "weight"]
    assert torch.equal(layer.state_dict()["weight"], NF4Linear.from_weight(fp).state_dict()["weight"])


def test_state_dict_roundtrip_and_missing_keys():
    src = NF4Linear.from_linear(make_linear())
    sd = src.state_dict()
    dst = NF4Linear(IN, OUT)
    dst.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v)
    assert dst.state_dict()["weight"].data_ptr() != sd["weight"].data_ptr()  # copied, not aliased
    res = NF4Linear(IN, OUT).load_state_dict({}, strict=False)
    assert sorted(res.missing_keys) == sorted(sd) and res.unexpected_keys == []
    part = {k: v for k, v in sd.items() if k != "weight.nested_absmax"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*weight\.nested_absmax"):
        NF4Linear(IN, OUT).load_state_dict(part)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*weight\.foo"):
        NF4Linear(IN, OUT).load_state_dict(sd | {"weight.foo": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"shape \[48, 128\], this layer is \(128, 48\)"):
        NF4Linear(OUT, IN).load_state_dict(sd)
    model = nn.Sequential(nn.ReLU(), NF4Linear(IN, OUT, double_quant=False))  # nested in a model
    model.load_state_dict({"1." + k: v for k, v in sd.items()})
    assert model[1].double_quant and torch.equal(model[1].dequantize(), src.dequantize())
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "1.weight", "1.weight.absmax"'):
        model.load_state_dict({"1.bias": sd["bias"]})


def test_meta_device_construction_then_load():
    layer = NF4Linear(IN, OUT, device="meta", compute_dtype=torch.bfloat16)
    assert all(t.is_meta for t in [*layer.buffers(), *layer.parameters()])
    src = NF4Linear.from_linear(make_linear())
    layer.load_state_dict(src.state_dict(), assign=True)
    assert not any(t.is_meta for t in [*layer.buffers(), *layer.parameters()])
    x = torch.randn(4, IN)
    assert torch.equal(layer(x), F.linear(x.bfloat16(), src.dequantize(torch.bfloat16), src.bias.bfloat16()))


def test_unloaded_layer_is_zero_and_repr():
    layer = NF4Linear(IN, OUT, bias=False)
    assert torch.equal(layer.dequantize(), torch.zeros(OUT, IN))
    r = repr(NF4Linear(IN, OUT, compute_dtype=torch.bfloat16))
    assert "in_features=128, out_features=48" in r and "blocksize=64" in r and "double_quant=True" in r
    assert "compute_dtype=torch.bfloat16" in r
    assert not isinstance(layer, nn.Linear)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_equals_linear_on_dequantized_weight(compute_dtype):
    lin = make_linear()
    layer = NF4Linear.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(2, 3, IN)
    y = layer(x)
    W = layer.dequantize()
    assert W.dtype == compute_dtype and y.dtype == compute_dtype
    assert torch.equal(y, F.linear(x.to(compute_dtype), W, lin.bias.to(compute_dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast dtype wins over the compute dtype
        ya = layer(x)
    assert ya.dtype == torch.bfloat16
    assert torch.equal(ya, F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), lin.bias.bfloat16()))


def test_input_gradient_and_no_weight_gradient():
    lin = make_linear()
    layer = NF4Linear.from_linear(lin)
    x = torch.randn(4, 6, IN, requires_grad=True)
    g = torch.randn(4, 6, OUT)
    layer(x).backward(g)
    W = layer.dequantize().requires_grad_(True)
    x2 = x.detach().requires_grad_(True)
    F.linear(x2, W, lin.bias).backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert layer.bias.grad is None and not any(b.requires_grad for b in layer.buffers())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == []
    # a trainable bias gets its gradient; the weight never does
    layer.bias.requires_grad_(True)
    layer(x).backward(g)
    assert torch.allclose(layer.bias.grad, g.sum((0, 1)), atol=1e-5)


def test_backward_keeps_only_the_4bit_weight():
    """Backward holds the layer's own 4-bit buffers (on ctx, no copy) and saves no tensor at all:
    no dequantized weight, and nothing that would make checkpointing recompute this product."""
    layer = NF4Linear.from_linear(nn.Linear(512, 256))
    x = torch.randn(8, 512, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved == []
    held = y.grad_fn.w.tensors()                      # what backward will dequantize from
    buffers = dict(layer.named_buffers())
    assert held["packed"].data_ptr() == buffers["weight"].data_ptr()
    assert all(t.data_ptr() == buffers[k].data_ptr() for k, t in held.items() if k != "packed")
    n = 512 * 256
    nbytes = sum(t.numel() * t.element_size() for t in held.values())
    assert n / 2 <= nbytes < 0.53 * n  # the packed codes + statistics + maps: ~4.1 bits per weight
    y.sum().backward()
    assert x.grad is not None


def test_to_dtype_and_device_keep_statistics_exact():
    layer = NF4Linear.from_linear(make_linear(), double_quant=False)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax.dtype == torch.float32 and layer.quant_map.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantize(torch.float32), before)
    layer = NF4Linear.from_linear(make_linear()).half().to("cpu")
    assert layer.offset.dtype == layer.nested_absmax.dtype == torch.float32


def test_nf4_nbytes_and_from_weight_matches_quantize():
    model = nn.Sequential(NF4Linear.from_linear(make_linear()), nn.ReLU(), NF4Linear.from_linear(nn.Linear(48, 64)))
    assert nf4_nbytes(model) == sum(b.numel() * b.element_size() for b in model.buffers())
    w = torch.randn(OUT, IN, dtype=torch.bfloat16)
    layer = NF4Linear.from_weight(w, name="k")
    assert layer.compute_dtype == torch.bfloat16 and layer.weight_dtype == torch.bfloat16 and layer.bias is None
    assert torch.equal(layer.dequantize(), quantize_nf4(w).dequantize())
    bad = torch.zeros(4, 64)
    bad[0, 0] = bad[3, 9] = float("nan")
    with pytest.raises(ValueError, match="k: 2 of 256 values"):
        NF4Linear.from_weight(bad, name="k")


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_plain_and_fast_paths_are_byte_identical(double_quant):
    """nf4.py's plain section (bucketize on the midpoints, a nibble pack, the 8-bit step as a second call)
    and the fenced lookup-table path that quantize_nf4 runs give the same bytes and the same Ŵ."""
    torch.manual_seed(3)
    cases = [torch.randn(*shape, dtype=dtype) * 0.02 for shape in SHAPES for dtype in DTYPES]
    cases += [nf4_edge_case(case, dtype) for case in NF4_EDGE_CASES for dtype in DTYPES]
    cases += [torch.zeros(70), torch.full((130,), 2.0 ** -120), torch.randn(4, 64) * 1e30]  # 0, tiny, huge blocks
    for t in cases:
        for bs in (64, 128):
            fast, plain = quantize_nf4(t, bs, double_quant), nf4.quantize_nf4_plain(t, bs, double_quant)
            for k in NF4Weight.TENSORS:
                a, b = getattr(fast, k), getattr(plain, k)
                assert (a is None and b is None) or torch.equal(a, b), (tuple(t.shape), t.dtype, bs, k)
            want = nf4.dequantize_plain(plain.packed, plain.absmax_fp32(), t.shape, bs, t.dtype)
            assert torch.equal(fast.dequantize(), want)
