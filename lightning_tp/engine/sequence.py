"""Megatron sequence parallelism outside the parallel linears.

Between the tensor-parallel regions the activations are sharded on the sequence, ``(B, T/p, H)``.
These pieces make the rest of a model work on them:

* :class:`SequenceGather`: forward hooks on a block that holds column layers. At the block's input
  it all-gathers the sequence (forward: all-gather on dim -2; backward: reduce-scatter, which also
  sums the column layers' partial input grads over TP), so the block reads the full sequence and its
  column layers run no collective in forward. Each column layer built with this object reads the
  shard behind its (gathered) input from it, to all-gather it again in backward instead of saving
  the full input. A block that holds other such blocks (a decoder layer holding its attention
  block and its MLP's linears itself) gathers nothing: its own column layers gather their input
  themselves (``ColumnParallelLinear(sequence_parallel=True)``), as Megatron's do.
* :class:`StackSequence`: hooks on the first and last layers of the model's layer stack, for models
  whose layers take per-position inputs the model computes from the embeddings' output (positions,
  masks, rotary tables from its sequence length, as Hugging Face models do): the sequence-sharded
  region is the stack. The hidden states are split to this rank's chunk where they enter the first
  layer and all-gathered where they leave the last; what runs before and after the stack runs on
  the whole sequence, as without sequence parallelism. :class:`StackOutputs` on the module that calls
  the stack gathers the hidden states it returns from inside it (``output_hidden_states``).
* :class:`SequenceShardedEmbedding`: a replicated ``nn.Embedding`` (positions, token types) that
  gives this rank's sequence chunk, to be added to the sequence-sharded token embeddings.
* :class:`WholeSequence`: forward hooks on a module that must see every token at once and runs as
  plain tensor parallelism inside (a mixture of experts whose experts are blocks: each rank would
  route different tokens to them) or whole, replicated (an attention or a Mamba mixer the plan leaves
  whole). Its input is all-gathered on the sequence (backward: this rank's chunk of the gradient,
  which inside is complete on every rank), its output split back to this rank's chunk (backward:
  all-gather, so a replicated module's parameters get their whole gradient on every rank).

A forward without gradients whose sequence length does not divide by TP (evaluation, generation: a
cached decode step feeds one token) runs the whole region on the whole sequence, replicated, as
without sequence parallelism: its entries (the stack's first layer, the embeddings) decide it
(:func:`~lightning_tp.engine.comm.enter_sequence_region`), and every piece here, the row layers, the
experts and the per-rank dropouts of the sequence-sharded activations read it
(:func:`~lightning_tp.engine.comm.sequence_whole`). With gradients such a length is a ``ShardingError``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from lightning_tp._compat import tensor_version, tree_leaves, tree_map
from lightning_tp.engine.comm import (
    enter_sequence_region,
    gather_from_sp,
    scatter_to_sp,
    sequence_whole,
    sharded_length,
    sharded_tokens,
)
from lightning_tp.engine.features import ModuleHooks
from lightning_tp.errors import ShardingError


def is_hidden(x: Any, widths: frozenset[int]) -> bool:
    """Whether ``x`` is sequence-sharded hidden states a gather takes: a floating ``(..., T/p, w)``
    tensor with ``w`` one of ``widths``."""
    return isinstance(x, Tensor) and x.is_floating_point() and x.dim() >= 2 and x.shape[-1] in widths


class SequenceGather:
    """All-gathers the sequence of a block's inputs (sequence parallelism); see the module doc.

    Gathered: every floating input (positional or keyword) of shape ``(..., T/p, in)`` with ``in``
    one of ``in_features`` (the input widths of the block's column layers); other inputs (masks,
    ids, rotary tables) pass unchanged.

    Args:
        group: the tensor-parallel process group.
        in_features: input widths of the column layers inside the block.
        ndim: the hidden states' number of dims, where known (a layer stack that is the sequence-sharded
            region: read from the model's forward); a tensor of another rank (a float mask as wide as a
            hidden width) is not gathered, but for the tokens flattened with the batch, ``(B*T/p, in)``
            (as a mixture of experts hands them to its shared experts): a 2-D tensor with as many rows
            as this rank's tokens in the current forward (:func:`~lightning_tp.engine.comm.sharded_tokens`;
            eager only: compiled, it is not gathered). A 2-D float mask ``(T, T)`` as wide as the
            hidden states and as long as those tokens (batch = TP size) cannot be told from them.
    """

    def __init__(self, group: ProcessGroup, in_features: Iterable[int], ndim: int | None = None) -> None:
        self.group, self.in_features, self.ndim = group, frozenset(int(i) for i in in_features), ndim
        # id(gathered) -> (weak ref to it, this rank's shard, its version when gathered). An entry
        # lives as long as the gathered tensor (a recompute of a checkpointed region inside the block
        # finds it again); it is dropped when that tensor is freed.
        self._shards: dict[int, tuple[weakref.ref, Tensor, int]] = {}

    def attach(self, block: nn.Module) -> RemovableHandle:
        """Register the gather on ``block``'s input."""
        return block.register_forward_pre_hook(self._pre, with_kwargs=True)

    def shard_of(self, full: Tensor) -> Tensor | None:
        """This rank's shard of ``full`` if ``full`` is an unchanged input this gather produced in
        the current block call, else ``None``."""
        if torch.compiler.is_compiling():
            return None  # traced: no bookkeeping by identity; the layer keeps the gathered input for dW
        entry = self._shards.get(id(full))
        if entry is None or entry[0]() is not full or tensor_version(full) != entry[2]:
            return None
        return entry[1]

    def _gather(self, x: Any) -> Any:
        if is_hidden(x, self.in_features) and (
            self.ndim is None or x.dim() == self.ndim or (x.dim() == 2 == self.ndim - 1 and sharded_tokens(x.shape[0]))
        ):
            if sequence_whole(x.shape[-2], flat=x.dim() == 2):
                return x  # a sequence that runs whole in this forward (no gradients, a length not dividing by TP)
            full = gather_from_sp(x, self.group, -2)  # (..., T, in)
            if torch.compiler.is_compiling():
                return full
            key = id(full)
            shards = self._shards
            ref = weakref.ref(full, lambda _, key=key: shards.pop(key, None))
            self._shards[key] = (ref, x, tensor_version(full))
            return full
        return x

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(self._gather(a) for a in args), {k: self._gather(v) for k, v in kwargs.items()}

    def __repr__(self) -> str:
        return f"SequenceGather(in_features={sorted(self.in_features)})"


