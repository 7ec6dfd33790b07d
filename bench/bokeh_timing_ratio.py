"""Renderer time on measure.py's timing scene next to a fixed FFT workload, interleaved in one run.

    python bench/bokeh_timing_ratio.py [--sizes 512 1024] [--repeats 8] [--threads 2]

On a shared or virtual machine the absolute time of one render drifts with the host's load; the ratio
to a reference workload measured in the same minutes does not (much). Printed: min / median / max
of the renders, the ratio of the medians (render / reference, interleaved repetitions) and the load. The reference is ten forward and
inverse 2-D FFTs of two complex 540 x 540 planes, the kind of work most of a render is. The renderer is
called as measure.py calls it (bench/bokeh_adapter.py), on a cold kernel-spectrum cache each time.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bokeh_adapter  # noqa: E402
from genrefocus_core.classical import renderer  # noqa: E402

SCENES = os.environ.get("BOKEH_SCENES", os.path.join(os.path.expanduser("~"), ".cache", "genrefocus-bokeh-scenes"))


def reference(planes: torch.Tensor) -> None:
    for _ in range(10):
        torch.fft.ifft2(torch.fft.fft2(planes))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    planes = torch.randn(1, 2, 540, 540, dtype=torch.complex64)
    for size in args.sizes:
        scene = np.load(os.path.join(SCENES, f"flat_{size}.npz"))
        with open(os.path.join(SCENES, f"flat_{size}.json")) as f:
            meta = json.load(f)
        image, disparity = scene["image"], scene["disparity"]
        bokeh_adapter.render(image[:64, :64], disparity[:64, :64], meta["focus_disparity"], meta["K"], None)
        reference(planes)
        ref, ren = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            reference(planes)
            ref.append(time.perf_counter() - t)
            renderer._KERNEL_SPECTRA.clear()
            t = time.perf_counter()
            bokeh_adapter.render(image, disparity, meta["focus_disparity"], meta["K"], None)
            ren.append(time.perf_counter() - t)
        print(json.dumps({"size": size, "threads": args.threads, "repeats": args.repeats,
                          "render_s_min_median_max": [round(float(x), 3) for x in (min(ren), np.median(ren), max(ren))],
                          "reference_median_s": round(float(np.median(ref)), 4),
                          "render_per_reference_medians": round(float(np.median(ren) / np.median(ref)), 2),
                          "load_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
