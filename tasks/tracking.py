"""Per-campaign TensorBoard logs, through accelerate's TensorBoard tracker.

Event files live in ``$GUILD_HOME/campaigns/<hero>/<campaign>/tensorboard/<job>/``, scalars indexed by the
campaign's global step, so ``tensorboard --logdir $GUILD_HOME/campaigns`` shows each campaign as one run.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)


class CampaignTracker:
    """Logs one job's scalars; every failure is logged and ignored (monitoring never stops training)."""

    def __init__(self, campaign_dir: Path, job_id: str):
        self._tracker = None
        try:
            from accelerate.tracking import TensorBoardTracker

            run_name = re.sub(r"[^\w.-]", "_", job_id)  # job ids are already safe; old ones had colons
            self._tracker = TensorBoardTracker(run_name, str(campaign_dir / "tensorboard"))
            start = getattr(self._tracker, "start", None)
            if callable(start) and getattr(self._tracker, "writer", None) is None:
                start()
        except Exception as exc:  # noqa: BLE001
            logger.warning("TensorBoard logging off: %s", exc)
            self._tracker = None

    def log(self, values: dict, step: int) -> None:
        if self._tracker is None:
            return
        try:
            self._tracker.log({k: v for k, v in values.items() if v is not None}, step=step)
        except Exception as exc:  # noqa: BLE001
            logger.warning("TensorBoard log failed: %s", exc)
            self._tracker = None

    def close(self) -> None:
        if self._tracker is not None:
            try:
                self._tracker.finish()
            except Exception:  # noqa: BLE001
                pass