class WholeSequence(ModuleHooks):
    """Runs a module on the whole sequence inside a sequence-parallel model (see the module doc).

    Gathered: every floating input of shape ``(..., T/p, w)`` with ``w`` one of ``in_features`` (the
    widths the module reads the hidden states at), on dim -2; the gradient of the gathered input is
    complete and the same on every rank (the module runs as plain tensor parallelism inside: its
    column layers all-reduce their input gradients), so backward keeps this rank's chunk of it. Split
    back: every floating output of the gathered input's shape ``(..., T, w)``; other outputs (router
    logits, an auxiliary loss) stay whole, as every rank computed them from every token. A call with
    nothing to gather is a ``ShardingError`` (each rank would compute on other tokens).

    With ``hidden_only`` (a module the plan leaves whole, run replicated) only the hidden states are
    gathered: the first such input with ``ndim`` dims that is, in eager code, as long as this rank's
    chunk of a sequence-sharded sequence of this forward (a cross-attention's memory, a mask, stay as
    given); and every floating output with the gathered input's dims before the last (batch and
    sequence; any width, a per-head gate's too) is split back.
    """

    def __init__(
        self,
        group: ProcessGroup,
        in_features: Iterable[int],
        name: str = "",
        hidden_only: bool = False,
        ndim: int | None = None,
    ) -> None:
        self.group, self.in_features, self.name = group, frozenset(int(i) for i in in_features), name
        self.hidden_only, self.ndim = hidden_only, ndim
        self._shapes: set[tuple[int, ...]] = set()  # the gathered inputs' shapes, set by the pre-hook
        self._whole = False  # an input of a sequence that runs whole in this forward (nothing to gather)

    def _gather(self, x: Any) -> Any:
        if is_hidden(x, self.in_features) and (self.ndim is None or x.dim() == self.ndim):
            if self.hidden_only and (self._shapes or self._whole):
                return x  # the hidden states came first: a cross-attention's memory stays as given
            if sequence_whole(x.shape[-2]):
                self._whole = True
                return x
            if self.hidden_only and sharded_length(x.shape[-2]) is False:
                return x  # not this rank's chunk of a sharded sequence
            full = gather_from_sp(x, self.group, -2, grad_reduce=False).contiguous()  # the module may view() it
            self._shapes.add(tuple(full.shape))
            return full
        return x

    def _split(self, y: Any) -> Any:
        if not isinstance(y, Tensor) or not y.is_floating_point():
            return y
        if tuple(y.shape) in self._shapes or (
            self.hidden_only and any(y.shape[:-1] == s[:-1] and y.dim() == len(s) for s in self._shapes)
        ):
            return scatter_to_sp(y, self.group, -2)
        return y

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._shapes, self._whole = set(), False
        out = tuple(self._gather(a) for a in args), {k: self._gather(v) for k, v in kwargs.items()}
        if not self._shapes and not self._whole:
            raise ShardingError(
                f"module {self.name!r} (sequence parallelism runs it on the whole sequence): none of its inputs "
                f"is a floating (..., T/p, w) tensor with w in {sorted(self.in_features)} to gather, so each rank "
                "would compute on other tokens. Pass it the hidden states, or use sequence_parallel=False."
            )
        return out

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return tree_map(self._split, output)

    def __repr__(self) -> str:
        return f"WholeSequence(in_features={sorted(self.in_features)}{', hidden_only' if self.hidden_only else ''})"


