"""Rendering the per-turn prompt (paper layout) and tokenising it through the chat template."""

from __future__ import annotations

from collections.abc import Sequence

from .parsing import ActionParser

_A, _B = "\x01ASSISTANT\x01", "\x01USER\x01"  # markers for splitting the chat template


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

    # ----- text ---------------------------------------------------------------------------------------------
    def turn_text(
        self,
        goal: str,
        step: int,
        observation: str,
        admissible: Sequence[str] | None,
        history: Sequence[tuple[str, str]] = (),
    ) -> str:
        lines = [self.header, f"your task is to : {goal}"]
        recent = list(history)[-self.prompt_history_pairs :] if self.prompt_history_pairs > 0 else []
        if step > 0:
            lines.append(f"you have taken {step} steps .")
        if recent:
            lines.append(f"your last {len(recent)} observations and actions :")
            for obs, action in recent:
                lines.append(f"observation : {obs}")
                lines.append(f"action : {action}")
        lines.append(self.observation_text(step, observation, admissible))
        lines.append(self.parser.instruction())
        return "\n".join(lines)

    def observation_text(self, step: int, observation: str, admissible: Sequence[str] | None) -> str:
        text = f"you are now at step {step + 1} . current observation : {observation}"
        if admissible:
            text += "\nadmissible actions : " + " , ".join(admissible) + " ."
        return text

    def vocabulary_texts(self) -> list[str]:
        """The fixed words of every prompt (feed `epo_trl.testing.words_of` with them for tiny tokenizers)."""
        return [
            self.header,
            self.turn_text("goal", 1, "obs", ["act"], [("obs", "act")]),
            self.parser.instruction(),
        ]

    # ----- tokens -------------------------------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, user_text: str) -> list[int]:
        """A single-message chat, ready for the assistant's reply."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return self.encode_text(text)

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
