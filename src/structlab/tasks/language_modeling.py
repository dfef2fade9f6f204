"""Causal language modeling on the structured core: next-token cross-entropy and perplexity."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.text import Perplexity

from structlab.tasks.structured import StructuredModule


class LanguageModelingModule(StructuredModule):
    """Batches are {"input_ids": (batch, seq)} (plus optional "attention_mask"); the model is a causal
    LM returning `.logits` (HF transformers). The loss predicts token t+1 from tokens ≤ t."""

    def __init__(
        self,
        model: dict[str, Any],
        layer: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__(model, layer, optimizer, scheduler, compile, init_from)
        self.save_hyperparameters()
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()

    def setup(self, stage: str) -> None:
        asked = getattr(self.trainer.datamodule, "tokenizer_name", None)
        used = getattr(self.trainer.datamodule, "tokenizer_used", None)
        pretrained = self.model_cfg.get("pretrained")
        # GPT-2's tokenizer asked for but the BPE fallback used: ids the pretrained weights never saw
        if pretrained and asked == "gpt2" and used is not None and used != "gpt2":
            raise ValueError(
                f"model.pretrained={pretrained} expects GPT-2's token ids, but the text was tokenised with a "
                f"{used} (GPT-2's tokenizer could not be loaded: offline?). Put GPT-2's tokenizer in the HF "
                "cache (or go online), or train from scratch with model.pretrained=null"
            )
        tokens = getattr(self.trainer.datamodule, "vocab_size", None)
        model = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if tokens is not None and model is not None and tokens > model:
            raise ValueError(
                f"the tokenizer has {tokens} tokens but the model's vocabulary {model}: "
                f"set model.vocab_size={tokens} (or a tokenizer with fewer tokens)"
            )

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()

    def _logits_and_targets(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(**self.model_inputs(batch)).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        mask = batch.get("attention_mask")
        if mask is not None:  # padding is not predicted
            targets = targets.masked_fill(mask[:, 1:] == 0, -100)
        return logits, targets

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, targets = self._logits_and_targets(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        bar = self.trainer.progress_bar_callback is not None  # a bar value syncs the GPU every step
        self.log("train/loss", loss, prog_bar=bar, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], index: int, ppl: Perplexity, stage: str) -> None:
        logits, targets = self._logits_and_targets(batch)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        if not torch.isfinite(loss):  # dropping the batch would report a perplexity of the rest
            raise FloatingPointError(f"{stage} batch {index} gave a non-finite loss ({float(loss)})")
        self.log(f"{stage}/loss", loss, sync_dist=True)
        ppl.update(logits, targets)
        self.log(f"{stage}/ppl", ppl, prog_bar=stage == "val")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.val_ppl, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, self.test_ppl, "test")
