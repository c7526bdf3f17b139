"""Post-hoc calibration: make the posteriors mean what they say, fitted on the run's validation split.

A network trained with label smoothing on a few hundred images per class is not calibrated: its softmax
is under- or over-confident and biased between classes. Each map below rewrites the logits z (K classes)
and is fitted by minimising the mean negative log-likelihood of the validation labels,

    L(θ) = −(1/n) Σ_i log softmax(g_θ(z_i))[y_i]                                          (NLL)

    ts    g(z) = z / T                 1 parameter    temperature scaling (Guo et al., ICML 2017, §4.2)
    bcts  g(z) = z / T + b             K + 1          bias-corrected TS (Alexandari et al., ICML 2020)
    vs    g(z) = w ⊙ z + b             2K             vector scaling (Guo et al. 2017, §4.2)

In the inverse temperature a = 1/T each g is linear in its parameters, so L is convex and L-BFGS (torch,
float64) finds the global minimum. The logits are centred per row first (z − mean_k z_k): softmax ignores
the constant for ts and bcts, and vs then does not depend on a constant added to a row. A free bias b
makes the mean calibrated validation posterior equal the validation class frequencies at the optimum
(∂L/∂b_k = mean_i (p_ik − y_ik) = 0), which is what label-shift EM needs of its source priors
(nanopeft/prior.py; Garg et al., NeurIPS 2020: maximum-likelihood label-shift estimation is consistent only
for calibrated posteriors).

    fit(kind, logits, labels)        -> Calibrator (kind, T, w, b; .apply(logits), .to_dict())
    choose(logits, labels)           -> the kind of lowest cross-validated NLL (`--calibration auto`)
    nll / brier / ece                   how calibrated a set of posteriors is (ece: 15 equal-mass bins)
    bootstrap_intervals(y, pred, K)  -> 95 % stratified bootstrap intervals of accuracy, balanced accuracy,
                                        macro F1
    save_val_logits / read_val_logits   the kept epoch's validation logits in the run folder
    fold_into_head(head, calibrator)    the calibration written into the head's last Linear (export, predict)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

KINDS = ("none", "ts", "bcts", "vs")
VAL_LOGITS = "val_logits.safetensors"  # in a run folder: the kept epoch's validation logits and labels


# ----------------------------------------------------------------------------- the maps
@dataclass
class Calibrator:
    """A fitted map of logits; kind "none" is the identity. T, w, b as in the module docstring."""
    kind: str = "none"
    T: float = 1.0
    w: list[float] | None = None
    b: list[float] | None = None
    nll: dict = field(default_factory=dict)  # validation NLL before / after, and the CV NLLs of `auto`

    def apply(self, logits) -> torch.Tensor:
        """(N, K) logits -> calibrated (N, K) logits (float64); softmax them for the posteriors."""
        z = torch.as_tensor(logits, dtype=torch.float64)
        if self.kind == "none":
            return z
        z = z - z.mean(dim=1, keepdim=True)                       # row-centred: (N, K)
        if self.kind == "vs":
            return z * torch.tensor(self.w, dtype=z.dtype) + torch.tensor(self.b, dtype=z.dtype)  # w ⊙ z + b
        out = z / self.T                                          # z / T
        return out + torch.tensor(self.b, dtype=z.dtype) if self.kind == "bcts" else out   # (+ b)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "T": self.T, "w": self.w, "b": self.b, "nll": self.nll}
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        if not isinstance(d, dict) or d.get("kind") not in KINDS:
            raise ValueError(f"calibration: not a calibrator: {d!r}")
        c = cls(d["kind"], float(d.get("T", 1.0)), d.get("w"), d.get("b"), d.get("nll") or {})
        K = len(c.b) if c.b is not None else None
        if (c.kind in ("bcts", "vs") and c.b is None) or (c.kind == "vs" and (c.w is None or len(c.w) != K)) \
                or not np.isfinite(c.T) or c.T <= 0:
            raise ValueError(f"calibration: the {c.kind} calibrator's parameters are incomplete: {d!r}")
        return c


def _check(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if z.ndim != 2 or y.shape != (z.shape[0],) or len(y) == 0:
        raise ValueError(f"calibration: need (N, K) logits and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(z).all() or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError("calibration: logits must be finite and labels in [0, K)")
    return z, y


class Degenerate(ValueError):
    """The NLL has no finite minimiser on these logits (separable, or no signal): nothing to fit."""


def fit(kind: str, logits, labels) -> Calibrator:
    """The `kind` map of lowest validation NLL (L-BFGS with strong-Wolfe line search, float64). Raises
    Degenerate where that minimum does not exist: when the map gets every fitting image right (each map
    is a cone, so scaling it up lowers the NLL without end) or when 1/T would have to be <= 0."""
    if kind not in KINDS:
        raise ValueError(f"--calibration {kind!r}: choose one of {KINDS} or auto")
    z, y = _check(logits, labels)
    nll0 = float(torch.nn.functional.cross_entropy(z, y))
    if kind == "none":
        return Calibrator("none", nll={"before": nll0, "after": nll0})
    K = z.shape[1]
    zc = z - z.mean(dim=1, keepdim=True)
    a = torch.ones(K if kind == "vs" else 1, dtype=torch.float64, requires_grad=True)   # 1/T, or w
    b = torch.zeros(K, dtype=torch.float64, requires_grad=kind != "ts")
    params = [a, b] if kind != "ts" else [a]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zc * a + b, y)   # (NLL) of g(z) = a·z + b
        loss.backward()
        return loss

    last = float("inf")
    for _ in range(5):  # LBFGS.step stops at max_iter; a restart of its history settles the last digits
        loss = float(opt.step(closure).detach())
        if last - loss < 1e-13:
            break
        last = loss
    if kind != "vs" and float(a.detach()) <= 0:  # the best "temperature" is negative or infinite
        raise Degenerate(f"{kind}: the fitted 1/T is {float(a.detach()):.3g} <= 0 (the logits carry no usable "
                         f"signal about these labels)")
    with torch.no_grad():
        if bool(((zc * a + b).argmax(1) == y).all()):  # every item right: scaling the map up lowers L forever
            raise Degenerate(f"{kind}: the map classifies every fitting image correctly, so the NLL has no "
                             f"minimum (T -> 0, infinitely confident)")
        nll1 = float(torch.nn.functional.cross_entropy(zc * a + b, y))
        bias = (b - b.mean()).tolist()  # b is defined up to a common constant: report the centred one
    if kind == "vs":
        return Calibrator("vs", w=a.detach().tolist(), b=bias, nll={"before": nll0, "after": nll1})
    T = 1.0 / float(a.detach())
    return Calibrator(kind, T=T, b=bias if kind == "bcts" else None, nll={"before": nll0, "after": nll1})


def folds_of(labels, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per item, stratified: each class's items are shuffled (seeded) and dealt round-robin,
    the deal going on from class to class, so the folds differ in size by at most one."""
    y = np.asarray(labels)
    out, rng, start = np.zeros(len(y), dtype=np.int64), np.random.default_rng(seed), 0
    for k in np.unique(y):
        idx = np.flatnonzero(y == k)
        out[rng.permutation(idx)] = (start + np.arange(len(idx))) % folds
        start += len(idx)
    return out