class StackSequence:
    """The layer stack's ends for a model whose layers take per-position inputs (see the module doc):
    with ``split_input`` (the first layer) the hidden states, the argument ``arg`` (a position or a
    keyword, read from the model's forward), are split to this rank's chunk on dim -2 (backward:
    all-gather, so what ran before the stack gets the whole, identical gradient on every rank); with
    ``gather_output`` (the last layer) its outputs of the shape of that argument (sequence-sharded) are
    all-gathered on dim -2 (backward: this rank's chunk of the gradient, which what runs after the
    stack, as without sequence parallelism, makes complete on every rank). Other inputs (masks,
    positions, rotary tables, an encoder's states) pass unchanged: the layers read them whole. The
    hooks keep no state of their own between calls (a compiled layer's guards see none); the first
    layer tells ``outputs`` the length of each call's chunk.

    Args:
        group: the tensor-parallel process group.
        in_features: the widths of the hidden states (the input widths of the stack's column layers).
        split_input: split the inputs (the stack's first layer).
        gather_output: gather the outputs (the stack's last layer).
        name: the layer's name (in errors).
        arg: the argument that carries the hidden states: its position in ``args``, or its keyword.
        outputs: the hooks on the module that calls the stack (:class:`StackOutputs`), told the length of
            each split's chunk (the first layer).
    """

    def __init__(
        self,
        group: ProcessGroup,
        in_features: Iterable[int],
        split_input: bool,
        gather_output: bool,
        name: str = "",
        arg: int | str = 0,
        outputs: StackOutputs | None = None,
    ) -> None:
        self.group, self.in_features, self.name, self.arg = group, frozenset(int(i) for i in in_features), name, arg
        self.split_input, self.gather_output, self.outputs = split_input, gather_output, outputs

    def attach(self, layer: nn.Module) -> list[RemovableHandle]:
        """Register the split on ``layer``'s input and the gather on its output, as configured."""
        handles = []
        if self.split_input:
            handles.append(layer.register_forward_pre_hook(self._pre, with_kwargs=True))
        if self.gather_output:  # (after the split, on a one-layer stack: it sees the split inputs)
            handles.append(layer.register_forward_hook(self._post, with_kwargs=True))
        return handles

    def _hidden(self, args: tuple, kwargs: dict) -> Tensor:
        x = args[self.arg] if isinstance(self.arg, int) and self.arg < len(args) else kwargs.get(str(self.arg))
        if not is_hidden(x, self.in_features):
            raise ShardingError(
                f"sequence parallelism: {self.name!r} (the layer stack's first or last layer) takes the hidden states "
                f"as argument {self.arg!r}, read from the model's forward, and this call gives it "
                f"{type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape)}, not a floating (..., T, w) "
                f"tensor with w in {sorted(self.in_features)}. Call the layers alike, or use sequence_parallel=False."
            )
        return x

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x = self._hidden(args, kwargs)
        if enter_sequence_region(x, self.group, self.name, module.training):
            return None  # a length that does not divide by TP, without gradients: the stack runs on the whole sequence
        shard = scatter_to_sp(x, self.group, -2)
        if self.outputs is not None:
            self.outputs.enter(shard)
        if isinstance(self.arg, int) and self.arg < len(args):
            return (*args[: self.arg], shard, *args[self.arg + 1 :]), kwargs
        return args, {**kwargs, str(self.arg): shard}

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        shape = tuple(self._hidden(args, kwargs).shape)  # this rank's chunk
        if sequence_whole(shape[-2]):
            return None  # the stack ran on the whole sequence

        def gather(y: Any) -> Any:
            if isinstance(y, Tensor) and y.is_floating_point() and tuple(y.shape) == shape:
                return gather_from_sp(y, self.group, -2, grad_reduce=False)
            return y

        return tree_map(gather, output)

    def __repr__(self) -> str:
        return (
            f"StackSequence(in_features={sorted(self.in_features)}, split_input={self.split_input}, "
            f"gather_output={self.gather_output}, arg={self.arg!r})"
        )


