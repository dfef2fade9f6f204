"""Text for causal language modeling: WikiText's raw files or any local text files, tokenised once
and cached, packed into non-overlapping windows of `block_size` tokens (the same windows for
validation and test: one perplexity protocol for training and compression).

Tokenizer: GPT-2's (`tokenizer=gpt2`: from the HF hub or its cache) when it can be loaded, otherwise
a byte-level BPE trained on the train split (`tokenizer=bpe`, or the fallback offline), cached.
Offline, set HF_HUB_OFFLINE=1 (or tokenizer=bpe): without it the hub retries its connection for
about a minute and a half before the fallback. The token cache is keyed by the requested tokenizer,
the files and the split: delete `cache_dir` to tokenise again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from structlab.data.base import SplitDataModule, missing

log = logging.getLogger(__name__)
WIKITEXT = {  # corpus → folder and its raw split files (the "raw" releases: untokenised text)
    "wikitext-103": ("wikitext-103-raw", "wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),
    "wikitext-2": ("wikitext-2-raw", "wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"),
}
HF_WIKITEXT = {"wikitext-103": "wikitext-103-raw-v1", "wikitext-2": "wikitext-2-raw-v1"}  # HF datasets' names


def download_wikitext(corpus: str, folder: Path) -> None:
    """Write WikiText's raw split files into `folder` from HF datasets (online). Its rows are the
    lines of the raw release, newlines included, so joining them gives the original files."""
    from datasets import load_dataset  # optional: only this path needs it

    data = load_dataset("Salesforce/wikitext", HF_WIKITEXT[corpus])
    folder.mkdir(parents=True, exist_ok=True)
    for split, name in zip(("train", "validation", "test"), WIKITEXT[corpus][1:], strict=True):
        tmp = folder / f".{name}.tmp"
        tmp.write_text("".join(data[split]["text"]), encoding="utf-8")
        tmp.replace(folder / name)


SPLITS = ("train", "val", "test")


def split_text(text: str, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Contiguous train / val / test parts (test at the end, val before it), cut at line breaks:
    deterministic, and no passage is shared between splits."""
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"task.data.val_fraction={val_fraction} and test_fraction={test_fraction} must be > 0 "
            "and sum to less than 1"
        )

    def cut(fraction: float) -> int:  # the first line start at or after that fraction of the text
        at = text.find("\n", int(len(text) * fraction) - 1)
        return len(text) if at < 0 else at + 1

    val_at, test_at = cut(1 - val_fraction - test_fraction), cut(1 - test_fraction)
    return {"train": text[:val_at], "val": text[val_at:test_at], "test": text[test_at:]}