def cross_validated_nll(kind: str, logits, labels, folds: int = 5, seed: int = 0) -> float:
    """The mean NLL of each validation item under the `kind` map fitted on the other folds (Degenerate
    when a fold's fit is)."""
    z, y = _check(logits, labels)
    f = folds_of(y.numpy(), folds, seed)
    total, scored = 0.0, 0
    for j in range(folds):
        held = torch.from_numpy(f == j)
        if held.all() or not held.any():
            continue
        c = fit(kind, z[~held], y[~held])
        total += float(torch.nn.functional.cross_entropy(c.apply(z[held]), y[held], reduction="sum"))
        scored += int(held.sum())
    return total / scored


def choose(logits, labels, folds: int = 5, seed: int = 0) -> tuple[Calibrator, str]:
    """`--calibration auto`: the kind of lowest `folds`-fold cross-validated NLL on the validation split,
    refitted on all of it; returns it and the line that says which and why. A class without validation
    images rules bcts and vs out (its bias would run to −∞)."""
    z, y = _check(logits, labels)
    K = z.shape[1]
    counts = np.bincount(y.numpy(), minlength=K)
    folds = int(max(2, min(folds, len(y))))
    kinds = ["none", "ts"] + (["bcts", "vs"] if (counts > 0).all() else [])
    cv, left_out = {}, {} if (counts > 0).all() else {"bcts, vs": "a class has no validation image"}
    for k in kinds:
        try:
            cv[k] = cross_validated_nll(k, z, y, folds, seed)
        except Degenerate as e:
            left_out[k] = str(e).partition(": ")[2]
    order = sorted(cv, key=lambda k: (cv[k], KINDS.index(k)))  # ties: the simpler map
    for best in order:
        try:
            c = fit(best, z, y)
            break
        except Degenerate as e:
            left_out[best] = str(e).partition(": ")[2]
    c.nll["cross_validated"] = {k: v for k, v in cv.items() if k not in left_out}
    why = (f"calibration auto: {c.kind} ({folds}-fold cross-validated validation NLL "
           + ", ".join(f"{k} {v:.4f}" for k, v in c.nll["cross_validated"].items()) + ", lowest wins"
           + "".join(f"; {k} left out: {r}" for k, r in left_out.items()) + ")")
    return c, why


