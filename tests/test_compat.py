"""Every private Lightning, torch or transformers name lightning_tp uses lives in lightning_tp._compat: each must
still exist and behave as used (a failure names the symbol an upstream release removed or changed)."""

import pytest
import torch

from lightning_tp import _compat


@pytest.mark.parametrize("symbol", sorted(_compat.__all__))
def test_private_symbol_exists(symbol):
    assert callable(getattr(_compat, symbol, None)), f"lightning_tp._compat.{symbol} is gone upstream"


def test_no_private_upstream_names_outside_compat():
    """Lightning/torch private names are imported only in _compat (static scan of the package)."""
    import ast
    from pathlib import Path

    root = Path(_compat.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("lightning", "torch"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += [node.module] if any(p.startswith("_") for p in node.module.split(".")) else []
                offenders += [f"{path.name}: {node.module}.{n}" for n in private]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                if node.attr.startswith("_"):
                    offenders.append(f"{path.name}: torch.{node.attr}")
    assert not offenders, offenders


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


def test_fake_mode_active_is_true_under_fake_tensors_only():
    """The split regions and TPDropout skip their draw (a value read from a tensor) under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not _compat.fake_mode_active()
    with FakeTensorMode():
        assert _compat.fake_mode_active()
        with Passing():  # another mode above the fake one
            assert _compat.fake_mode_active()
    with Passing():
        assert not _compat.fake_mode_active()
    assert not _compat.fake_mode_active()


def test_fake_inputs_user_modes_and_stance_as_the_fused_kernels_read_them():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    mode = FakeTensorMode()
    fake = mode.from_tensor(torch.zeros(2))
    assert _compat.fake_mode_active((fake, 3)) and not _compat.fake_mode_active((torch.zeros(2), 3))
    assert not _compat.user_dispatch_mode_active()
    with Passing():
        assert _compat.user_dispatch_mode_active()
    with mode:  # torch's own mode: not the user's
        assert not _compat.user_dispatch_mode_active()
    assert _compat.compile_stance() == "default"
    for stance in ("force_eager", "fail_on_recompile"):
        with torch.compiler.set_stance(stance):
            assert _compat.compile_stance() == stance
    assert isinstance(_compat.has_triton(), bool)
    if not torch.cuda.is_available():  # no GPU, no Triton kernels: the fused loss is off by default
        assert not _compat.has_triton()


def test_own_parameters_are_the_modules_live_parameters_by_name():
    """act_once reads a module's Parameter by name where a class property of that name stands in front."""
    lin = torch.nn.Linear(2, 3)
    params = _compat.own_parameters(lin)
    assert params["weight"] is lin.weight and params["bias"] is lin.bias and set(params) == {"weight", "bias"}
    lin.register_parameter("extra", None)
    assert "extra" in params and params["extra"] is None  # the live dict, a registered None included
    lin.extra = torch.nn.Parameter(torch.zeros(1))
    assert params["extra"] is lin.extra


def test_scaler_found_inf_flags_are_where_compat_reads_them():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale((p * float("inf")).sum()).backward()
    scaler.unscale_(opt)
    flags = _compat.found_inf_per_device(scaler, opt)
    assert flags and all(float(f) == 1.0 for f in flags.values())


def test_scaler_inf_check_for_fused_optimizers_records_flags():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale((p * float("inf")).sum()).backward()
    flags = _compat.check_inf_per_device(scaler, opt)
    assert flags and all(float(f) == 1.0 for f in flags.values())
    assert flags is _compat.found_inf_per_device(scaler, opt)  # where GradScaler.step reads them


def test_compile_counts_graphs_and_breaks():
    before = _compat.compile_counts()

    def f(x):
        y = x.sin()
        print("break")  # a graph break
        return y.cos()

    torch.compile(f, backend="eager")(torch.ones(3))
    graphs, breaks = _compat.compile_counts()
    assert graphs >= before[0] + 2 and breaks >= before[1] + 1


def test_exit_handlers_run_and_clear():
    # in a fresh interpreter: running this process's exit handlers would tear down pytest's own
    import subprocess
    import sys

    code = (
        "import atexit\nfrom lightning_tp import _compat\nseen = []\natexit.register(seen.append, 1)\n"
        "_compat.clear_exit_handlers()\natexit.register(seen.append, 2)\n_compat.run_exit_handlers()\nprint(seen)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[2]", out.stderr[-2000:]


@pytest.mark.parametrize("name", ["MultiProcessingLauncher", "SubprocessScriptLauncher"])
def test_lightning_launchers_exist(name):
    from lightning.pytorch.strategies.launchers.launcher import _Launcher

    cls = getattr(_compat, name)
    assert isinstance(cls, type) and issubclass(cls, _Launcher), f"lightning_tp._compat.{name} is gone upstream"


@pytest.mark.parametrize(("path", "hook"), _compat.LIGHTNING_HOOKS, ids=lambda x: x.rsplit(".", 1)[-1])
def test_overridden_lightning_hooks_exist(path, hook):
    """lightning_tp overrides these private hooks: Lightning must still define (and so call) them."""
    assert callable(getattr(_compat.lightning_class(path), hook, None)), f"{path}.{hook} is gone upstream"


def test_set_launcher_and_device_mesh_are_what_lightning_reads():
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    strategy, marker = DDPStrategy(), object()
    _compat.set_launcher(strategy, marker)
    assert strategy.launcher is marker
    module = pl.LightningModule()
    _compat.set_device_mesh(module, marker)
    assert module.device_mesh is marker


def test_take_over_signal_handling_keeps_lightnings_handlers_out_of_one_fit():
    """Lightning's Trainer installs its signal handlers in ``_run`` and its training epoch loop broadcasts
    rank 0's SIGTERM flag every batch; for a fit the strategy turns both into no-ops (it agrees on signals
    itself), and gives them back afterwards."""
    import inspect
    import signal

    import lightning.pytorch as pl
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    assert "self._broadcast_sigterm_tensor()" in inspect.getsource(_TrainingEpochLoop.advance)
    assert "self._signal_connector.register_signal_handlers()" in inspect.getsource(pl.Trainer._run)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    connector, before = trainer._signal_connector, signal.getsignal(signal.SIGTERM)
    _compat.take_over_signal_handling(trainer)
    connector.register_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is before
    assert trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor() is None
    connector.teardown()
    assert signal.getsignal(signal.SIGTERM) is before
    _compat.give_back_signal_handling(trainer)
    try:
        connector.register_signal_handlers()  # Lightning's own again
        assert signal.getsignal(signal.SIGTERM) is not before
    finally:
        connector.teardown()
    assert signal.getsignal(signal.SIGTERM) is before
    assert "_broadcast_sigterm_tensor" not in vars(trainer.fit_loop.epoch_loop)


def test_lr_finder_running_sees_the_finders_callback():
    """Lightning's LR finder replaces the trainer's callbacks with its ``_LRCallback`` while it sweeps."""
    import inspect
    from types import SimpleNamespace

    from lightning.pytorch.tuner import lr_finder

    assert "trainer.callbacks = [_LRCallback(" in inspect.getsource(lr_finder)
    assert _compat.lr_finder_running(SimpleNamespace(callbacks=[lr_finder._LRCallback(3, None)]))
    assert not _compat.lr_finder_running(SimpleNamespace(callbacks=[]))


def test_lightning_names_load_lazily():
    """The engine imports _compat; importing it must not import Lightning."""
    import subprocess
    import sys

    # lightning_tp/__init__ imports Lightning itself, so load _compat as a standalone file
    path = _compat.__file__
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('compat_alone', {path!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print('lightning' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_assert_async_raises_on_a_false_condition_only():
    _compat.assert_async(torch.tensor(True), "never")
    with pytest.raises(RuntimeError, match="out of range"):
        _compat.assert_async(torch.tensor(False), "a token id is out of range")


class _Doubled(torch.Tensor):
    """A tensor whose sum() is twice the plain one (a subclass that changes what an op means)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with _compat.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out * 2 if func is torch.Tensor.sum else out


def test_compile_inputs_opaque_runs_a_subclass_argument_eagerly():
    import torch._dynamo

    from lightning_tp.engine.loss import VocabShardedLogits

    assert VocabShardedLogits in torch._dynamo.config.nontraceable_tensor_subclasses  # registered on import
    x = torch.arange(4.0).as_subclass(_Doubled)
    try:
        _compat.compile_inputs_opaque(_Doubled)
        assert _Doubled in torch._dynamo.config.nontraceable_tensor_subclasses
        torch.compiler.reset()
        got = torch.compile(lambda t: t.sum() + 1, backend="aot_eager")(x)
        assert float(got) == 13.0  # 2 * 6 + 1: the subclass's meaning, run eagerly
    finally:
        torch._dynamo.config.nontraceable_tensor_subclasses.discard(_Doubled)
        torch.compiler.reset()


def test_compiler_backend_is_a_callable_backend():
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return _compat.compiler_backend("aot_eager")(gm, example_inputs)

    torch.compiler.reset()
    x = torch.arange(3.0, requires_grad=True)
    y = torch.compile(lambda t: (t.sin() * 2).sum(), backend=recording, fullgraph=True)(x)
    y.backward()
    assert len(graphs) == 1 and torch.allclose(x.grad, 2 * x.detach().cos())


def test_checkpoint_blocks_are_written_and_read_at_their_offsets(tmp_path):
    """DCP writes a block from its data at its offsets and reads a stored tensor's rows into one in
    place (one process: a block covering the whole tensor is written; rows 2..4 are read back)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    full = torch.arange(24.0).view(6, 4)
    block = _compat.checkpoint_block(full.clone(), (0, 0), (6, 4))
    assert block.size() == (6, 4) and block.size(0) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": block}, checkpoint_id=str(tmp_path), no_dist=True)
        into = torch.zeros(2, 4)
        dcp.load({"w": _compat.checkpoint_block(into, (2, 0), (6, 4))}, checkpoint_id=str(tmp_path), no_dist=True)
        plain = {"w": torch.zeros(6, 4)}
        dcp.load(plain, checkpoint_id=str(tmp_path), no_dist=True)
    assert torch.equal(into, full[2:4]) and torch.equal(plain["w"], full)


def test_checkpoint_blocks_of_several_ranks_plan_as_dcp_expects():
    """Several ranks' blocks through DCP's own planning (what one process cannot show): the blocks of
    two ranks tile the stored tensor, a block both hold alike is written once, and a plan whose blocks
    overlap is refused by DCP's validation."""
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
    from torch.distributed.checkpoint.default_planner import (
        _validate_global_plan,
        create_default_global_save_plan,
        create_default_local_save_plan,
    )

    full, rep = torch.arange(24.0).view(6, 4), torch.ones(2)

    def plans(rows):
        return [
            create_default_local_save_plan(
                {
                    "w": _compat.checkpoint_block(full[a:b], (a, 0), (6, 4)),
                    "r": _compat.checkpoint_block(rep, (0,), (2,)),
                },
                is_coordinator=rank == 0,
            )
            for rank, (a, b) in enumerate(rows)
        ]

    deduped = dedup_save_plans(plans([(0, 3), (3, 6)]))
    assert sum(1 for plan in deduped for item in plan.items if item.index.fqn == "r") == 1
    _, metadata = create_default_global_save_plan(deduped)
    assert _validate_global_plan(deduped, metadata) == []  # the errors it finds
    assert [tuple(c.offsets) for c in metadata.state_dict_metadata["w"].chunks] == [(0, 0), (3, 0)]
    overlapping = dedup_save_plans(plans([(0, 4), (3, 6)]))
    assert _validate_global_plan(overlapping, create_default_global_save_plan(overlapping)[1])


def test_shared_process_groups_makes_deepcopy_share_them_inside_only():
    import copy

    import torch.distributed as dist

    group = dist.ProcessGroup(dist.HashStore(), 0, 1)
    with pytest.raises(TypeError, match="pickle"):
        copy.deepcopy({"group": group})
    with _compat.shared_process_groups():
        assert copy.deepcopy({"group": group, "t": torch.ones(1)})["group"] is group
    with pytest.raises(TypeError, match="pickle"):
        copy.deepcopy(group)


def test_averaged_model_is_where_weight_averaging_keeps_its_copy():
    import lightning as L
    from lightning.pytorch.callbacks import EMAWeightAveraging

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    callback, module = EMAWeightAveraging(), Tiny()
    assert _compat.averaged_model(callback) is None
    callback.setup(None, module, "fit")
    averaged = _compat.averaged_model(callback)
    assert isinstance(averaged, torch.optim.swa_utils.AveragedModel) and type(averaged.module) is Tiny


def test_own_checkpointing_is_how_a_hugging_face_layer_checkpoints_itself():
    """A Hugging Face decoder layer recognized, given the checkpoint function (private
    ``_gradient_checkpointing_func``), calls it in a training forward with gradients on, its key/value
    cache argument dropped; not in eval mode; a module of another kind is left as it is."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    calls = []

    def function(forward, *args):
        calls.append(dict(forward.keywords))
        return forward(*args)

    linear = torch.nn.Linear(2, 2)
    assert not _compat.own_checkpointing(linear, function) and "gradient_checkpointing" not in vars(linear)
    assert _compat.own_checkpointing(model.model.layers[0], function)
    ids = torch.randint(0, 32, (1, 4))
    model.train()(input_ids=ids, use_cache=True)
    assert len(calls) == 1 and "cache" in calls[0] and calls[0]["cache"] is None and calls[0]["use_cache"] is False
    model.eval()(input_ids=ids)
    assert len(calls) == 1
