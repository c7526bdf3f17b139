"""Probes: a frozen backbone's row of the table in seconds, fitted on its cached features (features.py).

The DINOv3 authors evaluate frozen features with a linear classifier and a k-NN classifier, not with an MLP
trained for 80 epochs (their maintainers point users to logistic regression, facebookresearch/dinov3#92):

    linear-probe   p(y|f) = softmax(W f̂ + c),  f̂ = (f − μ)/σ (train-feature standardisation)
                   fitted by L-BFGS on  −(1/n) Σ_i log p(y_i|f_i) + (λ/2)‖W‖²  (multinomial logistic
                   regression), λ chosen from LAMBDAS by the validation accuracy (then the validation NLL)
    knn            score_c(f) = Σ_{j ∈ N_k(f)} exp(cos(f, f_j) / T) · [y_j = c],  p(y|f) = score / Σ score
                   over the k training features of highest cosine similarity (Wu et al., CVPR 2018;
                   Caron et al., DINO, ICCV 2021, §4.1: k = 20, T = 0.07)

Both fit on the clean view of each training image. Each is an nn.Module head on the pooled feature, so a
probe run is a Classifier like any other for eval.py, predict.py, export.py and load_classifier. Its
weights live in RUN/probe.safetensors (not the PEFT adapter file): `weight` (C, D) and `bias` (C,) with
μ and σ folded in, or the k-NN's `bank` (N, D, unit rows) and `labels` (N,); the metadata holds the
method, λ or (k, T), and the content id (save.tensors_id).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PROBE_FILE = "probe.safetensors"
LAMBDAS = tuple(10.0 ** e for e in range(-6, 2))   # the L2 grid: 1e-6 ... 10


class LinearProbe(nn.Module):
    """logits = W f + c: an nn.Linear on the pooled feature (the standardisation folded into W and c)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats)                                        # (B, D) -> (B, C)


class KNNProbe(nn.Module):
    """Cosine k-NN with DINO's temperature weighting; returns log p(y|f), whose softmax is p itself."""

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 20, t: float = 0.07):
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=1))   # (N, D), unit rows
        self.register_buffer("labels", labels.long())                    # (N,)
        self.num_classes, self.k, self.t = num_classes, min(k, len(labels)), t

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(feats.device.type, enabled=False):          # fp32 cosines: bf16 would reorder neighbours
            return self._vote(F.normalize(feats.float(), dim=1))

    def _vote(self, f: torch.Tensor) -> torch.Tensor:
        sims, idx = (f @ self.bank.float().T).topk(self.k, dim=1)         # (B, k) cosines of the k nearest
        votes = (sims / self.t).exp()                                    # exp(cos / T)
        scores = torch.zeros(len(f), self.num_classes, device=f.device).scatter_add_(1, self.labels[idx], votes)
        return (scores / scores.sum(1, keepdim=True)).clamp_min(1e-12).log()   # (B, C) log p


def fit_logistic(f: torch.Tensor, y: torch.Tensor, num_classes: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, c) minimising the mean cross-entropy + (λ/2)‖W‖² on standardised features (float64 L-BFGS)."""
    W = torch.zeros(num_classes, f.shape[1], dtype=torch.float64, requires_grad=True)
    c = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, c], lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(f @ W.T + c, y) + 0.5 * lam * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), c.detach()


def fit_linear_probe(train_f, train_y, val_f, val_y, num_classes: int,
                     select: str = "val_accuracy") -> tuple[LinearProbe, dict]:
    """The probe of the best validation `select` (val_accuracy | val_macro_f1 | val_loss; ties: the lower
    validation NLL) over LAMBDAS, and what each λ scored."""
    from .reports.metrics import compute_metrics

    mu, sd = train_f.double().mean(0), train_f.double().std(0).clamp_min(1e-6)
    ft, fv = (train_f.double() - mu) / sd, (val_f.double() - mu) / sd
    grid, best = {}, None
    for lam in LAMBDAS:
        W, c = fit_logistic(ft, train_y.long(), num_classes, lam)
        logits = fv @ W.T + c
        m = compute_metrics(val_y.numpy(), logits.argmax(1).numpy(), num_classes=num_classes)
        nll = float(F.cross_entropy(logits, val_y.long())) if len(val_y) else 0.0
        scores = {"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "val_loss": nll}
        grid[f"{lam:g}"] = scores
        key = (-nll, -nll) if select == "val_loss" else (scores[select], -nll)
        if best is None or key > best[0]:
            best = (key, lam, W, c)
    _, lam, W, c = best
    probe = LinearProbe(train_f.shape[1], num_classes)
    with torch.no_grad():  # logits = W (f − μ)/σ + c = (W/σ) f + (c − (W/σ)·μ)
        probe.linear.weight.copy_((W / sd).float())
        probe.linear.bias.copy_((c - (W / sd) @ mu).float())
    return probe, {"lambda": lam, "grid": grid}


def save_probe(run, head: nn.Module, method: str, info: dict) -> Path:
    """RUN/probe.safetensors (atomically), with the method, its settings and the content id in the metadata."""
    from safetensors.torch import save_file

    from .files.checkpoint_format import atomic_write
    from .files.save import EPOCH_META, ID_META, tensors_id

    tensors = ({"weight": head.linear.weight, "bias": head.linear.bias} if method == "linear-probe" else
               {"bank": head.bank, "labels": head.labels})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "pt", "method": method, "info": json.dumps(info), ID_META: tensors_id(tensors), EPOCH_META: "1"}
    path = Path(run) / PROBE_FILE
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
    return path


def load_probe(path, cfg) -> nn.Module:
    """The head module of a probe file (`cfg`: the run's TrainConfig, for k and T)."""
    from safetensors import safe_open

    from .files.checkpoint_format import CheckpointError, read_safetensors_header

    header = read_safetensors_header(path)
    method = header.metadata.get("method")
    want = {"linear-probe": {"weight", "bias"}, "knn": {"bank", "labels"}}.get(method)
    if want is None or set(header.tensors) != want:
        raise CheckpointError(f"{path}: not a probe file (method {method!r}, tensors {sorted(header.tensors)})")
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in want}
    if method == "linear-probe":
        head = LinearProbe(t["weight"].shape[1], t["weight"].shape[0])
        head.linear.load_state_dict(t)
        return head
    info = json.loads(header.metadata.get("info", "{}"))
    return KNNProbe(t["bank"], t["labels"], int(info.get("num_classes", int(t["labels"].max()) + 1)),
                    k=int(info.get("k", cfg.knn_k)), t=float(info.get("temperature", cfg.knn_temperature)))


def fit_probe(cfg, train_f, train_y, val_f, val_y, num_classes: int) -> tuple[nn.Module, dict]:
    """--method linear-probe | knn on cached features -> (head module, what to record)."""
    if cfg.method == "linear-probe":
        return fit_linear_probe(train_f, train_y, val_f, val_y, num_classes, cfg.select_metric)
    head = KNNProbe(train_f, train_y, num_classes, k=cfg.knn_k, t=cfg.knn_temperature)
    return head, {"k": head.k, "temperature": cfg.knn_temperature, "num_classes": num_classes, "bank": len(train_y)}
