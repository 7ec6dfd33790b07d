"""Soak run in the real server: 30 consecutive prompts of the full refocus workflow on the tiny weights,
each with another K and focus point (so the defocus map, BokehNet and a classical render of the same map
re-run every time while the cached model stays loaded). No failures; the server's resident memory after
the last prompt is within 5 % of what it was after the first."""
from __future__ import annotations

import gc
import random

import pytest

from conftest import errors_of
from test_server import INPUT_SIZE, _small_sampler

pytestmark = [pytest.mark.comfyui, pytest.mark.slow]
PROMPTS = 30


def test_soak_30_prompts_memory_flat(server):
    api = server.workflow_api("Refocus a Photo (DeblurNet, BokehNet).json", tiny=True)
    _small_sampler(api, steps=2)
    ids = {v["class_type"]: k for k, v in api.items()}
    api["900"] = {"class_type": "GenRefocusClassicalBokeh", "inputs": {
        "image": [ids["GenRefocusDeblurNet"], 0], "defocus": [ids["GenRefocusDefocusMap"], 0],
        "highlight_boost": 1.0, "highlight_threshold": 0.9, "colorspace": "srgb"}}
    api["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0], "filename_prefix": "soak/classical"}}
    rng = random.Random(0)
    rss = []
    for i in range(PROMPTS):
        api[ids["GenRefocusDefocusMap"]]["inputs"].update(
            K=round(rng.uniform(2.0, 40.0), 2), focus_x=round(rng.uniform(0, 1), 3), focus_y=round(rng.uniform(0, 1), 3))
        h = server.run(api)
        assert h["status"]["status_str"] == "success", (i, errors_of(h))
        outputs = h["outputs"]
        assert outputs[ids["SaveImage"]]["images"] and outputs["901"]["images"], i
        gc.collect()
        rss.append(server.rss_bytes())
    first, last, peak = rss[0], rss[-1], max(rss)
    growth = (last - first) / first
    print(f"\nsoak: {PROMPTS} prompts (full refocus on tiny weights, {INPUT_SIZE[1]}x{INPUT_SIZE[0]} px, "
          f"varying K and focus; BokehNet + classical each prompt): server RSS after first {first / 2**20:.1f} MiB, "
          f"after last {last / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, growth {100 * growth:+.2f} %")
    assert growth <= 0.05, [round(r / 2**20, 1) for r in rss]
