"""Style objects: one per kind of rewrite, each knowing which modules it fits, the shard spec it
gives their weight, and how to build the replacement (torchtitan's ParallelStyle idea).

Styles a policy can name: ``column``, ``row``, ``qkv``, ``vocab``, ``heads``, ``replicate``,
``gather_input`` (also planned automatically for a full-width norm inside a head-split block),
``tp_dropout`` (also planned automatically for attention dropouts of split blocks). Styles only
sequence-parallel planning adds: ``sequence_gather``, ``sequence_embedding``. A :class:`~lightning_tp.policy.plan.Plan` row names its
style; :func:`~lightning_tp.policy.apply.apply_plan` calls that style's :meth:`Style.build`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import nn
from torch.distributed import ProcessGroup

from lightning_tp.engine.features import FeatureGather, gathered_width
from lightning_tp.engine.layers import (
    ColumnParallelLinear,
    HeadParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    check_heads,
    chunk_sizes,
)
from lightning_tp.engine.random import RNGTracker, TPDropout
from lightning_tp.engine.sequence import SequenceGather, SequenceShardedEmbedding
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

    def gather(self, block: str) -> SequenceGather:
        """The sequence gather of ``block`` (made on first use; the plan must have its row)."""
        if block not in self.in_features:
            raise ShardingError(
                f"sequence parallelism: the plan has no 'sequence_gather' row for block {block!r}, which holds "
                "column layers. Make the plan with plan_policy(model, tp, policy, sequence_parallel=True)."
            )
        if block not in self.gathers:
            self.gathers[block] = SequenceGather(self.group, self.in_features[block])
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

    def splits_heads(self, options: dict[str, Any]) -> bool:
        """Whether the output stays split by heads, so the parent block sees only this rank's heads
        (its head-count attributes are divided)."""
        return False

    def output_spec(self, row: PlannedModule) -> ShardSpec | None:
        """Layout of the module's output over TP on the last dim (``None``: dense)."""
        return None

    def bias_local(self, bias: nn.Parameter, spec: ShardSpec) -> int:
        return spec.local_size

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
        block = row.name.rpartition(".")[0]
        return ColumnParallelLinear.from_dense(
            dense_linear(dense),
            ctx.group,
            gather_output=row.options.get("gather_output", False),
            chunks=row.options.get("chunks", 1),
            head_dim=row.options.get("head_dim"),
            sequence_gather=ctx.gather(block) if ctx.sequence_parallel else None,
            name=row.name,
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


class Row(Style):
    """``nn.Linear`` split on in_features; the output all-reduced (reduce-scattered under sequence
    parallelism), the bias added once."""

    name = "row"
    options = frozenset({"input_is_parallel"})

    def spec(self, name, module, shape, options, tp):
        return ShardSpec(dim=1, sizes=(shape[1],), tp_size=tp, name=f"in_features of {name!r}")

    def bias_local(self, bias, spec):
        return bias.numel()

    def build(self, row, dense, ctx):
        sp = {"sequence_parallel": True, "seq_dim": -2} if ctx.sequence_parallel else {}
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

    def build(self, row, dense, ctx):
        if isinstance(dense, nn.Embedding):
            return VocabParallelEmbedding.from_dense(
                dense, ctx.group, name=row.name, sequence_parallel=ctx.sequence_parallel
            )
        sp = {"sequence_parallel": True, "seq_dim": -2} if ctx.sequence_parallel else {}
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
    only this rank's heads or sequence chunk) and are summed over TP before the step."""

    name = "replicate"
    options = frozenset({"partial_grad"})
    replaces = False

    def acts_on(self, module, options):
        return "partial_grad" in options and any(True for _ in module.parameters(recurse=False))

    def fits(self, module):
        return True

    def build(self, row, dense, ctx):
        if row.options.get("partial_grad"):
            for param in dense.parameters(recurse=False):
                if shard_spec(param) is None and not has_partial_grad_mark(param):  # a user's mark stands
                    mark_partial_grad(param)
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
        return not isinstance(module, nn.Embedding) and as_linear(module) is None

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


class SequenceGatherStyle(Style):
    """A block holding column layers (sequence parallelism): its inputs of width ``in_features``
    are all-gathered on the sequence (:class:`~lightning_tp.engine.sequence.SequenceGather`); with
    ``partial_grad`` its own parameters' gradients are summed over TP."""

    name = "sequence_gather"
    options = frozenset({"in_features", "partial_grad"})
    need = "a module"
    replaces = False

    def fits(self, module):
        return True

    def shape(self, module):
        return ()

    def build(self, row, dense, ctx):
        ctx.gather(row.name).attach(dense)
        return REPLICATE.build(row, dense, ctx)


class SequenceEmbedding(Style):
    """A replicated ``nn.Embedding`` (positions) under sequence parallelism: this rank's chunk."""

    name = "sequence_embedding"
    need = "a plain nn.Embedding"

    def fits(self, module):
        return type(module) is nn.Embedding

    def build(self, row, dense, ctx):
        return SequenceShardedEmbedding.from_dense(dense, ctx.group)


class PerRankDropout(Style):
    """An ``nn.Dropout`` on activations split over TP (this rank's heads or sequence chunk): its
    mask comes from the model-parallel RNG stream, so it differs per TP rank."""

    name = "tp_dropout"
    need = "an nn.Dropout"

    def fits(self, module):
        return type(module) is nn.Dropout

    def shape(self, module):
        return ()

    def build(self, row, dense, ctx):
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
        return TPDropout.from_dense(dense, ctx.rng_tracker)


REPLICATE = Replicate()
#: styles a policy can name, by name
STYLES: dict[str, Style] = {
    s.name: s for s in (Column(), Row(), Qkv(), Vocab(), Heads(), REPLICATE, GatherInput(), PerRankDropout())
}
#: every style a plan row can hold (sequence parallelism's pieces are planned, never named)
ALL_STYLES: dict[str, Style] = {**STYLES, **{s.name: s for s in (SequenceGatherStyle(), SequenceEmbedding())}}
