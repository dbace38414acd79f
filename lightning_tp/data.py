"""Text data for causal-LM training: an embedded default corpus, a real tokenizer, cached tokens.

The default corpus is one every machine with Python has without a download: the Python standard
library's own source files (``*.py`` under ``sysconfig``'s ``stdlib``, tests excluded), read in a
fixed order up to ``max_chars``. Any local text files or folders can be given instead. A byte-level
BPE tokenizer is trained on the corpus with Hugging Face ``tokenizers`` and cached together with the
token ids; ``tokenizer="byte"`` uses plain UTF-8 bytes (256 ids) instead. The split is deterministic: the last
``val_fraction`` of the token stream is validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

_TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".yaml", ".yml", ".html", ".tex", ".c", ".h"}


def default_corpus_files() -> list[Path]:
    """The Python standard library's source files (tests and site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _expand(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _TEXT_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"data path {str(raw)!r} does not exist (give text files or folders).")
    if not files:
        raise FileNotFoundError(f"no text files found under {[str(p) for p in paths]}.")
    return files


def read_corpus(files: list[Path], max_chars: int | None) -> list[str]:
    texts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        texts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return texts


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256): the ``tokenizer="byte"`` choice (no training, no cache of a tokenizer)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _BPE:
    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


class BlockDataset(Dataset):
    """Consecutive, non-overlapping blocks: item ``i`` is ``(x, y)`` with ``y`` = ``x`` shifted by one."""

    def __init__(self, tokens: Tensor, block_size: int) -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} tokens are too few for block_size={block_size}; add text or lower it.")
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.tokens[i * self.block_size : (i + 1) * self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class ResumableSampler(DistributedSampler):
    """A :class:`~torch.utils.data.DistributedSampler` that can start one epoch part-way through.

    ``resume(epoch, samples)`` makes the iteration of epoch ``epoch`` leave out its first ``samples``
    indices (of this replica), so that a run resumed from a checkpoint written mid-epoch sees exactly
    the batches an uninterrupted run would have seen next; other epochs are unchanged. Lightning keeps
    a :class:`~torch.utils.data.DistributedSampler` the loader already has (it injects one only
    when there is none), so give this one the strategy's ``num_replicas``/``rank``
    (``trainer.distributed_sampler_kwargs``): with tensor parallelism every TP rank of a replica
    must see the same batches. :class:`TextDataModule` shows the use: its ``state_dict`` records the
    epoch and the batches done (from the trainer's progress, which counts what was trained, not
    what the loader prefetched) and ``load_state_dict`` calls ``resume``.
    """

    def __init__(self, dataset: Dataset, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self._resume: tuple[int, int] | None = None

    def resume(self, epoch: int, samples: int) -> None:
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}.")
        self._resume = (int(epoch), int(samples))

    def __iter__(self):
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] :]
        return iter(indices)


