"""Read run folders back through TensorBoard's own event-file reader."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
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


def hparams_tab(logdir: Path) -> tuple[list[dict], list[str], list[str]]:
    """(hyperparameter infos in the tab's order, metric tags, trial names) as a TensorBoard
    server on 127.0.0.1 gives them to its HParams tab (which shows the first five hyperparameters,
    differing ones first)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def post(path: str, body: dict) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/data/plugin/hparams/{path}", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    try:
        for _ in range(120):
            try:
                experiment = post("experiment", {"experimentName": ""})
                break
            except OSError:
                time.sleep(0.5)
        groups = post("session_groups", {"experimentName": "", "allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN"],
                                         "colParams": [], "startIndex": 0, "sliceSize": 100})
    finally:
        server.terminate()
        server.wait()
    return (experiment["hparamInfos"], [m["name"]["tag"] for m in experiment["metricInfos"]],
            [g["name"] for g in groups["sessionGroups"]])
