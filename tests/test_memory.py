"""nanopeft/training/memory.py: the parts of the memory model that are exact (NF4 bytes, adapter state) and the
ones that must move the right way (batch, checkpointing)."""

import torch
import torch.nn as nn

from nanopeft import PRESETS, DINOv3ViT, NF4Linear, add_adapters
from nanopeft.training.memory import estimate_training_memory, fewest_checkpointed_blocks, nf4_bytes
from nanopeft.nf4_linear import nf4_nbytes


def test_nf4_bytes_is_what_nf4linear_stores():
    for out, n_in in [(64, 128), (96, 320), (8192, 4096), (7, 9)]:
        layer = NF4Linear(n_in, out, bias=False, device="meta")
        assert nf4_bytes(out * n_in) == nf4_nbytes(layer), (out, n_in)


def test_estimate_counts_adapters_exactly_and_grows_with_batch():
    cfg = PRESETS["vitb16"]
    with torch.device("meta"):
        model = DINOv3ViT(cfg)
    n = add_adapters(model, method="lora", rank=16, alpha=32, dropout=0.05, targets="all-linear")
    e1 = estimate_training_memory(model, batch_size=1, image_size=224)
    e4 = estimate_training_memory(model, batch_size=4, image_size=224)
    assert e1.adapters * 1e9 == n * 4 and e1.optimizer == 2 * e1.adapters == 2 * e1.gradients
    linears = sum(m.in_features * m.out_features for nm, m in model.named_modules()
                  if isinstance(m, nn.Linear) and nm.endswith("base_layer"))
    assert e1.nf4_weights * 1e9 == sum(nf4_bytes(m.in_features * m.out_features) for nm, m in model.named_modules()
                                      if isinstance(m, nn.Linear) and nm.endswith("base_layer"))
    assert 0.51 < e1.nf4_weights * 1e9 / linears < 0.52  # ~4.13 bits per weight
    assert e4.activations > 3 * e1.activations and e4.nf4_weights == e1.nf4_weights
    full = estimate_training_memory(model, batch_size=4, image_size=224, grad_checkpointing=False)
    assert full.activations > 3 * e4.activations  # checkpointing keeps one block's set, not twelve
    k = fewest_checkpointed_blocks(model, (e4.total + full.total) / 2, batch_size=4, image_size=224)
    assert 0 < k < cfg.num_hidden_layers
    assert fewest_checkpointed_blocks(model, 0.1, batch_size=4, image_size=224) is None


def test_checkpointed_dora_counts_the_down_projections_kept_z():
    """Each checkpointed DoRA block keeps its down projection's z, (B, N, D) fp32 (DoRALinear.ends_block);
    a block kept whole already counts it."""
    cfg = PRESETS["vitb16"]
    with torch.device("meta"):
        model = DINOv3ViT(cfg)
    add_adapters(model, method="dora", rank=16, alpha=32, dropout=0.05, targets="all-linear")
    kw = dict(batch_size=4, image_size=224)
    est = {k: estimate_training_memory(model, checkpointed_blocks=k, **kw).activations for k in (0, 5)}
    for w in model.modules():
        if getattr(w, "ends_block", False):
            w.ends_block = False
    without = {k: estimate_training_memory(model, checkpointed_blocks=k, **kw).activations for k in (0, 5)}
    z = 4 * (1 + cfg.num_register_tokens + (224 // 16) ** 2) * cfg.hidden_size * 4
    assert est[0] == without[0] and abs((est[5] - without[5]) * 1e9 - 5 * z) < 1


def test_the_papers_7b_setting_fits_a_16gb_gpu_with_room_to_spare():
    """7B, batch 4, 224 px, QLoRA r64 all-linear, NF4, bf16 on one GPU, every block checkpointed: what
    `train.py --dry-run` prints. Weights and trainable state are exact; the total is pinned."""
    from nanopeft.training.build import build_classifier, memory_estimate
    from nanopeft.config import TrainConfig

    cfg = TrainConfig(method="lora", rank=64, targets="all-linear", batch_size=4, image_size=224).resolved()
    model = build_classifier(cfg, 9, torch.device("cpu"), meta=True)
    gpu = torch.device("cuda")
    est = memory_estimate(model, cfg, gpu, torch.bfloat16)
    D, I, L = 4096, 8192, 40
    n = L * (4 * D * D + 3 * D * I)  # q, k, v, o + SwiGLU gate, up, down: 6.71e9 frozen weights
    assert abs(est.nf4_weights * 1e9 - n * (1 / 2 + 1 / 64 + 4 / (64 * 256))) < 1e6  # 4.127 bits a weight
    assert round(est.nf4_weights, 2) == 3.46
    assert est.adapters * 1e9 == 182_982_665 * 4  # the paper's 178,257,920 adapter + 4,724,745 head, fp32
    assert est.optimizer == 2 * est.adapters and est.runtime == 0.0
    assert 7.0 < est.total < 7.6  # 7.28 GB: a 16 GB GPU keeps > 8 GB to spare
    assert est.total < 16 - 0.5 - 8
    no_ckpt = memory_estimate(model, cfg, gpu, torch.bfloat16, checkpointed_blocks=0)
    assert no_ckpt.total > 16  # without checkpointing the paper's setting does not fit: 17.8 GB
