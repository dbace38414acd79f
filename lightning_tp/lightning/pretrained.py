"""Pretrained weights into a rewritten (sharded) model, each rank reading only its slices.

Sources: a Hugging Face model directory (``model.safetensors``, or shards listed in
``model.safetensors.index.json``), one ``.safetensors`` file (read with ``safe_open(...).get_slice``),
or a ``.pt`` / ``.bin`` state dict (``torch.load(mmap=True, weights_only=True)``: pages are read only
where sliced), e.g. what ``lightning-tp export`` writes.

Key names: the file's keys and the model's state-dict names may differ by a prefix (a LightningModule's
``model.``, Hugging Face's ``model.`` of the base model); the prefix pair that matches the most keys
is used, or ``prefix`` (prepended to every file key) when given. Every check (missing and unexpected
keys, shapes, lossy dtype casts, unreadable files) runs on the file headers before the first tensor
is copied, and raises :class:`~lightning_tp.lightning.checkpoint.CheckpointError` naming the file
and the key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_tp.engine.sharding import ShardSpec, shard_spec
from lightning_tp.lightning.checkpoint import CheckpointError, _transposed

_INDEX = "model.safetensors.index.json"


class _Source:
    """Uniform read access to one weights file: ``keys``, ``shape``, ``dtype``, ``read(key, dim, start, n)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._st = safe_open(str(path), framework="pt")
                self._slices = {k: self._st.get_slice(k) for k in self._st.keys()}  # noqa: SIM118
                self._tensors = None
            else:
                self._st, self._slices = None, None
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                    raise CheckpointError(f"{path}: expected a state dict of tensors (name -> tensor).")
                self._tensors = state
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is an unreadable file
            raise CheckpointError(f"cannot read pretrained weights {path}: {type(exc).__name__}: {exc}") from exc

    def keys(self) -> list[str]:
        return list(self._slices if self._slices is not None else self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._slices is not None:
            return tuple(self._slices[key].get_shape())
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if self._slices is not None:
            return _ST_DTYPES[self._slices[key].get_dtype()]
        return self._tensors[key].dtype

    def read(self, key: str, dim: int | None = None, start: int = 0, n: int = 0) -> Tensor:
        """The whole tensor, or ``n`` elements from ``start`` along ``dim``."""
        return self.region(key, {} if dim is None else {dim: (start, n)})

    def region(self, key: str, ranges: dict[int, tuple[int, int]]) -> Tensor:
        """The part of ``key`` that is ``n`` elements from ``start`` along each ``dim`` of ``{dim: (start, n)}``."""
        try:
            if self._slices is not None:
                sl = self._slices[key]
                if not ranges:
                    return sl[...]  # (``[:]`` fails on a 0-dim tensor: a learned scalar)
                index = [slice(None)] * (max(ranges) + 1)
                for dim, (start, n) in ranges.items():
                    index[dim] = slice(start, start + n)
                return sl[tuple(index)]
            t = self._tensors[key]
            for dim, (start, n) in ranges.items():
                t = t.narrow(dim, start, n)
            return t.clone()
        except Exception as exc:  # noqa: BLE001 - a truncated file fails here
            raise CheckpointError(f"cannot read {key!r} from {self.path}: {type(exc).__name__}: {exc}") from exc


class _Joined:
    """One tensor a Hugging Face conversion concatenates from several keys along ``dim`` (``Concatenate``:
    Kimi-Linear's ``conv1d`` = ``[q_conv1d | k_conv1d | v_conv1d]``). Read like one key of a
    :class:`_Source`: a slice along ``dim`` reads only the parts it crosses, a slice along another dim
    that slice of each part."""

    def __init__(self, parts: list[tuple[_Source, str]], dim: int) -> None:
        self.parts, self.dim = parts, dim
        self.path = parts[0][0].path

    def keys(self) -> list[str]:
        return [k for _, k in self.parts]

    def shape(self, key: str | None = None) -> tuple[int, ...]:
        shapes = [src.shape(k) for src, k in self.parts]
        return tuple(sum(s[d] for s in shapes) if d == self.dim else n for d, n in enumerate(shapes[0]))

    def dtype(self, key: str | None = None) -> torch.dtype:
        return self.parts[0][0].dtype(self.parts[0][1])

    def read(self, key: str | None = None, dim: int | None = None, start: int = 0, n: int = 0) -> Tensor:
        if dim is None or dim != self.dim:
            pieces = [src.read(k, dim, start, n) for src, k in self.parts]
        else:  # the slice crosses the parts: read each one's share
            pieces, offset = [], 0
            for src, k in self.parts:
                size = src.shape(k)[self.dim]
                lo, hi = max(start, offset), min(start + n, offset + size)
                if lo < hi:
                    pieces.append(src.read(k, self.dim, lo - offset, hi - lo))
                offset += size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=self.dim)


