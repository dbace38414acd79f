"""Style objects: one per kind of rewrite, each knowing which modules it fits, the shard spec it
gives their weight, and how to build the replacement (torchtitan's ParallelStyle idea).

Styles a policy can name: ``column``, ``row``, ``qkv``, ``kv_replicate`` (also planned automatically
in place of ``column`` for key/value projections with fewer heads than ranks), ``vocab``, ``heads``,
``head_params`` (also planned automatically for a head-split block's own per-head parameters),
``replicate``, ``gather_input`` (also planned automatically for a full-width norm inside a
head-split block), ``experts`` (a mixture of experts kept as parameters, each expert split like an
MLP), ``tp_dropout`` (also planned automatically for attention dropouts of split blocks). Styles only
sequence-parallel planning adds: ``sequence_gather``, ``sequence_embedding``, ``sequence_whole``,
``sequence_stack``. A :class:`~lightning_tp.policy.plan.Plan` row names its
style; :func:`~lightning_tp.policy.apply.apply_plan` calls that style's :meth:`Style.build`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import nn
from torch.distributed import ProcessGroup

from lightning_tp.engine.attention import multihead_attention_specs, own_forward, split_multihead_attention
from lightning_tp.engine.comm import group_size
from lightning_tp.engine.experts import ExpertsReduce, act_once
from lightning_tp.engine.features import FeatureGather, HeadSlice, TailGradSum, forward_parameters, gathered_width
from lightning_tp.engine.layers import (
    EMBEDDING_OPTIONS_REASON,
    ColumnParallelLinear,
    HeadParallelEmbedding,
    KVReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    check_heads,
    chunk_sizes,
    kv_replica_layout,
    split_parameters,
    unsupported_embedding_options,
)
from lightning_tp.engine.random import RNGTracker, TPDropout
from lightning_tp.engine.sequence import (
    SequenceGather,
    SequenceShardedEmbedding,
    StackOutputs,
    StackSequence,
    WholeSequence,
)
from lightning_tp.engine.sharding import (
    ShardSpec,
    has_partial_grad,
    has_partial_grad_mark,
    mark_partial_grad,
    shard_spec,
)
from lightning_tp.errors import ShardingError


class PlannedModule(Protocol):
    """What a style reads of a plan row (:class:`lightning_tp.policy.plan.PlannedModule`)."""

    name: str
    options: dict[str, Any]
    spec: ShardSpec | None


def as_linear(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight
    ``(in, out)``), else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return module.weight.shape[0], module.weight.shape[1]
    return None


def not_a_layer(module: nn.Module) -> bool:
    """Neither a linear layer nor an embedding: what styles that hook or split a module's own
    parameters (a norm, an attention block) fit."""
    return as_linear(module) is None and not isinstance(module, nn.Embedding)


def dense_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear`` sharing its parameters (a ``Conv1D`` is transposed)."""
    if isinstance(module, nn.Linear):
        return module
    nx, nf = as_linear(module)
    lin = nn.Linear(nx, nf, bias=module.bias is not None, device="meta")
    lin.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        lin.bias = module.bias
    return lin


@dataclass
class BuildContext:
    """What building a plan's modules needs besides the dense module: the TP group, whether the
    plan is sequence parallel, the RNG tracker for per-rank dropouts (``None``: they stay
    ``nn.Dropout``), and the blocks' sequence gathers (shared by a block and its column layers)."""

    group: ProcessGroup
    sequence_parallel: bool = False
    rng_tracker: RNGTracker | None = None
    gathers: dict[str, SequenceGather] = field(default_factory=dict)
    in_features: dict[str, set[int]] = field(default_factory=dict)
    whole_sequence: tuple[str, ...] = ()  # modules that run on the whole sequence (sequence_whole rows)
    stack: str | None = None  # the layer stack, where a plan with sequence_stack rows is sequence parallel
    hidden_ndim: int | None = None  # the hidden states' dims there (read from the model's forward)
    stack_outputs: StackOutputs | None = None  # the hooks on the stack's caller (made by its first layer's row)
    entries: list[str] = field(default_factory=list)  # where the sequence is split (sequence parallelism)

    def sequence_parallel_at(self, name: str) -> bool:
        """Whether the module ``name`` runs on sequence-sharded activations: under sequence
        parallelism, unless it sits inside a module that runs on the whole sequence or outside the
        layer stack of a plan whose sequence-sharded region is that stack."""
        return (
            self.sequence_parallel
            and (self.stack is None or name.startswith(self.stack + "."))
            and not any(name.startswith(w + ".") for w in self.whole_sequence)
        )

    def column_input(self, name: str) -> dict[str, Any]:
        """How the input of the column layer ``name`` arrives (its layer's keyword options): gathered by
        its block (``sequence_gather``), or, where its block gathers nothing (a block holding other
        blocks: a decoder layer holding its attention block and its MLP's linears itself), sharded on
        the sequence and gathered by the layer itself, as Megatron's column layers do. Nothing outside
        the sequence-sharded region."""
        if not self.sequence_parallel_at(name):
            return {}
        block = name.rpartition(".")[0]
        if block not in self.in_features and any(b.startswith(f"{block}.") for b in self.in_features):
            return {"sequence_parallel": True, "seq_dim": -2}  # (a block the plan gives no gather: it holds others)
        return {"sequence_gather": self.gather(block)}  # (no row for it: a ShardingError says so)

    def gather(self, block: str) -> SequenceGather:
        """The sequence gather of ``block`` (made on first use; the plan must have its row)."""
        if block not in self.in_features:
            raise ShardingError(
                f"sequence parallelism: the plan has no 'sequence_gather' row for block {block!r}, which holds "
                "column layers. Make the plan with plan_policy(model, tp, policy, sequence_parallel=True)."
            )
        if block not in self.gathers:
            self.gathers[block] = SequenceGather(self.group, self.in_features[block], self.hidden_ndim)
        return self.gathers[block]


