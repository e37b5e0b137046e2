"""``python -m campaigns compare A B``: two models evaluated on one eval set, loss and probe answers side by side.

A side is ``NAME`` (the campaign's latest checkpoint), ``NAME@STEP`` (its checkpoint of global step STEP),
``NAME@base`` (the hero's weights before any training) or ``NAME@PATH`` (a checkpoint directory; the campaign says
which hero it is). Both are evaluated exactly as a worker evaluates (:func:`engine.evaluation.evaluate_model`):
A's eval set by default (its examples, ``max_length`` and probes), or ``eval_file``. Runs here, on the GPU when
there is one, else the CPU; the two models are loaded one after the other.

This is the only campaigns command that loads torch; the CLI imports it for ``compare`` alone.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from campaigns.campaign import Campaign, CampaignStore
from campaigns.errors import CompareError, EvalSetRejected
from campaigns.eval_set import DEFAULT_NUM_PROBES, current_eval_set, eval_spec, probes_of_file
from config.layers import resolve_job_config
from engine.checkpoint_layout import checkpoint_name, is_complete, list_checkpoints, read_checkpoint_state
from engine.eval_plan import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROBE_SEED,
    EvalPoint,
    EvalSpec,
    Probe,
    probes_from_examples,
)
from heroes.profile import Hero, load_hero

logger = logging.getLogger(__name__)

BASE = "base"


@dataclass(frozen=True)
class ModelRef:
    """One side of a comparison: a campaign's checkpoint, or its hero's base weights (``checkpoint`` None)."""

    text: str
    campaign: Campaign
    hero: Hero
    checkpoint: Path | None
    step: int

    def describe(self) -> str:
        where = str(self.checkpoint) if self.checkpoint is not None else f"hero {self.hero.id} base weights"
        return f"{self.text} (step {self.step}: {where})"


@dataclass(frozen=True)
class Side:
    ref: ModelRef
    point: EvalPoint
    num_tokens: int


@dataclass(frozen=True)
class Comparison:
    """Both sides' evaluation on one set."""

    eval_source: str
    eval_name: str
    max_length: int
    probes: tuple[Probe, ...]
    a: Side
    b: Side
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def side(s: Side) -> dict[str, Any]:
            return {"ref": s.ref.text, "campaign": s.ref.campaign.id, "hero": s.ref.hero.id, "step": s.ref.step,
                    "checkpoint": str(s.ref.checkpoint) if s.ref.checkpoint else None, "num_tokens": s.num_tokens,
                    **s.point.to_dict()}

        return {"eval_set": self.eval_source, "eval_sha256": self.eval_name, "max_length": self.max_length,
                "probes": [p.to_line() for p in self.probes], "a": side(self.a), "b": side(self.b),
                "loss_difference": self.b.point.loss - self.a.point.loss, "notes": list(self.notes)}


def parse_ref(guild_home: Path, text: str) -> ModelRef:
    """``NAME``, ``NAME@STEP``, ``NAME@base`` or ``NAME@PATH`` → the model it names.

    Raises:
        CompareError: no checkpoint of that step (the message lists the steps there are), not a complete checkpoint,
            or a campaign with no checkpoint yet. UnknownCampaign, HeroError.
    """
    name, _, at = text.partition("@")
    store = CampaignStore(guild_home)
    campaign = store.get(name)
    hero = load_hero(campaign.hero_id, guild_home)
    if at == "":
        if not campaign.latest_checkpoint:
            raise CompareError(f"{text}: campaign {name} has no checkpoint yet; compare {name}@{BASE} (the hero's "
                               "weights) or train a job first")
        return _checkpoint_ref(text, campaign, hero, Path(campaign.latest_checkpoint))
    if at == BASE:
        return ModelRef(text, campaign, hero, None, 0)
    if at.isdigit():
        return _checkpoint_ref(text, campaign, hero, _find_step(store, campaign, int(at), text))
    return _checkpoint_ref(text, campaign, hero, Path(at).expanduser().absolute())


def _checkpoint_ref(text: str, campaign: Campaign, hero: Hero, path: Path) -> ModelRef:
    if not is_complete(path):
        raise CompareError(f"{text}: {path} is not a complete checkpoint (a step-N directory with its COMPLETE "
                           "marker); list the campaign's with python -m campaigns show " + campaign.id)
    return ModelRef(text, campaign, hero, path, int(read_checkpoint_state(path)["global_step"]))


