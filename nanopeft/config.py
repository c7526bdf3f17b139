"""Architecture config for DINOv3 ViTs, and the presets of every released size.

The field names are those of the hub's `config.json` (transformers' `DINOv3ViTConfig`), so a config
file reads straight into `ViTConfig.from_dict` and unknown keys (`architectures`, `stage_names`, ...)
are ignored. Values: the hub configs of facebook/dinov3-*-pretrain-lvd1689m (docs/DINOV3.md
("Released sizes")).

The names the rest of the code chooses between (training methods, pooling, precisions) are defined here
once; every file imports them from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field

ADAPTER_METHODS = ("lora", "dora")                 # a frozen DINOv3 + low-rank adapters on --targets + the head
STUDY_METHODS = ("bitfit", "layernorm", "ssf", "vpt", "adaptformer")  # the unifying study's (nanopeft/methods/)
TUNED_METHODS = (*ADAPTER_METHODS, *STUDY_METHODS, "full")  # the backbone's function changes: kept weights saved
PROBE_METHODS = ("linear-probe", "knn")            # fitted on cached features, no training loop (probes.py)
FROZEN_METHODS = ("frozen", *PROBE_METHODS)         # the backbone never changes: its features can be cached
DINO_METHODS = (*TUNED_METHODS, *FROZEN_METHODS)    # every method on the DINOv3 backbone
SCRATCH_METHODS = ("resnet18", "vit-small")        # the paper's randomly initialised baselines (scratch.py)
METHODS = (*DINO_METHODS, *SCRATCH_METHODS)
POOLS = ("cls", "mean", "cls+mean")                # the feature the head reads (DINOv3ViT.features)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ROPE_FROM_CONFIG = "config"                        # --rope-*: keep the backbone config.json's value


@dataclass
class ViTConfig:
    hidden_size: int = 4096           # D
    num_hidden_layers: int = 40       # blocks
    num_attention_heads: int = 32     # H; head_dim = D / H must be divisible by 4 (2-D RoPE)
    intermediate_size: int = 8192     # I: MLP width (SwiGLU: gate/up are D->I)
    num_register_tokens: int = 4      # "storage tokens" between CLS and the patches (may be 0)
    patch_size: int = 16
    num_channels: int = 3
    image_size: int = 224             # only a default: RoPE is recomputed for every input size
    use_gated_mlp: bool = True        # SwiGLU (7B, S+, H+) vs GELU MLP (S, B, L)
    hidden_act: str = "silu"          # "silu" with the gated MLP, "gelu" (exact erf) without
    query_bias: bool = False          # per-projection biases: 7B has none on q/k/v ...
    key_bias: bool = False
    value_bias: bool = False
    proj_bias: bool = True            # ... and one on o_proj
    mlp_bias: bool = True
    layer_norm_eps: float = 1e-5
    layerscale_value: float = 1.0     # init only; every checkpoint overrides it
    rope_theta: float = 100.0         # RoPE periods 100^(4i/head_dim)
    # Train-time RoPE coordinate augmentation (DINOv3 pre-training). The hub configs ship
    # rescale=2.0, which makes every train-mode forward see randomly rescaled patch coordinates.
    # None switches a knob off; eval mode never applies any of them.
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = 2.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    dtype: str | None = None          # dtype of the checkpoint's tensors ("float32", "bfloat16", ...)
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for saving

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for 2-D RoPE")
        if self.hidden_act not in ("silu", "gelu", "swish"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (silu or gelu)")
        if self.num_register_tokens < 0:
            raise ValueError("num_register_tokens must be >= 0")

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        """Build from a `config.json` dict; accepts `dtype` or the older `torch_dtype`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("dtype") is None and d.get("torch_dtype") is not None:
            kwargs["dtype"] = d["torch_dtype"]
        extra = {k: v for k, v in d.items() if k not in names and k != "torch_dtype"}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        """The `config.json` form (what transformers writes, minus bookkeeping keys)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {"model_type": "dinov3_vit", "architectures": ["DINOv3ViTModel"], **d}

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


def _small(**kw) -> ViTConfig:
    # S/B/L/H+ share the pattern: q and v biases (all zeros in the release), no k bias.
    base = dict(query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True)
    return ViTConfig(**{**base, **kw})


# Every released DINOv3 ViT (facebook/dinov3-<name>-pretrain-lvd1689m), plus a tiny one for tests
# with the 7B's structure (SwiGLU, 4 registers, no q/k/v bias). Parameter counts in docs/DINOV3.md
# ("Released sizes").
PRESETS: dict[str, ViTConfig] = {
    "vits16": _small(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                     intermediate_size=1536, use_gated_mlp=False, hidden_act="gelu"),
    "vits16plus": _small(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                         intermediate_size=1536, use_gated_mlp=True, hidden_act="silu"),
    "vitb16": _small(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, use_gated_mlp=False, hidden_act="gelu"),
    "vitl16": _small(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     intermediate_size=4096, use_gated_mlp=False, hidden_act="gelu"),
    "vith16plus": _small(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                         intermediate_size=5120, use_gated_mlp=True, hidden_act="silu"),
    "vit7b16": ViTConfig(),  # the dataclass defaults are the 7B
    "tiny": ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, image_size=64),
}


def resolve_config(config, cls=None, presets=None, family: str = "DINOv3"):
    """A config object, a preset name (a copy of it), or a `config.json`-style dict -> the config object.
    Defaults: DINOv3's `ViTConfig` and PRESETS; DINOv2 passes its own (backbones/dinov2.py)."""
    cls, presets = cls or ViTConfig, PRESETS if presets is None else presets
    if isinstance(config, cls):
        return config
    if isinstance(config, str):
        if config not in presets:
            raise ValueError(f"unknown {family} preset {config!r}; choose one of {sorted(presets)}")
        return dataclasses.replace(presets[config])
    if isinstance(config, dict):
        return cls.from_dict(config)
    raise TypeError(f"config must be a {cls.__name__}, a preset name or a dict, not {type(config).__name__}")


