"""Text for language modeling: splits, the tokenizer (GPT-2's or the BPE fallback), the token cache,
packing into windows, WikiText's raw layout, and a GPT-2 trained on it."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from structlab.data import MissingDatasetError
from structlab.data.text import TextDataModule, split_text
from structlab.tasks import LanguageModelingModule

LINES = [
    f"Verse {i}: and the {w} said unto the {v}, behold the {w} of {v}."
    for i, (w, v) in enumerate(
        [("king", "people"), ("prophet", "city"), ("shepherd", "flock"), ("queen", "court")] * 150
    )
]


@pytest.fixture
def corpus(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(LINES[:300]) + "\n")
    b.write_text("\n".join(LINES[300:]) + "\n")
    return [str(a), str(b)]


def files_module(corpus: list[str], tmp_path, tokenizer: str = "bpe", **kw) -> TextDataModule:
    """The corpus fixture as `corpus=files`, a 300-token BPE, 16-token windows, cached under tmp_path."""
    return TextDataModule(
        corpus="files", files=corpus, tokenizer=tokenizer, vocab_size=300, block_size=16,
        cache_dir=str(tmp_path / "cache"), **kw,
    )  # fmt: skip


def test_split_is_contiguous_at_line_breaks_and_checked():
    text = "".join(f"line {i:02d}\n" for i in range(100))  # 8 characters a line
    parts = split_text(text, 0.1, 0.2)
    assert "".join(parts[s] for s in ("train", "val", "test")) == text
    assert all(p.endswith("\n") for p in parts.values())
    assert parts["test"].startswith("line 80\n") and parts["val"].startswith("line 70\n")
    assert split_text(text[:-3], 0.1, 0.2)["test"].startswith("line 80\n")  # mid-line: the next line
    with pytest.raises(ValueError, match="val_fraction=0.5 and test_fraction=0.5"):
        split_text(text, 0.5, 0.5)


def test_bpe_tokens_are_cached_and_packed_into_windows(corpus, tmp_path):
    dm = files_module(corpus, tmp_path, batch_size=4)
    dm.prepare_data()
    dm.setup()
    assert dm.tokenizer_used.startswith("byte-level BPE") and dm.vocab_size == 300
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(next((tmp_path / "cache").glob("bpe-*.json"))))
    text = "\n".join(LINES) + "\n"
    assert bpe.decode(bpe.encode(text).ids) == text  # byte-level: the round trip is exact
    total = sum(len(dm.tokens[s]) for s in ("train", "val", "test"))
    assert 0.04 < len(dm.tokens["test"]) / total < 0.06  # test_fraction 0.05
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].dtype == torch.int64
    windows = list(dm.test_dataloader())  # non-overlapping windows over the test stream, in order
    joined = torch.cat([w["input_ids"].flatten() for w in windows]).numpy()
    assert np.array_equal(joined, dm.tokens["test"][: len(joined)].astype(np.int64))
    assert len(dm.tokens["test"]) - len(joined) < 16
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = files_module(corpus, tmp_path)
    again.setup()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache  # read back, not retrained
    assert all(np.array_equal(again.tokens[s], dm.tokens[s]) for s in ("train", "val", "test"))


@pytest.fixture
def no_gpt2_tokenizer(monkeypatch) -> None:
    """The hub offline, and GPT-2's tokenizer not cached (else skip: there is no fallback to test)."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by the hub at import; the constant for this process
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        AutoTokenizer.from_pretrained("gpt2")
        pytest.skip("GPT-2's tokenizer is cached here: no fallback to test")
    except OSError:
        pass


def test_gpt2_tokenizer_falls_back_to_bpe_offline(corpus, tmp_path, no_gpt2_tokenizer, caplog):
    dm = files_module(corpus, tmp_path, tokenizer="gpt2")
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.tokenizer_used.startswith("byte-level BPE") and "training a byte-level BPE" in caplog.text


def test_wikitext_raw_layout_and_a_clear_error_when_absent(tmp_path, monkeypatch):
    with pytest.raises(MissingDatasetError, match="wiki.train.raw"):
        TextDataModule(data_dir=str(tmp_path), corpus="wikitext-2", tokenizer="bpe", download=False).setup()

    def offline(corpus, folder):
        raise ConnectionError("no network")

    monkeypatch.setattr("structlab.data.text.download_wikitext", offline)
    with pytest.raises(MissingDatasetError, match="download from HF datasets failed: ConnectionError"):
        TextDataModule(data_dir=str(tmp_path), corpus="wikitext-2", tokenizer="bpe").setup()
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    for split, lines in (("train", LINES[:400]), ("valid", LINES[400:500]), ("test", LINES[500:])):
        (folder / f"wiki.{split}.raw").write_text("\n".join(lines) + "\n")
    dm = TextDataModule(
        data_dir=str(tmp_path), corpus="wikitext-2", tokenizer="bpe", vocab_size=300, block_size=16
    )
    assert dm.texts()["val"].startswith(LINES[400])
    dm.setup()
    assert len(dm.tokens["train"]) > 3 * len(dm.tokens["test"]) > 0  # 400 lines against 100


def test_a_tokenizer_larger_than_the_model_vocabulary_is_an_error(corpus, tmp_path):
    dm = files_module(corpus, tmp_path, batch_size=4)
    small = LanguageModelingModule(model={"name": "gpt2_tiny", "vocab_size": 256})
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="300 tokens.*256.*model.vocab_size=300"):
        trainer.fit(small, datamodule=dm)
    module = LanguageModelingModule(model={"name": "gpt2_tiny", "vocab_size": 300, "n_positions": 16})
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_task_text_runs_through_run_py(corpus, tmp_path):
    from support import compose_train

    from structlab.train import run

    cfg = compose_train(
        "task=text",
        "model=gpt2_tiny",
        "model.vocab_size=300",
        "model.n_positions=16",
        f"task.data.files=[{corpus[0]},{corpus[1]}]",
        "task.data.tokenizer=bpe",
        "task.data.vocab_size=300",
        "task.data.block_size=16",
        f"task.data.cache_dir={tmp_path / 'cache'}",
        "debug=limit",
        "print_config=false",
        "trainer.enable_progress_bar=false",
        "compress.after_training=false",  # the default experiment's (Fashion-MNIST) compression step
        output_dir=tmp_path / "run",
    )
    summary = run(cfg)
    assert set(summary["test"]) == {"test/loss", "test/ppl"} and summary["run"][
        "tested checkpoint"
    ].startswith("best val/ppl")
    assert summary["speed"]["train tokens/s"] == pytest.approx(
        16 * summary["speed"]["train samples/s"], rel=1e-3
    )


def test_pretrained_weights_refuse_the_bpe_fallback(corpus, tmp_path, no_gpt2_tokenizer):
    """GPT-2's weights read GPT-2's token ids: text tokenised by the fallback BPE would be garbage to them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=512, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(tmp_path / "weights")
    model = {"name": "gpt2_tiny", "pretrained": str(tmp_path / "weights"), "vocab_size": 512, "n_positions": 16,
             "n_embd": 16, "n_layer": 1, "n_head": 2}  # fmt: skip
    module = LanguageModelingModule(model=model)
    trainer = L.Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="expects GPT-2's token ids"):
        trainer.fit(module, datamodule=files_module(corpus, tmp_path, tokenizer="gpt2", batch_size=4))
