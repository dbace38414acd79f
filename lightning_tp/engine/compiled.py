"""Regional compilation of a rewritten model: ``torch.compile`` of each layer.

The TP layers trace without graph breaks (their collectives become functional ones in the graph),
so a whole rewritten model compiles as one graph too; but inside a compiled region the
vocab-parallel LM head returns gathered (dense) logits, since the compiler cannot trace
:class:`~lightning_tp.engine.loss.VocabShardedLogits`. Compiling the layers instead (what
torchtitan does for its TP models: one graph per transformer block, compiled once and reused by
identical blocks) keeps the head and the vocab-parallel loss eager, with sharded logits.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_tp.engine.init import units


def compile_layers(model: nn.Module, **compile_kwargs: Any) -> list[str]:
    """``module.compile(**compile_kwargs)`` for every layer of ``model`` (an element of an
    ``nn.ModuleList``, e.g. each transformer block); returns their names. Call it after the rewrite
    (the strategy's ``setup``, e.g. in ``on_fit_start``) or before: compilation happens at the first
    call either way."""
    names = []
    for name, module, is_layer in units(model):
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        if is_layer and isinstance(parent, nn.ModuleList):
            module.compile(**compile_kwargs)
            names.append(name)
    return names