# ------------------------------------------------------------------------------------------------
# Training config: the defaults are the paper's recipe (Yang et al. 2026, arXiv:2603.17782; docs/RECIPE.md
# ("The recipe")), read from the authors' notebooks, with their two bugs fixed (one normalisation for
# train and test; warmup really applied: docs/RECIPE.md ("Fixes to the recipe")).
# train.py's command line is generated from these fields, so flags and config cannot drift apart.
# ------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    # what to train
    method: str = "lora"              # lora (QLoRA with the NF4 base) | dora | full | bitfit | layernorm | ssf | vpt | adaptformer | frozen | linear-probe | knn | resnet18 | vit-small
    targets: str | list[str] = "all-linear"  # q_proj | all-linear | comma list of module-name suffixes
    rank: int = 64                    # the paper's best row: all-linear r64
    alpha: float | None = None        # None: 2·rank, as in every run of the paper
    dropout: float | None = None      # None: 0.1 at rank <= 8, 0.05 above (the notebooks' rule)
    use_rslora: bool = False          # scale α/√r instead of α/r
    prompts: int = 10                 # --method vpt: learned tokens per block (deep VPT)
    adapter_scale: float = 0.1        # --method adaptformer: the fixed scale s of the parallel branch (its width is --rank)
    quant: str = "nf4"                # nf4 | none: the frozen DINOv3 base (QLoRA/QDoRA as in the paper)
    pool: str = "cls"                 # cls (the paper: pooler_output) | mean | cls+mean
    head_dropout: float = 0.5         # first head dropout; the second is half of it
    knn_k: int = 20                   # --method knn: neighbours that vote (DINO's k-NN evaluation)
    knn_temperature: float = 0.07     # --method knn: a neighbour's vote is exp(cosine / T)
    # data
    weights: str = "weights/dinov3-vit7b16"  # any load_dinov3 path
    data: str = "data"                # image-folder tree (one sub-folder per class) or CSV manifest
    task: str = "single"              # single | multilabel: a CSV manifest path,labels (';'-separated, empty = none), sigmoid outputs
    val_fraction: float = 0.2         # stratified split of the training pool: 2,700 -> 2,160 / 540
    split_seed: int = 42
    image_size: int = 224
    multiplier: int = 3               # each epoch: every image once clean + (multiplier-1) augmented
    augment: str = "medium"           # none | light | medium | heavy
    skip_bad: bool = False            # skip unreadable images instead of stopping before training
    workers: int = 4                  # DataLoader worker processes
    # optimisation
    epochs: int = 80
    batch_size: int = 4               # micro-batch (global across processes under torchrun)
    grad_accum: int = 8               # effective batch 32
    lr: float = 1e-4
    min_lr_ratio: float = 0.1         # cosine decays to 0.1 × lr
    warmup_ratio: float = 0.03        # of all optimizer steps; linear from 0 (the notebooks never applied it)
    weight_decay: float = 0.01        # AdamW, one group: adapters, DoRA magnitudes, head (as the paper)
    label_smoothing: float = 0.1
    grad_clip: float = 0.0            # 0 = off (the paper did not clip)
    patience: int = 5                 # early stopping: epochs without improvement of --select-metric
    min_delta: float = 1e-4
    rope_rescale: str | float | None = "config"  # train-time RoPE coordinate augmentation: config (config.json: 2.0 on the hub) | none | a float
    rope_shift: str | float | None = "config"
    rope_jitter: str | float | None = "config"
    eval_batch_size: int = 16
    max_steps: int = 0                # stop after this many optimizer steps (0 = no limit); resumable
    # run
    seed: int = 42
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    out: str = ""                     # run folder; "" = runs/<preset-or-method>-<time>
    preset: str = ""                  # one of the paper's rows (PAPER_RUNS); flags given explicitly win
    num_classes: int = 0              # 0 = from the data (--dry-run without data: 9)
    # reliability
    ckpt_every: int = 0               # also write resume.pt every N optimizer steps (0 = at each epoch end only)
    # reporting and selection
    select_metric: str = "val_accuracy"  # keeps the best adapter and drives early stopping: val_accuracy (the paper) | val_macro_f1 | val_loss (lower is better)
    class_weights: str = "none"       # none | balanced: cross-entropy weights n/(C·n_c) for imbalanced training folders
    sampler: str = "uniform"          # uniform (each image once per epoch) | balanced (classes drawn equally often, with replacement)
    # performance (nanopeft/device.py, nanopeft/training/memory.py; docs/BENCHMARKS.md ("Whole step and inference"))
    precision: str = "auto"           # auto: bf16 autocast on GPUs with bf16 (else fp16 + GradScaler) and on CPUs with AVX512-BF16/AMX, else fp32
    grad_checkpointing: str = "all"   # all | none | auto: recompute blocks in backward; auto: the fewest that fit --memory-budget
    memory_budget: float = 0.0        # GB for --grad-checkpointing auto; 0 = the GPU's free memory (CPU: available RAM)
    dora_dropout: str = "peft"        # peft (the study's semantics) | lora (dropout on the low-rank path only, one frozen pass)
    cache_features: str = "yes"       # yes | no: frozen-backbone methods compute each view's features once (nanopeft/training/features.py)
    cache_views: int = 0              # views per training image in the cache: the clean one + K-1 augmented (0: --multiplier)
    cache_dtype: str = "fp32"         # fp32 | fp16: how the cache stores the features
    dropout_sampler: str = "bits"     # bits (exact Bernoulli masks from raw random numbers; the mask op is cheaper) | torch (nn.Dropout: PEFT's masks seed for seed)

    def resolved(self) -> "TrainConfig":
        """Check every choice and turn the text of flags and config.json into the values the code uses,
        once: alpha and dropout filled in, `targets` -> "q_proj" | "all-linear" | [suffix, ...], each
        `rope_*` -> a float, None (off) or ROPE_FROM_CONFIG. Idempotent: resolving a resolved config (or
        one read back from a run's config.json, old or new) changes nothing."""
        c = dataclasses.replace(self)
        if str(c.method).lower() in ("qlora", "qdora"):
            raise ValueError(f"--method {c.method}: QLoRA is --method lora on the NF4 base (--quant nf4, the "
                             f"default), and DoRA on it (QDoRA) is --method dora")
        checks = {"method": METHODS, "quant": ("nf4", "none"), "pool": POOLS,
                  "augment": ("none", "light", "medium", "heavy"), "precision": PRECISIONS}
        checks.update(REPORTING_CHOICES)
        for name, choices in checks.items():
            if getattr(c, name) not in choices:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {choices}, got {getattr(c, name)!r}")
        for name in ("rank", "epochs", "batch_size", "grad_accum", "multiplier", "image_size", "eval_batch_size"):
            if getattr(c, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
        _resolve_performance(c)
        if c.method in PROBE_METHODS:  # a probe fits once, unweighted, on every training image's cached features
            for name, off in (("cache_features", "yes"), ("class_weights", "none"), ("sampler", "uniform")):
                if getattr(c, name) != off:
                    raise ValueError(f"--{name.replace('_', '-')} {getattr(c, name)}: --method {c.method} fits on the "
                                     f"cached features of every training image once, unweighted; leave it at {off}")
        if c.task not in ("single", "multilabel"):
            raise ValueError(f"--task must be one of ('single', 'multilabel'), got {c.task!r}")
        if c.task == "multilabel":  # what has no multi-label meaning is refused (docs/RECIPE.md "Multi-label")
            if c.sampler == "balanced":
                raise ValueError("--sampler balanced draws classes equally often, which a multi-label image has several "
                                 "of: use --class-weights balanced (BCE positive weights) with --task multilabel")
            if c.method in PROBE_METHODS:
                raise ValueError(f"--method {c.method} fits a single-label probe; --task multilabel trains a head "
                                 f"(--method frozen --cache-features no for a frozen backbone)")
            if c.method in FROZEN_METHODS and c.cache_features == "yes":
                raise ValueError("--task multilabel with the feature cache is not supported yet: pass --cache-features no")
        elif c.select_metric == "val_map":
            raise ValueError("--select-metric val_map is the multi-label mean average precision: use it with "
                             "--task multilabel")
        if c.method == "full" and c.quant != "none":
            raise ValueError("--method full trains every backbone weight, which NF4 cannot hold: use --quant none "
                             "(--method full alone picks it)")
        c.alpha = 2.0 * c.rank if c.alpha is None else c.alpha
        c.dropout = (0.1 if c.rank <= 8 else 0.05) if c.dropout is None else c.dropout
        check_ranges(c)
        c.targets = _parse_targets(c.targets)
        for name in ROPE_FIELDS:
            setattr(c, name, _parse_rope(getattr(c, name), "--" + name.replace("_", "-")))
        return c

    def to_dict(self) -> dict:
        """The form a run's config.json stores (and --dry-run prints): every field as its command-line
        text, e.g. targets "q_proj,v_proj" and rope_rescale "none", resolved or not."""
        d = dataclasses.asdict(self)
        if isinstance(self.targets, (list, tuple)):
            d["targets"] = ",".join(self.targets)
        for name in ROPE_FIELDS:
            value = d[name]
            d[name] = "none" if value is None else value if isinstance(value, str) else str(float(value))
        return d


ROPE_FIELDS = ("rope_rescale", "rope_shift", "rope_jitter")
SELECT_METRICS = ("val_accuracy", "val_macro_f1", "val_loss", "val_map")  # val_loss: lower is better; val_map: multilabel
REPORTING_CHOICES = {"select_metric": SELECT_METRICS, "class_weights": ("none", "balanced"),
                     "sampler": ("uniform", "balanced")}

# The numeric flags' valid ranges, as (low, low inclusive, high, high inclusive): a value outside is a
# one-line error naming the flag before anything runs (a dropout of 1.5 or an alpha of 0 would otherwise
# train silently into nonsense or fail deep inside a layer). Written so that NaN fails every comparison.
RANGES = {
    "alpha": (0.0, False, math.inf, False), "dropout": (0.0, True, 1.0, False),
    "head_dropout": (0.0, True, 1.0, False), "lr": (0.0, False, math.inf, False),
    "weight_decay": (0.0, True, math.inf, False), "label_smoothing": (0.0, True, 1.0, False),
    "warmup_ratio": (0.0, True, 1.0, True), "min_lr_ratio": (0.0, True, 1.0, True),
    "grad_clip": (0.0, True, math.inf, False), "min_delta": (0.0, True, math.inf, False),
    "val_fraction": (0.0, False, 1.0, False), "patience": (1, True, math.inf, False),
    "max_steps": (0, True, math.inf, False), "ckpt_every": (0, True, math.inf, False),
    "workers": (0, True, math.inf, False), "num_classes": (0, True, math.inf, False),
    "knn_k": (1, True, math.inf, False), "knn_temperature": (0.0, False, math.inf, False),
    "cache_views": (0, True, math.inf, False), "prompts": (1, True, math.inf, False),
    "adapter_scale": (0.0, False, math.inf, False),
}


def check_ranges(c: "TrainConfig") -> None:
    """ValueError naming the flag of the first numeric field outside its RANGES."""
    for name, (lo, lo_in, hi, hi_in) in RANGES.items():
        v = getattr(c, name)
        inside = isinstance(v, (int, float)) and not isinstance(v, bool) and \
            (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not inside:
            interval = f"{'[' if lo_in else '('}{lo:g}, {'inf' if hi == math.inf else f'{hi:g}'}{']' if hi_in else ')'}"
            raise ValueError(f"--{name.replace('_', '-')} must be in {interval}, got {v!r}")
GRAD_CHECKPOINTING = ("all", "none", "auto")
DORA_DROPOUT_MODES = ("peft", "lora")  # docs/DORA.md ("Dropout semantics")
DROPOUT_SAMPLERS = ("torch", "bits")   # nn.Dropout (PEFT's masks) | BitsDropout (nanopeft/methods/dropout.py)


def _resolve_performance(c: TrainConfig) -> None:
    """Check the performance fields in place. A run's config.json from before --grad-checkpointing took
    all | none | auto stores true / false: read as all / none."""
    if isinstance(c.grad_checkpointing, bool):
        c.grad_checkpointing = "all" if c.grad_checkpointing else "none"
    choices = {"grad_checkpointing": GRAD_CHECKPOINTING, "dora_dropout": DORA_DROPOUT_MODES,
               "dropout_sampler": DROPOUT_SAMPLERS, "cache_features": ("yes", "no"), "cache_dtype": ("fp32", "fp16")}
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(c, name)!r}")
    if not c.memory_budget >= 0:
        raise ValueError(f"--memory-budget must be >= 0 GB (0: the free memory), got {c.memory_budget}")


def _parse_targets(targets):
    """"q_proj" and "all-linear" stay names (inject.py's two shorthands); anything else is a list of
    module-name suffixes: "q_proj,v_proj" -> ["q_proj", "v_proj"]."""
    if targets in ("q_proj", "all-linear"):
        return targets
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"--targets takes q_proj, all-linear or a comma list of module-name suffixes, "
                         f"got {targets!r}")
    return names


