"""Every private torch name lightning_tp uses lives in lightning_tp._compat: each must still exist and
behave as used (a failure names the symbol an upstream release removed or changed)."""

import pytest
import torch

from lightning_tp import _compat


@pytest.mark.parametrize("symbol", sorted(_compat.__all__))
def test_private_symbol_exists(symbol):
    assert callable(getattr(_compat, symbol, None)), f"lightning_tp._compat.{symbol} is gone upstream"


def test_private_symbols_behave_as_used():
    tree = ((torch.ones(1), [2, torch.zeros(2)]), {"k": torch.Size([3, 4])})
    leaves = _compat.tree_leaves(tree)
    assert sum(isinstance(x, torch.Tensor) for x in leaves) == 2 and 2 in leaves
    mapped = _compat.tree_map(lambda x: x * 2 if isinstance(x, torch.Tensor) else x, tree)
    assert torch.equal(mapped[0][1][1], torch.zeros(2)) and float(mapped[0][0]) == 2.0

    class Sub(torch.Tensor):
        seen = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen += 1
            with _compat.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    s = torch.ones(3).as_subclass(Sub)
    before = Sub.seen
    with _compat.DisableTorchFunctionSubclass():
        s + 1
    assert Sub.seen == before  # no re-entry

    t = torch.zeros(2)
    v = _compat.tensor_version(t)
    t.add_(1)
    assert _compat.tensor_version(t) == v + 1

    u = torch.zeros(4)
    assert _compat.use_count(u) == 1 and _compat.storage_use_count(u) >= 1
    view = u[:2]
    assert _compat.storage_use_count(u) > 1 and view.numel() == 2
