"""Activation checkpointing against the plain module, the comparison that tests/unit/test_activation_checkpointing.py
(torch's checkpointing) and tests/distributed/test_activation_checkpointing.py (DeepSpeed's, on a spawned rank)
share: one training-mode step of each, then outputs, gradients and BatchNorm buffers compared.

Module-level functions: the spawned ranks call them (engine.runtime.spawn pickles functions by reference).
"""
from __future__ import annotations

import torch


def train_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One training-mode forward of `x` and a backward of a fixed weighting of the outputs; returns the outputs."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach()


def assert_same_step(plain: torch.nn.Module, ckpt: torch.nn.Module, x: torch.Tensor) -> None:
    """One train_step of each model on `x`: the checkpointed model's outputs, gradients and buffers (BatchNorm
    running statistics) equal the plain model's."""
    out_a, out_b = train_step(plain, x), train_step(ckpt, x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for (name, pa), (_, pb) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for (name, ba), (_, bb) in zip(plain.named_buffers(), ckpt.named_buffers()):
        # Running stats updated once, not twice (the recompute must leave no trace).
        torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-6, msg=lambda m: f"buffer {name}: {m}")
