"""Deferred initialization: a model built on the meta device is rewritten while still on meta, then
materialized one layer at a time, so no rank ever holds the whole dense model.

Each *unit* (an element of an ``nn.ModuleList`` / ``nn.ModuleDict`` that holds no such stack itself,
i.e. one transformer layer with its children; any other module on its own; containers never) is materialized dense on the target device, its modules'
own initializers run (children before parents, as ``nn.Module.apply`` and Hugging Face do), and only
then are its split layers built, keeping this rank's slices (Megatron's master-weight init). Every
module is initialized under a seed derived from the shared seed and the module's *name*, so the dense
values, and therefore the gathered weights, do not depend on the TP size (nor on which rank or in
which order units are done). A tied parameter is materialized and initialized once, by the first
unit that holds it.

A module's initializers, in the order eager construction runs them: the module's own
``reset_parameters()``; the ``_init_weights(module)`` of the nearest enclosing module that has one
(a Hugging Face ``PreTrainedModel``: also recomputes rotary ``inv_freq`` buffers). Within a layer,
``_init_weights`` also runs for the modules that hold no meta tensor of their own, after their children
(as Hugging Face's ``initialize_weights`` does: a mixture-of-experts block initializes its router's
weight). The Hugging Face models enclosing a unit from outside that write into it then run their
``_init_weights`` on their enclosing modules, writing the unit's tensors only (Whisper's encoder puts
sinusoids into its position embedding; see ``Materializer._init_from_enclosing_models``). Inside a
Hugging Face model the enclosing model is the nearest ``PreTrainedModel``, as its
``initialize_weights`` dispatches. The user's hook ``init_fn(module)`` runs last, for each module
holding tensors, after the whole layer's initializers. Modules holding meta tensors with no
initializer at all raise :class:`~lightning_tp.errors.DeferredInitError` before anything is
materialized.

Initializers that leave a tensor unset (a parameter whose value only its constructor gives, which the
meta device dropped: an activation's learned constants, a bias built as zeros) would leave
uninitialized memory. Every tensor is created filled with a value no initializer writes (NaN; the
minimum of a signed integer type, the maximum of an unsigned one; byte 0xFF for booleans), each
layer is checked before it is split (so alike on every rank), and a
:class:`~lightning_tp.errors.DeferredInitError` names the tensors still unset once every layer is
done (with ``initialize=False``, only the computed buffers, which no weights file has).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_tp.engine.random import derive_seed
from lightning_tp.engine.sharding import shard_spec
from lightning_tp.errors import DeferredInitError, few

InitFn = Callable[[nn.Module], None]


def is_deferred(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def move_built_tensors(module: nn.Module, device: torch.device | str) -> None:
    """Move the parameters and buffers of a deferred ``module`` that are not on meta (a part built
    outside the meta-device block, a metric's state) to ``device`` in place (``.data``: the same
    objects, ties and attributes kept), so its layers, materialized on ``device``, meet them there."""
    device = torch.device(device)
    for t in [*module.parameters(), *module.buffers()]:  # each tied tensor once
        if not t.is_meta and t.device != device:
            t.data = t.data.to(device)


def _own_meta(module: nn.Module) -> list[tuple[str, Tensor]]:
    own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
    return [(n, t) for n, t in own if t is not None and t.is_meta]


def _computed_buffers(module: nn.Module) -> list[str]:
    """Own buffers left out of the state dict (computed by the constructor, never saved)."""
    if not any(b is not None for _, b in module.named_buffers(recurse=False)):
        return []
    saved = {k for k in module.state_dict(keep_vars=True) if "." not in k}
    return [n for n, b in module.named_buffers(recurse=False) if b is not None and n not in saved]


def _sentinel(t: Tensor) -> tuple[Tensor, float | int]:
    """``(view, value)``: what :func:`_fill_unset` writes into ``t`` (through ``view``): NaN for floats,
    the minimum of a signed integer type, the maximum of an unsigned one, and byte 0xFF for booleans
    (which hold 0 or 1 once set)."""
    if t.is_floating_point() or t.is_complex():
        return t, float("nan")
    if t.dtype == torch.bool:
        return t.view(torch.uint8), 0xFF
    info = torch.iinfo(t.dtype)
    return t, (info.min if info.min < 0 else info.max)


def _fill_unset(t: Tensor) -> None:
    """Fill a freshly created tensor with the value no initializer writes (see the module doc)."""
    view, value = _sentinel(t)
    view.fill_(value)


def _unset(t: Tensor) -> bool:
    """Whether ``t`` still holds (some of) the value :func:`_fill_unset` wrote."""
    view, value = _sentinel(t)
    return bool(torch.isnan(view).any()) if value != value else bool((view == value).any())


def _holds_unset(module: nn.Module, name: str) -> bool:
    t = getattr(module, name, None)
    return isinstance(t, Tensor) and _unset(t)


_ABSENT = object()


def _enclosing(name: str) -> list[str]:
    """The names of the modules strictly enclosing module ``name`` (the root is ``""``)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def _transformers(name: str):
    """``transformers.<name>`` where transformers is imported (a Hugging Face model may be here), else ``None``."""
    return getattr(sys.modules.get("transformers"), name, None)


