"""The campaign's evaluations for people: how the probes' answers changed over the steps (``campaigns samples``)
and two models side by side (``campaigns compare``). Text for the terminal; the same data as JSON with ``--json``.
"""

from __future__ import annotations

import json
from typing import Any

from campaigns.campaign import Campaign
from campaigns.errors import CampaignError
from campaigns.eval_set import eval_history, read_probes
from campaigns.evaluations import LoggedEvaluation

QUOTE_CHARS = 400  # of a prompt or reference shown in text output (answers are shown whole: they are bounded)


def collect_samples(campaign: Campaign, entries: list[LoggedEvaluation], prompt: int | None = None) -> dict[str, Any]:
    """The evaluation log grouped by eval set, then by probe, each probe's answers in step order.

    Args:
        entries: :func:`campaigns.evaluations.read_log`, possibly filtered.
        prompt: only this probe (its 0-based index).

    Raises:
        CampaignError: ``prompt`` is not a probe of any eval set the log holds.
    """
    known = {c.eval_set.sha256: c.eval_set for c in eval_history(campaign) if c.eval_set is not None}
    sets: list[dict[str, Any]] = []
    by_sha: dict[str, dict[str, Any]] = {}
    for entry in entries:
        point = entry.point
        group = by_sha.get(point.eval_set)
        if group is None:
            group = by_sha[point.eval_set] = _new_group(point.eval_set, known.get(point.eval_set))
            sets.append(group)
        group["evaluations"].append({"step": point.step, "job": entry.job_id, "loss": point.loss,
                                     "num_examples": point.num_examples, "num_loss_tokens": point.num_loss_tokens,
                                     "seconds": point.seconds})
        for answer in point.answers:
            probe = _probe(group, answer.index)
            probe["answers"].append({"step": point.step, "job": entry.job_id, "text": answer.text,
                                     "num_tokens": answer.num_tokens, "finished": answer.finished})
    if prompt is not None:
        counts = [len(g["probes"]) for g in sets]
        if not any(prompt < n for n in counts) or prompt < 0:
            raise CampaignError(f"--prompt {prompt}: the campaign's evaluations have probes 0 to "
                                f"{max(counts, default=0) - 1}" if any(counts) else
                                f"--prompt {prompt}: no probe answers recorded yet")
        for group in sets:
            group["probes"] = [p for p in group["probes"] if p["index"] == prompt]
    return {"campaign": campaign.id, "eval_sets": sets}


def _new_group(sha: str, eval_set) -> dict[str, Any]:
    probes = []
    if eval_set is not None:
        try:
            probes = [{"index": i, "prompt": p.prompt_text, "reference": p.reference, "line": p.line, "answers": []}
                      for i, p in enumerate(read_probes(eval_set))]
        except Exception:  # noqa: BLE001 - a stored probes file removed by hand: answers still show
            probes = []
    return {"sha256": sha, "source": eval_set.source if eval_set is not None else None, "evaluations": [],
            "probes": probes}


def _probe(group: dict[str, Any], index: int) -> dict[str, Any]:
    for probe in group["probes"]:
        if probe["index"] == index:
            return probe
    probe = {"index": index, "prompt": None, "reference": None, "line": None, "answers": []}
    group["probes"].append(probe)
    group["probes"].sort(key=lambda p: p["index"])
    return probe


def format_samples(name: str, view: dict[str, Any]) -> str:
    """The text ``campaigns samples`` prints."""
    if not view["eval_sets"]:
        return (f"campaign {name}: no evaluation recorded yet (a campaign's eval set is evaluated at the end of every "
                f"job, and every eval_steps steps when set)")
    lines = []
    for group in view["eval_sets"]:
        evaluations = group["evaluations"]
        steps = [e["step"] for e in evaluations]
        lines.append(f"campaign {name} · eval set {group['sha256'][:12]} ({group['source'] or 'unknown file'}) · "
                     f"{len(evaluations)} evaluation{'s' if len(evaluations) != 1 else ''}, steps "
                     f"{min(steps)}-{max(steps)}")
        lines.append(f"  {'step':>8}  {'loss':>9}  {'examples':>8}  {'tokens':>8}  job")
        for e in evaluations:
            lines.append(f"  {e['step']:>8}  {e['loss']:>9.4f}  {e['num_examples']:>8}  {e['num_loss_tokens']:>8}  "
                         f"{e['job']}")
        for probe in group["probes"]:
            where = f" (line {probe['line']})" if probe.get("line") else ""
            lines.append(f"probe {probe['index']}{where}: {_quote(probe['prompt'], QUOTE_CHARS)}")
            if probe.get("reference") is not None:
                lines.append(f"  {'reference':>13}  {_quote(probe['reference'], QUOTE_CHARS)}")
            previous = None
            for a in probe["answers"]:
                text = "(same as before)" if a["text"] == previous else _quote(a["text"])
                cut = "" if a["finished"] else " [cut at max_new_tokens]"
                lines.append(f"  step {a['step']:>8}  {text}{cut}")
                previous = a["text"]
    return "\n".join(lines)


def format_comparison(result) -> str:
    """The text ``campaigns compare`` prints (``result`` a :class:`campaigns.compare.Comparison`)."""
    a, b = result.a, result.b
    width = max(24, len(a.ref.text) + 4)
    lines = [f"eval set {result.eval_name[:12]} ({result.eval_source}) · max_length {result.max_length} · "
             f"{a.point.num_examples} examples",
             f"{'':14}{'A: ' + a.ref.text:<{width}}{'B: ' + b.ref.text}",
             f"{'step':14}{a.ref.step:<{width}}{b.ref.step}",
             f"{'loss':14}{a.point.loss:<{width}.4f}{b.point.loss:.4f}   (B - A: {b.point.loss - a.point.loss:+.4f})",
             f"{'loss tokens':14}{a.point.num_loss_tokens:<{width}}{b.point.num_loss_tokens}",
             f"{'seconds':14}{a.point.seconds:<{width}.2f}{b.point.seconds:.2f}"]
    for probe, answer_a, answer_b in zip(result.probes, a.point.answers, b.point.answers):
        lines.append(f"probe {answer_a.index}: {_quote(probe.prompt_text, QUOTE_CHARS)}")
        if probe.reference is not None:
            lines.append(f"  reference: {_quote(probe.reference, QUOTE_CHARS)}")
        lines.append(f"  A: {_quote(answer_a.text)}")
        lines.append(f"  B: {_quote(answer_b.text)}")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


def _quote(text: str | None, limit: int | None = None) -> str:
    if text is None:
        return "(unknown)"
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return json.dumps(text, ensure_ascii=False)
