"""Every private Lightning, torch or transformers name lightning_tp still needs, in one place. Each breaks on some
future release; ``tests/test_compat.py`` fails naming the symbol when it is gone or behaves otherwise.

torch (no public equivalent):

* ``tree_leaves`` / ``tree_map`` (``torch.utils._pytree``): flatten nested args/kwargs of an op on
  sharded logits exactly as torch's own dispatch does (containers torch registers, e.g. ``torch.Size``).
* ``DisableTorchFunctionSubclass`` (``torch._C``): run an op on a tensor subclass without
  re-entering its ``__torch_function__`` (the documented way inside ``__torch_function__``).
* ``tensor_version`` (``Tensor._version``): detect an in-place change of a tensor (a cached gather
  or a saved activation is stale after one).
* ``use_count`` / ``storage_use_count`` (``Tensor._use_count``, ``torch._C._storage_Use_Count``):
  whether a reusable buffer is referenced from C++ (saved for backward, a view, an alias); callers
  treat ``AttributeError``/``RuntimeError`` as "unknown: do not reuse".
* ``found_inf_per_device`` (``GradScaler._per_optimizer_states``): the found-inf flags a scaler
  recorded while unscaling, to reduce them over ranks before it decides to skip the step.
* ``check_inf_per_device`` (``GradScaler._check_inf_per_device``): how ``GradScaler.step`` finds
  infs for a fused optimizer (no ``unscale_``); ``TPGradScaler`` overrides it (listed in
  :data:`LIGHTNING_HOOKS`) to reduce those flags over ranks too.
* ``compile_counts`` (``torch._dynamo.utils.counters``): graphs and graph breaks ``torch.compile``
  made in this process for the user's code (benchmarks and the GPU tests report them); those made
  inside ``library_compilation()`` (lightning_tp's own fused kernels) are left out (counted in the
  same ``counters``, so clearing them clears both).
* ``user_dispatch_mode_active`` (``torch.utils._python_dispatch.is_in_torch_dispatch_mode``): a
  ``TorchDispatchMode`` other than torch's own is active, where ``torch.compile`` refuses to run (a
  fused kernel then runs eagerly).
* ``compile_stance`` (``torch._dynamo.eval_frame._stance``): the stance the user set with
  ``torch.compiler.set_stance`` (a fused kernel runs eagerly under ``"force_eager"`` and does not
  recompile under ``"fail_on_recompile"``, which is meant for the user's own code).
* ``has_triton`` (``torch.utils._triton.has_triton``): whether ``torch.compile`` can generate GPU
  kernels here (the fused loss is on by default only then).
* ``compiler_backend`` (``torch._dynamo.lookup_backend``): a registered ``torch.compile`` backend
  by name, for a backend that wraps it (the tests record the graphs, then run ``aot_eager``).
* ``compile_inputs_opaque`` (``torch._dynamo.config.nontraceable_tensor_subclasses``): a
  ``__torch_function__`` subclass that enters a compiled region from outside (an argument, or a
  value live across a graph break) is run eagerly there instead of becoming a graph input that the
  compiled graph's ``aten`` ops would reach with the subclass's dispatch (wrong shapes, or
  AOTAutograd's input check refusing the type); values made inside a graph are traced as usual.
* ``run_exit_handlers`` / ``clear_exit_handlers`` (``atexit._run_exitfuncs`` / ``atexit._clear``): a
  worker that leaves with ``os._exit`` (gloo teardown aborts otherwise) still runs Python's exit
  handlers (loggers finish); a forked one first forgets its parent's.
* ``own_parameters`` (``nn.Module._parameters``): a module's own parameters by name, read without
  attribute lookup (a class property of the same name, ``engine.experts.act_once``'s, must not be
  called to find the Parameter it stands for).
* ``assert_async`` (``torch._assert_async``): a check on tensor values that ``torch.compile`` keeps
  in the graph (raising at run time) where a Python ``if tensor:`` would break the graph.
* ``fake_mode_active`` (``torch._guards.detect_fake_mode``): whether tensors are fake now, or given
  ones are (a tracer or memory estimator running the model under ``FakeTensorMode``; a fused kernel
  then runs eagerly), where a value read from a tensor
  (``.item()``) is not there to read.
* ``checkpoint_block`` (DCP's checkpointable protocol: ``__create_write_items__``,
  ``__create_chunk_list__``, ``__get_tensor_shard__``, the hooks DTensor implements): a rank's rows
  of a stored tensor at any offset, so a ZeRO-split parameter is written and read in place, without
  gathering its TP shard over DP (no DTensor placement describes rows of a fused, padded TP shard).

Lightning (imported on first use, so the engine, which imports this module, imports no Lightning):

* ``MultiProcessingLauncher`` / ``SubprocessScriptLauncher``
  (``lightning.pytorch.strategies.launchers``): the launchers a strategy picks in
  ``_configure_launcher``, both subclassed (plan before launch; the spawn one also sends consolidated
  weights back).
* :data:`LIGHTNING_HOOKS`: private hooks the strategy, launcher and precision plugins override
  (Lightning calls them; there is no public hook at that point of setup or of the optimizer step).
* ``set_launcher`` (``Strategy._launcher``): where ``_configure_launcher`` must leave the launcher.
* ``set_device_mesh`` (``LightningModule._device_mesh``): what ``LightningModule.device_mesh``
  returns (Lightning's ``ModelParallelStrategy`` sets it the same way).
* ``averaged_model`` (``WeightAveraging._average_model``): the copy a
  weight-averaging callback (``EMAWeightAveraging``) made in its ``setup``, before the strategy
  sharded the model: the strategy has the callback copy the sharded model again, and saves and
  restores that copy's shards.

transformers (its private checkpointing protocol; imported by nothing here):

* ``own_checkpointing`` (``GradientCheckpointingLayer._gradient_checkpointing_func``, recognized by
  ``_can_checkpoint_with_cache``): a Hugging Face decoder layer checkpoints itself through that
  function once ``gradient_checkpointing`` is set, and drops its key/value cache arguments first.

Python:

* ``shared_process_groups`` (``copy._deepcopy_dispatch``): ``copy.deepcopy`` of a rewritten model
  shares its process groups (a handle, not data; deep-copying one raises) for as long as the context
  is open.
"""

