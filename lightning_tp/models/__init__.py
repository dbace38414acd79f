"""Reference models (plain torch; no tensor-parallel code inside) and the causal-LM LightningModule."""

from lightning_tp.models.gpt import GPT
from lightning_tp.models.lm import CausalLM

__all__ = ["GPT", "CausalLM"]