def refuse_knn(methods, kind) -> str:
    """A k-NN run's outputs are vote shares (log p), not logits a temperature or a bias was meant for:
    calibration is refused for it in one line; by default it is simply off. Returns the kind to use."""
    if "knn" in methods:
        if kind not in (None, "none"):
            raise ValueError(f"--calibration {kind}: a k-NN run's posteriors are neighbour vote shares, not logits, "
                             f"and calibrating them is not defined here; use --calibration none")
        return "none"
    return kind


def calibrate(kind: str, logits, labels) -> tuple[Calibrator, str]:
    """--calibration KIND|auto on validation logits -> (Calibrator, the line eval.py prints)."""
    if kind == "auto":
        return choose(logits, labels)
    if kind in ("bcts", "vs"):
        counts = np.bincount(np.asarray(labels), minlength=np.asarray(logits).shape[1])
        if (counts == 0).any():
            raise ValueError(f"--calibration {kind}: class(es) {np.flatnonzero(counts == 0).tolist()} have no "
                             f"validation image, so their bias cannot be fitted; use ts or auto")
    try:
        c = fit(kind, logits, labels)
    except Degenerate as e:
        raise ValueError(f"--calibration {e}; calibrate on a validation split the model does not get all "
                         f"right, or pass --calibration none") from None
    return c, (f"calibration {kind}: " + describe(c))


def describe(c: Calibrator) -> str:
    bits = [f"T = {c.T:.4f}"] if c.kind in ("ts", "bcts") else []
    if c.b is not None:
        bits.append("b = [" + ", ".join(f"{v:+.3f}" for v in c.b) + "]")
    if c.w is not None:
        bits.append("w = [" + ", ".join(f"{v:.3f}" for v in c.w) + "]")
    nll = c.nll
    if "before" in nll:
        bits.append(f"validation NLL {nll['before']:.4f} -> {nll['after']:.4f}")
    return ", ".join(bits) or "identity"


# ----------------------------------------------------------------------------- how calibrated
def _probs_labels(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs.detach().cpu() if hasattr(probs, "detach") else probs, dtype=np.float64)
    return p, np.asarray(labels, dtype=np.int64)