class TokenWindows(Dataset):
    """Non-overlapping windows of `block_size` tokens of one token stream; the tail is dropped."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[i * self.block_size : (i + 1) * self.block_size]
        return {"input_ids": torch.from_numpy(window.astype(np.int64))}


class TextDataModule(SplitDataModule):
    """corpus: "wikitext-103", "wikitext-2" (raw files under `data_dir`) or "files" (`files`, read in
    the given order and split by `val_fraction` / `test_fraction`). Batches: {"input_ids": (B, T)}."""

    def __init__(
        self,
        data_dir: str = "data",
        corpus: str = "files",
        files: list[str] | None = None,
        tokenizer: str = "gpt2",
        vocab_size: int = 8192,
        block_size: int = 256,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        num_workers: int = 0,
        cache_dir: str | None = None,
        get_files: str | None = None,
        download: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.download = download
        if corpus not in (*WIKITEXT, "files"):
            raise ValueError(f"unknown corpus {corpus!r}; valid corpora: {', '.join([*WIKITEXT, 'files'])}")
        if corpus == "files" and not files:
            raise ValueError("corpus=files needs task.data.files=[<text file>, ...]")
        if tokenizer not in ("gpt2", "bpe"):
            raise ValueError(f"unknown tokenizer {tokenizer!r}; valid tokenizers: gpt2, bpe")
        self.data_dir, self.corpus, self.files = Path(data_dir).expanduser(), corpus, list(files or [])
        self.tokenizer_name, self.bpe_vocab_size, self.block_size = tokenizer, vocab_size, block_size
        self.fractions = (val_fraction, test_fraction)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else self.data_dir / "token_cache"
        self.get_files = get_files  # how to get missing `files`, for the error (from a task config)
        self.tokens: dict[str, np.ndarray] = {}
        self.vocab_size: int | None = None
        self.tokenizer_used: str | None = None

    # --- text ------------------------------------------------------------------------------------------
    def _sources(self) -> list[Path]:
        if self.corpus == "files":
            paths = [Path(f).expanduser() for f in self.files]
        else:
            folder, *names = WIKITEXT[self.corpus]
            paths = [self.data_dir / folder / name for name in names]
        absent = [p for p in paths if not p.is_file()]
        why = ""
        if absent and self.corpus in WIKITEXT and self.download:
            try:
                download_wikitext(self.corpus, self.data_dir / WIKITEXT[self.corpus][0])
                absent = [p for p in paths if not p.is_file()]
            except Exception as err:  # offline, or no `datasets`: reported below with what to do
                why = f" (the download from HF datasets failed: {type(err).__name__}: {str(err)[:200]})"
        if absent:
            how = (
                f"download the raw {self.corpus} release and unpack it under task.data.data_dir={self.data_dir}, "
                f"or, online, pip install datasets and keep task.data.download=true{why}"
                if self.corpus in WIKITEXT
                else self.get_files or "check task.data.files"
            )
            raise missing(f"{self.corpus} text", absent, how)
        return paths

    def texts(self) -> dict[str, str]:
        paths = self._sources()
        if self.corpus in WIKITEXT:
            return {split: p.read_text(encoding="utf-8") for split, p in zip(SPLITS, paths, strict=True)}
        joined = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)
        return split_text(joined, *self.fractions)

    # --- tokens ----------------------------------------------------------------------------------------
    def _key(self, paths: list[Path], tokenizer: str) -> str:
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        spec = json.dumps([self.corpus, files, tokenizer, self.bpe_vocab_size, self.fractions])
        return hashlib.sha1(spec.encode()).hexdigest()[:16]

    def _tokenizer(self, train_text: str, key: str):
        """(encode: str → list[int], vocabulary size, name)."""
        if self.tokenizer_name == "gpt2":
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained("gpt2")
                return (lambda s: tok(s)["input_ids"]), len(tok), "gpt2"
            except OSError as err:  # not cached and no network: the documented fallback
                log.warning("GPT-2's tokenizer is not available (%s); training a byte-level BPE instead", err)
        from tokenizers import ByteLevelBPETokenizer, Tokenizer

        path = self.cache_dir / f"bpe-{key}.json"
        if path.is_file():
            bpe = Tokenizer.from_file(str(path))
        else:
            trainer = ByteLevelBPETokenizer()
            trainer.train_from_iterator(
                train_text.splitlines(), vocab_size=self.bpe_vocab_size, special_tokens=["<|endoftext|>"]
            )
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            trainer.save(str(path))
            bpe = Tokenizer.from_file(str(path))
        return (lambda s: bpe.encode(s).ids), bpe.get_vocab_size(), f"byte-level BPE ({path.name})"

    def prepare_data(self) -> None:
        self._load()  # tokenises once (rank 0) into the cache; the other ranks read it in setup

    def _load(self) -> None:
        paths = self._sources()
        cached = self.cache_dir / f"tokens-{self._key(paths, self.tokenizer_name)}.npz"
        if cached.is_file():
            with np.load(cached) as data:
                self.tokens = {s: data[s] for s in SPLITS}
                self.vocab_size, self.tokenizer_used = int(data["vocab_size"]), str(data["tokenizer"])
            return
        texts = self.texts()
        encode, self.vocab_size, self.tokenizer_used = self._tokenizer(
            texts["train"], self._key(paths, "bpe")
        )
        self.tokens = {s: np.asarray(encode(texts[s]), dtype=np.uint32) for s in SPLITS}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **self.tokens, vocab_size=self.vocab_size, tokenizer=self.tokenizer_used)
        tmp.replace(cached)  # atomic: a crash never leaves half a cache behind

    def setup(self, stage: str | None = None) -> None:
        if not self.tokens:
            self._load()
        for split in SPLITS:
            if len(self.tokens[split]) < self.block_size:
                raise ValueError(
                    f"the {split} split has {len(self.tokens[split])} tokens, fewer than one window of "
                    f"task.data.block_size={self.block_size}: use more text or a smaller block_size"
                )
            self.splits[split] = TokenWindows(self.tokens[split], self.block_size)