from __future__ import annotations

import atexit
import copy
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

DisableTorchFunctionSubclass = torch._C.DisableTorchFunctionSubclass


def tensor_version(t: Tensor) -> int | object:
    """How many in-place changes ``t``'s memory has seen (autograd's version counter). A tensor made
    under ``torch.inference_mode`` has none: then a value equal to no other (nothing kept against it is
    reused)."""
    return object() if t.is_inference() else t._version


def use_count(t: Tensor) -> int:
    """C++ references to ``t``'s TensorImpl."""
    return t._use_count()


def storage_use_count(t: Tensor) -> int:
    """C++ references to ``t``'s storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def found_inf_per_device(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict[Any, Tensor]:
    """The found-inf flags ``scaler.unscale_(optimizer)`` recorded, by device."""
    return scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]


def check_inf_per_device(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict[Any, Tensor]:
    """``GradScaler``'s own inf check for ``optimizer`` (records and returns the flags by device)."""
    return torch.amp.GradScaler._check_inf_per_device(scaler, optimizer)


def _compile_totals() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def compile_counts() -> tuple[int, int]:
    """``(graphs, graph breaks)`` that ``torch.compile`` has made in this process so far for the user's
    code (those of lightning_tp's own kernels, made in :func:`library_compilation`, left out)."""
    from torch._dynamo.utils import counters

    graphs, breaks = _compile_totals()
    own = counters["lightning_tp"]
    return graphs - own["graphs"], breaks - own["graph_breaks"]


@contextmanager
def library_compilation():
    """Graphs and graph breaks ``torch.compile`` makes inside this block are lightning_tp's own:
    :func:`compile_counts` does not count them."""
    from torch._dynamo.utils import counters

    graphs, breaks = _compile_totals()
    try:
        yield
    finally:
        after = _compile_totals()
        counters["lightning_tp"]["graphs"] += after[0] - graphs
        counters["lightning_tp"]["graph_breaks"] += after[1] - breaks