class _Asked:
    """An ``_is_hf_initialized`` mark that answers "initialized" and notes the tensor's names in ``seen``
    whenever an initializer asks (the tensors an initializer would write, without writing them)."""

    def __init__(self, names: list[str], seen: set[str]) -> None:
        self.names, self.seen = names, seen

    def __bool__(self) -> bool:
        self.seen.update(self.names)
        return True


@contextlib.contextmanager
def _marked_initialized(tensors: list[Tensor], marks: list[object] | None = None) -> Iterator[None]:
    """Meanwhile Hugging Face's initializers skip ``tensors`` (marked ``_is_hf_initialized``, as
    ``from_pretrained`` marks loaded weights, or with ``marks``), and torch's ``nn.init`` functions too,
    guarded as Hugging Face's ``initialize_weights`` guards them. The marks are restored. ``tensors``
    holds each tensor once."""
    marks = [True] * len(tensors) if marks is None else marks
    before = [t.__dict__.get("_is_hf_initialized", _ABSENT) for t in tensors]
    guard = getattr(sys.modules.get("transformers.initialization"), "guard_torch_init_functions", None)
    for t, mark in zip(tensors, marks, strict=True):
        t._is_hf_initialized = mark
    try:
        with guard() if guard is not None else contextlib.nullcontext():
            yield
    finally:
        for t, flag in zip(tensors, before, strict=True):
            if flag is _ABSENT:
                del t._is_hf_initialized
            else:
                t._is_hf_initialized = flag


def _sample(t: Tensor) -> Tensor:
    """Three of ``t``'s elements (first, middle, last), as bytes, read in place: a write through
    ``.data`` leaves ``t._version`` as it was."""
    t = t.detach()
    if not t.numel():
        return t.new_empty(0, dtype=torch.uint8)
    at = [tuple(0 for _ in t.shape), tuple(s // 2 for s in t.shape), tuple(s - 1 for s in t.shape)]
    return torch.stack([t[i] for i in at]).view(torch.uint8)


def _initializes_modules(module: nn.Module, owner: nn.Module | None) -> bool:
    """Whether ``module._init_weights(m)`` initializes the modules under it, below ``owner`` (the nearest
    enclosing one that does). Inside a Hugging Face model only a ``PreTrainedModel``'s does, as its
    ``initialize_weights`` dispatches (another module's ``_init_weights`` is its own affair: MiniCPM-V's
    window merger has one that takes no module); elsewhere one that takes a module does."""
    init = getattr(module, "_init_weights", None)
    if not callable(init):
        return False
    PreTrainedModel = _transformers("PreTrainedModel")  # noqa: N806
    if PreTrainedModel is not None and isinstance(owner, PreTrainedModel):
        return isinstance(module, PreTrainedModel)
    try:
        params = inspect.signature(init).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): trust the name
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(name.encode()).digest()
    return derive_seed(seed, int.from_bytes(digest[:8], "little"))


def param_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Parameter]]:
    """``(module name, module, parameter name, parameter)`` for every place a parameter is held
    (a tied parameter once per holder)."""
    for name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False, remove_duplicate=False):
            yield name, module, p_name, p


