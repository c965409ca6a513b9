"""The post-norm after a writer (Gemma 2/3), as the fits see it: its gain g, its eps, and the rms it divides by.

A post-norm model adds N(W x) = W x / rms(W x) ⊙ g to the residual stream instead of W x (docs/math.md), so the fit of A
(ridge), the writers' shares of v (shares) and the ablation direction (adapter) all read these numbers off the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from steer_core.sites import Architecture, Kind, weight_of


def gain(norm: nn.Module) -> Tensor:
    """g = 1 + w of a Gemma-style RMSNorm (its output is z / rms(z) ⊙ g)."""
    return 1.0 + weight_of(norm).detach().float()


def norm_gain(model: nn.Module, arch: Architecture, layer: int, kind: Kind) -> Tensor:
    """The gain of the post-norm after a writer."""
    name = arch.post_norm_name(layer, kind)
    assert name is not None
    return gain(model.get_submodule(name))


def norm_eps(model: nn.Module, arch: Architecture, layer: int, kind: Kind) -> float:
    name = arch.post_norm_name(layer, kind)
    assert name is not None
    module = model.get_submodule(name)
    return float(getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6)))


def rms_target(z: Tensor, eps: float) -> Tensor:
    """rms(z) exactly as Gemma's RMSNorm divides by it."""
    return torch.sqrt(z.float().pow(2).mean(-1) + eps)
