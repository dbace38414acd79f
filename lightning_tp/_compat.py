"""Private torch names lightning_tp needs, in one place (each breaks on some future release;
``tests/test_compat.py`` fails naming the symbol when it is gone).

* ``tree_leaves`` / ``tree_map`` (``torch.utils._pytree``): flatten nested args/kwargs of an op on
  sharded logits exactly as torch's own dispatch does (containers torch registers, e.g. ``torch.Size``).
* ``DisableTorchFunctionSubclass`` (``torch._C``): run an op on a tensor subclass without
  re-entering its ``__torch_function__`` (the documented way inside ``__torch_function__``).
* ``tensor_version`` (``Tensor._version``): detect an in-place change of a tensor (a cached gather
  or a saved activation is stale after one).
* ``use_count`` / ``storage_use_count`` (``Tensor._use_count``, ``torch._C._storage_Use_Count``):
  whether a reusable buffer is referenced from C++ (saved for backward, a view, an alias); callers
  treat ``AttributeError``/``RuntimeError`` as "unknown: do not reuse".
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass


def tensor_version(t: Tensor) -> int:
    """How many in-place changes ``t``'s memory has seen (autograd's version counter)."""
    return t._version


def use_count(t: Tensor) -> int:
    """C++ references to ``t``'s TensorImpl."""
    return t._use_count()


def storage_use_count(t: Tensor) -> int:
    """C++ references to ``t``'s storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


__all__ = [
    "DisableTorchFunctionSubclass",
    "storage_use_count",
    "tensor_version",
    "tree_leaves",
    "tree_map",
    "use_count",
]
