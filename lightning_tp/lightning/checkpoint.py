"""Sharded checkpoints on ``torch.distributed.checkpoint`` (DCP), resharding, consolidation.

A checkpoint is a directory::

    <name>.ckpt/
        .metadata, __*_*.distcp   every rank's shards (DCP)
        meta.pt                   the Trainer's state (loops, callbacks, schedulers, scaler) and the
                                  layout; loaded with ``weights_only=True``

Tensors are stored in a TP- and DP-size independent form: each TP-sharded parameter (and each
optimizer state tensor shaped like it) is stored as the dense, unpadded tensor (one per fused chunk:
``name::chunk{i}``), each rank writing its own rows in place at their offsets (under ZeRO, its DP
part of its TP shard; nothing is gathered). Vocabulary padding is never written. Loading at another
layout reads each rank's new rows (DCP reshards), padding rows become zeros. What several ranks
hold alike (replicated tensors, DP replicas, a key/value head shared by several TP ranks) is written
once. The RNG states are per rank (``rng.rank{r}.*``) and restored only at the same world size.

Saving writes to a temporary directory and renames it over the target only when every rank has
finished, so a failed save never destroys the previous checkpoint. Loading validates keys and shapes
before touching the model, reads into buffers, and only then copies into parameters.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import signal
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from lightning_tp._compat import checkpoint_block
from lightning_tp.engine.comm import collective_device
from lightning_tp.engine.mesh import TPMesh
from lightning_tp.engine.sharding import ShardSpec, shard_spec
from lightning_tp.errors import LightningTPError
from lightning_tp.lightning.signals import exits_held
from lightning_tp.lightning.zero import dp_rows_start, local
from lightning_tp.policy.plan import applied_plan

META_FILE = "meta.pt"
FORMAT_VERSION = 1
_CHUNK = "::chunk"
_TP_RANK = "::tprank"  # an optimizer state of a TP-sharded parameter, shaped otherwise: one per TP rank
_CURRENT = "current."  # the training weights, beside averaged ones under "model." (weight averaging)


class CheckpointError(LightningTPError, RuntimeError):
    """A checkpoint that cannot be loaded: corrupt, truncated, or from a different model."""


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Plain objects a trainer state commonly holds that weights_only=True loading may rebuild: a LightningModule's
# hyperparameters often include paths (save_hyperparameters() of a data directory).
_SAFE_META_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]
# Names of the temporary and replaced directories beside a checkpoint: free of "ckpt_", which Lightning's
# search for the newest SLURM checkpoint (hpc_ckpt_<n>) reads version digits from in any name holding it.
_TMP, _OLD = ".lightning_tp-tmp-", ".lightning_tp-old-"


def local_path(path: str | os.PathLike) -> Path:
    """A checkpoint location as a local (or mounted) path: a ``file://`` URL becomes its path; any other
    URL (``s3://``, ``gs://``, ``memory://``) is a :class:`CheckpointError`, as checkpoints are written
    and read through the file system (``Path`` would turn ``s3://b/x`` into a relative ``s3:/b/x``)."""
    text = os.fspath(path)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    url = urllib.parse.urlparse(text)
    if match.group(1).lower() == "file" and url.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(url.path))
    raise CheckpointError(
        f"checkpoint path {text!r} is a URL: megatron_tp writes and reads checkpoints (directories of every rank's "
        "shards) through the file system only. Use a local or mounted path (for object storage, a mount such as "
        "s3fs/gcsfuse, or copy the directory after it is written)."
    )


# ------------------------------------------------------------------------------------------------
# Canonical (TP-size independent) views of local tensors.
# ------------------------------------------------------------------------------------------------


def _chunk_keys(key: str, spec: ShardSpec) -> list[str]:
    return [key] if len(spec.sizes) == 1 else [f"{key}{_CHUNK}{c}" for c in range(len(spec.sizes))]


def _global_shape(local_shape: torch.Size, spec: ShardSpec, chunk: int) -> torch.Size:
    shape = list(local_shape)
    shape[spec.dim] = spec.sizes[chunk]
    return torch.Size(shape)


def _blocks(key: str, t: Tensor, spec: ShardSpec | None, tp_rank: int, into: Tensor | None = None) -> dict[str, Tensor]:
    """``{key(s): block}``: where this rank's part of ``t`` (a parameter or optimizer state laid out
    by ``spec``) lies in the stored tensors, to be written from it, or read into ``into`` (a tensor
    shaped like that part), in place (:func:`lightning_tp._compat.checkpoint_block`).

    The part is the rank's whole TP shard of ``t`` or, under ZeRO, its rows ``[lo, lo + len)`` of
    dim 0 (no gathering over DP either way). The stored tensors are TP-size independent: a sharded tensor is
    stored dense and unpadded, one tensor per fused chunk (``key::chunk{i}``); vocabulary padding is
    never written. A part that several ranks hold alike (a replicated tensor, a DP replica, a shared
    key/value head) has the same offsets on each and is written once."""
    part, lo, shape = local(t).detach() if into is None else into, dp_rows_start(t), t.shape
    if spec is None and not isinstance(t, DTensor):
        return {key: part}  # whole on this rank
    if spec is None:  # ZeRO: this rank's rows (none at all for a short tensor over many DP ranks)
        return {key: checkpoint_block(part, (lo,) + (0,) * (part.dim() - 1), shape)} if part.numel() else {}
    dim, hi = spec.dim % len(shape), lo + part.shape[0]
    out, offset = {}, 0
    for c, ckey in enumerate(_chunk_keys(key, spec)):
        start, n_valid = spec.valid_range(tp_rank, c)
        a, b = offset, offset + n_valid  # the chunk's real rows in the TP shard
        if dim == 0:
            a, b = max(a, lo), min(b, hi)  # ZeRO: those this rank holds
        if a < b and part.shape[0]:  # (ZeRO: a DP part with no rows at all writes nothing)
            offsets = [lo if d == 0 else 0 for d in range(len(shape))]
            offsets[dim] = start + a - offset
            data = part.narrow(dim, a - lo if dim == 0 else a, b - a)
            out[ckey] = checkpoint_block(data, offsets, _global_shape(shape, spec, c))
        offset += spec.local_sizes[c]
    return out


def _stored_shapes(key: str, shape: torch.Size, spec: ShardSpec | None) -> dict[str, torch.Size]:
    """The stored tensors' shapes of a tensor whose TP shard is ``shape`` (as :func:`_blocks` writes)."""
    if spec is None:
        return {key: torch.Size(shape)}
    return {ckey: _global_shape(shape, spec, c) for c, ckey in enumerate(_chunk_keys(key, spec))}


# ZeRO (stages 2/3): parameters and optimizer state are DTensors split over the DP group (dim 0 of
# each TP shard). A checkpoint stores the same TP-size and DP-size independent tensors at every stage,
# each rank writing and reading its own rows in place (:func:`_blocks`): it loads at any stage and
# DP size, and saving or loading never holds more than what the rank holds anyway.


def _whole(t: Tensor) -> Tensor:
    """This rank's whole TP shard of ``t`` (all-gathered over DP for a ZeRO DTensor: collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(part: Tensor, like: Tensor) -> Tensor:
    """``part`` (this rank's DP part) as a DTensor split over DP as the ZeRO tensor ``like`` is."""
    return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())  # fmt: skip


def _params(module: nn.Module) -> dict[str, Tensor]:
    """Parameters (each shared one once) and persistent buffers, by name."""
    state = dict(module.named_parameters())
    persistent = set(module.state_dict(keep_vars=True))
    state.update({n: b for n, b in module.named_buffers() if n in persistent})
    return state


def _aliases(module: nn.Module) -> dict[str, str]:
    """State-dict names that refer to an already named tensor (ties): ``{alias: name}``."""
    first: dict[int, str] = {}
    aliases = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    return aliases


def _transposed(module: nn.Module) -> list[str]:
    """The split ``Conv1D`` weights (stored ``(in, out)`` in the dense model) of ``module``, or of the
    modules inside it that were rewritten (a policy applied to a submodule)."""
    out = []
    for prefix, sub in module.named_modules():
        plan = applied_plan(sub)
        at = f"{prefix}." if prefix else ""
        out += [f"{at}{m.name}.weight" for m in (plan.modules if plan else []) if m.module_type == "Conv1D" and m.spec]
    return out


# ------------------------------------------------------------------------------------------------
# Save / load.
# ------------------------------------------------------------------------------------------------


def _state_to_save(
    module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    mesh: TPMesh,
    average: nn.Module | None = None,
    state_dict: dict[str, Any] | None = None,
):
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    params = _params(module)
    names = {id(p): n for n, p in params.items()}  # every tensor's: the optimizer state is written whole
    aliases = _aliases(module)
    averaged = _params(average) if average is not None else params
    if state_dict is not None and average is None:  # Lightning's hooks may have dropped or replaced entries
        params, averaged, aliases = _as_hooks_left(params, aliases, state_dict, module)
    for name, t in params.items():
        spec = shard_spec(t)
        tensors.update(_blocks(f"model.{name}", averaged[name], spec, mesh.tp_rank))
        if average is not None:
            tensors.update(_blocks(f"{_CURRENT}{name}", t, spec, mesh.tp_rank))
        layout[name] = None if spec is None else {"dim": spec.dim, "sizes": list(spec.sizes), "pad": spec.pad}
    optim_meta = []
    for i, opt in enumerate(optimizers):
        groups, extra = [], {}
        for group in opt.param_groups:
            groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
            )
            for p in group["params"]:
                for k, v in opt.state.get(p, {}).items():
                    key = f"optim{i}.{names[id(p)]}.{k}"
                    if isinstance(v, Tensor) and v.dim() > 0 and v.shape == p.shape:  # laid out as p
                        tensors.update(_blocks(key, v, shard_spec(p), mesh.tp_rank))
                    elif isinstance(v, Tensor) and v.dim() > 0 and shard_spec(p) is not None:
                        # shaped otherwise, of a sharded parameter (Adafactor's factored statistics): this
                        # TP rank's own, not one tensor for all (the DP replicas of a TP rank hold it alike)
                        tensors[f"{key}{_TP_RANK}{mesh.tp_rank}"] = _whole(v)
                    elif isinstance(v, Tensor):
                        tensors[key] = _whole(v)
                    else:
                        extra.setdefault(names[id(p)], {})[k] = v
        optim_meta.append({"param_groups": groups, "extra": extra})
    return tensors, layout, optim_meta, aliases