def nll(probs, labels) -> float:
    """−(1/n) Σ_i log p_i,y_i, with p clipped at 1e-12 (a posterior of 0 for the true class is finite)."""
    p, y = _probs_labels(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())


def brier(probs, labels) -> float:
    """Multiclass Brier score (1/n) Σ_i Σ_k (p_ik − [y_i = k])², in [0, 2]."""
    p, y = _probs_labels(probs, labels)
    onehot = np.eye(p.shape[1])[y]
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def reliability_bins(probs, labels, bins: int = 15) -> list[dict]:
    """Top-label reliability with equal-mass bins (Nixon et al. 2019, arXiv:1904.01685): the items sorted
    by confidence max_k p_ik and cut into `bins` groups of (nearly) equal size; each bin's count, mean
    confidence and accuracy."""
    p, y = _probs_labels(probs, labels)
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    order = np.argsort(conf, kind="stable")
    out = []
    for idx in np.array_split(order, min(bins, len(order))):
        if len(idx):
            out.append({"n": int(len(idx)), "confidence": float(conf[idx].mean()),
                        "accuracy": float((pred[idx] == y[idx]).mean())})
    return out


def ece(probs, labels, bins: int = 15) -> float:
    """Expected calibration error, Σ_m (|B_m|/n)·|acc(B_m) − conf(B_m)| over 15 equal-mass bins."""
    rows = reliability_bins(probs, labels, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows))


def calibration_metrics(probs, labels) -> dict:
    return {"nll": nll(probs, labels), "brier": brier(probs, labels), "ece": ece(probs, labels)}


# ----------------------------------------------------------------------------- how sure each number is
def _scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy, macro F1 of a stack of confusion matrices (..., K, K), as metrics.py."""
    tp = np.diagonal(cm, axis1=-2, axis2=-1).astype(np.float64)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    n = support.sum(axis=-1)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    return {"accuracy": tp.sum(axis=-1) / n,
            "balanced_accuracy": (recall * present).sum(axis=-1) / present.sum(axis=-1),
            "macro_f1": f1.mean(axis=-1)}


def bootstrap_intervals(y_true, y_pred, num_classes: int, resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, list[float]]:
    """Percentile intervals of accuracy, balanced accuracy and macro F1 under a bootstrap stratified by
    true class (each class's n_k items resampled with replacement, so the class mix stays the test set's).
    A class's resampled predictions are a multinomial draw from its row of the confusion matrix, so each
    replicate costs K draws, whatever the number of images."""
    y, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    K = num_classes
    cm = np.bincount(y * K + p, minlength=K * K).reshape(K, K)
    rng = np.random.default_rng(seed)
    reps = np.zeros((resamples, K, K), dtype=np.int64)
    for k in range(K):
        n = int(cm[k].sum())
        if n:
            reps[:, k, :] = rng.multinomial(n, cm[k] / n, size=resamples)   # (B, K): class k's row
    scores = _scores(reps)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {name: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for name, v in scores.items()}


def with_interval(value: float, interval) -> str:
    """0.8316 [0.8301, 0.8331]"""
    return f"{value:.4f} [{interval[0]:.4f}, {interval[1]:.4f}]"


# ----------------------------------------------------------------------------- the run folder's copy
def save_val_logits(run, logits, labels, paths: list[str], adapter_id: str) -> Path:
    """run/val_logits.safetensors: the kept epoch's validation logits (N, K) fp32 and labels (N,), with
    the adapter's id (nanopeft/files/save.py adapter_identity) and the image paths in the metadata, so that
    eval.py calibrates without the training data and never with another epoch's logits."""
    import json

    from safetensors.torch import save_file

    from .files.checkpoint_format import atomic_write

    tensors = {"logits": torch.as_tensor(logits).float().contiguous().cpu(),
               "labels": torch.as_tensor(labels, dtype=torch.int64).contiguous().cpu()}
    meta = {"format": "pt", "adapter_id": adapter_id, "paths": json.dumps([str(p) for p in paths])}
    out = Path(run) / VAL_LOGITS
    atomic_write(out, lambda f: save_file(tensors, str(f), metadata=meta))
    return out