def user_dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` of the user's is active (a FLOP counter, a memory tracker), under
    which ``torch.compile`` refuses to compile (torch's own modes, ``FakeTensorMode`` among them, are not
    counted: see :func:`fake_mode_active`)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return bool(is_in_torch_dispatch_mode(include_infra_modes=False))


def compile_stance() -> str:
    """The stance ``torch.compiler.set_stance`` set (``"default"``, ``"force_eager"``,
    ``"eager_on_recompile"``, ``"fail_on_recompile"``, ...)."""
    from torch._dynamo.eval_frame import _stance

    return str(_stance.stance)


def has_triton() -> bool:
    """Whether ``torch.compile``'s inductor can generate GPU (Triton) kernels in this process."""
    from torch.utils._triton import has_triton as _has_triton

    return bool(_has_triton())


def compiler_backend(name: str):
    """The ``torch.compile`` backend registered as ``name`` (``"aot_eager"``, ``"inductor"``), callable as
    ``backend(graph_module, example_inputs)``."""
    import torch._dynamo

    return torch._dynamo.lookup_backend(name)


def compile_inputs_opaque(cls: type) -> None:
    """Tell ``torch.compile`` to model instances of the tensor subclass ``cls`` that come from outside a
    compiled region conservatively (run the ops on them eagerly), not as traced graph inputs."""
    import torch._dynamo

    registry = getattr(torch._dynamo.config, "nontraceable_tensor_subclasses", None)
    if registry is not None:  # gone in some future torch: importing must still work (tests/test_compat.py fails)
        registry.add(cls)


def run_exit_handlers() -> None:
    """Run the functions registered with ``atexit`` now (before an ``os._exit``)."""
    atexit._run_exitfuncs()


def fake_mode_active(inputs: tuple = ()) -> bool:
    """Whether a ``FakeTensorMode`` is active (tensors made now hold no values), or one of ``inputs`` is
    a fake tensor."""
    from torch._guards import TracingContext, detect_fake_mode

    if not inputs and not torch._C._len_torch_dispatch_stack() and TracingContext.try_get() is None:
        return False  # (the common case, in every training forward: about a fifth of detect_fake_mode's time)
    return detect_fake_mode(inputs) is not None


def assert_async(condition: Tensor, message: str) -> None:
    """Raise ``RuntimeError(message)`` when the one-element ``condition`` is false; traceable."""
    torch._assert_async(condition, message)


def own_parameters(module: torch.nn.Module) -> dict[str, Any]:
    """``module``'s own parameters by name (the live dict: ``None`` for a registered ``None``)."""
    return module._parameters


class CheckpointBlock(Tensor):
    """This rank's part ``data`` of a tensor stored by ``torch.distributed.checkpoint``: at
    ``offsets`` in a tensor of ``global_size``. DCP writes and reads it through the checkpointable
    hooks DTensor implements (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``) and reads its stored size through ``size()``; a part several ranks
    hold alike (equal offsets) is written once. Build with :func:`checkpoint_block`."""

    @staticmethod
    def __new__(cls, data: Tensor, offsets: tuple[int, ...], global_size: tuple[int, ...]):
        block = Tensor._make_subclass(cls, torch.empty(0, dtype=data.dtype, device=data.device))
        block.data_part, block.offsets, block.global_size = data, torch.Size(offsets), torch.Size(global_size)
        return block

    def size(self, dim: int | None = None):  # DCP compares the stored size with this one
        return self.global_size if dim is None else self.global_size[dim]

    def __create_write_items__(self, fqn: str, obj: Any) -> list:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        data = TensorWriteData(
            chunk=self.__create_chunk_list__()[0],
            properties=TensorProperties.create_from_tensor(self.data_part),
            size=self.global_size,
        )
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD, tensor_data=data)]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=self.offsets, sizes=self.data_part.shape)]

    def __get_tensor_shard__(self, index: Any) -> Tensor:
        return self.data_part


def checkpoint_block(data: Tensor, offsets: tuple[int, ...], global_size: tuple[int, ...]) -> Tensor:
    """A :class:`CheckpointBlock`: ``data`` (written from, or read into, in place) at ``offsets``
    of a stored tensor of ``global_size``."""
    return CheckpointBlock(data, tuple(offsets), tuple(global_size))


def clear_exit_handlers() -> None:
    """Forget the functions registered with ``atexit`` so far (a forked child: they are its parent's)."""
    atexit._clear()


# Lightning: name -> (module, attribute), imported on first access through module __getattr__.
_LIGHTNING = {
    "MultiProcessingLauncher": ("lightning.pytorch.strategies.launchers", "_MultiProcessingLauncher"),
    "SubprocessScriptLauncher": ("lightning.pytorch.strategies.launchers", "_SubprocessScriptLauncher"),
}

#: (class, private method) that lightning_tp overrides: Lightning must still define and call them
LIGHTNING_HOOKS = (
    ("lightning.pytorch.strategies.DDPStrategy", "_configure_launcher"),  # pick our launchers
    ("lightning.pytorch.strategies.DDPStrategy", "_setup_model"),  # DDP over the data-parallel group only
    ("lightning.pytorch.plugins.precision.Precision", "_after_closure"),  # partial grads summed before clipping
    ("lightning.pytorch.strategies.launchers._MultiProcessingLauncher", "_wrapping_function"),  # worker exit
    ("lightning.pytorch.strategies.launchers._MultiProcessingLauncher", "_collect_rank_zero_results"),  # weights
    ("torch.amp.GradScaler", "_check_inf_per_device"),  # a fused optimizer's inf check (TPGradScaler syncs it)
)


def lightning_class(path: str) -> type:
    """The class at dotted ``path`` (``"package.module.Class"``)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def set_launcher(strategy: Any, launcher: Any) -> None:
    """Install ``launcher`` on a Lightning strategy (read back by ``strategy.launcher``)."""
    strategy._launcher = launcher


def set_device_mesh(module: Any, mesh: Any) -> None:
    """Make ``module.device_mesh`` (a LightningModule) return ``mesh``."""
    module._device_mesh = mesh


def _install_no_handlers() -> None:
    """Stands in for Lightning's ``_SignalConnector.register_signal_handlers`` while the strategy handles signals."""


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-batch ``_broadcast_sigterm_tensor`` while the strategy handles signals."""


def take_over_signal_handling(trainer: Any) -> None:
    """For one stage (fit; validate / test / predict with more than one process): Lightning 2.6 installs
    none of its signal handlers (its SIGTERM handler broadcasts from inside the handler; it would also compose itself with the strategy's and, at teardown, put the
    strategy's back as "the original") and skips its per-batch broadcast of rank 0's SIGTERM flag (the
    strategy agrees on every rank's signal in one reduction per step). Undone by ``give_back_signal_handling``."""
    trainer._signal_connector.register_signal_handlers = _install_no_handlers
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_sigterm_broadcast


def give_back_signal_handling(trainer: Any) -> None:
    """Lightning's own signal handling again (validate / test / predict, or a later fit with another strategy)."""
    vars(trainer._signal_connector).pop("register_signal_handlers", None)
    vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)


def own_checkpointing(module: torch.nn.Module, function: Any) -> bool:
    """If ``module`` is a Hugging Face ``GradientCheckpointingLayer`` (every decoder layer of transformers 5),
    turn on its own checkpointing with ``function(forward, *args)`` as the checkpoint function and return
    ``True``: its ``forward`` wrapper then drops the key/value cache arguments and calls ``function`` (in
    training mode, gradients on). Otherwise change nothing and return ``False``."""
    cls = type(module)
    if not (
        isinstance(getattr(cls, "_can_checkpoint_with_cache", None), bool)
        and isinstance(getattr(cls, "gradient_checkpointing", None), bool)
    ):
        return False
    module._gradient_checkpointing_func = function
    module.gradient_checkpointing = True
    return True


def lr_finder_running(trainer: Any) -> bool:
    """Whether Lightning's learning-rate finder is running the fit loop (inside ``Tuner.lr_find`` or the
    ``LearningRateFinder`` callback): its ``_LRCallback`` is the trainer's callback list while it sweeps."""
    finder = lightning_class("lightning.pytorch.tuner.lr_finder._LRCallback")
    return any(isinstance(cb, finder) for cb in getattr(trainer, "callbacks", ()))


def averaged_model(callback: Any) -> Any:
    """The ``AveragedModel`` of a Lightning ``WeightAveraging`` callback (``None`` outside fit)."""
    return getattr(callback, "_average_model", None)


@contextmanager
def shared_process_groups() -> Iterator[None]:
    """Inside, ``copy.deepcopy`` returns a ``ProcessGroup`` itself instead of raising."""
    from torch.distributed import ProcessGroup

    before = copy._deepcopy_dispatch.get(ProcessGroup)
    copy._deepcopy_dispatch[ProcessGroup] = copy._deepcopy_atomic
    try:
        yield
    finally:
        if before is None:
            del copy._deepcopy_dispatch[ProcessGroup]
        else:
            copy._deepcopy_dispatch[ProcessGroup] = before


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        module, attr = _LIGHTNING[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "averaged_model",
    "shared_process_groups",
    "DisableTorchFunctionSubclass",
    "own_parameters",
    "checkpoint_block",
    "give_back_signal_handling",
    "lr_finder_running",
    "own_checkpointing",
    "take_over_signal_handling",
    "MultiProcessingLauncher",  # noqa: F822 (module __getattr__)
    "SubprocessScriptLauncher",  # noqa: F822 (module __getattr__)
    "found_inf_per_device",
    "check_inf_per_device",
    "compile_counts",
    "compile_stance",
    "has_triton",
    "user_dispatch_mode_active",
    "library_compilation",
    "compile_inputs_opaque",
    "compiler_backend",
    "lightning_class",
    "run_exit_handlers",
    "clear_exit_handlers",
    "assert_async",
    "fake_mode_active",
    "set_device_mesh",
    "set_launcher",
    "storage_use_count",
    "tensor_version",
    "tree_leaves",
    "tree_map",
    "use_count",
]
