"""Checks shared by the rule tests: a rule is exact against the oracle and the generic rule."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import optree
import torch
from oracle import flat_gramian, jacobian_matrix

import torchgram
import torchgram._assemble as assemble
import torchgram._ops as rules
from torchgram._linearised import Options
from torchgram._pytree import split_inputs
from torchgram._run import linearise


def rule_counts(fn: Callable[..., Any], params: Any, *args: Any, batch_dim=0) -> dict:
    """``{(op name, rule): count}`` over the uses of one run (rule "generic" or the op's)."""
    inputs = split_inputs((params, *args), (0,), 0, "test")
    run = linearise(fn, inputs, Options(batch_dim, False, False, "test"))
    return dict(collections.Counter(rules.rule_names(run.uses, run.records, run.cotangents)))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    scale = b.abs().max().clamp(min=1e-30)
    return a.shape == b.shape and float((a - b).abs().max() / scale) < rtol


def check_exact(
    monkeypatch, fn: Callable[..., Any], params: Any, *args: Any, batch_dim=0, **options: Any
) -> None:
    """The Gramian and vjp_fn match the oracle, and the Gramian matches the generic rule's.

    vjp_fn is checked twice: reusing the per-sample gradients the Gramian kept (where it keeps
    any), then from the factors alone (none kept). One run each (no first-call comparison of
    runs: the tests count what the rules build)."""
    options.setdefault("check_samples", False)
    out, vjp_fn, G = torchgram.vjp_and_gramian(fn, params, *args, batch_dim=batch_dim, **options)
    J = jacobian_matrix(fn, params, *args)
    assert _close(torchgram.flatten(G), flat_gramian(fn, params, *args))
    weights = torch.randn_like(out)
    direction = torch.cat([t.reshape(-1) for t in optree.tree_leaves(vjp_fn(weights))])
    assert _close(direction, weights.reshape(-1) @ J)
    with monkeypatch.context() as patch:
        patch.setattr(assemble, "_REUSE_GAIN", math.inf)
        _, vjp_fn, _ = torchgram.vjp_and_gramian(fn, params, *args, batch_dim=batch_dim, **options)
    direction = torch.cat([t.reshape(-1) for t in optree.tree_leaves(vjp_fn(weights))])
    assert _close(direction, weights.reshape(-1) @ J)
    with monkeypatch.context() as patch:
        patch.setattr(rules, "RULES", {})
        generic = torchgram.gramian(fn, params, *args, batch_dim=batch_dim, **options)
    assert _close(G, generic)