class _Merged:
    """One tensor a Hugging Face conversion builds from per-expert keys of the file: each expert's
    tensor (one key, or several joined: :class:`_Joined`) stacked over the experts (dim 0; Mixtral's
    ``experts.gate_up_proj`` = experts x ``[w1 | w3]``). Read like one key of a :class:`_Source`: a
    slice along a dim reads only that slice of each per-expert tensor."""

    def __init__(self, experts: list[_Joined]) -> None:
        self.experts = experts
        self.path = experts[0].path

    def keys(self) -> list[str]:
        return [k for e in self.experts for k in e.keys()]

    def shape(self, key: str | None = None) -> tuple[int, ...]:
        return (len(self.experts), *self.experts[0].shape())

    def dtype(self, key: str | None = None) -> torch.dtype:
        return self.experts[0].dtype()

    def read(self, key: str | None = None, dim: int | None = None, start: int = 0, n: int = 0) -> Tensor:
        """The whole tensor, or ``n`` elements from ``start`` along ``dim``."""
        if dim == 0:
            return torch.stack([e.read() for e in self.experts[start : start + n]])
        return torch.stack([e.read(None, None if dim is None else dim - 1, start, n) for e in self.experts])


class _Piece:
    """One of the tensors a Hugging Face conversion cuts from one key along ``dim`` (``Chunk``, ``Split``:
    a fused ``query_key_value`` into ``q_proj``, ``k_proj``, ``v_proj``): ``size`` elements from
    ``offset``. Read like one key of a :class:`_Source`."""

    def __init__(self, src: _Source, key: str, dim: int, offset: int, size: int) -> None:
        self.src, self.key, self.dim, self.offset, self.size, self.path = src, key, dim, offset, size, src.path

    def keys(self) -> list[str]:
        return [self.key]

    def shape(self, key: str | None = None) -> tuple[int, ...]:
        shape = list(self.src.shape(self.key))
        shape[self.dim] = self.size
        return tuple(shape)

    def dtype(self, key: str | None = None) -> torch.dtype:
        return self.src.dtype(self.key)

    def read(self, key: str | None = None, dim: int | None = None, start: int = 0, n: int = 0) -> Tensor:
        if dim == self.dim:
            return self.src.read(self.key, dim, self.offset + start, n)
        ranges = {self.dim: (self.offset, self.size)}
        if dim is not None:
            ranges[dim] = (start, n)
        return self.src.region(self.key, ranges)


class _Alias:
    """One key of a file under another name (a Hugging Face renaming): read like a key of a :class:`_Source`."""

    def __init__(self, src: _Source, key: str) -> None:
        self.src, self.key, self.path = src, key, src.path

    def keys(self) -> list[str]:
        return [self.key]

    def shape(self, key: str | None = None) -> tuple[int, ...]:
        return self.src.shape(self.key)

    def dtype(self, key: str | None = None) -> torch.dtype:
        return self.src.dtype(self.key)

    def read(self, key: str | None = None, dim: int | None = None, start: int = 0, n: int = 0) -> Tensor:
        return self.src.read(self.key, dim, start, n)


_View = _Alias | _Joined | _Merged | _Piece


