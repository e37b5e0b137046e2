"""Per-campaign TensorBoard logs, written with TensorBoard's own event writer (no torch).

Event files live in ``$GUILD_HOME/campaigns/<hero>/<campaign>/tensorboard/<job>/``, scalars indexed by the
campaign's global step, so ``tensorboard --logdir $GUILD_HOME/campaigns`` shows each campaign as one run.

The writer is ``tensorboard.summary.writer.event_file_writer.EventFileWriter`` (what ``torch.utils.tensorboard``
wraps), not accelerate's tracker: that one imports torch, so a worker training with a torch-free engine
(``GUILD_ENGINE_FACTORY``, e.g. the stand-in of the fleet benchmark) would load torch in every worker process
(about 5 s and 250 MB each) only to log scalars.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class CampaignTracker:
    """Logs one job's scalars; every failure is logged and ignored (monitoring never stops training)."""

    def __init__(self, campaign_dir: Path, job_id: str):
        self._writer = None
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            run_name = re.sub(r"[^\w.-]", "_", job_id)  # job ids are already safe; old ones had colons
            self._writer = EventFileWriter(str(Path(campaign_dir) / "tensorboard" / run_name))
        except Exception as exc:  # noqa: BLE001
            logger.warning("TensorBoard logging off: %s", exc)

    def log(self, values: dict, step: int) -> None:
        """One event per call at ``step``: every numeric value of ``values`` as a scalar, every string as text
        (TensorBoard's Text tab, Markdown); other values (None) skipped."""
        if self._writer is None:
            return
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary

            entries = [Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)]
            entries += [_text_value(k, v) for k, v in values.items() if isinstance(v, str)]
            if entries:
                self._writer.add_event(Event(wall_time=time.time(), step=int(step), summary=Summary(value=entries)))
        except Exception as exc:  # noqa: BLE001
            logger.warning("TensorBoard log failed: %s", exc)
            self._writer = None

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001
                pass
            self._writer = None


def _text_value(tag: str, text: str):
    """A summary value TensorBoard's text plugin shows: a string tensor tagged with the plugin's name."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.compat.proto.types_pb2 import DT_STRING

    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    tensor = TensorProto(dtype=DT_STRING, string_val=[text.encode("utf-8")],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary.Value(tag=tag, metadata=metadata, tensor=tensor)