def _parse_rope(value, flag: str):
    """"config" (the backbone's own value), "none" / "off" / "null" (switched off) or a number."""
    if value is None or value == ROPE_FROM_CONFIG:
        return value
    if isinstance(value, str) and value.lower() in ("none", "off", "null"):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} takes 'config', 'none' or a number, got {value!r}") from None


# The paper's 11 rows (docs/RECIPE.md ("The 11 configurations")). Scratch baselines: AdamW 1e-3, wd 1e-4, batch 32, patience 15.
_SCRATCH = dict(lr=1e-3, weight_decay=1e-4, batch_size=32, grad_accum=1, patience=15, epochs=150,
                grad_checkpointing="none")
# The recipe a method trains with when no preset says otherwise: the dataclass defaults are the PEFT
# recipe (micro-batch 4 × 8), which would put BatchNorm over 4 images and lr 1e-4 on a network trained
# from scratch; `--method resnet18` alone therefore means the study's scratch recipe, as its preset does.
# The unifying study tuned lr in {1e-3, 1e-2} and weight decay in {1e-4, 1e-3} per method (Mai et al. 2025,
# OSU-MLB/ViT_PEFT_Vision's VTAB grid); its methods start at the grid's low corner. Weight decay never
# applies to scales, shifts, norms, biases or prompts (training/setup.py's param_groups): it would pull a
# scale towards 0. Full fine-tuning takes the usual ViT fine-tuning rate instead (the study's grid was too
# high for it). docs/METHODS.md.
_STUDY = dict(lr=1e-3, weight_decay=1e-4)
METHOD_RECIPES: dict[str, dict] = {
    **{m: _SCRATCH for m in SCRATCH_METHODS},
    "full": dict(quant="none", lr=1e-5, weight_decay=0.05),
    "bitfit": _STUDY, "layernorm": _STUDY, "ssf": _STUDY,
    "vpt": dict(_STUDY, dropout=0.1),          # prompt dropout 0.1, as the study
    "adaptformer": dict(_STUDY, dropout=0.1),  # dropout after the ReLU, as the study
}
RECIPE_FIELDS = sorted({k for recipe in METHOD_RECIPES.values() for k in recipe})
PAPER_RUNS: dict[str, dict] = {
    "resnet18-scratch": dict(method="resnet18", **_SCRATCH),
    "vit-small-scratch": dict(method="vit-small", **_SCRATCH),
    "dinov3-frozen": dict(method="frozen"),
    **{f"qlora-{t}-r{r}": dict(method="lora", targets=t, rank=r)
       for t, r in [("q_proj", 8), ("q_proj", 16), ("all-linear", 16), ("all-linear", 64)]},
    **{f"dora-{t}-r{r}": dict(method="dora", targets=t, rank=r)
       for t, r in [("q_proj", 8), ("q_proj", 16), ("all-linear", 16), ("all-linear", 64)]},
}


