"""nanopeft.head: the paper's head (counts, init, layout of the notebooks' checkpoint) and Classifier."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanopeft.head import Classifier, make_head
from nanopeft.backbones.dinov3 import pooled_width


def test_paper_parameter_count():
    head = make_head(4096, 9)
    # 4096·1024 + 1024  +  1024·512 + 512  +  512·9 + 9  (the authors' printed count)
    assert sum(p.numel() for p in head.parameters()) == 4_724_745
    assert [tuple(m.weight.shape) for m in head if isinstance(m, nn.Linear)] == [(1024, 4096), (512, 1024), (9, 512)]
    assert all(p.dtype == torch.float32 for p in head.parameters())


def test_dropout_rates_and_order():
    head = make_head(64, 3, dropout=0.4)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (head[2].p, head[5].p) == (0.4, 0.2)                # second dropout is half the first
    assert (make_head(64, 3)[2].p, make_head(64, 3)[5].p) == (0.5, 0.25)   # paper default


def test_kaiming_fan_out_init():
    torch.manual_seed(0)
    head = make_head(4096, 9)
    for m in (head[0], head[3], head[6]):
        assert torch.count_nonzero(m.bias) == 0
        # fan_out = out_features for nn.Linear: std sqrt(2/1024)=0.044, sqrt(2/512)=0.0625, sqrt(2/9)=0.47
        # (fan_in would give 0.022, 0.044, 0.0625: clearly different)
        expected = math.sqrt(2.0 / m.out_features)
        tol = 0.02 if m.weight.numel() > 100_000 else 0.06    # 4,608 samples in the last layer
        assert m.weight.std().item() == pytest.approx(expected, rel=tol)
        assert abs(m.weight.mean().item()) < 0.05 * expected


def test_forward_is_the_mlp_and_loads_notebook_layout():
    torch.manual_seed(0)
    head = make_head(32, 5).eval()
    x = torch.randn(7, 32)
    W = [head[i].weight for i in (0, 3, 6)]
    b = [head[i].bias for i in (0, 3, 6)]
    ref = F.relu(F.relu(x @ W[0].T + b[0]) @ W[1].T + b[1]) @ W[2].T + b[2]   # dropout is off in eval
    torch.testing.assert_close(head(x), ref)
    # The notebooks' head, as rebuilt in their test scripts; `best_classifier.pth` keys are 0./3./6.
    nb = nn.Sequential(nn.Linear(32, 1024), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(1024, 512),
                       nn.ReLU(inplace=True), nn.Dropout(0.25), nn.Linear(512, 5)).eval()
    nb.load_state_dict(head.state_dict())                      # strict: same keys, same shapes
    torch.testing.assert_close(nb(x), head(x))
    # train mode drops activations: the same input gives a different output
    head.train()
    torch.manual_seed(1)
    assert not torch.allclose(head(x), ref)


def test_head_errors():
    with pytest.raises(ValueError, match="num_classes"):
        make_head(64, 0)
    with pytest.raises(ValueError, match="dropout"):
        make_head(64, 3, dropout=1.0)


class _Bf16Backbone(nn.Module):
    """A stand-in with DINOv3ViT's `features` signature that returns bf16, like an autocast backbone."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 8).to(torch.bfloat16)

    def features(self, pixel_values, pool="cls"):
        f = self.proj(pixel_values.flatten(1).to(torch.bfloat16))        # (B, 8)
        return torch.cat([f, -f], dim=-1) if pool == "cls+mean" else f


def test_classifier_casts_features_to_fp32():
    torch.manual_seed(0)
    bb = _Bf16Backbone()
    model = Classifier(bb, make_head(pooled_width(8, "cls+mean"), 4), pool="cls+mean").eval()
    x = torch.randn(3, 3, 2, 2)
    out = model(x)
    assert out.dtype == torch.float32 and out.shape == (3, 4)
    torch.testing.assert_close(out, model.head(bb.features(x, "cls+mean").float()))
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "classifier"}
    with pytest.raises(ValueError, match="pool"):
        Classifier(bb, make_head(8, 4), pool="avg")


@pytest.mark.parametrize("pool", ["cls", "mean", "cls+mean"])
def test_classifier_on_dinov3(pool):
    from nanopeft.backbones.dinov3 import DINOv3ViT
    torch.manual_seed(0)
    bb = DINOv3ViT("tiny").eval()
    D = bb.config.hidden_size
    model = Classifier(bb, make_head(pooled_width(D, pool), 9), pool=pool).eval()
    x = torch.randn(2, 3, 32, 48)
    tokens = bb(x)                                             # (B, 1 + 4 + 2·3, D)
    cls, patches = tokens[:, 0], tokens[:, 5:]                 # registers (1..4) are not pooled
    feat = {"cls": cls, "mean": patches.mean(1), "cls+mean": torch.cat([cls, patches.mean(1)], -1)}[pool]
    torch.testing.assert_close(model(x), model.head(feat))
    # a step trains the head (and only touches what requires grad)
    for p in bb.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)   # the recipe at 10x lr
    y = torch.tensor([1, 7])
    before = F.cross_entropy(model(x), y)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert F.cross_entropy(model(x), y) < before


def test_head_keys_in_files_stay_classifier():
    """The attribute is `.head`, but state dicts (resume.pt, adapter files, the notebooks' checkpoints)
    keep `classifier.*`: old files load, new files equal old ones."""
    from nanopeft.head import file_key

    torch.manual_seed(0)
    model = Classifier(_Bf16Backbone(), make_head(8, 4))
    sd = model.state_dict()
    assert list(sd) == ["backbone.proj.weight", "backbone.proj.bias"] + [
        f"classifier.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]  # the order of old files too
    assert [file_key(n) for n, _ in model.named_parameters()] == list(sd)
    old = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    fresh = Classifier(_Bf16Backbone(), make_head(8, 4))
    assert fresh.load_state_dict(old, strict=True)  # no missing, no unexpected keys
    torch.testing.assert_close(fresh.head[6].weight, old["classifier.6.weight"])
    with pytest.raises(RuntimeError, match="head.0.weight"):  # an old-named key missing is still caught
        fresh.load_state_dict({k: v for k, v in old.items() if k != "classifier.0.weight"}, strict=True)
    outer = nn.ModuleDict({"m": fresh})  # under a prefix as well
    assert "m.classifier.0.weight" in outer.state_dict()
    outer.load_state_dict(outer.state_dict(), strict=True)
