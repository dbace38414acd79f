"""lightning_tp: Megatron-LM style tensor parallelism for PyTorch Lightning."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_tp.engine.comm import (
    copy_to_tp,
    copy_to_tp_linear,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
)
from lightning_tp.engine.layers import (
    ColumnParallelLinear,
    HeadParallelEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
    gather_weight,
)
from lightning_tp.engine.loss import VocabShardedLogits, cross_entropy, gather_logits, vocab_parallel_cross_entropy
from lightning_tp.engine.mesh import TPMesh, init_tp_mesh
from lightning_tp.engine.random import RNGTracker, TPDropout, model_parallel_seed
from lightning_tp.engine.sharding import ShardSpec, mark_partial_grad
from lightning_tp.errors import (
    CheckpointSkippedWarning,
    DeferredInitError,
    LightningTPError,
    MeshConfigError,
    NonFiniteLossError,
    PartialGradError,
    PolicyMismatchError,
    PreemptedError,
    SequenceParallelGradError,
    ShardingError,
    UnsupportedCallbackError,
    VerifyInputError,
)
from lightning_tp.lightning.checkpoint import CheckpointError, consolidate
from lightning_tp.lightning.export import export
from lightning_tp.lightning.precision import TPGradScaler, TPMixedPrecision
from lightning_tp.lightning.strategy import MegatronTPStrategy
from lightning_tp.policy import (
    Plan,
    PolicyError,
    PolicyWarning,
    apply_plan,
    apply_policy,
    plan_policy,
    register_policy,
)

MegatronTPStrategy.register_strategies(StrategyRegistry)

__version__ = "0.1.0.dev0"

__all__ = [
    "CheckpointError",
    "CheckpointSkippedWarning",
    "DeferredInitError",
    "MegatronTPStrategy",
    "TPGradScaler",
    "TPMixedPrecision",
    "consolidate",
    "export",
    "Plan",
    "PolicyError",
    "PolicyWarning",
    "apply_plan",
    "apply_policy",
    "plan_policy",
    "register_policy",
    "ColumnParallelLinear",
    "LightningTPError",
    "MeshConfigError",
    "NonFiniteLossError",
    "PreemptedError",
    "PartialGradError",
    "VerifyInputError",
    "UnsupportedCallbackError",
    "HeadParallelEmbedding",
    "SequenceParallelGradError",
    "PolicyMismatchError",
    "RNGTracker",
    "RowParallelLinear",
    "ShardSpec",
    "ShardingError",
    "TPDropout",
    "TPMesh",
    "VocabParallelEmbedding",
    "VocabParallelLMHead",
    "VocabShardedLogits",
    "copy_to_tp",
    "copy_to_tp_linear",
    "cross_entropy",
    "gather_from_sp",
    "gather_from_tp",
    "gather_logits",
    "gather_weight",
    "init_tp_mesh",
    "mark_partial_grad",
    "model_parallel_seed",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "scatter_to_sp",
    "scatter_to_tp",
    "vocab_parallel_cross_entropy",
]