class Style:
    """One kind of rewrite. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()
    need: ClassVar[str] = "an nn.Linear"
    replaces: ClassVar[bool] = True  # builds a new module (False: marks or hooks the dense one)

    def acts_on(self, module: nn.Module, options: dict[str, Any]) -> bool:
        """For a style that does not replace the module: whether a row for a module that is not an
        ``nn.Linear``/``nn.Embedding`` does anything (a pattern that also covers containers skips them)."""
        return True

    def fits(self, module: nn.Module) -> bool:
        return as_linear(module) is not None

    def shape(self, module: nn.Module) -> tuple[int, ...]:
        """The weight's full shape, ``(out, in)`` for linear modules (as ``nn.Linear``)."""
        lin = as_linear(module)
        if lin is not None:
            return (lin[1], lin[0])
        weight = getattr(module, "weight", None)
        return tuple(weight.shape) if isinstance(weight, nn.Parameter) else ()

    def spec(
        self, name: str, module: nn.Module, shape: tuple[int, ...], options: dict[str, Any], tp: int
    ) -> ShardSpec | None:
        """How the weight is split (``None``: whole on every rank). May fill derived options."""
        return None

    def local_shape(
        self, shape: tuple[int, ...], spec: ShardSpec | None, options: dict[str, Any], tp: int
    ) -> tuple[int, ...]:
        """The weight's shape on each rank (the plan's ``local_shape``)."""
        return shape if spec is None else tuple(spec.local_size if d == spec.dim else s for d, s in enumerate(shape))

    def sequence_parallel_error(self, options: dict[str, Any], gathered: bool = False) -> str | None:
        """Why a row of this style cannot be sequence parallel (``None``: it can); ``gathered``: it sits
        in a block that gathers the sequence at its input."""
        return None

    def splits_heads(self, options: dict[str, Any]) -> bool:
        """Whether the output stays split by heads, so the parent block sees only this rank's heads
        (its head-count attributes are divided)."""
        return False

    def output_spec(self, row: PlannedModule) -> ShardSpec | None:
        """Layout of the module's output over TP on the last dim (``None``: dense)."""
        return None

    def bias_local(self, bias: nn.Parameter, spec: ShardSpec) -> int:
        return spec.local_size

    def local_numels(self, module: nn.Module, row: PlannedModule) -> dict[str, int]:
        """Elements per rank of each of the module's own parameters the row splits, by name (a
        linear module's weight and bias; the others whole)."""
        if row.spec is None:
            return {}
        local = row.spec.local_size
        numels = {"weight": math.prod(local if d == row.spec.dim else s for d, s in enumerate(row.full_shape))}
        if getattr(module, "bias", None) is not None:
            numels["bias"] = self.bias_local(module.bias, row.spec)
        return numels

    def dropped_state(self, module: nn.Module) -> list[str]:
        """Names of ``module``'s parameters and buffers the rewrite would not keep: the built layer holds
        a weight and a bias alone, so anything else a user's subclass, a parametrization or a child
        holds (a per-vocabulary logit scale, say) would be lost. Empty for styles that keep the module."""
        if not self.replaces:
            return []
        names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        return [n for n in names if n not in ("weight", "bias")]

    def refusal(self, module: nn.Module) -> str | None:
        """Why this style cannot split ``module`` whatever its sizes (``None``: it can). Checked when the
        plan is made, before any module is touched."""
        return None

    def companion_error(self, name: str, rows: Mapping[str, PlannedModule]) -> str | None:
        """Why the row of module ``name`` cannot be built with the plan's other ``rows`` (by module name), a
        module it runs needing a row of its own (``None``: it can). Checked when the plan is made."""
        return None

    def build(self, row: PlannedModule, dense: nn.Module, ctx: BuildContext) -> nn.Module:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<style {self.name}>"


class Column(Style):
    """``nn.Linear`` split on out_features; the output stays sharded (or gathered with ``gather_output``)."""

    name = "column"
    options = frozenset({"gather_output"})

    def splits_heads(self, options):
        return not options.get("gather_output", False)

    def spec(self, name, module, shape, options, tp):
        sizes = chunk_sizes(shape[0], options.get("chunks", 1), name)
        return ShardSpec(dim=0, sizes=sizes, tp_size=tp, name=f"out_features of {name!r}")

    def output_spec(self, row):
        if row.options.get("gather_output", False):
            return None
        return ShardSpec(dim=-1, sizes=row.spec.sizes, tp_size=row.spec.tp_size)

    def build(self, row, dense, ctx):
        return ColumnParallelLinear.from_dense(
            dense_linear(dense),
            ctx.group,
            gather_output=row.options.get("gather_output", False),
            chunks=row.options.get("chunks", 1),
            head_dim=row.options.get("head_dim"),
            name=row.name,
            **ctx.column_input(row.name),
        )


