"""The memory model of a QLoRA / QDoRA training step: what `train.py --dry-run` prints, and what
`--grad-checkpointing auto` uses to pick how many blocks to recompute (nanopeft/training/build.py plan_checkpointing).

    peak = NF4 weights + other frozen weights + adapters (fp32) + gradients (fp32) + AdamW m, v (fp32)
         + activations + workspace + runtime

    NF4 weights      per frozen block Linear of n = out·in weights, blocks of 64, nested blocks of 256:
                     n/2 packed bytes + n/64 absmax codes (uint8) + 4·n/(64·256) nested absmax (fp32)
                     + the two code books (docs/NF4.md "Blocks and absmax", "Double quantization")
    other weights    everything else frozen (patch embedding, norms, LayerScale, biases, tokens) in the
                     compute dtype
    activations      with checkpointing: each block's input (B, N, D) kept for recomputation, plus one
                     block's full set while it is recomputed and back-propagated; without it, every
                     block's full set. A block's set, in the compute dtype e (bytes):
                         attention  LN1 in/out, q, k, v, RoPE'd q and k, SDPA out, o_proj out, λ1·o:
                                    10 · B·N·D·e   (+ on CPU the math-path B·H·N² probabilities, fp32)
                         MLP        LN2 out, down out, λ2·down: 3 · B·N·D·e, plus B·N·I·e per hidden
                                    tensor kept (SwiGLU: gate, up, silu(gate), product = 4; GELU: 2)
                         adapters   per adapted Linear: the fp32 dropout output and its bool mask
                                    (B·N·in·5 bytes, only with dropout), A x (B·N·r·4); DoRA also z
                                    (B·N·out·4) and, in "peft" mode with dropout, x̃'s rows through W0
                     the backward of a block holds about as much again in gradients (factor 2). A
                     checkpointed DoRA block also keeps its down projection's z (B·N·D·4: DoRALinear.
                     ends_block), so that this frozen product is not recomputed.
    workspace        NF4Linear's reused dequantize buffer: the largest (out, in) in the compute dtype
    runtime          the framework itself: the CPU process's RSS after `import torch` (≈ 0.35 GB), or
                     a CUDA context (not in torch's allocator counts, so 0 for max_memory_allocated)

All numbers come from shapes (a model built on the meta device is enough). Measured against a CPU
step in bench/memory_7b.py (docs/BENCHMARKS.md "Whole step and inference").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

GB = 1e9
CPU_RUNTIME_BYTES = 0.35e9  # python + torch + its libraries, resident before any tensor exists


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, in GB, by part."""
    nf4_weights: float
    other_weights: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float
    workspace: float
    runtime: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}

    def summary(self) -> str:
        return (f"{self.total:.2f} GB = NF4 weights {self.nf4_weights:.2f} + other weights {self.other_weights:.2f} + "
                f"adapters {self.adapters:.2f} + gradients {self.gradients:.2f} + AdamW {self.optimizer:.2f} + "
                f"activations {self.activations:.2f} + workspace {self.workspace:.2f} + runtime {self.runtime:.2f}")


def nf4_bytes(numel: int, blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> int:
    """Bytes NF4Linear stores for `numel` weights (packed codes + statistics + code books)."""
    blocks = -(-numel // blocksize)
    if double_quant:  # uint8 absmax codes, fp32 nested absmax per 256 blocks, offset, 256-entry fp32 map
        stats = blocks + 4 * -(-blocks // nested_blocksize) + 4 + 256 * 4
    else:
        stats = 4 * blocks
    return (numel + 1) // 2 + stats + 16 * 4  # + the 16-entry NF4 code book


def _is_frozen_block_linear(name: str, m: nn.Module) -> bool:
    from ..nf4_linear import NF4Linear

    return (isinstance(m, (nn.Linear, NF4Linear)) and ".layer." in f".{name}" and "classifier" not in name
            and not getattr(m.weight, "requires_grad", False))  # lora_A / lora_B train: not frozen


def _adapters(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def estimate_training_memory(model: nn.Module, *, batch_size: int, image_size: int, compute_dtype=torch.float32,
                             quantized: bool = True, grad_checkpointing: bool = True,
                             checkpointed_blocks: int | None = None, device: str = "cpu") -> MemoryEstimate:
    """The step's peak memory by part (see the module docstring). `model`: a Classifier or a backbone
    with adapters (meta is fine). checkpointed_blocks: how many blocks recompute (default all when
    grad_checkpointing, none otherwise)."""
    from ..nf4_linear import NF4Linear

    e = torch.empty((), dtype=compute_dtype).element_size()
    frozen_linears = [(n, m) for n, m in model.named_modules() if _is_frozen_block_linear(n, m)]
    counted = {id(m.weight) for _, m in frozen_linears if not isinstance(m, NF4Linear)}
    nf4 = sum(nf4_bytes(m.in_features * m.out_features) for _, m in frozen_linears) if quantized else 0
    dense_linear = 0 if quantized else sum(m.in_features * m.out_features * e for _, m in frozen_linears)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    other = sum(p.numel() for p in model.parameters() if not p.requires_grad and id(p) not in counted) * e
    other += dense_linear
    workspace = max((m.in_features * m.out_features * e for _, m in frozen_linears), default=0) if quantized else 0

    bb = getattr(model, "backbone", model)
    c = bb.config
    N = 1 + c.num_register_tokens + (image_size // c.patch_size) ** 2
    B, D, I, L, H = batch_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads
    hidden = 4 if getattr(c, "use_gated_mlp", False) else 2
    block = (13 * D + hidden * I) * B * N * e
    if device == "cpu":
        block += 2 * B * H * N * N * 4  # SDPA's math path on CPU: scores and probabilities, fp32
    adapters = _adapters(model)
    for w in adapters:
        p = getattr(w.lora_dropout, "p", 0.0)
        per = B * N * w.rank * 4 + (B * N * w.in_features * 5 if p > 0 else 0)
        if hasattr(w, "lora_magnitude_vector"):
            per += B * N * w.out_features * 4
            if p > 0 and getattr(w, "dora_dropout", "peft") == "peft":
                per += B * N * (w.in_features + w.out_features) * e
        block += per / L  # spread over the blocks (adapters live inside them)
    tail = sum(B * N * w.out_features * 4 for w in adapters if getattr(w, "ends_block", False)) / L
    k = (L if grad_checkpointing else 0) if checkpointed_blocks is None else checkpointed_blocks
    kept = k * (B * N * D * e + tail) + (L - k) * block  # checkpointed inputs (+ DoRA's z) + blocks kept whole
    acts = kept + 2 * block                             # + one block recomputed, and its gradients
    acts += B * 3 * image_size ** 2 * 4                 # the input batch, fp32
    return MemoryEstimate(nf4_weights=nf4 / GB, other_weights=other / GB, adapters=trainable * 4 / GB,
                          gradients=trainable * 4 / GB, optimizer=trainable * 8 / GB, activations=acts / GB,
                          workspace=workspace / GB, runtime=(CPU_RUNTIME_BYTES if device == "cpu" else 0) / GB)


def fewest_checkpointed_blocks(model: nn.Module, budget_gb: float, **kw) -> int | None:
    """The smallest number of recomputed blocks whose estimated peak fits `budget_gb` (None: even
    checkpointing every block does not fit). What `--grad-checkpointing auto` uses."""
    L = getattr(model, "backbone", model).config.num_hidden_layers
    for k in range(L + 1):
        if estimate_training_memory(model, checkpointed_blocks=k, **kw).total <= budget_gb:
            return k
    return None

