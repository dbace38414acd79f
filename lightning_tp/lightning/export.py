"""Exporting a sharded checkpoint: one dense ``.pt`` state dict, or a Hugging Face directory.

``format="hf"`` writes what ``from_pretrained`` loads: ``config.json`` (recorded in the checkpoint
when it was saved from a module holding a Hugging Face model) and safetensors files, sharded above
``max_shard_bytes`` with ``model.safetensors.index.json``. Tensors are read from the checkpoint one
at a time and written one file at a time, so the exporting process holds at most one output file's
tensors, never the whole model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from lightning_tp.lightning.checkpoint import (
    _CHUNK,
    CheckpointError,
    _raise_if_bad,
    _storage,
    consolidate,
    local_path,
    read_meta,
    read_offline,
)


def export(
    path: str | os.PathLike,
    out: str | os.PathLike,
    format: Literal["pt", "hf"] = "pt",
    max_shard_bytes: int = 2 * 2**30,
    weights_only: bool = True,
) -> Path:
    """Write checkpoint ``path`` unsharded to ``out``.

    Args:
        path: a lightning_tp checkpoint directory.
        out: ``"pt"``: a file, the :func:`~lightning_tp.consolidate` state dict (``torch.save``); your
            unmodified LightningModule loads it with ``load_state_dict(strict=True)``. ``"hf"``: a
            directory that the Hugging Face model's class loads with ``from_pretrained``.
        format: ``"pt"`` or ``"hf"``.
        max_shard_bytes: ``"hf"``: the largest safetensors file (more files and an index above it).
        weights_only: ``False`` unpickles the objects the checkpoint's trainer state holds (a
            LightningModule's own hyperparameters): only for files you trust.

    Raises:
        CheckpointError: an unreadable checkpoint, or ``"hf"`` for one that holds no Hugging Face model.
    """
    out = Path(out)
    if format == "pt":
        state = consolidate(path, weights_only)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        return out
    if format != "hf":
        raise ValueError(f"format must be 'pt' or 'hf', got {format!r}.")
    return _export_hf(local_path(path), out, max_shard_bytes, weights_only)


def _dense(path: Path, info: dict, name: str, stored: dict) -> Tensor:
    """One tensor of the checkpoint, unsharded (its chunks joined, Conv1D layout restored)."""
    layout, key = info["layout"][name], f"model.{name}"
    keys = (
        [key]
        if layout is None or len(layout["sizes"]) == 1
        else [f"{key}{_CHUNK}{c}" for c in range(len(layout["sizes"]))]
    )
    bufs = read_offline(path, {k: stored[k] for k in keys})
    full = bufs[keys[0]] if len(keys) == 1 else torch.cat([bufs[k] for k in keys], dim=layout["dim"])
    return full.t().contiguous() if name in info["transpose"] else full


def _export_hf(path: Path, out: Path, max_shard_bytes: int, weights_only: bool = True) -> Path:
    from safetensors.torch import save_file

    info = read_meta(path, weights_only)["lightning_tp"]
    _raise_if_bad(path, info, distributed=False)
    hf = info.get("hf")
    if not hf:
        raise CheckpointError(
            f"{path} holds no Hugging Face model (none was inside the module when it was saved), so there is no "
            "config for from_pretrained. Export it as a state dict: format='pt'."
        )
    stored, prefix = _storage(path), hf["prefix"]
    names = [n for n in info["layout"] if n.startswith(prefix)]
    aliases = {a: n for a, n in info.get("aliases", {}).items() if a.startswith(prefix) and n.startswith(prefix)}
    sizes = {n: _nbytes(stored, n) for n in names}
    files: list[list[str]] = [[]]
    total = 0
    for n in names:  # plan the files first: their names carry the count
        if files[-1] and total + sizes[n] > max_shard_bytes:
            files.append([])
            total = 0
        files[-1].append(n)
        total += sizes[n]
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(hf["config"])
    config.setdefault("architectures", [hf["class"]])
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    weight_map: dict[str, str] = {}
    for i, group in enumerate(files):
        fname = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = {n[len(prefix) :]: _dense(path, info, n, stored) for n in group}  # this file only
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    for alias, name in aliases.items():  # a tie: from_pretrained re-ties it; the index names both
        weight_map.setdefault(alias[len(prefix) :], weight_map[name[len(prefix) :]])
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def _nbytes(stored: dict, name: str) -> int:
    keys = [k for k in stored if k == f"model.{name}" or k.startswith(f"model.{name}{_CHUNK}")]
    return sum(stored[k].size.numel() * torch.empty((), dtype=stored[k].properties.dtype).element_size() for k in keys)
