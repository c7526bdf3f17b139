"""Put a fine-tuning method into a model, and take it out again (merge).

    add_adapters(model, method="dora", rank=16, alpha=32, targets="all-linear")
    add_adapters(model, method="ssf")          # or bitfit, layernorm, vpt (prompts=N), adaptformer (rank=r), full

        layer.3.attention.q_proj   nn.Linear or NF4Linear   ─►   DoRALinear(base_layer=<that layer>)
        layer.3.mlp.down_proj      ...                      ─►   ...
        everything else                                     ─►   requires_grad = False

    merge_adapters(model)  ─►  each wrapper becomes a plain layer with W = W0 + s·BA (LoRA) or
                               m·(W0 + s·BA)/‖W0 + s·BA‖_c (DoRA), or SSF's scale and shift folded into the
                               layer it follows: the base model's inference cost. BitFit, LayerNorm tuning
                               and full fine-tuning train the model's own tensors (nothing to merge); VPT's
                               prompts and AdaptFormer's branch stay (they are not linear in the weights).

The unifying study's methods (Mai et al. 2025) live beside LoRA and DoRA in nanopeft/methods/, one file each;
add_adapters dispatches to them (METHOD_ADDERS) and records the method on the model (`nanopeft_method`).

Targets:
  "all-linear"           the Linears (nn.Linear or NF4Linear) inside the transformer blocks, i.e. every
                         module named `...layer.<N>.<...>`: 7 per SwiGLU block (q, k, v, o, gate, up,
                         down), 6 per GELU block; never a head or anything outside the blocks.
  "q_proj" or a list     module-name suffixes, matched at a `.` boundary as PEFT does: "q_proj",
                         ["q_proj", "v_proj"], "attention.o_proj", "layer.0.mlp.up_proj". Every entry
                         must match at least one module, and only Linears.

A model built on the meta device (to count a 7B's parameters without its weights) gets meta adapters:
counting works, forward does not. `init_dora_magnitudes(model)` makes them real once the base weights
are loaded (A, B initialised as at injection if still on meta; every DoRA m recomputed from W0);
a DoRA forward with m still on meta raises. It is explicit rather than lazy at the first forward so
that m exists before an optimizer is built over the parameters.
"""

from __future__ import annotations

import torch.nn as nn

from ..backbones.dinov3 import BLOCK_LAST_LINEAR, in_block
from ..config import ADAPTER_METHODS, DORA_DROPOUT_MODES, TUNED_METHODS
from .adaptformer import AdaptFormerBlock, add_adaptformer
from .bitfit import add_bitfit, bitfit_names
from .dora import DoRALinear
from .layernorm import add_layernorm, layernorm_names
from .lora import LoRALinear, base_device, check_adapter_args, init_lora_pair, is_linear
from .ssf import SSF, add_ssf, ssf_layers
from .vpt import PromptedBlock, add_vpt

ADAPTERS = dict(zip(ADAPTER_METHODS, (LoRALinear, DoRALinear)))  # "lora" -> LoRALinear, "dora" -> DoRALinear


def method_of(model: nn.Module) -> str | None:
    """The method add_adapters put into the backbone (None: none, or LoRA/DoRA/SSF merged away)."""
    return getattr(model, "nanopeft_method", None)


