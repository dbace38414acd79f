"""``CausalLM``: a LightningModule for causal language modelling. Its model code is plain (no TP
layers); under ``megatron_tp`` it reads the strategy's public ``dp_group`` / ``tp_mesh`` (metric
reduction over data-parallel replicas, FLOPs per device) and ``sequence_parallel`` (sampling pads
the prompt to a multiple of TP); under any other strategy those default to one process."""

from __future__ import annotations

import math
import time
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_tp.engine.compiled import compile_layers
from lightning_tp.engine.loss import cross_entropy, gather_logits
from lightning_tp.engine.sharding import shard_spec
from lightning_tp.models.gpt import GPT


class CausalLM(L.LightningModule):
    """Train a decoder-only LM: AdamW with weight-decay groups, linear warmup + cosine decay,
    ``lightning_tp.cross_entropy`` (vocab-parallel when the head keeps logits sharded), validation
    loss and perplexity (torchmetrics, over data-parallel replicas), and a text sample at the end of
    each validation logged to the logger (a W&B table with ``WandbLogger``).

    Args:
        arch: ``"gpt"`` (:class:`~lightning_tp.models.GPT`) or ``"hf-llama"`` (a Hugging Face
            ``LlamaForCausalLM`` built from config; needs the ``hf`` extra).
        vocab_size: vocabulary size (at least the tokenizer's).
        block_size: maximum sequence length.
        n_layer: transformer blocks.
        n_head: attention heads.
        n_embd: model width.
        n_kv_head: key/value heads (``hf-llama`` grouped-query attention; default ``n_head``).
        dropout: dropout probability (``gpt``).
        tie_weights: tie the token embedding and the LM head.
        lr: peak learning rate.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        warmup_steps: linear warmup steps.
        weight_decay: AdamW weight decay of weight matrices and embeddings (biases and norms: none).
        betas: AdamW betas.
        sample_prompt: text that starts the validation sample.
        sample_tokens: tokens to generate for the sample (0: no sample).
        pretrained: a Hugging Face model directory: the model is built from its ``config.json`` on
            the meta device in ``configure_model`` (sizes and ties come from there, ``arch`` must be
            ``"hf-llama"``); give the strategy the same ``pretrained=`` so that each rank loads only
            its slices of the weights (fine-tuning, see ``recipes/llama-hf-finetune.yaml``).
        compile: ``torch.compile`` each transformer block when training starts
            (:func:`~lightning_tp.engine.compiled.compile_layers`: the head and the vocab-parallel
            loss stay eager).
    """

    def __init__(
        self,
        arch: Literal["gpt", "hf-llama"] = "gpt",
        vocab_size: int = 8192,
        block_size: int = 256,
        n_layer: int = 4,
        n_head: int = 8,
        n_embd: int = 512,
        n_kv_head: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = True,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 20,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        sample_prompt: str = "def ",
        sample_tokens: int = 24,
        pretrained: str | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pretrained is not None and arch != "hf-llama":
            raise ValueError(f"pretrained={pretrained!r} needs arch='hf-llama' (a Hugging Face model), got {arch!r}.")
        self.model = self._build() if pretrained is None else None  # built on meta in configure_model
        self.example_input_array = torch.zeros(2, min(16, block_size), dtype=torch.long)
        self.val_loss = MeanMetric()
        self._last_batch_end: float | None = None

    def _build(self) -> nn.Module:
        h = self.hparams
        if h.arch == "gpt":
            return GPT(h.vocab_size, h.block_size, h.n_layer, h.n_head, h.n_embd, h.dropout, tie_weights=h.tie_weights)
        if h.arch == "hf-llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(
                vocab_size=h.vocab_size, hidden_size=h.n_embd, intermediate_size=4 * h.n_embd, num_hidden_layers=h.n_layer,
                num_attention_heads=h.n_head, num_key_value_heads=h.n_kv_head or h.n_head,
                max_position_embeddings=h.block_size, tie_word_embeddings=h.tie_weights, bos_token_id=None,
                eos_token_id=None, pad_token_id=None, attn_implementation="sdpa",
            )  # fmt: skip
            return LlamaForCausalLM(config)
        raise ValueError(f"arch must be 'gpt' or 'hf-llama', got {h.arch!r}.")

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.hparams.pretrained)
        with torch.device("meta"):  # the strategy initializes nothing and loads each rank's slices
            self.model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")

    def forward(self, idx: Tensor) -> Tensor:
        out = self.model(idx) if self.hparams.arch == "gpt" else self.model(input_ids=idx, use_cache=False).logits
        return out

    def on_fit_start(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled_layers", None):
            self._compiled_layers = compile_layers(self.model)
        # metrics sum over data-parallel replicas only (TP ranks of a replica hold the same values)
        group = getattr(self.trainer.strategy, "dp_group", None)
        if group is not None:
            self.val_loss.process_group = group
        tp = getattr(getattr(self.trainer.strategy, "tp_mesh", None), "tp_size", 1)
        dm = self.trainer.datamodule
        tokens = getattr(dm, "batch_size", 1) * getattr(dm, "block_size", self.hparams.block_size)
        dense_params = sum(
            p.numel() if (spec := shard_spec(p)) is None else p.numel() // spec.local_size * spec.full_size
            for p in self.parameters()
        )
        self.flops_per_batch = 6 * dense_params * tokens // tp  # per device, for ThroughputMonitor / MFU

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        now = time.perf_counter()
        if self._last_batch_end is not None:
            dp = getattr(getattr(self.trainer.strategy, "tp_mesh", None), "dp_size", self.trainer.world_size)
            self.log("tok/s", x.numel() * dp / (now - self._last_batch_end), prog_bar=True, on_step=True)
        self._last_batch_end = now
        self.log("train_loss", loss, prog_bar=True, on_step=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        # already reduced over DP by the metric; TP ranks hold the same value, so syncing is a no-op
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_ppl", torch.exp(loss), sync_dist=True)
        self._last_batch_end = None
        self._log_sample()

    @torch.no_grad()
    def generate(self, idx: Tensor, new_tokens: int, top_k: int = 20, seed: int = 0) -> Tensor:
        """Sample ``new_tokens`` after ``idx`` (1, T); identical on every rank (shared generator)."""
        gen = torch.Generator(device=idx.device).manual_seed(seed)
        for _ in range(new_tokens):
            ctx = idx[:, -self.hparams.block_size :]  # (1, n); under sequence parallelism any n (no gradients)
            logits = gather_logits(self(ctx))[:, -1, :].float()
            top = torch.topk(logits, min(top_k, logits.size(-1)))
            probs = torch.softmax(top.values, dim=-1)
            nxt = top.indices.gather(-1, torch.multinomial(probs, 1, generator=gen))
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def _log_sample(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if not self.hparams.sample_tokens or dm is None or not hasattr(dm, "encode") or dm.tokenizer is None:
            return
        prompt = torch.tensor([dm.encode(self.hparams.sample_prompt)], device=self.device)
        text = dm.decode(self.generate(prompt, self.hparams.sample_tokens)[0].tolist())
        logger = self.logger
        if logger is not None and hasattr(logger, "log_text"):
            logger.log_text(key="samples", columns=["step", "text"], data=[[self.global_step, text]])

    def configure_optimizers(self):
        h = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=h.lr, betas=tuple(h.betas),
        )  # fmt: skip
        total = max(int(self.trainer.max_steps), 1) if self.trainer.max_steps > 0 else 10_000

        def schedule(step: int) -> float:
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
            return h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