def _hf_converted(model: nn.Module, where: dict[str, _Source]) -> dict[str, _View]:
    """The file's keys in the layout the model's Hugging Face modules hold, when the file is in the
    layout of the Hub (``{new key: source}``), by Hugging Face's own conversion mapping for the model:
    renamed keys (Mixtral's ``block_sparse_moe`` -> ``mlp``), per-expert tensors stacked into the
    experts' 3-D parameters (``experts.N.w1`` / ``w3`` -> ``experts.gate_up_proj``), keys concatenated
    into one (``Concatenate``) and one key cut into several (``Chunk``, ``Split``). Each is a view that
    reads only the slices a rank asks for. A conversion of another kind leaves its keys as they are
    (reported as unexpected). ``{}`` without a Hugging Face model."""
    hf = next((m for m in model.modules() if hasattr(m, "config") and hasattr(type(m), "base_model_prefix")), None)
    if hf is None:
        return {}
    try:
        return _converted(hf, where)
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - transformers without (or with another form of) conversion mappings
        return {}  # the file's own names: missing and unexpected keys are reported as they are


def _full_size(hf: nn.Module, name: str, dim: int) -> int | None:
    """The unsharded size along ``dim`` of the Hugging Face model's tensor ``name`` (the file's naming:
    with or without the base model's prefix), ``None`` if it has none."""
    tensors = hf.state_dict(keep_vars=True)
    prefix = f"{getattr(hf, 'base_model_prefix', '')}."
    for n in (name, name.removeprefix(prefix), prefix + name):
        t = tensors.get(n)
        if t is not None and t.dim() > dim:
            spec = shard_spec(t)
            return spec.full_size if spec is not None and spec.dim == dim else t.shape[dim]
    return None