def _field_comments(cls) -> dict[str, str]:
    """The `# comment` after each field in the source: the CLI's help text, written once."""
    import inspect

    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


# --help's groups, in README.md's order ("Every flag"; tests/test_config.py checks the two agree).
FLAG_GROUPS = {
    "model": ("method", "targets", "rank", "alpha", "dropout", "use_rslora", "prompts", "adapter_scale", "quant", "pool",
              "head_dropout",
              "knn_k", "knn_temperature", "weights", "num_classes", "preset"),
    "data": ("data", "task", "val_fraction", "split_seed", "image_size", "multiplier", "augment", "skip_bad", "workers",
             "sampler", "class_weights"),
    "optimisation": ("epochs", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup_ratio", "weight_decay",
                     "label_smoothing", "grad_clip", "patience", "min_delta", "select_metric", "max_steps", "seed",
                     "rope_rescale", "rope_shift", "rope_jitter"),
    "performance": ("device", "precision", "grad_checkpointing", "memory_budget", "dora_dropout", "dropout_sampler",
                    "eval_batch_size", "cache_features", "cache_views", "cache_dtype"),
    "run folder": ("out", "ckpt_every"),
}


def flag_metavar(name: str, kind: str) -> str:
    """What --help shows as a flag's value: its allowed values where there is a list, else its kind."""
    choices = {"method": METHODS, "quant": ("nf4", "none"), "task": ("single", "multilabel"), "pool": POOLS, "augment": ("none", "light", "medium", "heavy"),
               "precision": PRECISIONS, "grad_checkpointing": GRAD_CHECKPOINTING, "dora_dropout": DORA_DROPOUT_MODES,
               "dropout_sampler": DROPOUT_SAMPLERS, **REPORTING_CHOICES, "cache_features": ("yes", "no"),
               "cache_dtype": ("fp32", "fp16"),
               "targets": ("q_proj", "all-linear", "A,B,..."), "device": ("auto", "cpu", "cuda", "cuda:N"),
               **{r: (ROPE_FROM_CONFIG, "none", "FLOAT") for r in ROPE_FIELDS}}
    if name in choices:
        return "{" + ",".join(choices[name]) + "}"
    return {"weights": "PATH", "data": "DIR|CSV", "out": "DIR", "preset": "PRESET"}.get(
        name, {"int": "N", "float": "X"}.get(kind, kind.upper()))


