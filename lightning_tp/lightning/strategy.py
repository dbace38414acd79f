"""The Lightning strategy ``megatron_tp``: glue between the Trainer and the TP engine.

Order of work: process group + (data_parallel, tensor_parallel) mesh (``setup_environment``); the
user's ``configure_model``; then ``setup``: the plan (errors raised identically on every rank,
before any collective), one weight sync from rank 0 (every rank shards the same dense model; a
meta-device model is initialized layer by layer instead), the model-parallel RNG, the rewrite with
the parity self-check (block by block for a meta-device model, after pretrained weights are
loaded), activation checkpointing, precision conversion, DDP over the data-parallel group (or ZeRO
2/3 on FSDP2: :mod:`lightning_tp.lightning.zero`), optimizers over the local shards. While training
runs, signals are agreed on per step (:mod:`lightning_tp.lightning.signals`). Checkpoints go
through :mod:`lightning_tp.lightning.checkpoint`.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import signal
import warnings
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from lightning_tp._compat import (
    give_back_signal_handling,
    set_device_mesh,
    set_launcher,
    take_over_signal_handling,
    tree_map,
)
from lightning_tp.engine.comm import broadcast_coalesced
from lightning_tp.engine.init import Materializer, is_deferred, move_built_tensors
from lightning_tp.engine.loss import loss_fusion_default, set_loss_fusion
from lightning_tp.engine.mesh import TPMesh, init_tp_mesh, parallel_sizes
from lightning_tp.engine.random import RNGTracker, attached_tracker, derive_seed, model_parallel_seed
from lightning_tp.engine.recompute import apply_activation_checkpointing, checkpoint_targets
from lightning_tp.errors import CheckpointSkippedWarning, MeshConfigError, PreemptedError, VerifyInputError
from lightning_tp.lightning import checkpoint as ckpt
from lightning_tp.lightning.averaging import averaging_callbacks, copy_sharded, refuse_averaging_resharded
from lightning_tp.lightning.faults import (
    agree_on_signals,
    check_finite_loss,
    enable_collective_debug,
    fault_in_flight,
    unchecked_dp_group,
)
from lightning_tp.lightning.launcher import TPMultiProcessingLauncher, TPSubprocessScriptLauncher
from lightning_tp.lightning.precision import PartialGradCheck, TPPrecision, _TPPrecisionMixin, to_tp_precision
from lightning_tp.lightning.pretrained import load_pretrained
from lightning_tp.lightning.signals import SignalFlag, SignalStop
from lightning_tp.lightning.zero import (
    ZERO_STAGES,
    dp_mesh,
    dp_shard,
    fsdp_modules,
    keep_param_attrs,
    no_gradient_sync,
)
from lightning_tp.policy import applied_plan, apply_policy, plan_policy, resolve_rules
from lightning_tp.policy.inputs import holds_meta, values_for_meta

log = logging.getLogger(__name__)
_INIT_STREAM = 0x1417  # the deferred-init seed: derived from the run's seed, apart from the dropout streams
_DDP_STRATEGY_PARAMS = frozenset(inspect.signature(DDPStrategy.__init__).parameters)


class MegatronTPStrategy(DDPStrategy):
    """Megatron-LM style tensor parallelism (x data parallelism) for the Lightning ``Trainer``.

    ``world = DP x TP``; TP ranks are contiguous (``rank = dp_rank * tp + tp_rank``), so with the
    default ``tensor_parallel_size="auto"`` (devices per node) TP stays inside a node and DP spans
    nodes. The user's ``nn.Linear`` / ``nn.Embedding`` layers are rewritten by ``policy`` after
    ``configure_model`` and before ``configure_optimizers``, so ``self.parameters()`` there are the
    local shards.

    Args:
        tensor_parallel_size: ranks per model replica, or ``"auto"`` (devices per node).
        policy: ``"auto"``, ``"names"`` (the name rules, ignoring a Hugging Face plan), a registered policy
            name, a dict or a YAML mapping (see README).
        verify: check the rewritten model against the unsharded one on a fixed random batch and raise
            ``PolicyMismatchError`` if they differ.
        sequence_parallel: Megatron sequence parallelism: activations between the parallel layers are
            sharded on the sequence (see :func:`lightning_tp.policy.apply_plan`); needs a vocab-parallel
            LM head and a sequence length divisible by TP.
        start_method: ``"popen"`` (subprocess/torchrun/SLURM), ``"spawn"`` or ``"fork"``.
        process_group_backend: ``"gloo"`` / ``"nccl"``; default from the device.
        timeout: process-group timeout.
        strict: unmatched ``nn.Linear`` / ``nn.Embedding`` modules are an error, not a warning.
        seed: base seed for the model-parallel RNG streams (default: ``PL_GLOBAL_SEED`` set by
            ``seed_everything``, else a seed broadcast from rank 0).
        nan_check: raise ``NonFiniteLossError`` on every rank, naming the step, when the training
            loss is NaN/inf on any rank (one scalar-per-rank all-reduce per step). Not applied with a
            loss scaler (``16-mixed``), which skips such steps itself.
        debug: set ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` before the process group is created: a rank
            that skips a collective or sends a mis-shaped tensor raises an error naming both sides
            instead of hanging. Slower; for debugging.
        pretrained: weights loaded into the rewritten model, each rank reading only its slices: a
            Hugging Face model directory (safetensors, one file or sharded with its index), one
            ``.safetensors`` file or a ``.pt`` state dict. With a meta-device model no random init runs.
        pretrained_prefix: prepended to every key of the weights file (default: the prefix that
            matches the most keys, e.g. a LightningModule's ``model.``).
        zero_stage: memory across data parallelism. ``0``: DDP over the DP group (every replica
            holds its TP shard's full gradients and optimizer state). ``2``: gradients and optimizer
            state split over the DP group, ``3``: parameters too (gathered per layer for forward
            and backward); both on torch's FSDP2 over the DP group (``lightning_tp.lightning.zero``).
        activation_checkpointing: module classes and/or fnmatch patterns on module names (e.g.
            ``"model.layers.*"``) whose forward is recomputed in backward instead of keeping its
            activations; the model-parallel RNG streams are restored for the recompute, so dropout
            masks (and gradients) equal those without it (``lightning_tp.engine.recompute``).
        save_on_signal: on SIGTERM / SIGINT (or SLURM's requeue signal) to any rank during fit, every
            rank stops after the same step (a signal before the first step: when training starts; one
            after the last step: when it ends); with ``True`` they first write one checkpoint together
            (``default_root_dir/hpc_ckpt_N.ckpt``; none before the first step), then raise
            ``PreemptedError`` naming the signal, the step and the checkpoint
            (``lightning_tp.lightning.signals``).
        loss_fusion: the vocab-parallel loss of the model's LM heads (Megatron's ``cross_entropy_loss_fusion``).
            ``True``: fused, two passes over the logits in kernels ``torch.compile`` makes at the first step
            (seconds) and no float32 copy of the logits; ``False``: the eager unfused loss; ``None``
            (default): fused on CUDA (with Triton), unfused on CPU. Same values either way.
        **kwargs: passed to ``DistributedDataParallel`` (e.g. ``find_unused_parameters``).
    """

    strategy_name = "megatron_tp"

    def __init__(
        self,
        tensor_parallel_size: Literal["auto"] | int = "auto",
        policy: str | dict[str, Any] | None = "auto",
        verify: bool = True,
        sequence_parallel: bool = False,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        strict: bool = False,
        seed: int | None = None,
        nan_check: bool = True,
        debug: bool = False,
        pretrained: str | os.PathLike | None = None,
        pretrained_prefix: str | None = None,
        zero_stage: Literal[0, 2, 3] = 0,
        activation_checkpointing: type | str | list[type | str] | None = None,
        save_on_signal: bool = True,
        loss_fusion: bool | None = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin: Precision | None = None,
        **kwargs: Any,
    ) -> None:
        if tensor_parallel_size != "auto" and (
            isinstance(tensor_parallel_size, bool)
            or not isinstance(tensor_parallel_size, int)
            or tensor_parallel_size < 1
        ):
            raise MeshConfigError(f"tensor_parallel_size must be 'auto' or an int >= 1, got {tensor_parallel_size!r}.")
        if loss_fusion is not None and not isinstance(loss_fusion, bool):
            raise TypeError(
                f"loss_fusion must be True (the fused loss), False (unfused) or None (fused on CUDA), got {loss_fusion!r}."
            )
        if isinstance(zero_stage, bool) or zero_stage not in ZERO_STAGES:
            raise MeshConfigError(
                f"zero_stage must be 0 (DDP over the data-parallel group), 2 (gradients and optimizer state split over "
                f"it) or 3 (parameters too), got {zero_stage!r}."
            )
        self._default_precision = TPPrecision()  # what precision_plugin is until one is set
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **kwargs,
        )
        self._tensor_parallel_size = tensor_parallel_size
        self.start_method, self.pg_timeout = start_method, timeout
        # for DistributedDataParallel: what DDPStrategy's own parameters (ddp_comm_hook, ...) did not take
        self.ddp_kwargs = {k: v for k, v in kwargs.items() if k not in _DDP_STRATEGY_PARAMS}
        self.policy, self.verify, self.strict = policy, verify, strict
        self.sequence_parallel = sequence_parallel
        self._seed = seed
        self.nan_check, self.debug = nan_check, debug
        self.pretrained, self.pretrained_prefix = pretrained, pretrained_prefix
        self.zero_stage = int(zero_stage)
        self.save_on_signal = bool(save_on_signal)
        self.loss_fusion = loss_fusion
        self.signal_flag: SignalFlag | None = None  # installed for each stage, from setup_environment
        self.signal_stop: SignalStop | None = None
        self.requeue_signal: int | None = None  # SLURM auto-requeue: the signal after which the job is requeued
        self._agreed: dict[int, int] | None = None  # signals agreed on in this step's non-finite-loss reduction
        self.activation_checkpointing = (
            None if activation_checkpointing is None else checkpoint_targets(activation_checkpointing)
        )
        self.zero_active = False  # ZeRO sharding applied (zero_stage > 0 and more than one DP rank, fitting)
        self._tp_mesh: TPMesh | None = None
        self._ddp_group = None  # debug mode: the DP group without the debug wrapper, for DDP
        self.rng_tracker: RNGTracker | None = None
        self.deferred_init = False  # the model was built on the meta device and initialized layer by layer
        self.load_weights_only: bool | None = None  # fit/validate/...(weights_only=...), kept by the launcher
        self.averaged: nn.Module | None = None  # a weight-averaging callback's copy of the sharded model (fit)

    # -- precision: every plugin becomes its TP-aware variant ------------------------------------
    def _get_precision_plugin(self) -> Precision:
        plugin = DDPStrategy.precision_plugin.fget(self)
        return plugin if isinstance(plugin, _TPPrecisionMixin) else self._default_precision  # none set yet

    def _set_precision_plugin(self, plugin: Precision | None) -> None:
        # None stays None: Lightning reads "no plugin given to the strategy" from it
        DDPStrategy.precision_plugin.fset(self, None if plugin is None else to_tp_precision(plugin))

    precision_plugin = property(_get_precision_plugin, _set_precision_plugin)

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``trainer.init_module(empty_init=True)`` builds the model on the meta device: the strategy
        then plans and rewrites it there and initializes it one layer at a time (deferred init)."""
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    # -- topology ---------------------------------------------------------------------------------
    @property
    def tp_mesh(self) -> TPMesh:
        if self._tp_mesh is None:
            raise RuntimeError("the TP x DP mesh exists only after the strategy set up the environment.")
        return self._tp_mesh

    @property
    def tensor_parallel_size(self) -> int:
        if self._tensor_parallel_size == "auto":
            return self.num_processes
        return int(self._tensor_parallel_size)

    @property
    def tp_group(self):
        return self.tp_mesh.tp_group

    @property
    def dp_group(self):
        return self.tp_mesh.dp_group

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Data is split by DP rank only: every TP rank of a replica sees the same batches.
        return {"num_replicas": self.tp_mesh.dp_size, "rank": self.tp_mesh.dp_rank}

    def _validate_config(self) -> None:
        """Checks that need no model: the TP x DP layout and the styles/options of a dict policy."""
        world = self.num_nodes * self.num_processes
        try:
            parallel_sizes(world, self.tensor_parallel_size)
        except MeshConfigError as exc:
            raise MeshConfigError(f"{exc} (Trainer devices={self.num_processes}, num_nodes={self.num_nodes})") from None
        if isinstance(self.policy, Mapping):
            resolve_rules(nn.Module(), self.policy)  # PolicyError for an unknown style or option

    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._validate_config()  # at Trainer construction: before any process is launched
        if self.start_method == "popen":
            launcher = TPSubprocessScriptLauncher(self, self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            launcher = TPMultiProcessingLauncher(self, start_method=self.start_method)
        set_launcher(self, launcher)

    def plan_before_launch(self, model: Any) -> None:
        """Plan the policy on the main process's model before the launcher starts the other processes,
        so that a policy, head-count, tie or module-type error is raised once, before any process or
        collective exists (every rank plans again in ``setup``). Skipped for a model without parameters
        yet or on the meta device (built in ``configure_model``), or already rewritten."""
        if not isinstance(model, pl.LightningModule) or applied_plan(model) is not None or is_deferred(model):
            return
        if next(model.parameters(), None) is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the plan's warnings come once, from setup
            forward, example = forward_target(model)  # what setup's plan traces too
            plan_policy(model, self.tensor_parallel_size, self.policy, strict=self.strict,
                        sequence_parallel=self.sequence_parallel, example_input=example,
                        forward_module=forward)  # fmt: skip

    def setup_environment(self) -> None:
        # Validate the layout before the process group exists: no collective on bad input.
        self._validate_config()
        module = self.lightning_module
        if module is not None and applied_plan(module) is not None:
            refuse_averaging_resharded(module.trainer)  # before the callbacks' setup copies the sharded model
        if self.debug:
            enable_collective_debug()
        super().setup_environment()
        trainer = self._attached_trainer()
        # from here on (a long load, the sanity check) a signal is only recorded; one process evaluating keeps
        # Lightning's (and Python's Ctrl-C): no collective to wait in
        if trainer is not None and (trainer.state.fn == TrainerFn.FITTING or self.world_size > 1):
            self._take_over_signals(trainer)
        self._tp_mesh = init_tp_mesh(self.tensor_parallel_size, self.root_device.type)
        if self.debug and self._tp_mesh.dp_size > 1:
            self._ddp_group = unchecked_dp_group(self._tp_mesh, self.pg_timeout)
        self.precision_plugin.configure_tp(self._tp_mesh.tp_group)
        if self.lightning_module is not None:
            set_device_mesh(self.lightning_module, self._tp_mesh.device_mesh)
        log.info("lightning_tp: %s", self._tp_mesh)

    # -- model ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        fitting = trainer.state.fn == TrainerFn.FITTING
        averaging = averaging_callbacks(trainer.callbacks) if fitting else []  # refused before anything changes
        self.accelerator.setup(trainer)
        module = self.lightning_module
        with keep_param_attrs(module):  # a ZeRO module from an earlier fit: moving it swaps its parameters' dicts
            if not is_deferred(module):
                self.model_to_device()
            else:  # what was built off meta meets the layers materialized on the rank's device (and verify's batch)
                move_built_tensors(module, self.root_device)
        if applied_plan(module) is None:
            with loss_fusion_default(self.loss_fusion):  # the heads' loss, in verify's forward too
                self._shard(module)
        else:  # sharded by an earlier fit: its dropouts and split regions keep the tracker they were built with
            self.rng_tracker = attached_tracker(module)
        # made before the precision conversion, as the callback's own copy is in Lightning's order
        self.averaged = copy_sharded(averaging[0], trainer, module) if averaging else None
        for m in (module, self.averaged):
            if m is not None:
                set_loss_fusion(m, self.loss_fusion)
        if self.activation_checkpointing is not None:  # before ZeRO wraps the layers (FSDP2's order)
            done = apply_activation_checkpointing(module, self.activation_checkpointing, self.rng_tracker)
            log.info("lightning_tp: activation checkpointing of %d modules: %s", len(done), done)
        with keep_param_attrs(module):
            self.model = self.precision_plugin.convert_module(self.model)
            self.model_to_device()
        if fitting and self.tp_mesh.dp_size > 1 and self.zero_stage and not isinstance(module, FSDPModule):
            mesh = dp_mesh(self.dp_group, self.root_device.type)
            for m in (module, self.averaged):  # the averaged copy split over DP as the model is
                if m is not None:
                    dp_shard(m, mesh, self.zero_stage)
        if isinstance(module, FSDPModule):  # sharded now, or by an earlier fit (then validate/test/predict)
            self.model, self.zero_active = _ZeroRoot(module), True  # FSDP2's hooks run on module's __call__
        check = PartialGradCheck(list(module.named_parameters()), self.sequence_parallel)  # at the first steps
        self.precision_plugin.configure_tp(self.tp_group, check, self.dp_group if self.zero_active else None)
        if fitting:
            if self.tp_mesh.dp_size > 1 and not self.zero_active:
                self.configure_ddp()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _shard(self, module: pl.LightningModule) -> None:
        """Plan, sync (or, for a meta-device model, initialize layer by layer), seed, rewrite (+ verify)
        the LightningModule in place."""
        forward, verify, example = self._verify_target(module)
        # Policy, head-count, tie and initializer errors are raised here, identically on every rank, before any
        # collective.
        plan = plan_policy(
            module, self.tensor_parallel_size, self.policy, strict=self.strict, sequence_parallel=self.sequence_parallel,
            example_input=example, forward_module=forward,
        )  # fmt: skip
        self.deferred_init = is_deferred(module)
        materializer = None
        if self.deferred_init:  # every rank initializes the same dense layers from the shared seed
            hook = getattr(module, "init_weights", None)
            materializer = Materializer(
                module, self.root_device, 0, hook if callable(hook) else None, initialize=self.pretrained is None
            )
        else:
            ignore = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))  # DDP's documented opt-out
            named = [*module.named_parameters(), *module.named_buffers()]
            broadcast_coalesced([t.detach() for n, t in named if n not in ignore])  # rank 0's weights
        seed = self._resolve_seed()
        self.rng_tracker = model_parallel_seed(seed, self.tp_mesh.tp_rank, self.tp_mesh.dp_rank, self.root_device)
        if materializer is not None:
            materializer.seed = derive_seed(seed, _INIT_STREAM)
        apply_policy(
            module, self.tp_group, plan, strict=self.strict, verify=verify, example_input=example,
            rng_tracker=self.rng_tracker, forward_module=forward, materializer=materializer,
            load_weights=self._load_pretrained if self.pretrained is not None else None,
        )  # fmt: skip

    def _load_pretrained(self, module: nn.Module) -> None:
        """Each rank reads its own slices (after the rewrite; before a meta model's block-by-block verify)."""
        n = load_pretrained(module, self.pretrained, self.tp_mesh.tp_rank, self.pretrained_prefix)
        rank_zero_info(f"lightning_tp: loaded {n} pretrained tensors from {self.pretrained} (each rank its slices)")

    def _verify_target(self, module: pl.LightningModule) -> tuple[nn.Module | None, bool, Any]:
        """``(module whose forward verify runs, verify, example input)``: the wrapped model when the
        LightningModule has neither a forward nor an example input to verify with."""
        example = getattr(module, "example_input_array", None)
        if holds_meta(example):  # built under trainer.init_module(empty_init=True): shapes without values
            try:
                example = values_for_meta(example, module)
            except VerifyInputError as error:
                if self.verify:
                    raise
                example = None  # Lightning's uses of it (ModelSummary, log_graph) would fail copying it
                rank_zero_warn(f"lightning_tp: example_input_array set to None: {error}")
            else:
                rank_zero_warn(
                    "lightning_tp: example_input_array holds tensors on the meta device (built under "
                    "trainer.init_module(empty_init=True)), which have no values: they were replaced by values of the "
                    "same shapes and dtypes (floats normal, token ids below the vocabulary size, booleans True) for "
                    "the self-check and Lightning's uses of it. To choose the values, build it with device='cpu'."
                )
            module.example_input_array = example
        forward, example = forward_target(module, example)
        if forward is None and example is None and not is_overridden("forward", module, pl.LightningModule):
            if self.verify:
                log.warning("lightning_tp: no forward and no example_input_array: skipping verify.")
            return None, False, None
        return forward, self.verify, example

    def _resolve_seed(self) -> int:
        if self._seed is not None:
            return int(self._seed)
        env = os.environ.get("PL_GLOBAL_SEED")
        if env is not None:
            return int(env)
        return int(self.broadcast(int(torch.randint(0, 2**31 - 1, ()).item())))

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        device_ids = self.determine_ddp_device_ids()
        # config parsers (LightningCLI) may fill every DDP default; ours win for these
        kwargs = {k: v for k, v in self.ddp_kwargs.items() if k not in ("module", "device_ids", "process_group")}
        group = self.dp_group if self._ddp_group is None else self._ddp_group
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group, **kwargs)

    def teardown(self) -> None:
        late = self._release_signals()
        try:
            module = self.lightning_module
            if self.zero_active and module is not None:
                self._reshard_zero()
                with keep_param_attrs(module):  # Lightning's teardown moves the model (DTensor params: swapped)
                    super().teardown()
            else:
                super().teardown()
        finally:
            # a signal no stop acted on (validate/test/predict, a fit with nothing to train, after the last
            # step's check, or a fit ended by another error): the handlers from before the stage get it now
            if late and not isinstance(self._fault(), PreemptedError):
                signal.raise_signal(late)

    def _reshard_zero(self) -> None:
        """Put the DP-split (marked) parameters back in the modules. ZeRO-2 keeps them gathered, as FSDP2's
        unmarked TP-local tensors, from a forward until the backward after it (validation in fit reshards
        after each forward: :meth:`_reshard_in_validation`); a checkpoint read or written, or a teardown,
        needs the split ones whatever ran last (Lightning's learning-rate finder reads its checkpoint back
        right after a validation)."""
        if not self.zero_active:
            return
        for model in (self.lightning_module, self.averaged):
            for m in fsdp_modules(model) if model is not None else ():
                m.reshard()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        if self.zero_active:  # gradient accumulation under ZeRO: reduce-scatter at the last micro-batch only
            with no_gradient_sync(self.lightning_module):
                yield
            return
        with super().block_backward_sync():
            yield

    # -- faults -----------------------------------------------------------------------------------
    @contextmanager
    def _no_open_region(self) -> Generator[None, None, None]:
        """No split region open before a step nor after it, even one that raised: a region left open by
        a forward that raised and was caught inside the step would draw replicated dropouts per rank."""
        if self.rng_tracker is None:
            yield
            return
        self.rng_tracker.close_region()
        try:
            yield
        finally:
            self.rng_tracker.close_region()

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._no_open_region():
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._no_open_region():
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._no_open_region():
            return super().predict_step(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._no_open_region():
            output = super().training_step(*args, **kwargs)
        if self.nan_check and getattr(self.precision_plugin, "scaler", None) is None:
            trainer = self.lightning_module.trainer
            signum = self.signal_flag.signum if self.signal_flag is not None else 0
            self._agreed = check_finite_loss(
                output, self.root_device, trainer.global_step, trainer.current_epoch, signum
            )
        return output

    # -- weight averaging under ZeRO-2 -------------------------------------------------------------
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._reshard_in_validation(True)

    def on_validation_end(self) -> None:
        self._reshard_in_validation(self.zero_stage == 3)
        super().on_validation_end()

    def _reshard_in_validation(self, reshard: bool) -> None:
        """ZeRO-2 (no reshard after forward) would leave the parameters gathered after an eval forward, as
        FSDP2's plain, unmarked tensors, not the ones the optimizer holds: the hooks after it (a callback
        freezing or unfreezing ``pl_module.parameters()``, a weight-averaging callback swapping the weights
        with its copy's, a checkpoint) would act on those. During validation in fit they reshard after each
        forward, as under ZeRO-3."""
        if not self.zero_active or self.zero_stage == 3:
            return
        for m in fsdp_modules(self.lightning_module):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)

    # -- signals ----------------------------------------------------------------------------------
    def _take_over_signals(self, trainer: pl.Trainer) -> None:
        """For this stage (fit, validate, test, predict), handlers that only record a signal (SIGTERM, SIGINT,
        SLURM's requeue signal) in place of the process's and Lightning's (``lightning_tp.lightning.signals``)."""
        self._release_signals()  # left by an earlier stage that did not reach its teardown
        signals = [signal.SIGTERM, signal.SIGINT]
        env = self.cluster_environment
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            self.requeue_signal = int(env.requeue_signal)  # stop, checkpoint, then `scontrol requeue`
            signals.append(self.requeue_signal)
        else:
            self.requeue_signal = None
        stage = trainer.state.fn
        notice = (
            "every rank stops after the current training step (a second signal exits at once)"
            if stage == TrainerFn.FITTING
            else f"{stage.value} runs to its end, then the handlers from before it get the signal (a second signal "
            "exits at once)"
        )
        self.signal_flag = SignalFlag(tuple(signals), notice)
        self.signal_flag.install()
        take_over_signal_handling(trainer)
        self._agreed = None

    def _release_signals(self) -> int:
        """Put back the handlers from before the stage, Lightning's own handling and the LightningModule's
        ``on_train_batch_end``; returns the signal this rank recorded (0 if none)."""
        flag, stop = self.signal_flag, self.signal_stop
        self.signal_flag = self.signal_stop = None
        if stop is not None:
            stop.remove()
        trainer = self._attached_trainer()
        if trainer is not None:
            give_back_signal_handling(trainer)
        if flag is None:
            return 0
        flag.uninstall()
        return flag.signum

    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        if self.signal_flag is None:  # a fit set up without setup_environment
            self._take_over_signals(trainer)
        self.signal_stop = SignalStop(self, trainer)
        self.signal_stop.at_train_start()  # a signal while fit set up: every rank stops before the first step

    def on_train_end(self) -> None:
        stop, self.signal_stop = self.signal_stop, None
        if stop is not None:
            stop.remove()
            stop.at_train_end()  # a signal after the last step's agreement: checkpoint, PreemptedError
        # the handlers stay until teardown (a run inside fit, e.g. the LR finder's, ends here too): a signal
        # from now on is given to the handlers from before fit then
        super().on_train_end()

    def agreed_signals(self) -> dict[int, int]:
        """``{rank: signal}`` agreed on for this step (same on every rank): from the non-finite-loss
        reduction when it ran in this step's ``training_step``, else one reduction now. Collective."""
        agreed, self._agreed = self._agreed, None
        if agreed is not None:
            return agreed
        return agree_on_signals(self.root_device, self.signal_flag.signum if self.signal_flag is not None else 0)

    def _attached_trainer(self) -> pl.Trainer | None:
        try:
            return self.lightning_module.trainer if self.lightning_module is not None else None
        except RuntimeError:  # not attached to a Trainer
            return None

    def _fault(self) -> BaseException | None:
        """The exception this rank is handling if a fault interrupted the Trainer (see ``faults``)."""
        return fault_in_flight(self._attached_trainer(), self._tp_mesh is not None)

    def barrier(self, name: str | None = None) -> None:
        if self._fault() is not None:
            return  # a faulted rank enters no collective: its peers may be blocked inside another one
        super().barrier(name)

    # -- collectives for logging and metrics ------------------------------------------------------
    def reduce(self, tensor: Tensor | Any, group: Any | None = None, reduce_op: Any = "mean") -> Tensor | Any:
        """Reduce over the data-parallel group (TP ranks of a replica hold equal values)."""
        if not isinstance(tensor, Tensor) or not _initialized():
            return tensor
        group = self.dp_group if group is None else group
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        """Gather over the data-parallel group: one entry per model replica."""
        group = self.dp_group if group is None and self._tp_mesh is not None else group
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if not _initialized():
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag == self.world_size) if all else bool(flag > 0)

    # -- checkpoints: every rank's shards through torch.distributed.checkpoint --------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the sharded model and the optimizers built over the shards

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # checkpoint.load restores them (resharded)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # This rank's shards; save_checkpoint writes the resharding-ready form itself.
        assert self.lightning_module is not None
        return self.lightning_module.state_dict()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return {}  # written by save_checkpoint from the live optimizers

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "megatron_tp writes checkpoints with torch.distributed.checkpoint; storage_options is not supported."
            )
        fault = self._fault()
        if fault is not None:
            where = f"rank {self.global_rank}" if self._tp_mesh is not None else "the main process"
            warnings.warn(
                f"lightning_tp: not writing checkpoint {os.fspath(filepath)!r} in {where}: the run "
                f"was interrupted by {type(fault).__name__}: {str(fault)[:200]}. This process may not hold the "
                "trained shards or may be mid-step, and its peers may be blocked in a collective; the last "
                "checkpoint written during training is the one to resume from.",
                CheckpointSkippedWarning,
                stacklevel=2,
            )
            return
        if self._tp_mesh is None:
            raise ckpt.CheckpointError(
                f"cannot write checkpoint {os.fspath(filepath)!r}: this process is not part of the process group (the "
                "main process of a spawn launch holds the dense model, not the shards). Checkpoints are written by "
                "the ranks during fit (ModelCheckpoint); lightning_tp.export makes a dense file from one."
            )
        path = self.broadcast(os.fspath(filepath))
        self._reshard_zero()
        state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        # Lightning leaves the optimizers out of a weights-only checkpoint (save_weights_only=True): so do we
        weights_only = "optimizer_states" not in checkpoint
        rng = self.rng_tracker.state_dict() if self.rng_tracker is not None and not weights_only else None
        optimizers = [] if weights_only else [_unwrapped(o) for o in self.optimizers]
        # a weight-averaging callback put the averaged weights in "state_dict", the model's in "current_model_state"
        average = self.averaged if "current_model_state" in checkpoint else None
        state.pop("current_model_state", None)
        if average is None:  # no averaged copy in this fit (a callback may hold one from an earlier fit)
            state.pop("averaging_state", None)
        ckpt.save(
            path, self.lightning_module, optimizers, self.tp_mesh, state, rng, average, checkpoint.get("state_dict")
        )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = self.broadcast(os.fspath(checkpoint_path))
        self._reshard_zero()
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        optimizers = [_unwrapped(o) for o in self.optimizers] if fitting else []  # as Lightning restores them
        strict = getattr(self.lightning_module, "strict_loading", True)
        state, rng = ckpt.load(
            path, self.lightning_module, optimizers, self.tp_mesh, strict=strict, average=self.averaged,
            # the trainer state is unpickled only when asked for explicitly (fit/validate/... weights_only=False)
            weights_only=(self.load_weights_only if weights_only is None else weights_only) is not False,
        )  # fmt: skip
        if rng is not None and self.rng_tracker is not None:
            self.rng_tracker.load_state_dict(rng)
        # What Lightning's hooks read (on_load_checkpoint): this rank's shards, as loaded. A weight-averaging
        # callback loads "state_dict" into its copy and "current_model_state" into the model (here, already).
        state["state_dict"] = self.lightning_module.state_dict()
        if self.averaged is not None and "averaging_state" in state:
            state["state_dict"], state["current_model_state"] = self.averaged.state_dict(), state["state_dict"]
        return state

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        pass  # done in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint) -> None:
        pass  # done in load_checkpoint

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = ckpt.local_path(filepath)
            if path.is_symlink():
                path.unlink()
            elif os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (
            ("megatron_tp", "popen"),
            ("megatron_tp_spawn", "spawn"),
            ("megatron_tp_fork", "fork"),
        ):
            strategy_registry.register(
                name, cls, description=f"Megatron-style tensor parallelism, start_method={start_method!r}",
                start_method=start_method, override=True,
            )  # fmt: skip


def forward_target(module: nn.Module, example: Any = None) -> tuple[nn.Module | None, Any]:
    """``(module whose forward takes a batch, example input)`` for the plan's trace and the self-check:
    a LightningModule with an ``example_input_array`` (or ``example``) or a ``forward`` of its own is
    run itself (``None``); one without either, its one child holding parameters (the wrapped model;
    rewriting the module rewrites it), with no example (random token ids); else ``(None, None)``.
    The same for every caller (setup, the plan before launch, ``lightning-tp plan``), so they plan
    alike."""
    if example is None:
        example = getattr(module, "example_input_array", None)
        example = None if holds_meta(example) else example
    if not isinstance(module, pl.LightningModule) or example is not None:
        return None, example
    if is_overridden("forward", module, pl.LightningModule):
        return None, None
    children = [c for c in module.children() if any(True for _ in c.parameters())]
    return (children[0], None) if len(children) == 1 else (None, None)


class _ZeroRoot(nn.Module):
    """What the Trainer calls under ZeRO: its forward calls the FSDP2-sharded LightningModule, so
    Lightning's forward redirection runs ``training_step`` (and the others) inside the module's
    ``__call__``, where FSDP2 gathers the root's parameters and arranges the gradient reduce-scatter."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind a ``LightningOptimizer``."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _to(device: torch.device):
    return lambda t: t.to(device) if isinstance(t, Tensor) else t


def _optimizers_to_device(optimizers: list[Any], device: torch.device) -> None:
    """Move optimizer state (e.g. restored on CPU) to ``device``."""
    for optimizer in optimizers:
        opt = _unwrapped(optimizer)
        for param, state in opt.state.items():
            # the "step" counter stays where it is (on CPU: no device sync per parameter per step)
            opt.state[param] = {k: v if k == "step" else tree_map(_to(device), v) for k, v in state.items()}
