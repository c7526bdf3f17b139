"""Prior-shift correction: re-weight a classifier's posteriors from the training to the test class priors.

A classifier trained on priors π_train (the study: 240 images per class, uniform) and applied where the
classes occur as π_test (its test set: 39 % lying, 33 % standing, 0.3 % gallop) is miscalibrated by the
ratio of the two. If only the priors move (p(x|y) is the same in both sets), Bayes' rule gives

    p'(y|x) = p(y|x) · π_test(y)/π_train(y)  /  Σ_j p(j|x) · π_test(j)/π_train(j)            (adjust)

π_test is either known (a JSON file: class → share) or estimated on the unlabelled test posteriors by
the EM procedure of Saerens, Latinne & Decaestecker, "Adjusting the outputs of a classifier to new a
priori probabilities: a simple procedure", Neural Computation 14(1):21-41, 2002:

    start   π⁰ = π_train
    E-step  p^s(y|x_i) = adjust(p(y|x_i), π_train → π^s)
    M-step  π^{s+1}(y) = (1/N) Σ_i p^s(y|x_i)

which climbs the likelihood of the test set under the mixture Σ_y π(y) p(x|y). It stops when no prior
moves by more than `tol`. Everything is float64 numpy; posteriors are (N, C) rows that sum to 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

METHODS = ("none", "em")  # or a path to a JSON file of known priors


def _as_probs(probs, what: str = "posteriors") -> np.ndarray:
    if hasattr(probs, "detach"):  # a torch tensor, without importing torch here
        probs = probs.detach().cpu().double().numpy()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"prior.py: {what} must be (N, C), got shape {p.shape}")
    if p.size and (not np.isfinite(p).all() or (p < 0).any()):
        raise ValueError(f"prior.py: {what} must be finite and non-negative")
    return p


def _as_priors(priors, num_classes: int, what: str) -> np.ndarray:
    pi = np.asarray(priors, dtype=np.float64).reshape(-1)
    if pi.shape != (num_classes,):
        raise ValueError(f"prior.py: {what} has {pi.size} entries for {num_classes} classes")
    if not np.isfinite(pi).all() or (pi < 0).any() or pi.sum() <= 0:
        raise ValueError(f"prior.py: {what} must be non-negative and not all zero, got {pi.tolist()}")
    return pi / pi.sum()


def adjust_posteriors(probs, train_priors, test_priors) -> np.ndarray:
    """p'(y|x) ∝ p(y|x) · π_test(y)/π_train(y), each row renormalised (the "adjust" line above).
    A class with π_train = 0 was never learnt: its weight is 0. A row whose weights all vanish keeps
    its original posterior rather than becoming 0/0."""
    p = _as_probs(probs)
    C = p.shape[1]
    pi_tr, pi_te = _as_priors(train_priors, C, "train priors"), _as_priors(test_priors, C, "test priors")
    ratio = np.divide(pi_te, pi_tr, out=np.zeros(C), where=pi_tr > 0)  # (C,)
    w = p * ratio                                                      # (N, C)
    z = w.sum(axis=1, keepdims=True)                                   # (N, 1)
    return np.where(z > 0, w / np.where(z > 0, z, 1.0), p)


def em_priors(probs, train_priors, tol: float = 1e-6, max_iter: int = 1000) -> tuple[np.ndarray, int]:
    """Saerens et al.'s EM estimate of the test priors from unlabelled posteriors -> (π_test, iterations)."""
    p = _as_probs(probs)
    if len(p) == 0:
        raise ValueError("prior.py: EM needs at least one posterior row")
    pi_tr = _as_priors(train_priors, p.shape[1], "train priors")
    pi = pi_tr.copy()
    for it in range(1, max_iter + 1):
        new = adjust_posteriors(p, pi_tr, pi).mean(axis=0)  # E-step, then M-step: (C,)
        done = np.abs(new - pi).max() < tol
        pi = new
        if done:
            return pi, it
    return pi, max_iter


def read_priors(path, class_names: list[str]) -> np.ndarray:
    """Known test priors from a JSON object {class name: share}, in class-index order.

    Every class must appear, and nothing else; shares are non-negative numbers, not all 0. They are
    normalised to sum to 1, so counts work as well as fractions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prior file not found")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object {{class name: share}}, got {type(d).__name__}")
    missing, unknown = [c for c in class_names if c not in d], [k for k in d if k not in class_names]
    if unknown:
        raise ValueError(f"{path}: unknown class(es) {unknown}; the model's classes are {class_names}")
    if missing:
        raise ValueError(f"{path}: no share for class(es) {missing}")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{path}: share of {k!r} must be a non-negative number, got {v!r}")
    pi = np.array([float(d[c]) for c in class_names])
    if pi.sum() <= 0:
        raise ValueError(f"{path}: the shares are all 0")
    return pi / pi.sum()


def check_method(method: str) -> str:
    """`none`, `em`, or an existing JSON file; anything else is a clear error (for argparse `type=`)."""
    if method in METHODS or Path(method).is_file():
        return method
    raise ValueError(f"--prior-correction {method!r}: expected 'none', 'em' or a JSON file of priors "
                     f"(no such file)")


def correct(probs, method: str, train_priors, class_names: list[str]) -> tuple[np.ndarray, dict | None]:
    """Apply --prior-correction: (corrected posteriors, {method, priors, train_priors[, iterations]}),
    or the posteriors unchanged and None for `none`."""
    p = _as_probs(probs)
    if method == "none":
        return p, None
    info: dict = {"method": method}
    if method == "em":
        pi, info["iterations"] = em_priors(p, train_priors)
    else:
        pi = read_priors(method, class_names)
        info["method"] = "file"
        info["file"] = str(method)
    pi_tr = _as_priors(train_priors, p.shape[1], "train priors")
    info["priors"] = {c: float(v) for c, v in zip(class_names, pi)}
    info["train_priors"] = {c: float(v) for c, v in zip(class_names, pi_tr)}
    return adjust_posteriors(p, pi_tr, pi), info


def train_priors_of(saved: dict, class_names: list[str]) -> np.ndarray:
    """The class priors a run trained with: `train_class_counts` in its config.json when recorded, else
    uniform (the study's balanced 240 per class; also what a balanced sampler or class weights give)."""
    counts = saved.get("train_class_counts")
    if isinstance(counts, dict) and all(c in counts for c in class_names):
        return _as_priors([counts[c] for c in class_names], len(class_names), "train_class_counts")
    return np.full(len(class_names), 1.0 / len(class_names))
