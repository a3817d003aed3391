"""A real tensorboard server on 127.0.0.1 serves the plugin's tags and its custom-scalars layout."""

import json
import re

from conftest import MeanActivation, make_trainer

from lightning_interp import ARMDrift
from lightning_interp.demo import DigitsCNN


def test_server_lists_plugin_tags_and_layout(tmp_path, datamodule, tensorboard_server):
    cb = MeanActivation(threshold=-1.0)  # fires alerts, so alerts/* tags exist too
    make_trainer(tmp_path, [cb, ARMDrift()], max_epochs=2).fit(DigitsCNN(), datamodule)
    with tensorboard_server(tmp_path / "tb") as server:
        tags = {}
        for _ in range(30):  # the server loads event files in the background
            tags = json.loads(server.get("/data/plugin/scalars/tags"))
            if any("alerts/probe_mean" in t for t in tags.values()):
                break
            import time

            time.sleep(1)
        run_tags = next(iter(tags.values()))
        assert {"probe_mean/conv1", "probe_mean/fc1", "alerts/probe_mean"} <= set(run_tags)
        layout = json.loads(server.get("/data/plugin/custom_scalars/layout"))
        charts = {cat["title"]: [chart["title"] for chart in cat["chart"]] for cat in layout["category"]}
        assert list(charts) == ["lightning_interp: drift", "lightning_interp: cost", "lightning_interp: alerts"]
        assert charts["lightning_interp: cost"] == ["seconds per analysis", "share of the fit's wall time"]
        # no shift_data, so no data-shift chart that would stay empty
        assert charts["lightning_interp: drift"] == ["ARM aggregate", "ARM per layer", "settled layers"]
        regexes = [r for cat in layout["category"] for chart in cat["chart"] for r in chart["multiline"]["tag"]]
        assert all(any(re.fullmatch(r, t) for t in run_tags) for r in regexes)  # no chart stays empty
        text_tags = json.loads(server.get("/data/plugin/text/tags"))
        assert any(t.startswith("alerts/log") for t in next(iter(text_tags.values())))