def _find_step(store: CampaignStore, campaign: Campaign, step: int, text: str) -> Path:
    """The complete checkpoint of ``step`` among the campaign's jobs (the newest when several jobs saved it)."""
    root = store.checkpoint_root(campaign)
    found = [p for job in (sorted(root.iterdir()) if root.is_dir() else []) if job.is_dir()
             for s, p in list_checkpoints(job) if s == step]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    steps = sorted({s for job in (root.iterdir() if root.is_dir() else []) if job.is_dir()
                    for s, _ in list_checkpoints(job)})
    kept = ", ".join(str(s) for s in steps) or "none"
    raise CompareError(f"{text}: campaign {campaign.id} keeps no checkpoint {checkpoint_name(step)} (steps kept: "
                       f"{kept}); the retention policy may have removed it (python -m campaigns retention "
                       f"{campaign.id})")


def comparison_spec(guild_home: Path, a: ModelRef, *, eval_file: str | None = None, probes_file: str | None = None,
                    num_probes: int | None = None, max_new_tokens: int | None = None, max_length: int | None = None,
                    limits=None) -> tuple[EvalSpec, str]:
    """The eval set both sides are evaluated on: A's campaign's (its examples, max_length, probes and generation
    settings), or ``eval_file`` (validated: ``FILE:LINE`` errors; probes from its first conversations); each option
    given replaces what the set says.

    Returns:
        ``(spec, source)``: what the engine evaluates and how to name the set.

    Raises:
        EvalSetRejected: a bad file or option. CompareError: no eval set to compare on.
    """
    from engine.formats import DatasetError, read_examples, validate_file

    eval_set = current_eval_set(a.campaign)
    try:
        if eval_file is not None:
            summary = validate_file(eval_file, eval_file, limits=limits)
            probes = probes_from_examples(read_examples(eval_file, eval_file, limits=limits),
                                          DEFAULT_NUM_PROBES if num_probes is None else num_probes)
            length = eval_set.max_length if eval_set is not None else resolve_job_config(
                guild_home, a.hero, a.campaign.config_overrides, None).config.hyperparams.max_length
            spec = EvalSpec(dataset_path=str(eval_file), name=summary.sha256, max_length=length,
                            probes=tuple(probes), max_new_tokens=DEFAULT_MAX_NEW_TOKENS, seed=DEFAULT_PROBE_SEED)
            source = str(Path(eval_file).resolve())
        elif eval_set is not None:
            spec, source = eval_spec(eval_set, max_tokens=0), eval_set.source
            if num_probes is not None:
                spec = replace(spec, probes=spec.probes[:num_probes])
        else:
            raise CompareError(f"campaign {a.campaign.id} has no eval set: pass --eval-file FILE, or set one "
                               f"(python -m campaigns eval-set {a.campaign.id} FILE)")
        if probes_file is not None:
            validate_file(probes_file, probes_file, limits=limits)
            probes = probes_of_file(probes_file, read_examples(probes_file, probes_file, limits=limits), num_probes)
            spec = replace(spec, probes=tuple(probes))
    except DatasetError as exc:
        raise EvalSetRejected("\n".join(exc.report_lines())) from None
    if max_new_tokens is not None:
        spec = replace(spec, max_new_tokens=max_new_tokens)
    if max_length is not None:
        spec = replace(spec, max_length=max_length)
    return spec, source


def compare(guild_home: Path, a_text: str, b_text: str, *, device: str | None = None, **spec_options) -> Comparison:
    """Evaluate ``a_text`` and ``b_text`` (see :func:`parse_ref`) on one eval set (:func:`comparison_spec`).

    Raises:
        CompareError, EvalSetRejected, UnknownCampaign, HeroError, EngineError (a model that cannot load here).
    """
    a, b = parse_ref(guild_home, a_text), parse_ref(guild_home, b_text)
    spec, source = comparison_spec(guild_home, a, **spec_options)
    import torch

    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sides = [_evaluate(guild_home, ref, spec, target) for ref in (a, b)]
    notes = []
    if a.hero.id != b.hero.id:
        notes.append(f"different heroes ({a.hero.id}, {b.hero.id}): each side is tokenised by its own tokenizer, so "
                     "the losses are per token of different tokenisations")
    return Comparison(source, spec.name, spec.max_length, spec.probes, sides[0], sides[1], notes)


def _evaluate(guild_home: Path, ref: ModelRef, spec: EvalSpec, device) -> Side:
    from transformers import AutoTokenizer

    from engine.evaluation import evaluate_model, load_eval_model
    from heroes.materialise import ensure_model

    model_path = ensure_model(ref.hero, guild_home)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model, config = load_eval_model(model_path, ref.checkpoint, device)
    try:
        point, data = evaluate_model(model, tokenizer, spec, step=ref.step, device=device, chat=ref.hero.chat_options,
                                     precision=config.hyperparams.precision)
    finally:
        del model
        gc.collect()
    logger.info("%s: eval loss %.4f over %d loss tokens", ref.text, point.loss, point.num_loss_tokens)
    return Side(ref, point, data.num_tokens)