def _as_hooks_left(
    params: dict[str, Tensor], aliases: dict[str, str], state_dict: dict[str, Any], module: nn.Module
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """The model's tensors to write as ``state_dict`` (the checkpoint's, after Lightning's
    ``on_save_checkpoint`` hooks) says: ``(tensors kept, with their specs, what to write for each, aliases
    kept)``. A name removed there (with its aliases) is not written; a replaced value is written instead."""
    known = set(module.state_dict(keep_vars=True))
    added = sorted(k for k in state_dict if k not in known)
    if added:
        raise CheckpointError(
            f"checkpoint['state_dict'] holds keys the model does not have: {added[:10]}. A checkpoint stores the "
            "model's own tensors (each rank its shards); put other data under a top-level key of the checkpoint."
        )
    names_of: dict[str, list[str]] = {name: [name] for name in params}
    for alias, name in aliases.items():
        names_of.setdefault(name, [name]).append(alias)
    kept, values = {}, {}
    for name, t in params.items():
        present = [n for n in names_of[name] if n in state_dict]
        if not present:
            continue  # dropped by a hook: a partial checkpoint (load it with strict_loading=False)
        value = state_dict[present[0]]
        if (
            not isinstance(value, Tensor)
            or value.shape != t.shape
            or value.dtype != t.dtype
            or isinstance(value, DTensor) != isinstance(t, DTensor)  # ZeRO: split over DP as the parameter
        ):
            what = (
                f"{type(value).__name__} {tuple(value.shape)} {value.dtype}"
                if isinstance(value, Tensor)
                else type(value).__name__
            )
            raise CheckpointError(
                f"checkpoint['state_dict'][{present[0]!r}] is {what}; this rank's tensor is {tuple(t.shape)} {t.dtype}. "
                "A hook may drop entries or replace them with tensors of the same shape and dtype (this rank's shard)."
            )
        kept[name], values[name] = t, value
    kept_aliases = {a: n for a, n in aliases.items() if n in kept and a in state_dict}
    return kept, values, kept_aliases


def _failed_ranks(failed: bool) -> list[int]:
    """Ranks that report ``failed`` (one all-reduce over the default group; every rank gets the list)."""
    flags = torch.zeros(dist.get_world_size(), device=collective_device())
    flags[dist.get_rank()] = float(failed)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return torch.nonzero(flags).flatten().tolist()


_DEFERRED_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold these signals (blocked, delivered when the block ends) while the checkpoint is renamed into
    place: a handler run between the two renames (a second signal's exit, a default action) would leave
    nothing at the checkpoint's path. A no-op where threads cannot block signals (Windows)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {getattr(signal, name) for name in _DEFERRED_SIGNALS if hasattr(signal, name)}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _replace(tmp: Path, path: Path, old: Path) -> None:
    """Move ``tmp`` to ``path``; a previous ``path`` (a directory, a file, or a link such as
    ``ModelCheckpoint(save_last="link")``'s ``last.ckpt``) is moved aside first and put back on failure.
    Signals wait until one of the two is at ``path`` again: a second signal's exit always (``exits_held``),
    other actions in a process of one thread (``pthread_sigmask`` holds them for the calling thread only)."""
    with exits_held(), _signals_deferred():
        if path.is_symlink() or path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            if (old.is_symlink() or old.exists()) and not (path.is_symlink() or path.exists()):
                old.rename(path)
            raise
    if old.is_symlink() or old.is_file():
        old.unlink()  # a link: only the link (the checkpoint it pointed to is another's)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)


def save(
    path: str | os.PathLike,
    module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    mesh: TPMesh,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Tensor] | None = None,
    average: nn.Module | None = None,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """Save every rank's shards and the trainer state to directory ``path``. Collective.

    ``state_dict``: the checkpoint's ``"state_dict"`` as Lightning's hooks left it (this rank's shards):
    a key removed there is not written (a partial checkpoint), a value replaced there is written in place
    of the model's (it must keep the shard's shape and dtype).

    With ``average`` (a weight-averaging callback's copy of ``module``, parameters of the same names and
    layouts) the model's state is the averaged weights, as in Lightning's checkpoints (what
    :func:`consolidate` and ``export`` give), and ``module``'s own are stored beside them for a resume.

    Written to a temporary sibling directory, which replaces ``path`` only when every rank has
    finished. Every rank runs the same collectives whatever fails where, so a failure on one rank
    is a :class:`CheckpointError` on all of them (naming the failed ranks), the temporary directory
    is removed and a previous checkpoint at ``path`` is left as it was.
    """
    path = local_path(path)  # the same on every rank (a URL raises on all)
    rank = dist.get_rank()
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    tmp = path.parent / f"{_TMP}{token[0]}"
    error: BaseException | None = None
    try:  # local work: build what to write; rank 0 creates the directory
        tensors, layout, optim_meta, aliases = _state_to_save(module, optimizers, mesh, average, state_dict)
        for name, state in (rng_state or {}).items():
            tensors[f"rng.rank{rank}.{name}"] = state
        meta = dict(trainer_state)
        meta["lightning_tp"] = {
            "version": FORMAT_VERSION,
            "tp_size": mesh.tp_size,
            "world_size": mesh.world_size,
            "layout": layout,
            "transpose": _transposed(module),
            "aliases": aliases,
            "optimizers": optim_meta,
            "hf": hf_info(module),
            "averaged": average is not None,
        }
        if rank == 0:
            tmp.mkdir(parents=True, exist_ok=False)
    except Exception as exc:
        error = exc
    failed = _failed_ranks(error is not None)
    if not failed:
        try:
            dcp.save(tensors, checkpoint_id=str(tmp))  # collective; a failure on one rank raises on all
            if rank == 0:
                meta["lightning_tp"]["files"] = _manifest(tmp)  # every rank's files are complete here
                torch.save(meta, tmp / META_FILE)
        except (Exception, dcp.CheckpointException) as exc:  # the latter is a BaseException
            error = exc
        failed = _failed_ranks(error is not None)
    if not failed:
        if rank == 0:
            try:
                _replace(tmp, path, path.parent / f"{_OLD}{token[0]}")
            except Exception as exc:
                error = exc
        failed = _failed_ranks(error is not None)
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = f": {type(error).__name__}: {str(error)[:1000]}" if error is not None else ""
        raise CheckpointError(
            f"saving checkpoint {path} failed on ranks {failed}{cause}. Nothing was written: the temporary directory "
            "was removed and a previous checkpoint at that path, if any, is unchanged."
        ) from error


def hf_info(module: nn.Module) -> dict[str, str] | None:
    """The outermost Hugging Face model inside ``module``: its state-dict prefix, class and config
    (JSON), so that a checkpoint can be exported as a ``from_pretrained`` directory."""
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        if callable(getattr(sub, "save_pretrained", None)) and callable(getattr(config, "to_json_string", None)):
            return {
                "prefix": f"{name}." if name else "",
                "class": type(sub).__name__,
                "config": config.to_json_string(),
            }
    return None


def read_meta(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Any]:
    """The trainer state and layout of a checkpoint. ``weights_only=True`` (default) rebuilds no
    arbitrary objects (paths excepted); ``False`` unpickles whatever the trainer state holds (a
    LightningModule's hyperparameters of other types): only for files you trust."""
    path = local_path(path)
    if not path.is_dir() or not (path / META_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a lightning_tp checkpoint (a directory with {META_FILE} and DCP shards); "
            "it may be missing, partially written or from another strategy."
        )
    try:
        with torch.serialization.safe_globals(_SAFE_META_GLOBALS):
            meta = torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)
    except Exception as exc:
        hint = (
            " If it holds objects of your own (hyperparameters saved by save_hyperparameters()) and you trust the "
            "file, load it with weights_only=False: trainer.fit(model, ckpt_path=..., weights_only=False), "
            "lightning_tp.consolidate(path, weights_only=False)."
            if weights_only
            else ""
        )
        raise CheckpointError(
            f"cannot read {path / META_FILE}: {type(exc).__name__}: {str(exc)[:1000]}. The file is corrupt or "
            f"truncated, or it holds pickled objects, which weights_only=True refuses.{hint}"
        ) from exc
    if not isinstance(meta, dict) or "lightning_tp" not in meta:
        raise CheckpointError(f"{path / META_FILE} has no lightning_tp layout: not a lightning_tp checkpoint.")
    return meta


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(path: Path) -> dict[str, dict[str, Any]]:
    return {
        f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(path.iterdir())
        if f.is_file() and f.name != META_FILE
    }


def verify_files(path: str | os.PathLike, files: dict[str, dict[str, Any]], part: int = 0, parts: int = 1) -> list[str]:
    """Problems with the checkpoint's files: missing, truncated (size) or corrupt (sha256). Sizes are
    checked for every file, checksums for files ``part::parts`` (ranks split the reading)."""
    path = Path(path)
    problems = []
    for i, (name, want) in enumerate(sorted(files.items())):
        f = path / name
        if not f.is_file():
            problems.append(f"missing file {name}")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{name} is truncated or extended: {f.stat().st_size} bytes, expected {want['size']}")
        elif i % parts == part and _sha256(f) != want["sha256"]:
            problems.append(f"{name} is corrupt: its sha256 does not match the one recorded at save time")
    return problems


def _raise_if_bad(path: Path, info: dict[str, Any], distributed: bool) -> None:
    files = info.get("files")
    if files is None:
        return
    if distributed:
        problems = verify_files(path, files, dist.get_rank(), dist.get_world_size())
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, problems)
        problems = sorted({p for rank_problems in gathered for p in rank_problems})
    else:
        problems = verify_files(path, files)
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated: {'; '.join(problems)}. Nothing was loaded; use an earlier "
            "checkpoint."
        )


