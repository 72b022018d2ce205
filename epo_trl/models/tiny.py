"""Offline tiny models and tokenizers for tests, the demo and benchmarks.

Nothing here touches a model hub: a word-level tokenizer is built from a vocabulary, wrapped in
`PreTrainedTokenizerFast` with a ChatML-style chat template, and paired with a randomly initialised
`Qwen2ForCausalLM`. Both are saved to a folder whose path TRL trainers accept like a hub id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..envs.protocol import words_of  # noqa: F401  (re-exported: the tokenizers here cover these words)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Tags of Qwen2.5's tool-calling format (TRL's `qwen2_5.jinja`); `tool_calling=True` tokenizers hold each whole.
TOOL_WORDS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>", "name",
              "arguments", "{", "}"]  # fmt: skip


def tool_calling_template() -> str:
    """TRL's own Qwen2.5 chat template: renders tool schemas, tool calls and tool results, and TRL knows how to
    parse its tool calls (`add_response_schema`). TRL refuses `tools` / `environment_factory` without one."""
    from importlib.resources import files

    return (files("trl") / "chat_templates" / "qwen2_5.jinja").read_text()


# Words every tiny tokenizer knows: chat roles, the action-format tags and common env words.
BASE_WORDS = (
    "system user assistant <think> </think> <action> </action> . , : ; ? ! ' \" ( ) [ ] - _ / = + * "
    "0 1 2 3 4 5 6 7 8 9 10 a an the you your is are am at to in on of and or not no yes go look open "
    "take put use move north south east west up down left right room door key code lock box goal "
    "task step turn observation action actions admissible valid invalid nothing happens won lost "
    "try enter press button reach find"
).split(" ")


def build_tokenizer(extra_words: Iterable[str] = (), tool_calling: bool = False):
    """A small byte-level BPE tokenizer in Qwen2's format, whose vocabulary holds every given word whole.

    It is a real `Qwen2Tokenizer` (same pre-tokenizer and byte-level decoder as Qwen2.5), so it loads
    back through `AutoTokenizer` with a Qwen2 model config, and any text still tokenizes (byte fallback
    through the 256 byte symbols). pad = `<|endoftext|>`, eos = `<|im_end|>`, ChatML chat template;
    `tool_calling=True`: Qwen2.5's tool-calling template instead (for TRL's `tools` / `environment_factory`).
    """
    if tool_calling:
        extra_words = [*TOOL_WORDS, *extra_words]
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    words = list(dict.fromkeys(w for w in [*BASE_WORDS, *extra_words] if w.strip()))
    proto = Qwen2Tokenizer()  # borrow Qwen2's normalizer / pre-tokenizer so training splits text the same way
    tok = Tokenizer(models.BPE())
    tok.normalizer = proto.backend_tokenizer.normalizer
    tok.pre_tokenizer = proto.backend_tokenizer.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Every word, alone and after a space / newline, must become a single token: ask for enough merges.
    corpus = [f"{w}" for w in words] + [f" {w}" for w in words] + ["\n", " \n"]
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + 8 * len(words) + 64,
        min_frequency=1,
        initial_alphabet=alphabet,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 2, trainer=trainer)
    data = __import__("json").loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    fast = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = tool_calling_template() if tool_calling else CHATML_TEMPLATE
    return fast


def env_words(factory) -> list[str]:
    """Every word of an env (`vocabulary()`, when it has one) and of the turn prompts around it: a tiny tokenizer
    built from them holds each whole (one token per word)."""
    from ..rollout import PromptBuilder

    words = list(factory.vocabulary()) if hasattr(factory, "vocabulary") else []
    return [*words, *words_of(PromptBuilder(build_tokenizer(), factory.prompt_header).vocabulary_texts())]


def build_tiny_model(
    output_dir: str,
    extra_words: Iterable[str] = (),
    hidden_size: int = 16,
    num_layers: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    head_dim: int = 8,
    tie_word_embeddings: bool = True,
    tool_calling: bool = False,
) -> str:
    """Save a tiny random Qwen2 model and its tokenizer to `output_dir`; return the path.

    `vocab_size` larger than the tokenizer's vocabulary pads the embedding (used by benchmarks to get a
    realistic 32k+ vocabulary for the entropy computation). vLLM's CPU attention needs `head_dim` >= 32 (it
    rejects 8, the default here); `tie_word_embeddings=False` gives an untied LM head; `tool_calling` as in
    `build_tokenizer`.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(extra_words, tool_calling=tool_calling)
    vocab = max(len(tokenizer), vocab_size or 0)
    heads = max(1, hidden_size // head_dim)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden_size // heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