class Qkv(Column):
    """A fused projection (q/k/v, gate/up): each chunk split separately, so ranks hold whole heads."""

    name = "qkv"
    options = frozenset({"chunks", "head_dim", "gather_output"})

    def spec(self, name, module, shape, options, tp):
        sizes = chunk_sizes(shape[0], options.get("chunks", 3), name)
        if options.get("head_dim"):
            check_heads(sizes, options["head_dim"], tp, name)
        options["chunks"] = sizes
        return ShardSpec(dim=0, sizes=sizes, tp_size=tp, name=f"out_features of {name!r}")


class KVReplicate(Column):
    """Key/value heads fewer (``kv_heads``) than TP ranks, the TP size a multiple of them: a key or
    value projection, or a fused ``[Q | K | V]`` one (``chunks=(q, k, v)``): each rank holds and
    computes its query heads and the key/value head they read
    (:class:`~lightning_tp.engine.layers.KVReplicatedLinear`, whose weight's ``ShardSpec`` shares the
    key/value chunks over the ranks of a head; the plan row has no spec: ``local_shape`` gives its size). Planned in place of a ``column`` or
    ``qkv`` row when the block's key/value heads cannot be split (a policy may name it too)."""

    name = "kv_replicate"
    options = frozenset({"kv_heads", "chunks"})
    need = "an nn.Linear"

    def fits(self, module):
        return isinstance(module, nn.Linear)  # a Conv1D's (in, out) weight would change layout whole

    def spec(self, name, module, shape, options, tp):
        kv_replica_layout(shape[0], options.get("kv_heads"), options.get("chunks"), tp, name)
        return None  # not a split the plan describes: KVReplicatedLinear lays its weight out itself

    def splits_heads(self, options):
        return True

    def output_spec(self, row):
        return None

    def local_shape(self, shape, spec, options, tp):
        """Each rank holds its query heads' rows and one key/value head's, not the whole projection."""
        n, chunks = options["kv_heads"], options.get("chunks")
        q, kv = kv_replica_layout(shape[0], n, chunks, tp)
        return (q // tp + (2 if chunks else 1) * kv // n, *shape[1:])

    def local_numels(self, module, row):
        numels = {"weight": math.prod(row.local_shape)}
        if getattr(module, "bias", None) is not None:
            numels["bias"] = row.local_shape[0]
        return numels

    def build(self, row, dense, ctx):
        return KVReplicatedLinear.from_dense(
            dense, ctx.group, kv_heads=row.options["kv_heads"], chunks=row.options.get("chunks"), name=row.name,
            **ctx.column_input(row.name),
        )  # fmt: skip


class Row(Style):
    """``nn.Linear`` split on in_features; the output all-reduced (reduce-scattered under sequence
    parallelism), the bias added once."""

    name = "row"
    options = frozenset({"input_is_parallel"})

    def spec(self, name, module, shape, options, tp):
        return ShardSpec(dim=1, sizes=(shape[1],), tp_size=tp, name=f"in_features of {name!r}")

    def sequence_parallel_error(self, options, gathered=False):
        if options.get("input_is_parallel", True):
            return None
        return (
            "with input_is_parallel=False it cannot be sequence parallel (its input would be the sequence-sharded "
            "activations): make its input come from a column layer."
        )

    def bias_local(self, bias, spec):
        return bias.numel()

    def build(self, row, dense, ctx):
        sp = {"sequence_parallel": True, "seq_dim": -2} if ctx.sequence_parallel_at(row.name) else {}
        return RowParallelLinear.from_dense(
            dense_linear(dense), ctx.group, input_is_parallel=row.options.get("input_is_parallel", True),
            name=row.name, **sp,
        )  # fmt: skip


class Vocab(Style):
    """Embedding rows or LM-head outputs split by vocabulary (padded to a multiple of TP)."""

    name = "vocab"
    options = frozenset({"gather_output"})
    need = "an nn.Linear or nn.Embedding"

    def fits(self, module):
        return as_linear(module) is not None or isinstance(module, nn.Embedding)

    def spec(self, name, module, shape, options, tp):
        what = "out_features" if as_linear(module) is not None else "num_embeddings"
        return ShardSpec(dim=0, sizes=(shape[0],), tp_size=tp, pad=True, name=f"{what} of {name!r}")

    def dropped_state(self, module):
        if isinstance(module, nn.Embedding) and type(module) is not nn.Embedding:
            return []  # a subclass is kept, only its weight replaced (VocabParallelEmbedding.from_dense)
        return super().dropped_state(module)

    def refusal(self, module):
        bad = unsupported_embedding_options(module) if isinstance(module, nn.Embedding) else []
        return f"its nn.Embedding options {bad} {EMBEDDING_OPTIONS_REASON}" if bad else None

    def build(self, row, dense, ctx):
        if isinstance(dense, nn.Embedding):
            if ctx.sequence_parallel_at(row.name):
                ctx.entries.append(row.name)
            return VocabParallelEmbedding.from_dense(
                dense, ctx.group, name=row.name, sequence_parallel=ctx.sequence_parallel_at(row.name)
            )
        sp = {"sequence_parallel": True, "seq_dim": -2} if ctx.sequence_parallel_at(row.name) else {}
        return VocabParallelLMHead.from_dense(
            dense_linear(dense), ctx.group, gather_output=row.options.get("gather_output", False), name=row.name, **sp
        )


class Heads(Style):
    """A per-head table (``nn.Embedding`` as wide as the head count, e.g. T5's relative-position
    bias) split on embedding_dim like the attention heads."""

    name = "heads"
    need = "an nn.Embedding"

    def fits(self, module):
        return isinstance(module, nn.Embedding)

    def spec(self, name, module, shape, options, tp):
        return ShardSpec(dim=1, sizes=(shape[1],), tp_size=tp, name=f"embedding_dim of {name!r}")

    def output_spec(self, row):
        return ShardSpec(dim=-1, sizes=row.spec.sizes, tp_size=row.spec.tp_size)

    def build(self, row, dense, ctx):
        return HeadParallelEmbedding(dense, ctx.group, name=row.name)


class Replicate(Style):
    """Whole on every rank. With ``partial_grad`` its own parameters' gradients are partial (they see
    only this rank's heads or sequence chunk) and are summed over TP before the step. With
    ``partial_output=n`` (a linear layer) the gradient of its last ``n`` output features is summed
    over TP in backward: they reach only this rank's heads (multi-head latent attention's shared
    rotary key, Hugging Face's ``mla_kv_a_proj``; :class:`~lightning_tp.engine.features.TailGradSum`).
    Under sequence parallelism, in a block that gathers the sequence, the column layers leave their
    input gradients partial for the gather to sum, so the whole output's gradient is partial alike:
    the plan gives such a row ``partial_grad`` in place of ``partial_output``."""

    name = "replicate"
    options = frozenset({"partial_grad", "partial_output"})
    replaces = False

    def acts_on(self, module, options):
        return ("partial_grad" in options and any(True for _ in module.parameters(recurse=False))) or bool(
            options.get("partial_output")
        )

    def fits(self, module):
        return True

    def sequence_parallel_error(self, options, gathered=False):
        if not options.get("partial_output") or gathered:
            return None  # in a gathering block its whole output's gradient is partial, summed by the gather
        return (
            "with partial_output, its output reaches both a column layer and this rank's heads; under sequence "
            "parallelism it must sit in the block that gathers the sequence for those (the attention)."
        )

    def spec(self, name, module, shape, options, tp):
        n = options.get("partial_output")
        if n is not None and (
            isinstance(n, bool) or not isinstance(n, int) or as_linear(module) is None or not 0 < n < shape[0]
        ):
            raise ShardingError(
                f"module {name!r} (style 'replicate'): partial_output={n!r} must be a number of output features of a "
                f"linear layer, between 1 and its out_features - 1 (module: {type(module).__name__}"
                + (f", out_features={shape[0]})." if as_linear(module) is not None else ").")
            )
        return None

    def build(self, row, dense, ctx):
        if row.options.get("partial_grad"):
            for param in dense.parameters(recurse=False):
                if shard_spec(param) is None and not has_partial_grad_mark(param):  # a user's mark stands
                    mark_partial_grad(param)
        if row.options.get("partial_output"):
            TailGradSum(ctx.group, row.options["partial_output"]).attach(dense)
        return dense


class GatherInput(Style):
    """A module that reads the whole width ``width`` of a feature dim split over TP (OLMo-2's q/k
    RMSNorm over all heads): its inputs of this rank's width are all-gathered on the last dim, it
    runs whole, its output keeps this rank's chunk
    (:class:`~lightning_tp.engine.features.FeatureGather`); inputs of any other width pass through.
    Parameters whole on every rank, with complete gradients; with ``partial_grad`` (planned under
    sequence parallelism) each rank's gradient covers its output chunk and they are summed over TP.
    ``width`` defaults to the size of the module's 1-D parameters."""

    name = "gather_input"
    options = frozenset({"width", "partial_grad"})
    need = "a module with 1-D parameters of one size (a norm) or a 'width' option"
    replaces = False

    def fits(self, module):
        return not_a_layer(module)

    def spec(self, name, module, shape, options, tp):
        width = options.setdefault("width", gathered_width(module))
        if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
            raise ShardingError(
                f"module {name!r} (style 'gather_input'): width={width!r}; the width of the split feature dim it "
                "reads cannot be read from its parameters (they are not 1-D vectors of one size). Give it: "
                "{'style': 'gather_input', 'width': <full width, e.g. n_head * head_dim>}."
            )
        if width % tp != 0:
            raise ShardingError(
                f"module {name!r} (style 'gather_input'): width={width} is not divisible by tensor_parallel_size="
                f"{tp}. Use a tensor_parallel_size that divides {width}."
            )
        if len({has_partial_grad(p) for p in module.parameters(recurse=False) if has_partial_grad_mark(p)}) > 1:
            raise ShardingError(
                f"module {name!r} (style 'gather_input'): some of its parameters are marked partial and some complete "
                "(lightning_tp.mark_partial_grad); its backward gives them all the same kind. Mark them alike."
            )
        return None

    def build(self, row, dense, ctx):
        REPLICATE.build(row, dense, ctx)  # marks the partial gradients (a user's mark stands)
        marks = {has_partial_grad(p) for p in dense.parameters(recurse=False)}  # one kind: checked by spec()
        partial = marks.pop() if marks else bool(row.options.get("partial_grad"))
        FeatureGather(ctx.group, row.options["width"], partial_grads=partial).attach(dense)
        return dense


_EXPERT_SPLITS = {"column": (-2, 1), "row": (-1, 1), "packed_column": (-2, 2), "packed_row": (-1, 2)}


class _OwnParamsSplit(Style):
    """A style that splits some of a module's own parameters in place, each with its own shard spec
    (:meth:`param_specs`); the row's spec is the first one's."""

    def param_specs(self, name: str, module: nn.Module, options: Mapping[str, Any], tp: int) -> dict[str, ShardSpec]:
        raise NotImplementedError

    def spec(self, name, module, shape, options, tp):
        return next(iter(self.param_specs(name, module, options, tp).values()))

    def local_numels(self, module, row):
        specs = self.param_specs(row.name, module, row.options, row.spec.tp_size)
        params = dict(module.named_parameters(recurse=False))
        return {p: params[p].numel() // s.full_size * s.local_size for p, s in specs.items()}

    def build(self, row, dense, ctx):
        return split_parameters(dense, self.param_specs(row.name, dense, row.options, row.spec.tp_size), ctx.group)


class Experts(_OwnParamsSplit):
    """A module holding a mixture of experts as its own parameters, experts on dim 0 (Hugging Face's
    ``gate_up_proj (E, 2I, H)`` / ``down_proj (E, H, I)``): every expert is split over TP on its
    hidden units, like an MLP, the module runs as it is on the shards and its output is summed over
    TP (:mod:`lightning_tp.engine.experts`).

    ``params`` maps each of the module's parameters to its split. Every parameter is read experts
    first: ``(E, out, in)`` weights, ``(E, out)`` biases. ``"column"`` splits ``out`` (dim -2 of a
    weight, the last dim of a 2-D or 1-D parameter), ``"row"`` (on
    ``in``, dim -1), ``"packed_column"`` / ``"packed_row"`` (the same dim holding two chunks back to
    back, gate then up, each split), an int dim, ``{"dim": d, "chunks": k}``, or
    ``{"dim": d, "interleave": k}`` (the dim holds ``k`` chunks interleaved element by element, GPT-OSS's
    gate/up ``[..., ::2]`` / ``[..., 1::2]``: each rank holds a contiguous run of whole groups).
    ``"once"`` keeps a parameter whole, acting on one rank of the TP group (a bias added after the down
    projection, GPT-OSS's ``down_proj_bias``: :func:`~lightning_tp.engine.experts.act_once`). Every
    parameter of the module must be given one (one that is not, such as that bias, would be summed
    once per rank), and so would anything the module adds without parameters (identity experts): the
    split dims hold the hidden units, not the experts (dim 0 is refused)."""

    name = "experts"
    options = frozenset({"params"})
    need = "a module holding its experts' weights as its own parameters (not an nn.Linear/nn.Embedding)"

    def fits(self, module):
        return (
            as_linear(module) is None
            and not isinstance(module, nn.Embedding)
            and any(p.dim() >= 2 for p in module.parameters(recurse=False))
        )

    def dropped_state(self, module):
        return []  # the module is kept, its parameters split in place (param_specs checks each)

    def shape(self, module):
        return tuple(next(module.parameters(recurse=False)).shape)

    def param_specs(self, name: str, module: nn.Module, options: dict[str, Any], tp: int) -> dict[str, ShardSpec]:
        """The spec of each of ``module``'s split parameters, in registration order (not the ``once`` ones)."""
        given = options.get("params")
        own = dict(module.named_parameters(recurse=False))
        label = f"module {name!r} (style 'experts')"
        if not isinstance(given, Mapping) or not given:
            raise ShardingError(
                f"{label}: params={given!r}; give the split of each of its parameters, e.g. "
                "{'style': 'experts', 'params': {'gate_up_proj': 'packed_column', 'down_proj': 'row'}} "
                f"(its parameters: {sorted(own)})."
            )
        unknown = sorted(set(given) - set(own))
        missing = [p for p in own if p not in given]
        nested = [f"{c}.{p}" for c, child in module.named_children() for p, _ in child.named_parameters()]
        if unknown or missing or nested:
            what = (
                f"names {unknown} that are not its own parameters" if unknown
                else f"no split for its parameters {missing + nested}"
            )  # fmt: skip
            raise ShardingError(
                f"{label}: params has {what} (its own parameters: {sorted(own)}). Every parameter that acts in the "
                "experts must be split on the experts' hidden units: the output is summed over TP, so a whole one "
                "would count once per rank. A bias added after the down projection takes 'once' (kept whole, added "
                "on one rank); map the module to 'replicate' if neither is possible."
            )
        specs = {}
        for p_name, param in own.items():
            if given[p_name] == "once":
                continue
            dim, chunks, interleave = _expert_split(label, p_name, given[p_name], param.dim())
            if interleave > 1:
                size = param.shape[dim]
                if size % (interleave * tp) != 0:
                    raise ShardingError(
                        f"{label}: params[{p_name!r}]={given[p_name]!r}: dim {dim} of size {size} interleaves "
                        f"{interleave} chunks, and each rank must hold whole groups of {interleave}, so {size} must "
                        f"be divisible by {interleave} x tensor_parallel_size={tp}. Use a tensor_parallel_size that "
                        f"divides {size // interleave}."
                    )
                sizes = (size,)
            else:
                sizes = chunk_sizes(param.shape[dim], chunks, f"{name}.{p_name}")
            specs[p_name] = ShardSpec(dim=dim, sizes=sizes, tp_size=tp, name=f"dim {dim} of {name}.{p_name}")
        if not specs:
            raise ShardingError(
                f"{label}: params={given!r} splits none of its parameters ('once' keeps one whole). Split the "
                "experts' weights on their hidden units, or map the module to 'replicate'."
            )
        return specs

    @staticmethod
    def once(options: Mapping[str, Any]) -> tuple[str, ...]:
        """The parameters kept whole and acting on one rank (``"once"``)."""
        return tuple(p for p, split in options["params"].items() if split == "once")

    def build(self, row, dense, ctx):
        super().build(row, dense, ctx)
        act_once(dense, self.once(row.options), ctx.group)
        ExpertsReduce(ctx.group, ctx.sequence_parallel_at(row.name), row.name).attach(dense)
        return dense


def _expert_split(label: str, p_name: str, split: Any, ndim: int) -> tuple[int, int, int]:
    """``(dim, chunks, interleave)`` of one entry of an ``experts`` row's ``params``."""
    dim: Any = None
    chunks: Any = 1
    interleave: Any = 1
    if isinstance(split, str) and split in _EXPERT_SPLITS:
        dim, chunks = _EXPERT_SPLITS[split]
        if dim == -2 and ndim <= 2:  # a column split's bias, (E, out) or (out,): its last dim
            dim = -1
    elif isinstance(split, int) and not isinstance(split, bool):
        dim = split
    elif isinstance(split, Mapping) and set(split) <= {"dim", "chunks", "interleave"}:
        if {"chunks", "interleave"} <= set(split):
            raise ShardingError(
                f"{label}: params[{p_name!r}]={split!r} gives both 'chunks' (chunks back to back) and 'interleave' "
                "(chunks interleaved element by element); give the one that describes the dim."
            )
        dim, chunks, interleave = split.get("dim"), split.get("chunks", 1), split.get("interleave", 1)
    valid = isinstance(dim, int) and not isinstance(dim, bool) and -ndim <= dim < ndim
    counts = (chunks, interleave)
    if not valid or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
        raise ShardingError(
            f"{label}: params[{p_name!r}]={split!r} is not a split of a {ndim}-D parameter. Use 'once', one of "
            f"{sorted(_EXPERT_SPLITS)}, a dim in [{-ndim}, {ndim}), {{'dim': d, 'chunks': k}} or "
            "{'dim': d, 'interleave': k}."
        )
    if ndim >= 2 and dim % ndim == 0:
        raise ShardingError(
            f"{label}: params[{p_name!r}]={split!r} splits dim 0, the experts: every rank would hold other "
            "experts, which the module's code indexes by their global number (expert parallelism is not built). "
            "Split a dim of the experts' hidden units ('column', 'row', or a dim >= 1)."
        )
    return dim % ndim, chunks, interleave


class HeadParams(_OwnParamsSplit):
    """A block's own per-head parameters (GPT-OSS's attention sinks, ``(n_head,)``), in a block whose
    projections are split by heads: each split on its head dim (``params``: parameter name -> dim), so
    a rank holds its heads' entries, which the block's own code then reads with its local head count.
    Planned automatically; a policy may name it too. Under sequence parallelism the block's
    ``sequence_gather`` row carries the split (``params``)."""

    name = "head_params"
    options = frozenset({"params"})
    need = "a module holding per-head parameters of its own"
    replaces = False

    def fits(self, module):
        return not_a_layer(module)

    def param_specs(self, name: str, module: nn.Module, options: Mapping[str, Any], tp: int) -> dict[str, ShardSpec]:
        """The shard spec of each named parameter (split on its given dim)."""
        own, given = dict(module.named_parameters(recurse=False)), options.get("params")
        label = f"module {name!r} (style 'head_params')"
        if not isinstance(given, Mapping) or not given or set(given) - set(own):
            raise ShardingError(
                f"{label}: params={given!r} must map some of its own parameters {sorted(own)} to the dim that "
                "holds the heads, e.g. {'sinks': 0}."
            )
        specs = {}
        for p_name, split in given.items():
            ndim = own[p_name].dim()
            dim, kv = (split.get("dim"), split.get("kv_heads")) if isinstance(split, Mapping) else (split, None)
            valid = not isinstance(dim, bool) and isinstance(dim, int) and -ndim <= dim < ndim
            if isinstance(split, Mapping):
                valid = valid and set(split) <= {"dim", "kv_heads"} and type(kv) is int and kv > 0
            if not valid:
                raise ShardingError(
                    f"{label}: params[{p_name!r}]={split!r} is not a dim of a {ndim}-D parameter, nor "
                    "{'dim': d, 'kv_heads': n} (the dim holds the block's n key/value heads)."
                )
            dim %= ndim
            size, what = own[p_name].shape[dim], f"dim {dim} of {name}.{p_name}"
            shared = ()
            if kv is not None and kv < tp:  # replicated key/value heads: each rank holds the one its queries read
                if size != kv or tp % kv:
                    raise ShardingError(
                        f"{label}: params[{p_name!r}] has {size} entries on dim {dim}, not one per key/value head of "
                        f"{kv} replicated over tensor_parallel_size={tp} (which a multiple of {kv} must be)."
                    )
                shared = (tp // kv,)
            specs[p_name] = ShardSpec(dim=dim, sizes=(size,), tp_size=tp, name=what, shared=shared)
        return specs

    def shape(self, module):
        return ()


HEAD_PARAMS = HeadParams()


class MultiheadAttentionStyle(_OwnParamsSplit):
    """torch's ``nn.MultiheadAttention`` split by heads: its own q/k/v projection parameters (fused
    ``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``/``bias_v``) keep this rank's
    heads and the module runs them (:class:`~lightning_tp.engine.attention.TensorParallelMultiheadAttention`);
    its ``out_proj`` must be a ``row`` row of its own, which sums the heads over TP. ``num_heads`` keeps
    the whole count (``local_heads``: this rank's). Planned by the auto rules for every
    ``nn.MultiheadAttention``."""

    name = "mha"
    need = "an nn.MultiheadAttention"

    def fits(self, module):
        return isinstance(module, nn.MultiheadAttention)

    def shape(self, module):
        return tuple(next(module.parameters(recurse=False)).shape)  # in_proj_weight (3E, E) or q_proj_weight (E, E)

    def dropped_state(self, module):
        return []  # the module is kept, its parameters split in place

    def refusal(self, module):
        return own_forward(module)

    def param_specs(self, name, module, options, tp):
        return multihead_attention_specs(module, tp, name)

    def sequence_parallel_error(self, options, gathered=False):
        return (
            "nn.MultiheadAttention split by heads is not built for sequence parallelism (it reads the sequence on "
            "dim 0 unless batch_first, and gathers no sequence); mapping it and its out_proj to 'replicate' keeps "
            "it whole."
        )

    def companion_error(self, name, rows):
        out = rows.get(f"{name}.out_proj")
        if out is not None and out.style == "row" and out.options.get("input_is_parallel", True):
            return None
        got = "no row (whole)" if out is None else f"style {out.style!r} {out.options or ''}".rstrip()
        return (
            f"its out_proj must be a 'row' layer taking this rank's heads, and the plan gives {name}.out_proj "
            f"{got}. Add {{'{name}.out_proj': 'row'}} to the policy, or map both to 'replicate'."
        )

    def build(self, row, dense, ctx):
        super().build(row, dense, ctx)  # this rank's heads of its own parameters
        return split_multihead_attention(dense, ctx.group, row.name)


class HeadInputs(Style):
    """A block whose projections are split by heads and whose ``forward`` takes a tensor holding one
    entry per head of the whole model, made outside it (BLOOM's ALiBi biases, ``(batch * n_head, 1,
    kv_len)``): that argument is cut to this rank's heads before the block runs
    (:class:`~lightning_tp.engine.features.HeadSlice`). ``inputs`` maps the argument's name to the
    model's head count, e.g. ``{'alibi': 32}``. Planned automatically for an argument named ``alibi``;
    a policy may name it too."""

    name = "head_inputs"
    options = frozenset({"inputs"})
    need = "a block (not a linear or embedding layer) whose forward takes the named arguments"
    replaces = False

    def fits(self, module):
        return not_a_layer(module)

    def shape(self, module):
        return ()

    def spec(self, name, module, shape, options, tp):
        given, params = options.get("inputs"), forward_parameters(module)
        valid = isinstance(given, Mapping) and bool(given)
        for arg, heads in given.items() if valid else ():
            if arg not in params or isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
                valid = False
            elif heads % tp:
                raise ShardingError(
                    f"module {name!r} (style 'head_inputs'): {arg!r} holds {heads} heads, which "
                    f"tensor_parallel_size={tp} does not divide. Use a tensor_parallel_size that divides {heads}."
                )
        if not valid:
            raise ShardingError(
                f"module {name!r} (style 'head_inputs'): inputs={given!r} must map arguments of its forward "
                f"{list(params)} to the model's head count, e.g. {{'alibi': <n_head>}}."
            )
        return None

    def build(self, row, dense, ctx):
        HeadSlice(ctx.group, row.options["inputs"]).attach(dense)
        return dense


class SequenceGatherStyle(Style):
    """A block holding column layers (sequence parallelism): its inputs of width ``in_features``
    are all-gathered on the sequence (:class:`~lightning_tp.engine.sequence.SequenceGather`); with
    ``partial_grad`` its own whole parameters' gradients are summed over TP; with ``params`` its own
    per-head parameters are split with its heads, as a ``head_params`` row does without sequence
    parallelism (the block's one row carries both); with ``inputs`` (a layer stack that is the
    sequence-sharded region: per-head inputs the model builds outside it, for the whole sequence)
    those arguments are cut to this rank's heads, as a ``head_inputs`` row does."""

    name = "sequence_gather"
    options = frozenset({"in_features", "partial_grad", "params", "inputs"})
    need = "a module"
    replaces = False

    def fits(self, module):
        return True

    def shape(self, module):
        return ()

    def spec(self, name, module, shape, options, tp):
        if options.get("inputs"):
            HEAD_INPUTS.spec(name, module, shape, {"inputs": options["inputs"]}, tp)  # validated as that row's
        return HEAD_PARAMS.spec(name, module, shape, options, tp) if options.get("params") else None

    def local_numels(self, module, row):
        return HEAD_PARAMS.local_numels(module, row) if row.options.get("params") else super().local_numels(module, row)

    def build(self, row, dense, ctx):
        if row.options.get("params"):
            HEAD_PARAMS.build(row, dense, ctx)  # split first: partial marks go to the whole parameters only
        if row.options.get("inputs"):
            HeadSlice(ctx.group, row.options["inputs"]).attach(dense)
        ctx.gather(row.name).attach(dense)
        return REPLICATE.build(row, dense, ctx)


class WholeSequenceStyle(SequenceGatherStyle):
    """A module that sees every token at once inside a sequence-parallel model (a mixture of experts
    whose experts are blocks of column and row layers; an attention or a mixer the plan leaves whole):
    its inputs of width ``in_features`` are all-gathered on the sequence (with ``hidden_only`` only
    its hidden states: the first of ``ndim`` dims as long as this rank's chunk), it runs as plain
    tensor parallelism (or whole, replicated) inside, its outputs are split back to this rank's chunk
    (:class:`~lightning_tp.engine.sequence.WholeSequence`). Planned by sequence parallelism only."""

    name = "sequence_whole"
    options = frozenset({"in_features", "hidden_only", "ndim"})

    def build(self, row, dense, ctx):
        o = row.options
        WholeSequence(ctx.group, o["in_features"], row.name, o.get("hidden_only", False), o.get("ndim")).attach(dense)
        return dense


class SequenceStackStyle(SequenceGatherStyle):
    """The first (``split_input``) or last (``gather_output``) layer of the model's layer stack, for a
    model whose layers take per-position inputs it computes from the embeddings' output: the stack is
    the sequence-sharded region (:class:`~lightning_tp.engine.sequence.StackSequence`), what runs
    outside it runs as without sequence parallelism. ``arg`` is the argument that carries the hidden
    states (a position or a keyword), ``ndim`` their number of dims (the stack's sequence gathers take
    only tensors of that rank). With ``partial_grad`` its own whole parameters' gradients are summed
    over TP. Planned by sequence parallelism only."""

    name = "sequence_stack"
    options = frozenset({"in_features", "split_input", "gather_output", "arg", "ndim", "partial_grad"})

    def build(self, row, dense, ctx):
        o = row.options
        if o["split_input"]:  # the hidden states the stack's caller returns from inside it are gathered
            ctx.stack_outputs = StackOutputs(ctx.group, o["in_features"], o["ndim"])
            ctx.entries.append(row.name)
        outputs = ctx.stack_outputs if o["split_input"] else None
        StackSequence(
            ctx.group, o["in_features"], o["split_input"], o["gather_output"], row.name, o["arg"], outputs
        ).attach(dense)
        return REPLICATE.build(row, dense, ctx)


class SequenceEmbedding(Style):
    """A replicated ``nn.Embedding`` (positions) under sequence parallelism: this rank's chunk."""

    name = "sequence_embedding"
    need = "a plain nn.Embedding"

    def fits(self, module):
        return type(module) is nn.Embedding

    def build(self, row, dense, ctx):
        ctx.entries.append(row.name)
        return SequenceShardedEmbedding.from_dense(dense, ctx.group, row.name)


class PerRankDropout(Style):
    """An ``nn.Dropout`` on activations split over TP (this rank's heads or sequence chunk): its
    mask comes from the model-parallel RNG stream, so it differs per TP rank. With ``sequence_only``
    (planned by sequence parallelism for a dropout on the sequence-sharded activations) only while
    the sequence is sharded: in a forward on the whole sequence it draws as without sequence
    parallelism."""

    name = "tp_dropout"
    options = frozenset({"sequence_only"})
    need = "an nn.Dropout"

    def fits(self, module):
        return type(module) is nn.Dropout

    def shape(self, module):
        return ()

    def build(self, row, dense, ctx):
        if group_size(ctx.group) == 1:
            return dense  # one rank holds every head and unit: the dense model's masks
        if ctx.rng_tracker is None:
            if dense.p > 0:
                warnings.warn(
                    f"{row.name!r} drops activations split over tensor-parallel ranks, but no rng_tracker was given "
                    "to apply_plan/apply_policy: its masks stay those of the default generator. Pass "
                    "rng_tracker=lightning_tp.model_parallel_seed(seed, tp_rank, dp_rank) (the strategy does).",
                    UserWarning,
                    stacklevel=4,
                )
            return dense
        return TPDropout.from_dense(dense, ctx.rng_tracker, sequence_only=bool(row.options.get("sequence_only")))


REPLICATE = Replicate()
KV_REPLICATE = KVReplicate()
HEAD_INPUTS = HeadInputs()
#: styles a policy can name, by name
STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Column(), Row(), Qkv(), KV_REPLICATE, Vocab(), Heads(), HEAD_PARAMS, HEAD_INPUTS, REPLICATE, GatherInput(),
        Experts(), MultiheadAttentionStyle(),
        PerRankDropout(),
    )
}  # fmt: skip
#: every style a plan row can hold (sequence parallelism's pieces are planned, never named)
ALL_STYLES: dict[str, Style] = {
    **STYLES,
    **{s.name: s for s in (SequenceGatherStyle(), SequenceEmbedding(), WholeSequenceStyle(), SequenceStackStyle())},
}
