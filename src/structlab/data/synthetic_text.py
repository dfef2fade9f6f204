"""Random token sequences with a learnable rule, as dict batches: tests and benchmarks of the
language-model path without a corpus."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from structlab.data.base import SplitDataModule


class TokenSequences(Dataset):
    """`count` sequences of `seq_len` tokens: token t+1 = (a·token t + b) mod vocab, where (a, b) is one
    of a few rules picked per sequence, so a language model can learn it from the context."""

    def __init__(self, count: int, seq_len: int, vocab_size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        rules = torch.tensor([[1, 1], [3, 7], [5, 2], [7, 11]])
        rule = rules[torch.randint(0, len(rules), (count,), generator=g)]
        tokens = torch.empty(count, seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_size, (count,), generator=g)
        for t in range(1, seq_len):
            tokens[:, t] = (rule[:, 0] * tokens[:, t - 1] + rule[:, 1]) % vocab_size
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i]}


class SyntheticTextDataModule(SplitDataModule):
    """Train / validation / test splits of `TokenSequences` with disjoint seeds; batches are
    {"input_ids": (batch, seq_len)}. `batch_size` is per device."""

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 32,
        train_size: int = 256,
        val_size: int = 64,
        test_size: int = 64,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.sizes, self.seed = {"train": train_size, "val": val_size, "test": test_size}, seed

    def setup(self, stage: str | None = None) -> None:
        for i, (name, count) in enumerate(self.sizes.items()):
            self.splits.setdefault(name, TokenSequences(count, self.seq_len, self.vocab_size, self.seed + i))
