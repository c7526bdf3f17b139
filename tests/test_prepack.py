"""nanopeft/inference/prepack.py: oneDNN-prepacked Linears give nn.Linear's outputs, and pack only where they may."""

import pytest
import torch
import torch.nn as nn

from nanopeft.inference.prepack import PackedLinear, prepack_available, prepack_for_inference, prepack_linears

needs_onednn = pytest.mark.skipif(not prepack_available(), reason="this torch build has no oneDNN linear ops")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, hint", [((5, 24), 5), ((2, 7, 24), 1), ((3, 24), 4096)])
def test_packed_linear_matches_nn_linear(bias, shape, hint):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = lin(x)
        got = PackedLinear(lin, hint)(x)  # a hint unlike the real row count is still exact
    assert got.shape == want.shape == (*shape[:-1], 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_linear_refuses_a_graph():
    lin = PackedLinear(nn.Linear(8, 4), 2)
    with pytest.raises(RuntimeError, match="inference-only"):
        lin(torch.randn(2, 8, requires_grad=True))


def classifier(own_tiny_ckpt, merged=True, requantize=False):
    from nanopeft import add_adapters, load_dinov3, merge_adapters
    from nanopeft.head import Classifier, make_head

    torch.manual_seed(0)
    backbone = load_dinov3(own_tiny_ckpt(), quantize="nf4")
    add_adapters(backbone, method="lora", targets="all-linear", rank=4, alpha=8)
    for name, p in backbone.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained-looking adapter: B = 0 would merge to the base alone
    if merged:
        merge_adapters(backbone, requantize=requantize)
    return Classifier(backbone, make_head(backbone.feature_dim(), 3)).eval()


@needs_onednn
def test_prepacked_classifier_gives_the_merged_logits(own_tiny_ckpt):
    model = classifier(own_tiny_ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = model(x)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model, 2 * 4) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_prepack_leaves_nf4_bf16_and_unmerged_layers_alone(own_tiny_ckpt):
    from nanopeft.nf4_linear import NF4Linear

    model = classifier(own_tiny_ckpt, requantize=True)  # blocks are NF4Linear again; only the head is dense
    nf4 = sum(isinstance(m, NF4Linear) for m in model.modules())
    head = sum(type(m) is nn.Linear for m in model.modules())
    assert prepack_linears(model, 8) == head and sum(isinstance(m, NF4Linear) for m in model.modules()) == nf4 > 0
    assert prepack_linears(nn.Sequential(nn.Linear(4, 4).bfloat16()), 8) == 0
    cpu = torch.device("cpu")
    unmerged = classifier(own_tiny_ckpt, merged=False)
    assert prepack_for_inference(unmerged, cpu, None, 2, 32) == "CPU weight prepacking: not used (adapters unmerged)"
    assert not any(isinstance(m, PackedLinear) for m in unmerged.modules())


def test_prepack_for_inference_says_what_it_did(own_tiny_ckpt):
    cpu = torch.device("cpu")
    model = classifier(own_tiny_ckpt)
    assert prepack_for_inference(model, cpu, None, 2, 32, enabled=False) == "CPU weight prepacking: off (--prepack no)"
    assert "not used (cpu, autocast)" in prepack_for_inference(model, cpu, torch.bfloat16, 2, 32)
    assert "not used (cuda)" in prepack_for_inference(model, torch.device("cuda"), None, 2, 32)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert "not used at batch 2" in prepack_for_inference(model, cpu, None, 2, 32)  # it pays at batch 1 only
    line = prepack_for_inference(model, cpu, None, 1, 32)
    if prepack_available():
        n = sum(isinstance(m, PackedLinear) for m in model.modules())
        assert line.startswith(f"CPU weight prepacking: {n} Linear layers reordered") and n > 0
    else:
        assert "not available" in line