def module_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{name: (name, *other names)}`` of every module registered under more than one name: one
    layer object shared by several parents (T5's ``shared`` embedding kept again as each stack's
    ``embed_tokens``), or weight-shared blocks (``nn.ModuleList([block] * n)``). ``name`` is the one
    ``named_modules()`` gives (its first place); a policy pattern that matches any of the names
    applies to the one module, and rewriting it rewrites it at every place."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return {names[0]: tuple(names) for names in paths.values() if len(names) > 1}


def units(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """``(name, module, with children)`` in module order. A layer (an element of an
    ``nn.ModuleList`` / ``nn.ModuleDict`` that holds no such container itself) comes with its
    children; containers are never units (their elements are); every other module comes alone."""
    containers = (nn.ModuleList, nn.ModuleDict)
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(u + ".") for u in inside[-1:]) or isinstance(module, containers):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if name else None
        stack = any(isinstance(m, containers) for m in module.modules())
        if isinstance(parent, containers) and not stack:
            inside.append(name)
            yield name, module, True
        else:
            yield name, module, False


class Materializer:
    """Materializes and initializes a meta model unit by unit (see the module doc).

    Args:
        model: the model (still holding meta tensors).
        device: where the tensors are created.
        seed: shared by every rank (data-parallel ones too).
        init_fn: a user initializer called with each module that holds tensors, after the
            initializers of the whole layer (children first).
        initialize: ``False`` when pretrained weights are loaded afterwards: only modules holding
            non-persistent buffers (which no weights file has, e.g. rotary ``inv_freq``) run their
            initializers; every other tensor is left holding the unset marker (see the module
            doc) for the weights to overwrite.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str,
        seed: int,
        init_fn: InitFn | None = None,
        initialize: bool = True,
    ) -> None:
        self.model, self.device, self.seed, self.init_fn = model, torch.device(device), int(seed), init_fn
        self.initialize = initialize  # False: pretrained weights follow; only computed buffers are initialized
        self._owners: dict[str, nn.Module | None] = {}  # module name -> who initializes it (_initializes_modules)
        self._enclosing: set[str] = set()  # modules without meta tensors of their own: _init_weights only
        self._initializers = self._find_initializers()
        self._writes = self._find_enclosing_writes()  # enclosing module -> tensors its _init_weights writes
        # id(meta tensor) -> (weak refs to it and to its materialized tensor): a tie materializes once.
        # Weak both ways: a dense layer must be freed as soon as its split modules replace it (ids of
        # freed tensors are reused, hence the identity check).
        self._done: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        self._holders: dict[int, list[tuple[nn.Module, str]]] = {}  # id(meta parameter) -> every holder
        # (module name, tensor name) -> (weak ref to the dense module, the module's class name): tensors an
        # initializer had to set and did not (checked on the dense layer, before any split: alike on every rank)
        self._unset: dict[tuple[str, str], tuple[weakref.ref, str]] = {}
        for _, module, p_name, p in param_slots(model):
            self._holders.setdefault(id(p), []).append((module, p_name))

    def _find_initializers(self) -> dict[str, list[InitFn]]:
        """``{module name: initializers}`` for every module holding meta tensors, in the order eager
        construction runs them (the module's ``reset_parameters``, then the enclosing model's
        ``_init_weights``; the user's hook runs after the whole layer's), and the enclosing model's
        ``_init_weights`` for the other modules; raises naming the modules holding tensors without any."""
        found: dict[str, list[InitFn]] = {}
        missing: list[str] = []
        owners = self._owners  # the nearest enclosing module whose _init_weights initializes it, by name
        for name, module in self.model.named_modules():
            parent = owners.get(name.rpartition(".")[0]) if name else None
            owners[name] = module if _initializes_modules(module, parent) else parent
            if not _own_meta(module):
                if owners[name] is not None:  # run after its children's, within a layer (see the module doc)
                    found[name] = [owners[name]._init_weights]
                    self._enclosing.add(name)
                continue
            chain: list[InitFn] = []
            if callable(getattr(module, "reset_parameters", None)):
                chain.append(lambda m: m.reset_parameters())
            if owners[name] is not None:
                chain.append(owners[name]._init_weights)
            if not chain and self.init_fn is None:
                missing.append(f"{name or '<root>'} ({type(module).__name__})")
            found[name] = chain
        if missing:
            raise DeferredInitError(
                f"deferred (meta-device) init: modules {missing} hold tensors but have no initializer, so they would "
                "keep uninitialized memory. Give them a reset_parameters() that sets every parameter and buffer, or "
                "define init_weights(module) on the LightningModule (called for every module)."
            )
        return found

    def units(self) -> Iterator[tuple[str, nn.Module, bool]]:
        """The model's units (see :func:`units`)."""
        return units(self.model)

    def materialize(self, name: str, unit: nn.Module, recurse: bool) -> None:
        """Create ``unit``'s meta tensors on the device (a tensor several modules hold, once) and run
        its modules' initializers, children first, each under its own name's seed; then the user's
        hook. Tensors left unset are noted (see the module doc)."""
        modules = list(unit.named_modules(prefix=name)) if recurse else [(name, unit)]
        fresh, expected = [], []
        for mod_name, module in modules:
            created = False
            computed = _computed_buffers(module)
            for t_name, t in _own_meta(module):
                entry = self._done.get(id(t))
                real = entry[1]() if entry is not None and entry[0]() is t else None
                if real is None:
                    real = torch.empty_like(t, device=self.device)
                    _fill_unset(real)
                    if isinstance(t, nn.Parameter):
                        real = nn.Parameter(real, requires_grad=t.requires_grad)
                    self._done[id(t)] = (weakref.ref(t), weakref.ref(real))
                    created = True
                    if self.initialize or t_name in computed:
                        expected.append(((mod_name, t_name), module))
                for holder, h_name in self._holders.pop(id(t), [(module, t_name)]):  # held no longer
                    setattr(holder, h_name, real)
            if created and (self.initialize or computed):
                fresh.append((mod_name, module))
        run = fresh
        if self.initialize and fresh:  # the layer's modules without tensors of their own that enclose fresh ones
            inits = {n for n, _ in fresh}
            run = [
                (n, m)
                for n, m in modules
                if n in inits or (n in self._enclosing and any(f.startswith(n + ".") for f in inits))
            ]
        for mod_name, module in reversed(run):  # children before parents
            self._run(mod_name, self._initializers[mod_name], module)
        if expected:
            self._init_from_enclosing_models(
                name, {f"{m}.{t}" if m else t: getattr(mod, t) for (m, t), mod in expected}
            )
        if self.init_fn is not None:  # the user's hook has the last word, children first
            for mod_name, module in reversed(fresh):
                self._run(f"{mod_name}/init_fn", [self.init_fn], module)
        # what the modules hold now (an initializer may assign a new tensor: LitGPT's rope cache)
        for key, (ref, _) in list(self._unset.items()):  # a tie set by this layer's initializers
            if (module := ref()) is not None and not _holds_unset(module, key[1]):
                del self._unset[key]
        for key, module in expected:
            if _holds_unset(module, key[1]):
                self._unset[key] = (weakref.ref(module), type(module).__name__)

    def _run(self, seed_name: str, inits: list[InitFn], module: nn.Module) -> None:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(_name_seed(self.seed, seed_name))
            with torch.no_grad():
                for init in inits:
                    init(module)

    def finish(self) -> None:
        """Materialize whatever is still on meta (modules no unit reached), then check nothing is left
        on meta or unset."""
        for name, module in self.model.named_modules():
            if _own_meta(module):
                self.materialize(name, module, recurse=False)
        left = [n for n, t in (*self.model.named_parameters(), *self.model.named_buffers()) if t.is_meta]
        if left:
            raise DeferredInitError(f"deferred init left tensors on the meta device: {left}.")
        if self._unset:
            unset: dict[str, list[str]] = {}  # module class -> tensors no initializer set
            for (mod_name, t_name), (_, cls) in self._unset.items():
                unset.setdefault(cls, []).append(f"{mod_name}.{t_name}" if mod_name else t_name)
            what = "; ".join(f"{cls}: {few(names)}" for cls, names in unset.items())
            raise DeferredInitError(
                f"deferred (meta-device) init: no initializer sets {what} (their values come from the constructor, "
                "which the meta device skipped), so they would keep uninitialized memory. "
                + (
                    "Define init_weights(module) on the LightningModule that sets them (called for every module "
                    "holding tensors), give the module a reset_parameters() that does, load them (pretrained=...), "
                    "or build the model off the meta device."
                    if self.initialize
                    else "They are buffers left out of the state dict, so no weights file has them: give the module "
                    "a reset_parameters() that computes them, define init_weights(module) on the LightningModule, "
                    "or build the model off the meta device."
                )
            )

    def _find_enclosing_writes(self) -> dict[str, set[str] | None]:
        """``{module name: the names of the tensors its Hugging Face model's _init_weights writes}``, for
        every module enclosing a unit, from one run on the meta model in which every tensor is marked
        with an :class:`_Asked`: the tensors it asks about (through ``transformers.initialization`` or
        torch's guarded ``nn.init``), which it then leaves alone, and those it writes in place anyway
        (a meta tensor's version moves). ``None`` where that run fails (a value-dependent initializer):
        then it runs for every unit inside. What an initializer writes through ``.data`` without asking
        is not seen, and is not written under deferred init."""
        PreTrainedModel = _transformers("PreTrainedModel")  # noqa: N806
        if PreTrainedModel is None:
            return {}
        names: dict[int, list[str]] = {}
        tensors: dict[int, Tensor] = {}
        for n, t in (
            *self.model.named_parameters(remove_duplicate=False),
            *self.model.named_buffers(remove_duplicate=False),
        ):
            names.setdefault(id(t), []).append(n)
            tensors[id(t)] = t
        seen: set[str] = set()
        marks = [_Asked(names[i], seen) for i in tensors]
        writes: dict[str, set[str] | None] = {}
        for a in sorted({e for n, _, _ in units(self.model) for e in _enclosing(n)}):
            if not isinstance(owner := self._owners.get(a), PreTrainedModel):
                continue
            seen.clear()
            versions = [t._version for t in tensors.values()]
            try:
                with _marked_initialized(list(tensors.values()), marks):
                    self._run(f"{a}/writes", [owner._init_weights], self.model.get_submodule(a))
            except Exception:  # noqa: BLE001 - e.g. .item() of a meta tensor: run it for every unit inside
                writes[a] = None
                continue
            moved = (names[i] for (i, t), v in zip(tensors.items(), versions, strict=True) if t._version != v)
            writes[a] = seen | {n for ns in moved for n in ns}
        return writes

    def _init_from_enclosing_models(self, name: str, fresh: dict[str, Tensor]) -> None:
        """The ``_init_weights`` of the Hugging Face models enclosing unit ``name`` from outside it that
        write into it (``fresh``: its new tensors, by name), run on those enclosing modules, innermost
        first: Hugging Face initializes every module after its children, and some write into them
        (Whisper's encoder copies sinusoids into its position embedding; Falcon-H1's base model writes
        every layer's ``mup_vector``). Every other tensor is marked meanwhile (:func:`_marked_initialized`),
        so only the unit is written, dense, before it is split: alike on every rank. A split tensor
        written anyway (through ``.data``, unguarded) is a :class:`~lightning_tp.errors.DeferredInitError`."""
        owners = [  # (self._writes holds the enclosing modules that a Hugging Face model initializes)
            (n, self._owners[n])
            for n in reversed(_enclosing(name))
            if n in self._writes and (self._writes[n] is None or not self._writes[n].isdisjoint(fresh))
        ]
        if not owners:
            return
        ids = {id(t) for t in fresh.values()}
        everything = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}  # (a tensor held twice)
        marked = [t for i, t in everything.items() if i not in ids]
        shards = [(t, t._version, _sample(t)) for t in marked if shard_spec(t) is not None]  # split units' slices
        with _marked_initialized(marked):
            for n, owner in owners:  # (a seed per unit: the draws of different layers are independent)
                self._run(f"{name}<{n}", [owner._init_weights], self.model.get_submodule(n))
        written = {
            id(t) for t, version, sample in shards if t._version != version or not torch.equal(_sample(t), sample)
        }
        if written:
            names = [n for n, t in (*self.model.named_parameters(), *self.model.named_buffers()) if id(t) in written]
            raise DeferredInitError(
                f"deferred (meta-device) init: the _init_weights of {[type(o).__name__ for _, o in owners]}, run for "
                f"'{name}' as Hugging Face initializes a module after its children, wrote {few(names)}, which the "
                "rewrite had already split: it writes them in place without checking _is_hf_initialized, so each "
                "rank would write its slice, differently at each TP size. Set them in the LightningModule's "
                "init_weights(module) hook, load them (pretrained=...), or build the model off the meta device."
            )
