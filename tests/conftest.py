"""Shared fixtures: tiny random models built from a config, with the shipped MiniLM tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several test processes share the cores (make test): torch on more threads than its share of them
    # only spins, and the runs a test starts (declora, torchrun) inherit the setting.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny matmuls: more threads only spin on busy cores), then back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def restore_threads():
    """For modules whose runs set torch's threads (config ``threads=1``): later tests get them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def minilm_folder() -> Path:
    """The shipped MiniLM's folder; on a GPU machine without its package, the bf16 copy in shared/ that
    benchmarks/gpu_prepare.sh makes, which has the same tokenizer."""
    from declora.assets import AssetNotFoundError, model_path

    try:
        return model_path("minilm")
    except AssetNotFoundError:
        carried = Path(__file__).resolve().parents[1] / "shared" / "minilm-bf16"
        if (carried / "tokenizer.json").is_file():
            return carried
        raise


def _tiny_encoder(folder: Path, config_cls: type, model_cls: type, **shape: int) -> Path:
    """A classifier with random weights (hidden 32, 2 heads) and MiniLM's tokenizer, saved in ``folder``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    config = config_cls(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **shape,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with random weights (hidden 32) saved as a local model folder."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
    return _tiny_encoder(folder, BertConfig, BertForSequenceClassification, num_hidden_layers=2)


@pytest.fixture(scope="session")
def tiny_albert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer ALBERT: one layer shared across its depth, so every adapted module runs three times in a
    forward."""
    from transformers import AlbertConfig, AlbertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-albert")
    return _tiny_encoder(
        folder, AlbertConfig, AlbertForSequenceClassification, num_hidden_layers=3, embedding_size=16
    )


# Short texts for the tiny LLaMA's tokenizer: the review prompt, the label words and a few sentences.
LLAMA_CORPUS = [
    "Review: a fine and moving film\nSentiment: positive",
    "Review: a dull, awful mess\nSentiment: negative",
    "Review: great fun from start to end\nSentiment: positive",
    "Review: poor acting and a sad plot\nSentiment: negative",
    "The cat sat on the mat. The dog ran in the park.",
    "A good story is told well; a bad one is told twice.",
]


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    """A byte-level BPE tokenizer of a few hundred tokens (as SmolLM2's) trained here on LLAMA_CORPUS,
    with </s> as its pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(LLAMA_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, byte_level_tokenizer) -> Path:
    """A 2-layer LlamaForCausalLM with random weights (hidden 32) and the byte-level tokenizer, saved
    together as a local model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_level_tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
