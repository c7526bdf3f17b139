"""Shared fixtures: tiny DINOv3 checkpoints written by transformers itself (nothing comes from a hub)."""

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
# The suite never depends on the CPU it runs on: the native-bf16 probe reads as "no" here (subprocesses
# inherit it), and the tests of the other branch force "1" themselves (monkeypatch.setenv).
os.environ["NANOPEFT_CPU_BF16"] = "0"


def make_hf_model(gated: bool = True, registers: int = 4, seed: int = 0, **overrides):
    """A random tiny transformers DINOv3ViTModel with every tensor non-trivial (docs/DINOV3.md
    ("Parity with transformers")).

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


# ---- structure helpers
# Shared by test_inject.py and test_save.py: the same input and the same PEFT reference model.
# Each fixture hands out the value or the function; a test that asks for one skips only itself when
# the reference library it calls is missing.

PIXELS = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))  # 4 × 6 patches of 16


def make_bnb_config():
    """transformers' 4-bit config equal to our NF4 (double quantization, fp32 compute)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)


def make_peft_model(ckpt, method, targets, nf4=False, dropout=0.0, r=4, alpha=8, **config):
    """PEFT on transformers' DINOv3ViTModel (bnb 4-bit for nf4) with B != 0 and perturbed magnitudes."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    kw = dict(quantization_config=make_bnb_config(), device_map="cpu") if nf4 else {}
    hf = transformers.DINOv3ViTModel.from_pretrained(ckpt, **kw, **config)
    for m in hf.modules():  # bnb's CPU eval path repacks the weight into another layout (docs/NF4.md
        if hasattr(m, "support_avx512bf16_for_cpu"):  # ("bitsandbytes CPU traps")): keep the plain one
            m.support_avx512bf16_for_cpu = False
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj"] if targets == "q_proj" else targets,
                          use_dora=method == "dora", lora_dropout=dropout, init_lora_weights=False)
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    return pm


@pytest.fixture
def hf_model():
    """Factory: hf_model(gated=True, registers=4, seed=0, **config) -> make_hf_model's transformers model
    (skips without transformers)."""
    return make_hf_model


@pytest.fixture
def pixels():
    """(2, 3, 64, 96) fixed random images."""
    return PIXELS.clone()


@pytest.fixture
def bnb_config():
    """Factory: bnb_config() -> transformers.BitsAndBytesConfig (skips without transformers / bitsandbytes)."""
    return make_bnb_config


@pytest.fixture
def peft_model():
    """Factory: peft_model(ckpt, method, targets, nf4=False, dropout=0.0, r=4, alpha=8, **hf_config)
    -> a PEFT model with non-zero B and perturbed DoRA magnitudes (skips without transformers / peft)."""
    return make_peft_model
# ---- kernels helpers
# The NF4 case list that the torch-ops path (test_nf4.py) and the kernels (test_nf4_cuda.py) are both
# checked on: numel not a multiple of 64 / 256 blocks, odd numel, 1-D, 3-D, and last dims that hit bnb's
# CPU dequantize bug (shape[-1] % 16 == 0 but % 64 != 0, docs/NF4.md ("bitsandbytes CPU traps")).
NF4_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NF4_SHAPES = [(128, 64), (3, 100), (7, 33), (1, 65), (5,), (1,), (2,), (63,), (2, 3, 50), (3, 96), (4, 32),
              (300, 257), (17, 64)]
NF4_EDGE_CASES = ["ties", "scaled ties", "zero blocks", "zero tail", "tiny", "huge"]


def nf4_edge_rows() -> torch.Tensor:
    """(2, 64): the 15 decision thresholds and the 16 codes, ± and one ulp either side, then zeros."""
    from nanopeft.nf4 import NF4_CODES, lookup_tables
    mid, code = lookup_tables(torch.device("cpu")).mid, torch.tensor(NF4_CODES)
    up, down = torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))
    row = torch.cat([mid, -mid, code, up, down, -up, -down, torch.tensor([1.0])])  # 107 values
    return torch.cat([row, torch.zeros(128 - row.numel())]).view(2, 64)


def nf4_edge_case(case: str, dtype: torch.dtype) -> torch.Tensor:
    """One of NF4_EDGE_CASES in `dtype`: ties on the thresholds, all-zero blocks, denormal or huge scales."""
    torch.manual_seed(1)
    rows = nf4_edge_rows()
    t = {"ties": torch.cat([rows, -rows]),
         "scaled ties": torch.cat([rows * 3.7, rows * 0.013]),
         "zero blocks": torch.cat([torch.randn(64), torch.zeros(128), torch.randn(30)]),
         "zero tail": torch.cat([torch.randn(128), torch.zeros(10)]),   # stored absmax = 1e-38, not 0
         "tiny": torch.cat([torch.randn(64) * s for s in (1e-36, 1e-40, 3e-35, 1e-30)] + [torch.full((64,), 1e-45)]),
         "huge": (torch.rand(5, 64) * 2 - 1) * torch.finfo(dtype).max / 20}[case]
    return t.to(dtype)
# ---- reliability helpers
# The fault table (docs/RELIABILITY.md) is data: tests/reliability_cases.json, one row per fault or bad
# input with the outcome promised. A test that takes the argument `reliability_case` runs once per row whose
# "test" names it ("test_file.py::test_name") and asserts that row's outcome; tests/test_reliability.py
# renders the rows to docs/RELIABILITY.md and checks that every row has such a test.
import json  # noqa: E402
from pathlib import Path  # noqa: E402

RELIABILITY_CASES = Path(__file__).parent / "reliability_cases.json"


def pytest_generate_tests(metafunc):
    if "reliability_case" in metafunc.fixturenames:
        me = f"{Path(str(metafunc.definition.fspath)).name}::{metafunc.definition.originalname}"
        rows = [r for r in json.loads(RELIABILITY_CASES.read_text()) if r["test"] == me]
        metafunc.parametrize("reliability_case", rows, ids=[r["id"] for r in rows])


@pytest.fixture(scope="session")
def own_tiny_ckpt(tmp_path_factory):
    """Factory: own_tiny_ckpt(sharded=False) -> folder with config.json + model.safetensors (or three
    shards and model.safetensors.index.json) of nanopeft's own tiny DINOv3 with seeded random weights.
    Needs no transformers: for the tests of what a damaged checkpoint does."""
    from safetensors.torch import save_file

    from nanopeft.config import PRESETS
    from nanopeft.backbones.dinov3 import DINOv3ViT

    cache = {}

    def build(sharded=False):
        if sharded not in cache:
            torch.manual_seed(0)
            cfg = PRESETS["tiny"]
            sd = {k: torch.randn(v.shape) * 0.05 for k, v in DINOv3ViT(cfg).state_dict().items()}
            out = tmp_path_factory.mktemp("own-tiny-sharded" if sharded else "own-tiny")
            (out / "config.json").write_text(json.dumps(cfg.to_dict()))
            if not sharded:
                save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
            else:
                keys, weight_map = sorted(sd), {}
                for i in range(3):
                    name = f"model-{i + 1:05d}-of-00003.safetensors"
                    part = {k: sd[k] for k in keys[i::3]}
                    save_file(part, out / name, metadata={"format": "pt"})
                    weight_map |= {k: name for k in part}
                (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
            cache[sharded] = out
        return cache[sharded]

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
# ---- deploy helpers
TINY_TRAIN = ["--image-size", "32", "--batch-size", "8", "--grad-accum", "1", "--workers", "0", "--lr", "1e-3",
              "--rank", "4", "--epochs", "1", "--patience", "5"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_ckpt):
    """Factory: tiny_run(method="lora") -> a run folder train.py wrote on a generated 3-class folder (one
    epoch, 32 px, the tiny SwiGLU checkpoint), shared by the eval / predict / export tests."""
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("deploy")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train
    from nanopeft.data.folders import make_demo_dataset

    data = make_demo_dataset(root / "train", num_classes=3, per_class=8, size=(40, 32), seed=0)
    cache = {}

    def build(method="lora"):
        if method not in cache:
            extra = ["--targets", "all-linear"] if method in ("lora", "dora") else []
            train.main(["--out", str(root / method), "--method", method, "--weights", str(tiny_ckpt()[0]),
                        "--data", str(data), *TINY_TRAIN, *extra])
            cache[method] = root / method
        return cache[method]

    return build


# ---- relB helpers
@pytest.fixture(scope="session")
def train_images(tmp_path_factory):
    """A generated 3-class image folder (12 images of 40×32 a class) for the train.py end-to-end tests."""
    from nanopeft.data.folders import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("data") / "train", num_classes=3, per_class=12,
                             size=(40, 32), seed=0)