def method_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the backbone's method trains, by parameter name: what its adapter file holds. A wrapper's own
    parameters (LoRA's A and B, DoRA's m, SSF's γ and β, VPT's prompts, AdaptFormer's down and up), or the
    model's own tensors that BitFit (biases), LayerNorm tuning (norms) and full fine-tuning (all) train."""
    method, params = method_of(model), dict(model.named_parameters())
    if method == "full":
        return params
    if method == "bitfit":
        return {n: params[n] for n in bitfit_names(model)}
    if method == "layernorm":
        return {n: params[n] for n in layernorm_names(model)}
    return {f"{name}.{k}": p for name, m in model.named_modules() if isinstance(m, WRAPPERS)
            for k, p in m.named_parameters() if not k.startswith("base_layer.")}


def method_settings(model: nn.Module) -> dict:
    """The add_adapters arguments that rebuild the backbone's method (for its adapter file's config)."""
    blocks = [m for m in model.modules() if isinstance(m, (PromptedBlock, AdaptFormerBlock))]
    if not blocks:
        return {}
    b = blocks[0]
    if isinstance(b, PromptedBlock):
        return {"prompts": b.num_prompts, "dropout": b.prompt_dropout.p}
    return {"rank": b.rank, "adapter_scale": b.scale, "dropout": b.adapter_dropout.p}


def adapter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, wrapper) of every LoRALinear / DoRALinear in the model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """Full module names of the layers `targets` selects (see the module docstring)."""
    modules = dict(model.named_modules())
    if targets == "all-linear":
        names = [n for n, m in modules.items() if in_block(n) and is_linear(m)]
        if not names:
            raise ValueError("targets='all-linear' matched no nn.Linear/NF4Linear inside a transformer block "
                             "(modules named 'layer.<N>.*')")
        return names
    suffixes = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple)) else []
    if not suffixes or not all(isinstance(t, str) and t for t in suffixes):
        raise ValueError(f"targets must be 'all-linear', a module-name suffix or a non-empty list of them, "
                         f"got {targets!r}")
    names = []
    for t in suffixes:
        hits = [n for n in modules if n == t or n.endswith("." + t)]
        if not hits:
            linears = [n for n, m in modules.items() if is_linear(m)]
            raise ValueError(f"target {t!r} matches no module of the model (its Linears are named like "
                             f"{linears[:3]})")
        for n in hits:
            if not is_linear(modules[n]):
                raise ValueError(f"target {t!r} matches {n!r}, a {type(modules[n]).__name__}; adapters wrap "
                                 f"only nn.Linear or NF4Linear")
        names += [n for n in hits if n not in names]
    return [n for n in modules if n in names]  # module order, each once


WRAPPERS = (LoRALinear, DoRALinear, SSF, PromptedBlock, AdaptFormerBlock)  # what a method puts into a model


def add_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every backbone parameter trains (needs a dense base: NF4 weights cannot)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not t.is_floating_point() and not t.is_meta:  # NF4 codes: uint8 buffers
            raise ValueError(f"method='full' trains every weight, but {name} is quantized ({t.dtype}); load the "
                             f"backbone without NF4 (--quant none)")
    return model.requires_grad_(True)


