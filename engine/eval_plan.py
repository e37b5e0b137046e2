"""What a fixed evaluation asks of the engine and what it gives back: :class:`EvalSpec`, :class:`Probe`,
:class:`EvalPoint`. No torch here: the job layer and the CLIs build and read these without loading a model.

A campaign's eval set (:mod:`campaigns.eval_set`) becomes an :class:`EvalSpec` for each job. At every evaluation
the engine computes the loss over the whole set, token-weighted over the tokens that carry loss (assistant
replies), exactly as the training loss is defined, and answers each probe prompt greedily; the result is an
:class:`EvalPoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.formats import Example

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_PROBE_SEED = 0


@dataclass(frozen=True)
class Probe:
    """A fixed prompt: a conversation that ends with a user turn, and the answer the data gives, if any.

    Attributes:
        messages: ``(role, content)`` pairs; the model answers after the last one.
        reference: the assistant reply the file holds for it (shown beside generated answers), or None.
        line: where it came from in its file.
    """

    messages: tuple[tuple[str, str], ...]
    reference: str | None = None
    line: int = 0

    @classmethod
    def from_example(cls, example: Example) -> Probe | None:
        """The prompt of a chat example: everything before its final assistant reply (that reply is the
        reference). A ``prompt``/``response`` line is one user turn. None for a ``text`` line (no prompt)."""
        if example.format == "prompt_response":
            return cls(((("user", example.prompt),)), example.response, example.line)
        if example.format != "messages":
            return None
        messages = list(example.messages)
        reference = None
        if messages and messages[-1][0] == "assistant":
            reference = messages.pop()[1]
        if not messages or messages[-1][0] != "user":
            return None
        return cls(tuple(messages), reference, example.line)

    @property
    def prompt_text(self) -> str:
        """The last user turn: how a person recognises the probe."""
        return self.messages[-1][1]

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_line(self) -> dict[str, Any]:
        """The probe as a ``messages`` dataset line (the reference as the final assistant turn)."""
        turns = self.conversation()
        if self.reference is not None:
            turns.append({"role": "assistant", "content": self.reference})
        return {"messages": turns}


def probes_from_examples(examples: Sequence[Example], limit: int) -> list[Probe]:
    """The prompts of the first ``limit`` chat examples that have one."""
    probes: list[Probe] = []
    for example in examples:
        if len(probes) >= limit:
            break
        probe = Probe.from_example(example)
        if probe is not None:
            probes.append(probe)
    return probes


@dataclass(frozen=True)
class EvalSpec:
    """A fixed evaluation for one job (see :meth:`engine.trainer.TrainerEngine.run_job`).

    Attributes:
        dataset_path: a validated ``.jsonl`` file (the stored copy of a campaign's eval set).
        name: what identifies the set in results (its sha256).
        max_length: examples are cut to this many tokens, whatever the job's own ``max_length``, so that every job
            evaluates on exactly the same tokens.
        probes: prompts answered at every evaluation.
        max_new_tokens: the most tokens generated per answer.
        seed: seeds generation (greedy decoding needs none, but every random generator is set, in a forked state, so
            an answer depends on the weights and the prompt only).
        max_tokens: the budget: an eval set of more tokens is refused before training (0: no limit).
        at_start: also evaluate before the first step (the baseline of a new campaign or a newly set eval set).
    """

    dataset_path: str
    name: str
    max_length: int
    probes: tuple[Probe, ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = DEFAULT_PROBE_SEED
    max_tokens: int = 0
    at_start: bool = False


@dataclass(frozen=True)
class ProbeAnswer:
    """One generated answer.

    Attributes:
        index: the probe's position in the eval set's probes.
        text: the answer, decoded without special tokens.
        num_tokens: tokens generated (the stop token included when one came).
        finished: the model ended its turn; False when ``max_new_tokens`` cut it.
    """

    index: int
    text: str
    num_tokens: int
    finished: bool

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "text": self.text, "num_tokens": self.num_tokens, "finished": self.finished}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeAnswer:
        return cls(int(data["index"]), str(data["text"]), int(data["num_tokens"]), bool(data["finished"]))


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation of the fixed set at a global step.

    Attributes:
        step: the campaign's global step of the weights evaluated.
        loss: token-weighted mean cross-entropy over every loss token of the set.
        num_examples: examples evaluated (those with a loss token within ``max_length``).
        num_loss_tokens: the tokens the mean is over; the same at every point of one set.
        seconds: wall time of the evaluation, generation included.
        eval_set: the set's name (sha256).
        answers: the probes' answers.
    """

    step: int
    loss: float
    num_examples: int
    num_loss_tokens: int
    seconds: float
    eval_set: str
    answers: tuple[ProbeAnswer, ...] = field(default=())

    def to_dict(self, answers: bool = True) -> dict[str, Any]:
        data = {"step": self.step, "loss": self.loss, "num_examples": self.num_examples,
                "num_loss_tokens": self.num_loss_tokens, "seconds": round(self.seconds, 4), "eval_set": self.eval_set}
        if answers:
            data["answers"] = [a.to_dict() for a in self.answers]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalPoint:
        return cls(step=int(data["step"]), loss=float(data["loss"]), num_examples=int(data["num_examples"]),
                   num_loss_tokens=int(data["num_loss_tokens"]), seconds=float(data.get("seconds", 0.0)),
                   eval_set=str(data.get("eval_set", "")),
                   answers=tuple(ProbeAnswer.from_dict(a) for a in data.get("answers", ())))
