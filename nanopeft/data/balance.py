"""Training on imbalanced folders: `--sampler balanced` and `--class-weights balanced`.

Both make the classifier learn as if every class were equally frequent, in two ways:

    sampler balanced:        P(draw image i) ∝ 1/n_{y_i}     each class drawn n/C times an epoch on average
    class weights balanced:  loss_i · w_{y_i},  w_c = 1/(C·q_c)   q_c: class c's expected share of the draws

With the uniform sampler q_c = n_c/n, so w_c = n/(C·n_c) (sklearn's "balanced"; the weights average 1
over the training images). With the balanced sampler q_c = 1/C and the weights are 1: the classes are
not balanced twice. Either way the prior the classifier learns is uniform, which is what
nanopeft/inference/predict.py run_train_priors assumes for --prior-correction. C counts the classes that have
training images; a class without any gets weight 0 (none of its images is ever drawn).
"""

from __future__ import annotations

import torch


def sampling_weights(labels) -> list[float]:
    """1/n_c for each index of class c (MicroBatchSampler's weights; WeightedRandomSampler's usual use)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels).double()
    return (1.0 / counts[labels]).tolist()


def class_weights(counts, sampler: str = "uniform") -> torch.Tensor:
    """(C,) float32 loss weights w_c = 1/(C·q_c) for training images per class `counts`."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = counts > 0
    C = present.sum()
    share = torch.where(present, 1.0 / C, 0.0) if sampler == "balanced" else counts / counts.sum()
    return torch.where(present, 1.0 / (C * share), 0.0).float()  # uniform sampler: n/(C·n_c)