def _converted(hf: nn.Module, where: dict[str, _Source]) -> dict[str, _View]:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        Chunk,
        Concatenate,
        MergeModulelist,
        Split,
        WeightConverter,
        WeightRenaming,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(hf)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    out: dict[str, _View] = {}
    experts: dict[str, dict[int, dict[int, tuple[_Source, str]]]] = {}  # target -> pattern -> expert -> key
    joined: dict[str, dict[int, tuple[_Source, str]]] = {}  # target -> pattern -> key
    dims: dict[str, int] = {}
    n_sources: dict[str, int] = {}  # target -> how many source patterns its conversion joins
    for key in sorted(where):  # transformers' group renamings expect keys in order
        src = where[key]
        new, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            if new != key:
                out[new] = _Alias(src, key)
            continue
        conv = next((c for c in converters if pattern in c.source_patterns), None)
        ops = [(type(op), getattr(op, "dim", None), op) for op in conv.operations] if conv is not None else []
        if new in where or not ops:
            continue  # the file also holds the converted tensor: the key stays as it is
        kind, dim, op = ops[0]
        index = conv.source_patterns.index(pattern)
        n_sources[new] = len(conv.source_patterns)
        if kind is MergeModulelist and dim == 0 and (len(ops) == 1 or (ops[1][0] is Concatenate and ops[1][1] >= 1)):
            e = expert_index(pattern, rename_source_key(key, renamings, [])[0])  # after the renamings only
            if e is not None:
                experts.setdefault(new, {}).setdefault(index, {})[e] = (src, key)
                dims[new] = ops[1][1] - 1 if len(ops) == 2 else 0
        elif len(ops) > 1:
            continue  # a chain of another kind
        elif kind is Concatenate and getattr(op, "num_shards_attribute", None) is None:
            joined.setdefault(new, {})[index] = (src, key)
            dims[new] = dim
        elif kind in (Chunk, Split) and getattr(op, "num_shards_attribute", None) is None:
            targets = [new.replace(conv.target_patterns[0], t) for t in conv.target_patterns]
            total = src.shape(key)[dim]
            if kind is Chunk:
                step = -(-total // len(targets))  # torch.chunk's sizes
                sizes = [max(0, min(step, total - i * step)) for i in range(len(targets))]
            else:  # Split: each target as large as the model's tensor
                sizes = [_full_size(hf, t, dim) for t in targets]
            if len(set(targets)) == len(targets) and None not in sizes and sum(sizes) == total:
                offsets = [sum(sizes[:i]) for i in range(len(sizes))]
                out.update({t: _Piece(src, key, dim, o, n) for t, o, n in zip(targets, offsets, sizes, strict=True)})
    for target, by_pattern in experts.items():
        found = [sorted(by_pattern[p]) for p in sorted(by_pattern)]
        n = len(found[0])
        if any(e != list(range(n)) for e in found) or len(by_pattern) != n_sources[target]:
            raise CheckpointError(
                f"pretrained weights: the per-expert tensors merged into {target!r} do not cover experts 0..{n - 1} "
                f"for every pattern (found {found}): the file is incomplete."
            )
        out[target] = _Merged([_Joined([by_pattern[p][e] for p in sorted(by_pattern)], dims[target]) for e in range(n)])
    for target, by_pattern in joined.items():
        if len(by_pattern) == n_sources[target]:  # else: the keys stay unexpected
            out[target] = _Joined([by_pattern[p] for p in sorted(by_pattern)], dims[target])
    return out


def expert_index(pattern: str, key: str) -> int | None:
    """The expert number in ``key`` at the ``*`` of a Hugging Face source pattern (a regular expression
    with ``*`` for the expert, ``.experts.*.w1.weight`` or ``\\.experts.*.w1.weight``); ``None`` when
    the pattern has no single ``*`` or does not match."""
    if pattern.count("*") != 1:
        return None
    try:
        found = re.search(pattern.replace("*", r"(?P<lightning_tp_expert>\d+)"), key)
    except re.error:
        return None
    return int(found.group("lightning_tp_expert")) if found else None


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        index = path / _INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map'): {exc}") from exc
            return [path / f for f in sorted(set(weight_map.values()))]
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
            if (path / name).is_file():
                return [path / name]
        raise CheckpointError(f"pretrained directory {path} holds no model.safetensors, {_INDEX} or pytorch_model.bin.")
    if not path.is_file():
        raise CheckpointError(f"pretrained weights {path} do not exist.")
    return [path]


def _tensors(model: nn.Module) -> dict[str, list[str]]:
    """``{first state-dict name: [every name of that tensor]}`` (ties under every name)."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(name)
    return {group[0]: group for group in names.values()}


def _match(model_names: set[str], file_keys: list[str], prefix: str | None) -> dict[str, str]:
    """``{file key: model name}`` under the best prefix pair (or ``prefix`` + file key)."""
    if prefix is not None:
        return {k: prefix + k for k in file_keys if prefix + k in model_names}
    candidates = {("", "")}
    for name in list(model_names)[:2000]:
        parts = name.split(".")
        candidates.update((".".join(parts[:i]) + ".", "") for i in range(1, min(4, len(parts))))
    for key in file_keys[:2000]:
        parts = key.split(".")
        candidates.update(("", ".".join(parts[:i]) + ".") for i in range(1, min(4, len(parts))))
    for name in list(model_names)[:200]:  # both sides prefixed: model.model.x <- model.x in a wrapper
        parts = name.split(".")
        for key in file_keys[:200]:
            kparts = key.split(".")
            for i in range(1, min(4, len(parts))):
                for j in range(1, min(4, len(kparts))):
                    if parts[i:] == kparts[j:]:
                        candidates.add((".".join(parts[:i]) + ".", ".".join(kparts[:j]) + "."))
    best: dict[str, str] = {}
    for add, strip in sorted(candidates):
        found = {}
        for k in file_keys:
            if k.startswith(strip) and (name := add + k[len(strip) :]) in model_names:
                found[k] = name
        if len(found) > len(best):
            best = found
    return best


def _ignored(model: nn.Module) -> list[re.Pattern]:
    """Unexpected-key patterns the model declares harmless (Hugging Face ``_keys_to_ignore_on_load_unexpected``)."""
    patterns = []
    for module in model.modules():
        for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ():
            patterns.append(re.compile(p))
    return patterns


def load_pretrained(model: nn.Module, path: str | os.PathLike, tp_rank: int, prefix: str | None = None) -> int:
    """Copy pretrained weights into the (rewritten) ``model``, reading only this rank's slices.

    Returns the number of tensors loaded.

    Raises:
        CheckpointError: unreadable files, missing or unexpected keys, shape mismatches or lossy dtype
            casts, naming the file and the key; raised before anything is copied.
    """
    sources = [_Source(f) for f in _files(Path(path))]
    where: dict[str, _Source | _Alias | _Merged] = {}
    for src in sources:
        for key in src.keys():
            where[key] = src
    tensors = _tensors(model)
    alias_of = {n: first for first, group in tensors.items() for n in group}
    live = model.state_dict(keep_vars=True)
    matched = _match(set(alias_of), list(where), prefix)
    if len(matched) < len(tensors):  # the Hub's layout of a Hugging Face model (per-expert tensors)?
        converted = _hf_converted(model, where)
        consumed = {k for src in converted.values() for k in src.keys()}
        renamed = {**{k: v for k, v in where.items() if k not in consumed}, **converted}
        again = _match(set(alias_of), list(renamed), prefix)
        if len(again) > len(matched):
            where, matched = renamed, again
    ignore = _ignored(model)
    unexpected = [k for k in where if k not in matched and not any(p.search(k) for p in ignore)]
    by_tensor: dict[str, str] = {}
    for key, name in matched.items():
        by_tensor.setdefault(alias_of[name], key)
    missing = [first for first in tensors if first not in by_tensor]
    src_name = str(path)
    if missing or unexpected:
        raise CheckpointError(
            f"pretrained weights {src_name} do not fit this model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}. Check the model configuration, or give "
            "pretrained_prefix= (prepended to every key of the file)."
        )
    transposed = set(_transposed(model))
    plan: list[tuple[Tensor, _Source | _Alias | _Merged, str, ShardSpec | None, bool]] = []
    for first, key in by_tensor.items():
        target, src = live[first], where[key]
        spec = shard_spec(target)
        flip = any(n in transposed for n in tensors[first])
        full = _full_shape(target, spec)
        file_shape = src.shape(key)
        if (tuple(reversed(file_shape)) if flip else file_shape) != full:
            raise CheckpointError(
                f"{src.path}: {key!r} has shape {list(file_shape)}, the model's {first!r} needs {list(full)}."
            )
        dtype = src.dtype(key)
        if target.is_floating_point() and dtype.is_floating_point and _lossy(dtype, target.dtype):
            raise CheckpointError(
                f"{src.path}: {key!r} is {dtype} and the model's {first!r} is {target.dtype}: loading would lose "
                "precision. Build the model in the file's dtype (or wider), or convert the file."
            )
        plan.append((target, src, key, spec, flip))
    with torch.no_grad():
        for target, src, key, spec, flip in plan:
            target.copy_(_local(src, key, spec, tp_rank, flip, target.shape))
    return len(plan)


def _full_shape(t: Tensor, spec: ShardSpec | None) -> tuple[int, ...]:
    shape = list(t.shape)
    if spec is not None:
        shape[spec.dim] = spec.full_size
    return tuple(shape)


_WIDTH = {torch.float64: (11, 52), torch.float32: (8, 23), torch.bfloat16: (8, 7), torch.float16: (5, 10)}


def _lossy(src: torch.dtype, dst: torch.dtype) -> bool:
    a, b = _WIDTH.get(src), _WIDTH.get(dst)
    return a is not None and b is not None and (b[0] < a[0] or b[1] < a[1])


def _local(src: _Source, key: str, spec: ShardSpec | None, tp_rank: int, flip: bool, shape: torch.Size) -> Tensor:
    """This rank's part of ``key``: each chunk's slice along the split dim, zero padding appended."""
    if spec is None:
        full = src.read(key)
        return full.t() if flip else full
    dim = spec.dim if not flip else 1 - spec.dim  # a Conv1D stores (in, out)
    pieces, offset = [], 0
    for chunk, size in enumerate(spec.sizes):
        start, n = spec.valid_range(tp_rank, chunk)
        local = spec.local_sizes[chunk]
        piece = src.read(key, dim, offset + start, n) if n > 0 else None
        if flip and piece is not None:
            piece = piece.t()
        if n < local:  # padding rows of a vocabulary
            pad_shape = list(shape)
            pad_shape[spec.dim] = local - n
            pad = torch.zeros(pad_shape, dtype=piece.dtype if piece is not None else torch.float32)
            piece = pad if piece is None else torch.cat([piece, pad], dim=spec.dim)
        pieces.append(piece)
        offset += size
    return torch.cat(pieces, dim=spec.dim) if len(pieces) > 1 else pieces[0]