def add_config_args(parser, cls=TrainConfig):
    """One `--flag` per dataclass field, in FLAG_GROUPS' groups; help = the field's comment and default.
    Returns the groups ({name: argparse group}) for the script's own flags."""
    comments = _field_comments(cls)
    where = {name: group for group, names in FLAG_GROUPS.items() for name in names}
    groups = {g: parser.add_argument_group(g) for g in FLAG_GROUPS}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        group = groups.get(where.get(f.name), parser)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{comments.get(f.name, '')} (default: {f.default})")
            continue
        conv = {"int": int, "float": float, "str": str}.get(kind.split(" ")[0], str)
        if kind.startswith("float | None"):
            conv = float
        extra = dict(nargs="?", const="all") if f.name == "grad_checkpointing" else {}
        group.add_argument(flag, type=conv, default=None, metavar=flag_metavar(f.name, kind.split(" ")[0]), **extra,
                           help=f"{comments.get(f.name, '')} (default: {f.default!r})".replace("%", "%%"))
    if any(f.name == "grad_checkpointing" for f in dataclasses.fields(cls)):
        # the flag was a switch before it took all | none | auto: `--grad-checkpointing` alone still means
        # all, and `--no-grad-checkpointing` none, so older command lines keep working
        groups["performance"].add_argument("--no-grad-checkpointing", dest="grad_checkpointing",
                                           action="store_const", const="none", help="same as --grad-checkpointing none")
    return groups


