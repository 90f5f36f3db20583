"""The private torch tensor APIs the Partial FC head relies on, one function each, so that a torch upgrade shows
in one place which of them changed.

Kept apart from engine/runtime/compat.py because heads/ must not import engine/ (layering).
tests/unit/test_compat.py calls each against the installed torch, so a version bump that changes one fails
there, naming the API.
"""
from __future__ import annotations

import torch


class PrivateAPIError(RuntimeError):
    """A private torch API the head relies on is missing or changed in the installed version."""


def version_counter(tensor: torch.Tensor) -> int:
    """Autograd's in-place version counter of `tensor`.

    Private: Tensor._version. No public API says whether a tensor was modified in place since a moment; the
    optimizers reuse the rows the forward gathered only while the weight's counter is unchanged.
    """
    value = getattr(tensor, "_version", None)
    if not isinstance(value, int):
        raise PrivateAPIError("torch.Tensor._version is missing or changed; heads/compat.py must be updated "
                              "(used to tell whether the head's weight changed since the forward)")
    return value


def mark_sorted_sparse_coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad` (sparse COO, sparse dim 1) as coalesced without sorting, when its row ids strictly increase.

    Private: Tensor._indices and Tensor._coalesced_. Autograd's accumulation into .grad drops the coalesced
    flag SampledRows set; coalesce() would sort k ids and copy the [k, E] values again (0.3 s at 500k rows on
    one core), while strictly increasing ids are coalesced by definition (an O(k) check). Falls back to
    coalesce() when the ids are not strictly increasing.
    """
    if grad.is_coalesced():
        return grad
    for api in ("_indices", "_coalesced_"):
        if not hasattr(grad, api):
            raise PrivateAPIError(f"torch.Tensor.{api} is missing; heads/compat.py must be updated (used to mark "
                                  f"sorted sparse gradients coalesced without a copy)")
    ids = grad._indices()[0]
    return grad._coalesced_(True) if bool((ids[1:] > ids[:-1]).all()) else grad.coalesce()


def sparse_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse COO tensor, without coalescing it first.

    Private: Tensor._values. The public values() requires a coalesced tensor, and coalesce() sorts and copies;
    a finiteness check over the stored values needs neither (duplicates sum to a finite value iff each is).
    """
    if not hasattr(grad, "_values"):
        raise PrivateAPIError("torch.Tensor._values is missing; heads/compat.py must be updated (used to check "
                              "a sparse gradient for inf/NaN without coalescing it)")
    return grad._values()
