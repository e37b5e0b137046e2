"""A job's evaluation on its campaign's eval set, as a worker runs it: which set (frozen at the job's first start),
and where each evaluation goes (the campaign's evaluation log, TensorBoard, the job's live progress for Flower).

:class:`tasks.lifecycle.JobRunner` asks :func:`job_evaluation` for the engine's :class:`engine.eval_plan.EvalSpec`
and hands :class:`EvalReporter.on_eval` to the engine. Nothing here may stop training: the reporter logs its
failures and carries on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaigns.campaign import Campaign
from campaigns.eval_set import EvalSet, current_change, eval_spec
from campaigns.evaluations import append_evaluation
from engine.eval_plan import EvalPoint, EvalSpec
from jobs.job import Job

logger = logging.getLogger(__name__)

METADATA_KEY = "eval_set"  # in the job's metadata: the set it evaluates on (None: none), from its first start
SAMPLE_CHARS = 160  # of the latest answer, in the live progress (Flower's task page)


@dataclass(frozen=True)
class JobEvaluation:
    """The eval set of one run of a job: ``spec`` for the engine (None: no eval set) and the record to keep in the
    job's metadata."""

    spec: EvalSpec | None
    record: dict[str, Any] | None


def job_evaluation(job: Job, campaign: Campaign, resume_path: Path | None, resume_step: int,
                   checkpoint_dir: Path) -> JobEvaluation:
    """The eval set ``job`` evaluates on.

    At the job's first start it is the campaign's current set, recorded in the job; afterwards (a resume after a
    pause, a crash or a retry) always the recorded one, so a set changed meanwhile never applies half-way through a
    job. The first job to start at the step a set was set at also evaluates before its first step: the set's
    baseline.

    Raises:
        DatasetError: the set's stored probes file is gone (a damaged ``$GUILD_HOME``).
    """
    budget = job.plan.config.hyperparams.eval_max_tokens
    if METADATA_KEY in job.metadata:
        recorded = job.metadata[METADATA_KEY]
        if recorded is None:
            return JobEvaluation(None, None)
        return JobEvaluation(eval_spec(EvalSet.from_record(recorded), budget), recorded)
    change = current_change(campaign)
    if change is None or change.eval_set is None:
        return JobEvaluation(None, None)
    own = resume_path is not None and Path(checkpoint_dir).resolve() in Path(resume_path).resolve().parents
    at_start = not own and resume_step == change.from_step
    return JobEvaluation(eval_spec(change.eval_set, budget, at_start=at_start), change.eval_set.to_record())


class EvalReporter:
    """Where a job's evaluations go, as they happen: the campaign's evaluation log, TensorBoard (the loss, and each
    answer as text), and the latest figures merged into the job's live progress.

    Args:
        campaign_dir: ``$GUILD_HOME/campaigns/<hero>/<name>``.
        job_id: the job.
        spec: its evaluation (for the probes' prompts in TensorBoard).
        tracker: a :class:`tasks.tracking.CampaignTracker`.
    """

    def __init__(self, campaign_dir: Path, job_id: str, spec: EvalSpec | None, tracker):
        self.campaign_dir, self.job_id, self.spec, self.tracker = Path(campaign_dir), job_id, spec, tracker
        self.latest: dict[str, Any] = {}  # merged into every progress report from the first evaluation on
        self._warned = False

    def on_eval(self, point: EvalPoint) -> None:
        """The engine's ``on_eval``: never raises."""
        try:
            append_evaluation(self.campaign_dir, self.job_id, point)
            self.tracker.log({"eval/loss": point.loss}, point.step)
            probes = self.spec.probes if self.spec is not None else ()
            for answer in point.answers:
                prompt = probes[answer.index].prompt_text if answer.index < len(probes) else ""
                self.tracker.log({f"samples/probe-{answer.index}": f"**prompt:** {prompt}\n\n**answer:** "
                                                                   f"{answer.text}"}, point.step)
            latest = {"eval_step": point.step, "eval_loss": point.loss}
            if point.answers:
                latest["sample"] = point.answers[0].text[:SAMPLE_CHARS]
            self.latest = latest
        except Exception as exc:  # noqa: BLE001 - monitoring must never stop training
            if not self._warned:
                self._warned = True
                logger.warning("job %s: evaluation not recorded: %s", self.job_id, exc)