def read_val_logits(run) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    """(logits, labels, paths, adapter_id) of a run folder; FileNotFoundError when it has none."""
    import json

    from safetensors import safe_open

    from .files.checkpoint_format import CheckpointError, read_safetensors_header

    f = Path(run) / VAL_LOGITS
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing: the run was trained before nanopeft stored its validation "
                                f"logits (train it again, or pass --calibration none)")
    header = read_safetensors_header(f)
    if set(header.tensors) != {"logits", "labels"}:
        raise CheckpointError(f"{f}: expected the tensors logits and labels, got {sorted(header.tensors)}")
    with safe_open(f, "pt") as h:
        z, y = h.get_tensor("logits"), h.get_tensor("labels")
    try:
        paths = json.loads(header.metadata.get("paths", "[]"))
    except ValueError:
        raise CheckpointError(f"{f}: metadata `paths` is not JSON") from None
    if z.ndim != 2 or y.shape not in ((z.shape[0],), tuple(z.shape)) or len(paths) != len(y):  # (N,) or multi-label (N, C)
        raise CheckpointError(f"{f}: logits {tuple(z.shape)}, labels {tuple(y.shape)} and {len(paths)} paths "
                              f"do not fit together")
    return z, y, paths, header.metadata.get("adapter_id", "")


def runs_val_logits(runs: list, adapter_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation logits eval.py calibrates on: one run's, or an ensemble's average (its members must
    have validated on the same images, as they do on one data set with one --split-seed). Each file must
    belong to the adapter being evaluated."""
    z_sum, y0, paths0 = 0, None, None
    for run, want in zip(runs, adapter_ids):
        z, y, paths, got = read_val_logits(run)
        if got != want:
            raise ValueError(f"{Path(run) / VAL_LOGITS} was written for other weights ({got or 'unrecorded'}) "
                             f"than the run's kept ones ({want}); train or resume the run again, or pass "
                             f"--calibration none")
        if y0 is not None and (paths != paths0 or not torch.equal(y, y0)):
            raise ValueError(f"--ensemble with calibration: {run} validated on other images than {runs[0]} "
                             f"(another data set or --split-seed); calibrate the members one by one")
        z_sum, y0, paths0 = z_sum + z.double(), y, paths
    return z_sum / len(runs), y0


def fold_into_head(head: torch.nn.Module, cal: Calibrator) -> None:
    """Write the calibration into the head's last Linear (in place), so the model's logits are the calibrated
    ones: every map here is affine in the logits, g(z) = A z + b with A = diag(a)(I − 11ᵀ/K) (the row
    centring, then a = 1/T or w), hence W' = A W and c' = A c + b for z = W h + c. export.py stores a
    calibrated head this way and predict.py runs one; load_classifier needs nothing else."""
    if cal.kind == "none":
        return
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    K = last.out_features
    a = torch.tensor(cal.w, dtype=torch.float64) if cal.kind == "vs" else torch.full((K,), 1.0 / cal.T, dtype=torch.float64)
    b = torch.tensor(cal.b, dtype=torch.float64) if cal.b is not None else torch.zeros(K, dtype=torch.float64)
    A = a[:, None] * (torch.eye(K, dtype=torch.float64) - 1.0 / K)      # (K, K)
    with torch.no_grad():
        W, c = last.weight.detach().double().cpu(), last.bias.detach().double().cpu()
        last.weight.copy_((A @ W).to(last.weight.dtype))                 # (K, D)
        last.bias.copy_((A @ c + b).to(last.bias.dtype))                 # (K,)
