"""Tiny randomly initialised targets (Llama and Qwen3 architectures) with a word-level tokenizer.

Everything is built in the test process or written to a temporary directory: no downloads.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from caddtree.models.target import Target

UNUSED_ROWS = 4  # embedding rows past the tokenizer: the drafter's mask token comes from here


def tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    # The special words are no part of another word: a special token is matched inside any text,
    # so naming them w0 and w1 split w10..w19 into two tokens.
    words = {"<unk>": 0, "<eos>": 1} | {f"w{i}": i for i in range(2, vocab_size - UNUSED_ROWS)}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def tiny_model(arch: str = "llama", vocab_size: int = 32, layers: int = 4, seed: int = 0, init_std: float = 0.3):
    shape = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=init_std, eos_token_id=1,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **shape))
    return model.eval()


def tiny_target(arch: str = "llama", vocab_size: int = 32, layers: int = 4, seed: int = 0,
                init_std: float = 0.3) -> Target:
    return Target(tiny_model(arch, vocab_size, layers, seed, init_std), tiny_tokenizer(vocab_size), f"tiny-{arch}")
