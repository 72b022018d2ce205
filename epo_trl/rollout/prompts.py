"""Rendering the per-turn prompt (paper layout) and tokenising it through the chat template.

Most of a step-mode prompt repeats: the chat template around the message, the env's header, the goal line and the
format instruction every turn; the history lines, actions and admissible lists over and over. `encode_prompt`
tokenises each of those pieces once and splices the cached ids:

    ids = ids(template prefix + header + goal line) + ids(line 1) + ... + ids(line n) + ids(instruction + suffix)

Every cut sits right after a newline that follows a non-space and right before an ASCII letter, where byte-level
BPE tokenizers with a split regex (GPT-2, Qwen2, Llama 3, cl100k-style) always start a new pre-token, so the ids
equal the full encoding's. This is checked, not assumed: the first prompt of every new goal is also encoded in full
and compared; one mismatch (e.g. SentencePiece's leading-space marker, a template that edits the message) turns
splicing off for good (`PromptBuilder.splicing = False`) and every prompt is encoded in full, as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .parsing import ActionParser

_A, _B = "\x01ASSISTANT\x01", "\x01USER\x01"  # markers for splitting the chat template
_MAX_CACHED_GOALS = 4096
_MAX_CACHED_PIECES = 65536
# Safe cut points: right after a newline that follows a non-space, right before an ASCII letter. Split-regex
# byte-level BPE tokenizers always start a new pre-token there, so the pieces' ids concatenate to the whole's.
_CUTS = re.compile(r"(?<=\S\n)(?=[A-Za-z])")


def _letter(text: str) -> bool:
    return text[:1].isascii() and text[:1].isalpha()


class TurnText(str):
    """A step prompt's user message (a plain str) that remembers where its constant parts end.

    `head` = header + goal line + newline, `body` = the turn's own lines + newline, the rest = the instruction.
    """

    head: str
    body: str


class PromptBuilder:
    """Builds each turn's user message and its token ids.

    Step mode (the paper): every turn is a fresh single-message chat holding the env's header, the goal, the step
    count, the last `prompt_history_pairs` (observation, action) pairs, the current observation, the admissible actions
    and the format instruction. Trajectory mode: the first turn is the same; later turns append only a short user
    message (step count, observation, admissible actions) to the running conversation.
    """

    def __init__(self, tokenizer, header: str, parser: ActionParser | None = None, prompt_history_pairs: int = 2):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The tokenizer has no chat template; set `tokenizer.chat_template` (e.g. a ChatML template) so "
                "turn prompts can be rendered with apply_chat_template."
            )
        self.tokenizer, self.header = tokenizer, header
        self.parser = parser or ActionParser()
        self.prompt_history_pairs = prompt_history_pairs
        self._suffix_template: str | None = None
        #: None = not decided yet; False after a spliced prompt differed from the full encoding (then never again)
        self.splicing: bool | None = None
        self._wrap: tuple[str, str] | None = None  # the chat template around one user message
        self._heads: dict[str, list[int]] = {}  # template prefix + head -> ids
        self._tails: dict[str, list[int]] = {}  # instruction + template suffix -> ids
        self._pieces: dict[str, list[int]] = {}  # lines of turn texts -> ids

    def clear_cache(self) -> None:
        """Forget the cached ids (benchmarks: time a rollout as if its texts were all new)."""
        self._heads.clear()
        self._tails.clear()
        self._pieces.clear()

    # ----- text ---------------------------------------------------------------------------------------------
    def turn_text(
        self,
        goal: str,
        step: int,
        observation: str,
        admissible: Sequence[str] | None,
        history: Sequence[tuple[str, str]] = (),
    ) -> TurnText:
        head = f"{self.header}\nyour task is to : {goal}\n"
        lines = []
        recent = list(history)[-self.prompt_history_pairs :] if self.prompt_history_pairs > 0 else []
        if step > 0:
            lines.append(f"you have taken {step} steps .")
        if recent:
            lines.append(f"your last {len(recent)} observations and actions :")
            for obs, action in recent:
                lines.append(f"observation : {obs}")
                lines.append(f"action : {action}")
        lines.append(self.observation_text(step, observation, admissible))
        body = "\n".join(lines) + "\n"
        text = TurnText(head + body + self.parser.instruction())
        text.head, text.body = head, body
        return text

    def observation_text(self, step: int, observation: str, admissible: Sequence[str] | None) -> str:
        text = f"you are now at step {step + 1} . current observation : {observation}"
        if admissible:
            text += "\nadmissible actions : " + " , ".join(admissible) + " ."
        return text

    def vocabulary_texts(self) -> list[str]:
        """The fixed words of every prompt (feed `epo_trl.models.tiny.words_of` with them for tiny tokenizers)."""
        return [
            self.header,
            self.turn_text("goal", 1, "obs", ["act"], [("obs", "act")]),
            self.parser.instruction(),
        ]

    # ----- tokens -------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, user_text: str) -> list[int]:
        """A single-message chat, ready for the assistant's reply (spliced from cached parts when exact)."""
        if isinstance(user_text, TurnText) and self.splicing is not False:
            ids = self._spliced(user_text)
            if ids is not None:
                return ids
        return self._encode_full(user_text)

    def _encode_full(self, user_text: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return self.encode_text(text)

    def _spliced(self, text: TurnText) -> list[int] | None:
        """Cached head ids + this turn's ids + cached tail ids; None = encode this one in full."""
        if self._wrap is None:
            full = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": _B}], tokenize=False, add_generation_prompt=True
            )
            if full.count(_B) != 1:
                self.splicing = False
                return None
            pre, post = full.split(_B)
            self._wrap = (pre, post)
        pre, post = self._wrap
        head, body, tail = text.head, text.body, text[len(text.head) + len(text.body) :]
        # every cut: right after a newline that follows a non-space, right before an ASCII letter
        if not (_letter(body) and _letter(tail) and not head[-2:-1].isspace() and not body[-2:-1].isspace()):
            return None
        head_ids = self._heads.get(text.head)
        new_head = head_ids is None
        if new_head:
            if len(self._heads) >= _MAX_CACHED_GOALS:
                self._heads.clear()
            head_ids = self._heads[text.head] = self.encode_text(pre + text.head)
        tail_ids = self._tails.get(tail)
        if tail_ids is None:
            tail_ids = self._tails[tail] = self.encode_text(tail + post)
        ids = list(head_ids)
        for piece in _CUTS.split(body):  # the turn's lines: most recur (history, actions, admissible lists)
            piece_ids = self._pieces.get(piece)
            if piece_ids is None:
                if len(self._pieces) >= _MAX_CACHED_PIECES:
                    self._pieces.clear()
                piece_ids = self._pieces[piece] = self.encode_text(piece)
            ids += piece_ids
        ids += tail_ids
        if new_head:  # check against the full encoding once per goal; any difference turns splicing off
            full = self._encode_full(text)
            if full != ids:
                self.splicing = False
                return full
            self.splicing = True
        return ids

    def continuation_ids(self, user_text: str, ended_with_eos: bool) -> list[int]:
        """Tokens that close the assistant turn and open the next one with `user_text` (trajectory mode).

        Read off the chat template with marker messages, so it works for any template. When the model's turn
        already ended with EOS, the template's copy of the end-of-turn token is dropped.
        """
        if self._suffix_template is None:
            messages = [
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": _A},
                {"role": "user", "content": _B},
            ]
            full = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if _A not in full or _B not in full:
                raise ValueError("The chat template drops message contents; trajectory mode cannot render turns.")
            self._suffix_template = full[full.index(_A) + len(_A) :]
        suffix = self._suffix_template
        eos = self.tokenizer.eos_token
        if ended_with_eos and eos and suffix.startswith(eos):
            suffix = suffix[len(eos) :]
        return self.encode_text(suffix.replace(_B, user_text))
