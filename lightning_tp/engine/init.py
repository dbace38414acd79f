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

A module's initializer, first that applies: the user's hook ``init_fn(module)``; the
``_init_weights(module)`` of the nearest enclosing module that has one (a Hugging Face
``PreTrainedModel``: also recomputes rotary ``inv_freq`` buffers); the module's own
``reset_parameters()``. Modules holding meta tensors with none of these raise
:class:`~lightning_tp.errors.DeferredInitError` before anything is materialized.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from lightning_tp.engine.random import derive_seed
from lightning_tp.errors import DeferredInitError

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
    saved = {k for k in module.state_dict(keep_vars=True) if "." not in k}
    return [n for n, b in module.named_buffers(recurse=False) if b is not None and n not in saved]


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
        init_fn: a user initializer called with each module that holds tensors, after its own.
        initialize: ``False`` when pretrained weights are loaded afterwards: only modules holding
            non-persistent buffers (which no weights file has, e.g. rotary ``inv_freq``) run their
            initializers; every other tensor is left as allocated.
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
        self._initializers = self._find_initializers()
        # id(meta tensor) -> (weak refs to it and to its materialized tensor): a tie materializes once.
        # Weak both ways: a dense layer must be freed as soon as its split modules replace it (ids of
        # freed tensors are reused, hence the identity check).
        self._done: dict[int, tuple[weakref.ref, weakref.ref]] = {}
        self._holders: dict[int, list[tuple[nn.Module, str]]] = {}  # id(meta parameter) -> every holder
        for _, module, p_name, p in param_slots(model):
            self._holders.setdefault(id(p), []).append((module, p_name))

    def _find_initializers(self) -> dict[str, list[InitFn]]:
        """``{module name: initializers}`` for every module holding meta tensors, in the order eager
        construction runs them (the module's ``reset_parameters``, then the enclosing model's
        ``_init_weights``, then the user's hook); raises naming the modules without any."""
        found: dict[str, list[InitFn]] = {}
        missing: list[str] = []
        owners: dict[str, nn.Module | None] = {}  # nearest enclosing module with _init_weights, by name
        for name, module in self.model.named_modules():
            parent = owners.get(name.rpartition(".")[0]) if name else None
            owners[name] = module if callable(getattr(module, "_init_weights", None)) else parent
            if not _own_meta(module):
                continue
            chain: list[InitFn] = []
            if callable(getattr(module, "reset_parameters", None)):
                chain.append(lambda m: m.reset_parameters())
            if owners[name] is not None:
                chain.append(owners[name]._init_weights)
            if self.init_fn is not None:
                chain.append(self.init_fn)
            if not chain:
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
        its modules' initializers, children first, each under its own name's seed."""
        modules = list(unit.named_modules(prefix=name)) if recurse else [(name, unit)]
        fresh = []
        for mod_name, module in modules:
            created = False
            for t_name, t in _own_meta(module):
                entry = self._done.get(id(t))
                real = entry[1]() if entry is not None and entry[0]() is t else None
                if real is None:
                    real = torch.empty_like(t, device=self.device)
                    if isinstance(t, nn.Parameter):
                        real = nn.Parameter(real, requires_grad=t.requires_grad)
                    self._done[id(t)] = (weakref.ref(t), weakref.ref(real))
                    created = True
                for holder, h_name in self._holders.pop(id(t), [(module, t_name)]):  # held no longer
                    setattr(holder, h_name, real)
            if created and (self.initialize or _computed_buffers(module)):
                fresh.append((mod_name, module))
        for mod_name, module in reversed(fresh):  # children before parents
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(_name_seed(self.seed, mod_name))
                with torch.no_grad():
                    for init in self._initializers[mod_name]:
                        init(module)

    def finish(self) -> None:
        """Materialize whatever is still on meta (modules no unit reached), then check nothing is left."""
        for name, module in self.model.named_modules():
            if _own_meta(module):
                self.materialize(name, module, recurse=False)
        left = [n for n, t in (*self.model.named_parameters(), *self.model.named_buffers()) if t.is_meta]
        if left:
            raise DeferredInitError(f"deferred init left tensors on the meta device: {left}.")