class TextDataModule(L.LightningDataModule):
    """Tokenized text in fixed-length blocks for causal language modelling.

    Args:
        paths: text files or folders; default: the Python standard library's sources (no download).
        vocab_size: BPE vocabulary size (the model's ``vocab_size`` must be at least this).
        block_size: tokens per training sequence.
        batch_size: sequences per batch per data-parallel replica.
        max_chars: characters of the corpus to use (``None``: all).
        val_fraction: the last part of the token stream kept for validation.
        tokenizer: ``"bpe"`` (trained on the corpus, cached) or ``"byte"``.
        cache_dir: where tokenizer and tokens are cached (default ``~/.cache/lightning_tp``).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        paths: list[str] | None = None,
        vocab_size: int = 8192,
        block_size: int = 256,
        batch_size: int = 8,
        max_chars: int | None = 3_000_000,
        val_fraction: float = 0.05,
        tokenizer: Literal["bpe", "byte"] = "bpe",
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        self.paths, self.vocab_size, self.block_size = paths, vocab_size, block_size
        self.batch_size, self.max_chars, self.val_fraction = batch_size, max_chars, val_fraction
        self.tokenizer_kind, self.num_workers = tokenizer, num_workers
        self.cache_root = Path(cache_dir or Path.home() / ".cache" / "lightning_tp").expanduser()
        self.tokenizer = None
        self.train_tokens: Tensor | None = None
        self.val_tokens: Tensor | None = None
        self._resume: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    def _files(self) -> list[Path]:
        return _expand(self.paths) if self.paths else default_corpus_files()

    def _cache_dir(self, files: list[Path]) -> Path:
        h = hashlib.sha1()
        for f in files:
            h.update(f"{f}:{f.stat().st_size}:{int(f.stat().st_mtime)}\n".encode())
        h.update(json.dumps([self.max_chars, self.vocab_size, self.tokenizer_kind, 1]).encode())
        return self.cache_root / h.hexdigest()[:16]

    def prepare_data(self) -> None:
        """Train the tokenizer and tokenize the corpus once (cached; safe to race)."""
        files = self._files()
        cache = self._cache_dir(files)
        if (cache / "tokens.pt").is_file():
            return
        cache.mkdir(parents=True, exist_ok=True)
        texts = read_corpus(files, self.max_chars)
        if self.tokenizer_kind == "bpe":
            tok = _train_bpe(texts, self.vocab_size)
            tmp = cache / f"tokenizer.json.{os.getpid()}"
            tok.save(str(tmp))
            os.replace(tmp, cache / "tokenizer.json")
            ids = [e.ids for e in tok.encode_batch(texts)]
        else:
            ids = [ByteTokenizer().encode(t) for t in texts]
        tokens = torch.tensor([i for doc in ids for i in doc], dtype=torch.int32)
        tmp = cache / f"tokens.pt.{os.getpid()}"
        torch.save(tokens, tmp)
        os.replace(tmp, cache / "tokens.pt")

    def setup(self, stage: str | None = None) -> None:
        if self.train_tokens is not None:
            return
        files = self._files()
        cache = self._cache_dir(files)
        if not (cache / "tokens.pt").is_file():
            self.prepare_data()
        if self.tokenizer_kind == "bpe":
            from tokenizers import Tokenizer

            self.tokenizer = _BPE(Tokenizer.from_file(str(cache / "tokenizer.json")))
        else:
            self.tokenizer = ByteTokenizer()
        if self.tokenizer.vocab_size > self.vocab_size:
            raise ValueError(
                f"tokenizer has {self.tokenizer.vocab_size} tokens, more than vocab_size={self.vocab_size}."
            )
        tokens = torch.load(cache / "tokens.pt", weights_only=True)
        split = int(len(tokens) * (1 - self.val_fraction))
        self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]

    def train_dataloader(self) -> DataLoader:
        """Shuffled by seed and epoch, split over data-parallel replicas (``ResumableSampler``): a run
        resumed from a mid-epoch checkpoint continues with the next batch of that epoch."""
        ds = BlockDataset(self.train_tokens, self.block_size)
        trainer = self.trainer
        split = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {"num_replicas": 1, "rank": 0}
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # what Lightning's injected sampler would use
        sampler = ResumableSampler(ds, shuffle=True, seed=seed, drop_last=True, **split)
        if self._resume is not None:
            sampler.resume(self._resume[0], self._resume[1] * self.batch_size)
            # Lightning creates the iterator before it sets the epoch; with workers the indices are drawn then
            sampler.set_epoch(self._resume[0])
        # its own generator: creating the epoch's iterator draws no number from torch's global generator, which a
        # resumed run restores before it re-creates the iterator (dropout would then differ from an uninterrupted run)
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers,
                          generator=generator)  # fmt: skip

    def state_dict(self) -> dict:
        """The epoch and the training batches done in it, saved in every checkpoint."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": done}

    def load_state_dict(self, state_dict: dict) -> None:
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self._resume = None  # a later fit without a checkpoint starts from the first batch

    def val_dataloader(self) -> DataLoader:
        ds = BlockDataset(self.val_tokens, self.block_size)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False, drop_last=True, num_workers=self.num_workers)

    test_dataloader = val_dataloader

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(ids)