def _storage(path: Path) -> dict[str, TensorStorageMetadata]:
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:
        raise CheckpointError(f"cannot read the shard index of {path}: {type(exc).__name__}: {exc}") from exc
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _check_model_keys(
    path: Path, stored: dict[str, TensorStorageMetadata], expected: dict[str, torch.Size], strict: bool
):
    have = {k for k in stored if k.startswith("model.")}
    missing = sorted(set(expected) - have)
    unexpected = sorted(have - set(expected))
    if missing or (strict and unexpected):
        raise CheckpointError(
            f"checkpoint {path} was saved with a different model: missing keys {_strip(missing)}, unexpected keys "
            f"{_strip(unexpected)}. Load it into the model it was saved from (or load non-strictly)."
        )
    for key, shape in expected.items():
        if tuple(stored[key].size) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {path}: {key[len('model.') :]!r} has shape {tuple(stored[key].size)} in the checkpoint "
                f"but {tuple(shape)} in the model: it was saved with a different model configuration."
            )


def _strip(keys: list[str]) -> list[str]:
    return sorted({k[len("model.") :].split(_CHUNK)[0] for k in keys})


def load(
    path: str | os.PathLike,
    module: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    mesh: TPMesh,
    strict: bool = True,
    average: nn.Module | None = None,
    weights_only: bool = True,
) -> tuple[dict[str, Any], dict[str, Tensor] | None]:
    """Load shards into ``module`` / ``optimizers`` at the current TP size (resharding as needed).
    Returns ``(trainer_state, rng_state or None)``. Collective; raises :class:`CheckpointError`
    before modifying anything on a bad checkpoint.

    A checkpoint saved with averaged weights holds them as the model's state: they go into ``average``
    (a weight-averaging callback's copy of ``module``) and the training weights into ``module``;
    without ``average`` the averaged weights go into ``module``, as Lightning loads such a checkpoint.
    With ``strict=False`` the model's tensors the checkpoint does not hold (a partial checkpoint) keep
    their values."""
    meta, error = None, None
    try:
        path = local_path(path)
        meta = read_meta(path, weights_only)
    except CheckpointError as exc:
        error = exc
    failed = _failed_ranks(error is not None)  # every rank raises, not only those that cannot read it
    if failed:
        raise error or CheckpointError(f"checkpoint {path} cannot be read on ranks {failed}; nothing was loaded.")
    info = meta.pop("lightning_tp")
    if not info.get(
        "averaged", False
    ):  # no averaged weights stored: a weight-averaging callback starts from the model's
        meta.pop("averaging_state", None)
    _raise_if_bad(path, info, distributed=True)

    def plan_reads():  # the buffers DCP reads into, on every rank: may fail here, before any collective
        stored = _storage(path)
        params = _params(module)
        buffers: dict[str, Tensor] = {}  # what DCP reads into: blocks of plain tensors shaped like each rank's part
        targets: list[tuple[Tensor, Tensor]] = []  # (parameter or buffer, what its part is read into)
        expected: dict[str, torch.Size] = {}
        # (stored key, what reads it): the model's state, or the averaged weights and the training ones
        both = average is not None and info.get("averaged", False)
        reads = [("model.", _params(average)), (_CURRENT, params)] if both else [("model.", params)]
        for name, t in params.items():
            spec = shard_spec(t)
            shapes = _stored_shapes(f"model.{name}", t.shape, spec)
            if not strict and not any(k in stored for k in shapes):
                continue  # not in a partial checkpoint: keeps its value
            expected.update(shapes)
            for prefix, into_params in reads:
                target = into_params[name]
                into = torch.zeros_like(local(target).detach())  # vocabulary padding rows stay zero
                buffers.update(_blocks(f"{prefix}{name}", target, spec, mesh.tp_rank, into=into))
                targets.append((target, into))
        _check_model_keys(path, stored, expected, strict)

        names = {id(p): n for n, p in params.items()}
        optim_targets = []
        for i, opt in enumerate(optimizers):
            if i >= len(info["optimizers"]):
                weights = (
                    " It was saved with the weights only (ModelCheckpoint(save_weights_only=True) or "
                    "trainer.save_checkpoint(..., weights_only=True)): training cannot resume from it. Validate, test "
                    "or predict with it, or start a fit from its weights (lightning-tp export, then "
                    "MegatronTPStrategy(pretrained=...))."
                    if not info["optimizers"]
                    else ""
                )
                raise CheckpointError(
                    f"checkpoint {path} has {len(info['optimizers'])} optimizers, the model has {len(optimizers)}."
                    f"{weights}"
                )
            for group in opt.param_groups:
                for p in group["params"]:
                    prefix = f"optim{i}.{names[id(p)]}."
                    for key in sorted({k.split(_CHUNK)[0].split(_TP_RANK)[0] for k in stored if k.startswith(prefix)}):
                        state_key, spec = key[len(prefix) :], shard_spec(p)
                        shapes = _stored_shapes(key, p.shape, spec)
                        own = f"{key}{_TP_RANK}{mesh.tp_rank}"
                        if f"{key}{_TP_RANK}0" in stored:  # saved per TP rank: read back at the same TP size only
                            if info["tp_size"] != mesh.tp_size or own not in stored or spec is None:
                                raise CheckpointError(
                                    f"checkpoint {path}: optimizer state {key.split('.', 1)[1]!r} was saved per "
                                    f"tensor-parallel rank (shaped unlike its parameter, as a factored statistic is) at "
                                    f"tensor_parallel_size={info['tp_size']}; it cannot be resharded to "
                                    f"tensor_parallel_size={mesh.tp_size}. Resume at TP {info['tp_size']}, or load the "
                                    "model without its optimizer state."
                                )
                            meta_ = stored[own]
                            state = into = torch.empty(meta_.size, dtype=meta_.properties.dtype, device=local(p).device)
                            buffers[own], as_param = into, False
                        elif p.dim() > 0 and all(k in stored and tuple(stored[k].size) == s for k, s in shapes.items()):
                            into = torch.zeros_like(local(p).detach())  # a state laid out as its parameter
                            buffers.update(_blocks(key, p, spec, mesh.tp_rank, into=into))
                            state, as_param = into, True  # ZeRO: made a DTensor split as p once read
                        elif key not in stored:  # chunked as a parameter, but not as this one
                            raise CheckpointError(
                                f"checkpoint {path}: optimizer state {key!r} is stored as {sorted(shapes)} chunks of shapes "
                                f"{[tuple(stored[k].size) for k in shapes if k in stored]}, its parameter here is laid "
                                f"out as {[tuple(s) for s in shapes.values()]}: saved with a different model."
                            )
                        else:
                            meta_ = stored[key]
                            state = into = torch.empty(
                                meta_.size, dtype=meta_.properties.dtype
                            )  # as saved (a CPU step)
                            as_param = False
                            buffers[key] = into
                        optim_targets.append((i, p, state_key, state, as_param))
        rng_keys = [k for k in stored if k.startswith(f"rng.rank{dist.get_rank()}.")]
        same_layout = info["world_size"] == mesh.world_size and info["tp_size"] == mesh.tp_size
        if same_layout:
            for k in rng_keys:
                buffers[k] = torch.empty(stored[k].size, dtype=stored[k].properties.dtype)
        return stored, params, buffers, targets, optim_targets, rng_keys, same_layout

    error = None
    try:
        stored, params, buffers, targets, optim_targets, rng_keys, same_layout = plan_reads()
    except Exception as exc:
        error = exc
    failed = _failed_ranks(error is not None)  # every rank raises together, before DCP's collectives
    if failed:
        raise error or CheckpointError(f"loading {path} failed on ranks {failed}; nothing was loaded.")

    try:
        dcp.load(buffers, checkpoint_id=str(path))
    except (Exception, dcp.CheckpointException) as exc:  # the latter is a BaseException
        raise CheckpointError(
            f"reading the shards of {path} failed ({type(exc).__name__}: {str(exc)[:500]}). The checkpoint is corrupt "
            "or truncated (a missing or short .distcp file); the model was not modified."
        ) from exc

    with torch.no_grad():
        for t, into in targets:
            local(t).copy_(into)
    for i, opt in enumerate(optimizers):
        state: dict[int, dict[str, Any]] = {}
        index = {id(p): j for j, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        for _, p, state_key, value, as_param in (t for t in optim_targets if t[0] == i):
            if as_param and isinstance(p, DTensor):
                value = _like(value, p)  # ZeRO: the state is split over DP as its parameter is
            state.setdefault(index[id(p)], {})[state_key] = value
        saved = info["optimizers"][i]
        for name, extra in saved["extra"].items():
            p = params.get(name)
            if p is not None and id(p) in index:
                state.setdefault(index[id(p)], {}).update(extra)
        sizes = [len(g["params"]) for g in opt.param_groups], [len(g["params"]) for g in saved["param_groups"]]
        if sizes[0] != sizes[1]:  # torch's load_state_dict refuses it too; matched by position it would drop state
            raise CheckpointError(
                f"checkpoint {path}: optimizer {i} was saved with parameter groups of {sizes[1]} parameters, the "
                f"optimizer here has {sizes[0]}. Build the optimizer's groups as they were when it was saved (a "
                "callback adding groups during fit, such as BaseFinetuning, must add them again before the resume)."
            )
        groups = []
        for current, old in zip(opt.param_groups, saved["param_groups"], strict=True):
            groups.append(
                {**{k: v for k, v in old.items() if k != "params"}, "params": [index[id(p)] for p in current["params"]]}
            )
        opt.load_state_dict({"state": state, "param_groups": groups})
    rng = {k.split(".", 2)[2]: buffers[k] for k in rng_keys} if same_layout else None
    return meta, rng


# ------------------------------------------------------------------------------------------------
# Consolidation.
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def full_state_dict(module: nn.Module, group: ProcessGroup) -> dict[str, Tensor]:
    """The dense state_dict of a rewritten module, in the original module's layout (collective)."""
    from lightning_tp.engine.layers import gather_sharded

    # by identity: a module registered under several names (or a tie) holds the same tensor under each
    transpose = {id(module.get_parameter(name)) for name in _transposed(module)}
    done: dict[int, Tensor] = {}
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in done:
            whole, spec = _whole(t.detach()), shard_spec(t)  # ZeRO: gathered over DP first
            full = gather_sharded(whole, spec, group) if spec is not None else whole.clone()
            done[id(t)] = full.t().contiguous() if id(t) in transpose else full
        out[name] = done[id(t)]
    return out


def read_offline(path: Path, keys: dict[str, TensorStorageMetadata]) -> dict[str, Tensor]:
    """The stored tensors ``keys`` (names -> their storage metadata) of checkpoint ``path``, read
    without a process group."""
    buffers = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in keys.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(buffers, checkpoint_id=str(path), no_dist=True)
    except (Exception, dcp.CheckpointException) as exc:  # the latter is a BaseException
        raise CheckpointError(f"reading {sorted(keys)[:3]} from {path} failed: {type(exc).__name__}: {exc}") from exc
    return buffers


def consolidate(path: str | os.PathLike, weights_only: bool = True) -> dict[str, Tensor]:
    """One full, unsharded state_dict from a sharded checkpoint, without a process group.

    The original (unmodified) LightningModule loads it with ``load_state_dict(strict=True)``.
    ``weights_only=False``: the checkpoint's trainer state may hold objects of your own (see
    :func:`read_meta`); only for files you trust.
    """
    path = local_path(path)
    info = read_meta(path, weights_only)["lightning_tp"]
    _raise_if_bad(path, info, distributed=False)
    stored = _storage(path)
    buffers = read_offline(path, {k: v for k, v in stored.items() if k.startswith("model.")})
    out: dict[str, Tensor] = {}
    for name, layout in info["layout"].items():
        key = f"model.{name}"
        if layout is None or len(layout["sizes"]) == 1:
            out[name] = buffers[key]
        else:
            parts = [buffers[f"{key}{_CHUNK}{c}"] for c in range(len(layout["sizes"]))]
            out[name] = torch.cat(parts, dim=layout["dim"])
    for name in info["transpose"]:
        out[name] = out[name].t().contiguous()
    for alias, name in info.get("aliases", {}).items():
        out[alias] = out[name]
    return out