_NEGATIVE_NUMBER = r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf|-nan"  # -1e-4, -.5, -3, -inf


def joined_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-4` → `--lr=-1e-4`. Before Python 3.13 argparse takes a token with an exponent such as
    -1e-4 for an option and stops with "expected one argument"; joined to its flag, the value reaches
    check_ranges, whose message names the flag and the allowed range."""
    out = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.fullmatch(_NEGATIVE_NUMBER, a):
            out[-1] += "=" + a
        else:
            out.append(a)
    return out


def config_from_args(args, cls=TrainConfig, recorded: dict | None = None) -> TrainConfig:
    """Defaults < the method's recipe (METHOD_RECIPES) < --preset < explicitly given flags.
    recorded: a recorded run's fields (train.py --config), which replace the defaults; the method's
    recipe (or for a DINOv3 method the defaults of the recipe's fields) then applies only when a flag
    changes the method."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    base = {}
    if given.get("preset"):
        if given["preset"] not in PAPER_RUNS:
            raise ValueError(f"--preset must be one of {sorted(PAPER_RUNS)}, got {given['preset']!r}")
        base = PAPER_RUNS[given["preset"]]
    recorded = recorded or {}
    method = given.get("method", base.get("method", recorded.get("method", cls.method)))
    recipe = METHOD_RECIPES.get(method, {})
    if recorded and method != recorded.get("method"):  # another method: its recipe, not the recorded one's
        recipe = {**{k: getattr(cls, k) for k in RECIPE_FIELDS}, **recipe}
    elif recorded:
        recipe = {}
    merged = {**recorded, **recipe, **base, **given}
    if merged.get("task") == "multilabel" and "select_metric" not in {**recorded, **base, **given}:
        merged["select_metric"] = "val_map"  # multi-label: keep the epoch of the best mean average precision
    return cls(**merged)
