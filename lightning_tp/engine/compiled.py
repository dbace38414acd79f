"""Regional compilation of a rewritten model: ``torch.compile`` of each layer.

The TP layers and the vocab-parallel loss trace without graph breaks (collectives become
functional ones in the graph; the LM head's :class:`~lightning_tp.engine.loss.VocabShardedLogits`
are traced through their dispatch), so a whole rewritten model, or a whole training step, also
compiles as one graph. Compiling the layers instead (what torchtitan does for its TP models: one
graph per transformer block, compiled once and reused by identical blocks) compiles less code and
keeps the head and the loss eager.
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
