"""A user's LightningModule (plain GPT, no TP code) and helpers to run Trainers inside test worlds."""

from __future__ import annotations

import os
from contextlib import contextmanager

import lightning as L
import models
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_tp import cross_entropy

VOCAB, SEQ = 30, 12


class TokenData(Dataset):
    """Deterministic random token sequences (input, target shifted by one)."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


class LitGPT(L.LightningModule):
    def __init__(self, batch_size=8, lr=3e-3, dropout=0.0, tied=True, n_train=64, model="plain", ref_sampler=False):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(1234)
        if model in ("plain", "plain_gqa", "plain_mqa"):  # grouped-query: 2 k/v heads; multi-query: 1
            kv = {"plain": None, "plain_gqa": 2, "plain_mqa": 1}[model]
            self.model = models.PlainGPT(vocab=VOCAB, d=32, n_layers=2, n_heads=4, n_kv_heads=kv, tied=tied, ctx=SEQ)
        elif model in ("litgpt", "litgpt_moe"):  # Lightning's LLM library (extra 'litgpt'): Llama-style, GQA
            from litgpt.config import Config
            from litgpt.model import GPT

            mlp = {"mlp_class_name": "LLaMAMLP"}
            if model == "litgpt_moe":
                mlp = {
                    "mlp_class_name": "LLaMAMoE",
                    "n_expert": 4,
                    "n_expert_per_token": 2,
                    "moe_intermediate_size": 16,
                }
            self.model = GPT(Config(name="lit", block_size=SEQ, n_layer=2, n_embd=32, n_head=4, n_query_groups=2,
                                    vocab_size=VOCAB, padded_vocab_size=VOCAB, norm_class_name="RMSNorm",
                                    intermediate_size=48, bias=False, **mlp))  # fmt: skip
        elif model in ("hf_gpt_oss", "hf_gpt_oss_cache"):  # Hugging Face GPT-OSS (extra 'hf'): experts with biases,
            import hf_zoo  # attention sinks; "_cache": its key/value cache on in training (use_cache=True)

            self.model = hf_zoo.gpt_oss(vocab_size=VOCAB, num_hidden_layers=2, num_experts_per_tok=2, sliding_window=4,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                        tie_word_embeddings=tied, use_cache=model.endswith("_cache"))  # fmt: skip
        elif model == "hf_gpt2":  # Hugging Face GPT-2 (extra 'hf'), tied head; its own dropouts (no extra one)
            self.model = models.hf_gpt2(vocab=VOCAB, dropout=dropout)
        elif model == "torch_encoder":  # torch's nn.TransformerEncoder; its own dropouts (no extra one)
            self.model = models.TorchEncoderLM(vocab=VOCAB, dropout=dropout)
        else:
            self.model = models.NanoGPT(vocab=VOCAB, n_embd=32, n_layer=2, n_head=4, block_size=SEQ)
        self.drop = torch.nn.Dropout(0.0 if model in ("hf_gpt2", "torch_encoder") else dropout)
        self.example_input_array = torch.zeros(2, SEQ, dtype=torch.long)
        self.losses: list[float] = []

    def forward(self, idx):
        out = self.model(idx)
        return getattr(out, "logits", out)  # a Hugging Face model's output

    def training_step(self, batch, _):
        x, y = batch
        logits = self.drop(self(x)) if self.drop.p else self(x)
        loss = cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        loss = F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1))
        self.log("val_loss", loss, sync_dist=True)

    def test_step(self, batch, _):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x).reshape(-1, VOCAB), y.reshape(-1)), sync_dist=True)

    def predict_step(self, batch, _):
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)

    def train_dataloader(self):
        data = TokenData(self.hparams.n_train)
        if self.hparams.ref_sampler:
            # What Lightning injects for distributed training (shuffled by seed + epoch), for one process:
            # the reference run sees the union of the DP replicas' batches at every step.
            sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
            return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(TokenData(16, seed=1), batch_size=self.hparams.batch_size)

    test_dataloader = val_dataloader

    def predict_dataloader(self):
        return DataLoader(TokenData(8, seed=2), batch_size=4)


@contextmanager
def external_launch(world_size: int):
    """Make Lightning treat this already-initialized worker as one externally launched process
    (like torchrun): it reuses the existing process group and starts no launcher."""
    import torch.distributed as dist

    rank = dist.get_rank()
    env = {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def trainer_kwargs(**overrides):
    base = dict(
        accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, deterministic=False,
    )  # fmt: skip
    base.update(overrides)
    return base
