"""A campaign's own eval set: the fixed yardstick every job of the campaign is measured on.

``campaign.json`` keeps the history of changes under ``eval_sets`` (oldest first; the last one is current): each
:class:`EvalSetChange` says when it was made, the campaign's global step then (``from_step``), and the
:class:`EvalSet` (None when the set was removed). The set itself is a dataset stored content-addressed
(``$GUILD_HOME/datasets/<sha[:2]>/<sha>.jsonl``), validated like any dataset when it was set; so are its probe
prompts, written as a small ``messages`` file of their own.

**Which jobs use which set.** A worker reads the campaign's current set when a job first starts training and
records it in the job (``metadata.eval_set``); the job keeps it to its end, also when it is paused and resumed.
A change therefore applies from the next job to start, whenever that job was enqueued, and never moves under a
running job. The first job on a new set also evaluates before its first step, the set's baseline
(``at_start``), so every series of eval points begins at the step it was set at.

Torch-free: the CLIs read and write these records without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from campaigns.campaign import Campaign
from campaigns.errors import CampaignError, EvalSetRejected
from config.clock import utc_now
from engine.eval_plan import DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROBE_SEED, EvalSpec, Probe
from engine.formats import Example

MAX_PROBES = 16  # prompts answered at every evaluation
DEFAULT_NUM_PROBES = 4  # taken from the eval file when no probes file is given
MAX_PROBE_NEW_TOKENS = 1024


@dataclass(frozen=True)
class EvalSet:
    """One eval set as the campaign records it.

    Attributes:
        sha256: of the file's bytes; the set's name in eval points and sample logs.
        path: the stored copy every job reads.
        source: the file it was set from (absolute), for people.
        format: the dataset format of its lines.
        num_examples: lines in it.
        num_tokens: its tokens at ``max_length`` (what one evaluation forwards), counted with the hero's tokenizer
            when it was on this machine (``tokens_counted``), else estimated from the text's size.
        max_length: every job cuts the set's examples here, whatever its own ``max_length``.
        probes_sha256, probes_path: the stored probe prompts (a ``messages`` file), None without probes.
        num_probes: how many.
        probes_source: ``"eval file"`` (its first conversations) or the probes file it was set from.
        max_new_tokens, seed: how answers are generated.
    """

    sha256: str
    path: str
    source: str
    format: str
    num_examples: int
    num_tokens: int
    tokens_counted: bool
    max_length: int
    probes_sha256: str | None = None
    probes_path: str | None = None
    num_probes: int = 0
    probes_source: str | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    seed: int = DEFAULT_PROBE_SEED

    @property
    def short(self) -> str:
        return self.sha256[:12]

    def to_record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> EvalSet:
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise CampaignError(f"eval set record {data!r} is incomplete ({exc}); set it again with "
                                "python -m campaigns eval-set NAME FILE") from None

    def budget_problem(self, max_tokens: int) -> str | None:
        """Why the set is over a budget of ``max_tokens`` tokens per evaluation (0: no budget), or None."""
        if not max_tokens or self.num_tokens <= max_tokens:
            return None
        counted = "" if self.tokens_counted else "about "
        return (f"the eval set {self.source} has {counted}{self.num_tokens:,} tokens at max_length "
                f"{self.max_length} and hyperparams.eval_max_tokens allows {max_tokens:,} per evaluation; raise it "
                f"(--set eval_max_tokens={self.num_tokens}) or set a smaller eval set (python -m campaigns "
                "eval-set NAME FILE)")


@dataclass(frozen=True)
class EvalSetChange:
    """One entry of a campaign's eval set history."""

    at: str  # when (ISO-8601 UTC)
    from_step: int  # the campaign's global step then: jobs that start after it evaluate on ``eval_set``
    eval_set: EvalSet | None  # None: the campaign has no eval set from here

    def to_record(self) -> dict[str, Any]:
        return {"at": self.at, "from_step": self.from_step,
                "eval_set": self.eval_set.to_record() if self.eval_set is not None else None}

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> EvalSetChange:
        raw = data.get("eval_set")
        return cls(str(data.get("at", "")), int(data.get("from_step", 0)),
                   EvalSet.from_record(raw) if raw else None)


def eval_history(campaign: Campaign) -> list[EvalSetChange]:
    """Every change of the campaign's eval set, oldest first."""
    return [EvalSetChange.from_record(entry) for entry in campaign.eval_sets]


def current_change(campaign: Campaign) -> EvalSetChange | None:
    """The change in force (its ``eval_set`` may be None: removed), or None when the campaign never had one."""
    return EvalSetChange.from_record(campaign.eval_sets[-1]) if campaign.eval_sets else None


def current_eval_set(campaign: Campaign) -> EvalSet | None:
    change = current_change(campaign)
    return change.eval_set if change is not None else None


def record_change(campaign: Campaign, eval_set: EvalSet | None) -> EvalSetChange:
    """Append a change to ``campaign`` (in memory; write it with :meth:`CampaignStore.edit` or ``create``), at the
    campaign's current step."""
    change = EvalSetChange(utc_now(), campaign.current_step, eval_set)
    campaign.eval_sets.append(change.to_record())
    return change


def read_probes(eval_set: EvalSet) -> tuple[Probe, ...]:
    """The probe prompts of ``eval_set`` from their stored file.

    Raises:
        DatasetError: the stored file is gone or unreadable (it was validated when it was set).
    """
    if not eval_set.probes_path:
        return ()
    from engine.formats import read_examples

    probes = (Probe.from_example(e) for e in read_examples(eval_set.probes_path))
    return tuple(p for p in probes if p is not None)


def probes_of_file(path: str, examples: Sequence[Example], limit: int | None) -> list[Probe]:
    """The probes of a probes file's (validated) examples: every line's prompt, or the first ``limit``.

    Raises:
        EvalSetRejected: a line has no prompt (``FILE:LINE``), or there are more than :data:`MAX_PROBES` and no
            ``limit`` says which to take.
    """
    problems, probes = [], []
    for example in examples:
        probe = Probe.from_example(example)
        if probe is None:
            why = ("a text line has no prompt to answer; use messages or prompt/response lines"
                   if example.format == "text" else "no user turn before its final assistant reply")
            problems.append(f"{path}:{example.line}: {why}")
        else:
            probes.append(probe)
    if problems:
        raise EvalSetRejected("\n".join(problems[:20]))
    if limit is None and len(probes) > MAX_PROBES:
        raise EvalSetRejected(f"{path}: {len(probes)} probes, at most {MAX_PROBES} are answered at every evaluation; "
                              "keep the ones that matter, or pass --num-probes N to take the first N")
    return probes if limit is None else probes[:limit]


def eval_spec(eval_set: EvalSet, max_tokens: int, at_start: bool = False) -> EvalSpec:
    """What the engine evaluates for a job on ``eval_set`` with the job's budget ``max_tokens``."""
    return EvalSpec(dataset_path=eval_set.path, name=eval_set.sha256, max_length=eval_set.max_length,
                    probes=read_probes(eval_set), max_new_tokens=eval_set.max_new_tokens, seed=eval_set.seed,
                    max_tokens=max_tokens, at_start=at_start)