class StackOutputs(ModuleHooks):
    """Hooks on the module that calls the layer stack (the stack's parent; one without a forward of its
    own, a container, is looked through) under sequence parallelism, where the stack is the
    sequence-sharded region (:class:`StackSequence`) or inside it (Megatron's split at the
    embeddings: :meth:`layer_input` on each layer): hidden states it returns from inside the stack
    (Hugging Face's ``output_hidden_states=True`` collects every layer's input and output; a user's
    list of them) are this rank's chunk, ``(..., T/p, w)``; they are all-gathered on dim -2, so the
    caller sees what the dense model returns (backward: this rank's chunk of the gradient, which is
    complete: what runs on a gathered tensor runs alike on every rank). The chunks are the hidden
    states the stack's layers take (:meth:`enter`: the first layer's split, or each layer's input
    where the sequence is split before the stack) and return (:meth:`note`, :meth:`layer_output`; a
    call on the whole sequence notes none): the same tensor objects, so a tensor made from them (a
    pooled ``h[:, -1:]`` as long as a chunk) is not one. Where a layer ran compiled (no tensor
    identity there), every floating output of the hidden states' number of dims, a hidden width and a
    chunk's length is taken for one. Nothing is gathered unless the module returns a chunk.

    A mixture of experts' routers inside the stack (:meth:`router_output`, hooked on each) score this
    rank's tokens: their outputs (the router logits Hugging Face returns with
    ``output_router_logits=True``, for its auxiliary load-balancing loss) are this rank's rows of the
    tokens, flattened ``(B*T/p, E)`` or ``(..., T/p, E)``; where the module returns them they are
    all-gathered to the dense model's rows (flattened batch-major: ``(B*T, E)``), so that loss is the
    dense model's on every rank and the routers' (partial) gradients from it are too. Known by
    identity as above, or as a view of one holding all its elements (``scores.view(B, T/p, E)``); where
    layers ran compiled, by shape (a router's width ``E``, a chunk's rows). A router that is a parameter
    of the experts' layer (scoring inside its forward) cannot be hooked: ``apply_policy`` warns.

    Args:
        group: the tensor-parallel process group.
        in_features: the widths of the hidden states.
        ndim: their number of dims (read again from each call's chunk).
    """

    def __init__(self, group: ProcessGroup, in_features: Iterable[int], ndim: int = 3) -> None:
        self.group, self.in_features, self.ndim = group, frozenset(int(i) for i in in_features), ndim
        self.chunk: int | None = None  # this call's chunk length (enter)
        self._chunks: dict[int, weakref.ref] = {}  # id -> the chunks noted in this call
        self._traced = False  # a chunk was made in compiled code: read by shape
        self.rows: int | None = None  # the chunk's tokens, B*T/p: a router's outputs' rows
        self._routed: dict[int, weakref.ref] = {}  # id -> the routers' outputs in this call
        self._router_widths: set[int] = set()  # the routers' output widths (the numbers of experts)

    def _is_chunk_shaped(self, y: Any) -> bool:  # (plain tensors only: sharded logits are no hidden states)
        return (
            type(y) is Tensor and self.chunk is not None and y.dim() == self.ndim and y.shape[-2] == self.chunk
            and is_hidden(y, self.in_features)
        )  # fmt: skip

    def enter(self, x: Tensor) -> None:
        """A layer of the stack takes this chunk of the hidden states, ``x``: this call's chunk length."""
        self.chunk, self.rows, self.ndim = x.shape[-2], x.shape[:-1].numel(), x.dim()
        self.note(x)

    def layer_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on each layer of the stack where the sequence is split before it (Megatron's
        split, at the embeddings; the same on every layer, so that compiled layers share their code): its
        first hidden-state input is a chunk, unless this forward runs on the whole sequence."""
        for x in (*args, *kwargs.values()):
            if is_hidden(x, self.in_features):
                if not sequence_whole(x.shape[-2]):
                    self.enter(x)
                return

    def note(self, y: Any) -> None:
        """``y`` may be a chunk of this call's hidden states (the first layer's split input, a layer's output)."""
        if torch.compiler.is_compiling():
            self._traced = True
        elif self._is_chunk_shaped(y):
            self._remember(self._chunks, y)

    @staticmethod
    def _remember(noted: dict[int, weakref.ref], y: Tensor) -> None:  # (a dead tensor leaves: no growth)
        key = id(y)
        noted[key] = weakref.ref(y, lambda ref, key=key: noted.pop(key, None) if noted.get(key) is ref else None)

    def layer_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on each layer of the stack: notes the chunks it returns."""
        if torch.compiler.is_compiling():  # (reading no state: every compiled layer shares its code)
            self._traced = True
        elif self.chunk is not None:
            for y in tree_leaves(output):
                self.note(y)

    def router(self, module: nn.Module, width: int) -> RemovableHandle:
        """Hook a router inside the stack that scores ``width`` experts (see the class doc)."""
        self._router_widths.add(int(width))
        return module.register_forward_hook(self.router_output)

    def _is_routed_shaped(self, y: Any) -> bool:
        if type(y) is not Tensor or self.rows is None or not y.is_floating_point() or y.dim() < 2:
            return False
        if y.shape[-1] not in self._router_widths:
            return False
        if y.dim() == 2:
            return y.shape[0] == self.rows
        return y.shape[-2] == self.chunk and y.shape[:-2].numel() * self.chunk == self.rows

    def router_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on each router of the stack: notes its outputs of this rank's tokens."""
        if torch.compiler.is_compiling():  # (reading no state, as layer_output)
            self._traced = True
        elif self.chunk is not None:
            for y in tree_leaves(output):
                if self._is_routed_shaped(y):
                    self._remember(self._routed, y)

    def _views_routed(self, y: Tensor) -> bool:
        """``y`` holds a router output's very elements (a ``view`` of it to ``(B, T/p, E)``)."""
        return any(
            (r := ref()) is not None and r.data_ptr() == y.data_ptr() and r.numel() == y.numel()
            for ref in self._routed.values()
        )

    def _gather_rows(self, y: Tensor) -> Tensor:
        if y.dim() > 2:  # (..., T/p, E)
            return gather_from_sp(y, self.group, -2, grad_reduce=False)
        rows = y.reshape(self.rows // self.chunk, self.chunk, y.shape[-1])  # (B, T/p, E): batch-major rows
        return gather_from_sp(rows, self.group, 1, grad_reduce=False).reshape(-1, y.shape[-1])

    def _forget(self) -> None:
        self.chunk, self.rows, self._traced = None, None, False
        self._chunks.clear()
        self._routed.clear()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._forget()

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.chunk is None:
            return None

        def noted(y: Any, where: dict[int, weakref.ref]) -> bool:
            return self._traced or (ref := where.get(id(y))) is not None and ref() is y

        def gather(y: Any) -> Any:
            if self._is_chunk_shaped(y) and noted(y, self._chunks):
                return gather_from_sp(y, self.group, -2, grad_reduce=False)
            if self._is_routed_shaped(y) and (noted(y, self._routed) or self._views_routed(y)):
                return self._gather_rows(y)
            return y

        out = tree_map(gather, output)
        self._forget()
        return out

    def __repr__(self) -> str:
        return f"StackOutputs(in_features={sorted(self.in_features)}, ndim={self.ndim})"


class SequenceShardedEmbedding(nn.Embedding):
    """A replicated ``nn.Embedding`` (positions, token types) inside a sequence-parallel model: the
    whole table on every rank, output ``(..., T/p, H)``, this rank's chunk of the ids' last dim (the
    sequence). Backward all-gathers the chunks' grads, so the weight's grad is complete and identical
    on every rank. Same parameter object (``weight``, ties kept) and state-dict key as the
    ``nn.Embedding`` it replaces.
    """

    group: ProcessGroup
    tp_name: str = ""  # its name in the model (in errors)

    @classmethod
    def from_dense(cls, module: nn.Embedding, group: ProcessGroup, name: str = "") -> SequenceShardedEmbedding:
        if type(module) is not nn.Embedding:
            raise TypeError(
                f"SequenceShardedEmbedding.from_dense expects a plain nn.Embedding, got {type(module).__name__}."
            )
        new = cls(
            module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm, module.norm_type,
            module.scale_grad_by_freq, module.sparse, device="meta",
        )  # fmt: skip
        new.weight = module.weight  # the same Parameter object
        new.train(module.training)
        new.group, new.tp_name = group, name
        return new

    def forward(self, ids: Tensor) -> Tensor:
        y = super().forward(ids)  # (..., T, H)
        if enter_sequence_region(y, self.group, self.tp_name, self.training):
            return y  # a length that does not divide by TP, without gradients: the whole sequence
        return scatter_to_sp(y, self.group, -2)  # (..., T/p, H)
