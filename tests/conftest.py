"""Shared fixtures: tiny DINOv3 checkpoints written by transformers itself (nothing comes from a hub)."""

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_hf_model(gated: bool = True, registers: int = 4, seed: int = 0, **overrides):
    """A random tiny transformers DINOv3ViTModel with every tensor non-trivial (dinov3.md §6).

    gated=True has the 7B's structure (SwiGLU, no q/k/v bias); gated=False the S/B/L one (GELU MLP,
    q and v biases). in_features are multiples of 64, so bitsandbytes' CPU kernels are valid oracles.
    """
    transformers = pytest.importorskip("transformers")
    kw = dict(patch_size=16, image_size=64, num_channels=3, hidden_size=64, num_attention_heads=4,
              intermediate_size=128, num_hidden_layers=2, num_register_tokens=registers,
              layerscale_value=1e-5, layer_norm_eps=1e-5, rope_theta=100.0)
    if gated:
        kw.update(use_gated_mlp=True, hidden_act="silu", query_bias=False, key_bias=False,
                  value_bias=False, proj_bias=True, mlp_bias=True)
    else:
        kw.update(use_gated_mlp=False, hidden_act="gelu", query_bias=True, value_bias=True)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**kw)).eval()
    with torch.no_grad():  # LayerScale 1e-5 and zero biases would hide bugs
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "lambda1" in name else 0.05)
            if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.add_(1.0)
    return model


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Factory: tiny_ckpt(gated=True, sharded=False, dtype=torch.float32, registers=4) -> (dir, hf_model)."""
    cache = {}

    def build(gated=True, sharded=False, dtype=torch.float32, registers=4):
        key = (gated, sharded, dtype, registers)
        if key not in cache:
            model = make_hf_model(gated=gated, registers=registers)
            out = tmp_path_factory.mktemp(f"tiny-{'swiglu' if gated else 'gelu'}-{registers}r")
            kw = {"max_shard_size": "40KB"} if sharded else {}
            model.to(dtype).save_pretrained(out, **kw)
            cache[key] = (out, model)
        return cache[key]

    return build


# ---- perf helpers (single-layer adapter parity: tests/test_lora.py, tests/test_dora.py) ----------------

ADAPTER_IN, ADAPTER_OUT, ADAPTER_R, ADAPTER_ALPHA = 128, 64, 4, 8  # in % 64 == 0: bitsandbytes' CPU
# dequantize is right for it (docs/NF4.md "bitsandbytes CPU traps")


class OneLinear(torch.nn.Module):
    """PEFT adapts any nn.Module with nn.Linear children: one Linear named `lin`."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def make_linear(dtype=torch.float32, bias=True, seed=0, n_in=ADAPTER_IN, n_out=ADAPTER_OUT):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def make_bnb4(lin):
    """bitsandbytes' NF4 Linear4bit (double quant) holding lin's weight, to be used in train mode
    (its CPU eval path repacks the weight: docs/NF4.md "bitsandbytes CPU traps"). Skips without bnb."""
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=lin.weight.dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4")
    q = q.to("cpu")
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q


def peft_layer(base, *, dora=False, dropout=0.0, rslora=False, r=ADAPTER_R, alpha=ADAPTER_ALPHA):
    """PEFT's adapter on a copy of `base`, with init_lora_weights=False so that B != 0. Skips without PEFT."""
    import copy

    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin"], use_dora=dora, lora_dropout=dropout,
                          use_rslora=rslora, init_lora_weights=False)
    pm = peft.get_peft_model(OneLinear(copy.deepcopy(base)), cfg)
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


def assert_outputs_and_grads_equal(ref, ours, x, theirs, mine, atol=1e-6):
    """Eval and train mode (the same seed, so the same dropout mask when both draw it the same way):
    outputs, and gradients of x and of the given tensors."""
    for training in (False, True):
        ref.train(training), ours.train(training)
        torch.manual_seed(123)
        y_ref = ref(x)
        torch.manual_seed(123)
        y = ours(x)
        assert torch.allclose(y, y_ref, atol=atol, rtol=0), (y - y_ref).abs().max()
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x] + theirs)
        g = torch.autograd.grad(y.square().sum(), [x] + mine)
        for a, b in zip(g, g_ref):
            assert close(a, b), (a - b).abs().max()


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); bench/gpu.py runs them")