def add_adapters(model: nn.Module, *, method: str = "lora", rank: int | None = None, alpha: float | None = None,
                 dropout: float = 0.0, targets="all-linear", use_rslora: bool = False, dora_dropout: str = "peft",
                 dropout_sampler: str = "torch", prompts: int = 10, adapter_scale: float = 0.1) -> int:
    """Put `method` into the backbone (in place) and freeze everything the method does not train.

    method: "lora" | "dora" (wrap the `targets` Linears; rank and alpha required), "bitfit", "layernorm",
    "ssf", "vpt" (`prompts` tokens per block, prompt dropout `dropout`), "adaptformer" (a `rank`-wide branch
    beside each MLP, scale `adapter_scale`, dropout `dropout`) or "full" (nanopeft/methods/<method>.py).

    dora_dropout: "peft" (PEFT's semantics, the default) or "lora" (dropout on the low-rank path only,
    one frozen pass); see nanopeft/methods/dora.py. dropout_sampler: "torch" (nn.Dropout: PEFT's masks under
    the same seed) or "bits" (the same Bernoulli law, drawn faster; nanopeft/methods/dropout.py BitsDropout).

    Returns the number of trainable parameters, i.e. of the method: for LoRA r·(in + out) per layer, plus
    `out` per layer for DoRA's magnitude (ViT-7B q_proj r=8: 2,621,440 LoRA, 2,785,280 DoRA).
    """
    if method not in TUNED_METHODS:
        raise ValueError(f"method must be one of {TUNED_METHODS}, got {method!r}")
    existing = [(n, m) for n, m in model.named_modules() if isinstance(m, WRAPPERS)]
    if existing or getattr(model, "nanopeft_method", None):
        first = existing[0][0] if existing else model.nanopeft_method
        raise ValueError(f"the model already has adapters ({first!r}); one method at a time is supported "
                         f"(merge_adapters(model) folds LoRA, DoRA and SSF back first)")
    if method in ("ssf", "vpt", "adaptformer") and not hasattr(model, "rope_embeddings"):
        raise ValueError(f"method={method!r} is placed on DINOv3's blocks; on {type(model).__name__} it is not "
                         f"supported yet (lora, dora, bitfit, layernorm and full are)")
    if method not in ADAPTERS:
        adders = {"full": add_full, "bitfit": add_bitfit, "layernorm": add_layernorm, "ssf": add_ssf,
                  "vpt": lambda m: add_vpt(m, prompts, dropout),
                  "adaptformer": lambda m: add_adaptformer(m, rank if rank is not None else 64, adapter_scale, dropout)}
        adders[method](model)
        model.nanopeft_method = method
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank is None or alpha is None:
        raise ValueError(f"method={method!r} needs rank= and alpha=")
    check_adapter_args(rank, alpha, dropout)
    if dora_dropout not in DORA_DROPOUT_MODES:
        raise ValueError(f"dora_dropout must be one of {DORA_DROPOUT_MODES}, got {dora_dropout!r}")
    names = resolve_targets(model, targets)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        extra = {"dora_dropout": dora_dropout} if method == "dora" else {}
        wrapper = ADAPTERS[method](base, rank, alpha, dropout, use_rslora, dropout_sampler, **extra)
        if method == "dora":  # m's gradient tensors kept past checkpointing there (DoRALinear.ends_block)
            wrapper.ends_block = in_block(name) and name.endswith("." + BLOCK_LAST_LINEAR)
        model.set_submodule(name, wrapper.train(base.training))  # an eval model stays in eval (dropout off)
    model.nanopeft_method = method
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def init_dora_magnitudes(model: nn.Module) -> int:
    """After the base weights are loaded into a model whose adapters were built on meta: create the
    adapter tensors still on meta (A kaiming-uniform, B zero, on the base layer's device) and set every
    DoRA magnitude to ‖W0 + s·BA‖_row. Returns the number of DoRA layers initialised."""
    count = 0
    for name, w in adapter_layers(model):
        if any(t.is_meta for t in (*w.base_layer.parameters(), *w.base_layer.buffers())):
            raise RuntimeError(f"{name}: the base layer is still on the meta device; load the checkpoint first")
        if w.lora_A.weight.is_meta or w.lora_B.weight.is_meta:
            device = base_device(w.base_layer)
            w.lora_A.to_empty(device=device)
            w.lora_B.to_empty(device=device)
            init_lora_pair(w.lora_A, w.lora_B)
        if isinstance(w, DoRALinear):
            w.init_magnitude()
            count += 1
    return count


def merge_adapters(model: nn.Module, requantize: bool = False, dtype=None) -> int:
    """Fold every LoRA / DoRA adapter and SSF pair into its base and put a plain layer in the wrapper's place.

    nn.Linear base: an nn.Linear in the base dtype. NF4 base: an nn.Linear in the compute dtype
    (merged output == unmerged output), or NF4Linear again with requantize=True (4× smaller, but the
    merged weight is re-rounded to NF4, so outputs move by about one quantization step).
    dtype: the merged layers' dtype (default the base's; the sum W0 + ΔW is formed in fp32 and rounded
    once into it); run the model under autocast in that dtype, or cast the rest of it too, since a bf16
    Linear refuses fp32 input. Returns the number of layers merged.
    """
    layers = adapter_layers(model)
    for name, w in layers:
        if w.lora_A.weight.is_meta or getattr(w, "lora_magnitude_vector", w.lora_A.weight).is_meta:
            raise RuntimeError(f"{name}: adapter tensors are on the meta device; nothing to merge")
        model.set_submodule(name, w.merged(requantize, dtype).train(w.training))
    ssf = ssf_layers(model)
    for name, w in ssf.items():  # y = γ ⊙ base(x) + β folded: W' = diag(γ) W, b' = γ ⊙ b + β
        merged = w.merged()
        model.set_submodule(name, (merged.to(dtype) if dtype is not None else merged).train(w.training))
    if getattr(model, "nanopeft_method", None) in ("lora", "dora", "ssf"):
        model.nanopeft_method = None  # nothing of the method is left: another may be added
    return len(layers) + len(ssf)
