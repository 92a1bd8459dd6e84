"""Read run folders back through TensorBoard's own event-file reader."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2


def load(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def scalar_tags(run_dir: Path) -> set[str]:
    return set(load(run_dir).Tags()["scalars"])


def hparams(run_dir: Path) -> tuple[dict, list[str]]:
    """(hyperparameters of the session, metric tags of the experiment) as the HParams tab sees them."""
    content = load(run_dir).PluginTagToContent("hparams")
    values, metrics = {}, []
    for raw in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(raw)
        if data.HasField("session_start_info"):
            for key, value in data.session_start_info.hparams.items():
                values[key] = value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
        if data.HasField("experiment"):
            metrics = [m.name.tag for m in data.experiment.metric_infos]
    return values, metrics
