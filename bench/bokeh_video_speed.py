"""Classical renderer speed for video: per-frame time at 1920x1080 and 3840x2160, a focus pull, peak memory.

    python bench/bokeh_video_speed.py [--sizes 1080 2160] [--repeats 3] [--frames 6] [--threads 2] [--compete]

Scene: the built-in street (genrefocus_core.basics.scene), hexagon, focus on the pillar, K set so the
largest blur radius is 60 px. Every time is printed next to a fixed FFT workload timed in the same
minutes (the one of bench/bokeh_timing_ratio.py: ten forward + inverse FFTs of two complex 540 x 540
planes at the same thread count; 30-34 ms on the quiet machine), as a ratio, so figures from a busy
machine convert to quiet ones: quiet time ~ ratio x 32 ms.
- frame: one render, warm process, cold kernel-spectrum cache (median of --repeats);
- pull: per-frame time over --frames frames whose focus moves from the near card to the far wall
  (consecutive calls, as a focus pull makes them: spectra and DFT tables are reused across frames);
- peak RSS: VmHWM of a fresh subprocess that loads the scene and renders one frame (exact; torch's
  allocations are invisible to tracemalloc), and of one that only loads the scene (the baseline).
--compete runs a competing 2-thread job (a matrix-product loop in another process) during the timings.
--modes: how the renderer uses the threads, interleaved per repetition: auto (its own choice from the
load average), ops (torch splits every operation; its choice on a quiet machine), levels (levels on
worker threads, one thread per operation; its choice on a busy one). The pull runs in the first mode.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from genrefocus_core.basics.apertures import polygon  # noqa: E402
from genrefocus_core.basics.scene import make_scene  # noqa: E402
from genrefocus_core.classical import renderer  # noqa: E402

MAX_RADIUS = 60.0
QUIET_REFERENCE_S = 0.032  # the reference workload on the quiet machine (bench/README_bokeh.md)
SIZES = {1080: (1080, 1920), 2160: (2160, 3840)}


def scene(height: int, width: int):
    image, depth = make_scene(height, width)
    disparity = 1.0 / depth
    focus = 1.0 / 6.0  # the pillar
    K = MAX_RADIUS / float((disparity - focus).abs().max())
    return image, disparity, focus, K


def reference(planes: torch.Tensor) -> float:
    t = time.perf_counter()
    for _ in range(10):
        torch.fft.ifft2(torch.fft.fft2(planes))
    return time.perf_counter() - t


_BUSY = renderer._machine_busy


def use_mode(mode: str) -> None:
    renderer._machine_busy = {"auto": _BUSY, "ops": lambda: False, "levels": lambda: True}[mode]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def own_peak_rss_mib() -> float:
    """This process's peak RSS. Linux's ru_maxrss survives exec, so a child forked from this big bench
    process would report at least the parent's size; /proc's VmHWM belongs to the new program only."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_rss(path: str, threads: int, render: bool) -> None:
    torch.set_num_threads(threads)
    image, disparity, focus, K = torch.load(path, weights_only=True)
    if render:
        renderer.render_bokeh(image, disparity, focus, K, polygon(6))
    print(own_peak_rss_mib())


def peak_rss(size: int, threads: int) -> tuple[float, float]:
    """(peak RSS MiB of loading the scene + rendering, of loading it alone), each in a fresh process. The
    scene is built here and saved: building it at 4K (float64 numpy) peaks higher than the render."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scene.pt")
        image, disparity, focus, K = scene(*SIZES[size])
        torch.save([image, disparity, focus, K], path)
        out = []
        for render in (True, False):
            cmd = [sys.executable, __file__, "--child-rss", path, "--threads", str(threads)]
            if not render:
                cmd.append("--no-render")
            out.append(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1]))
    return out[0], out[1]


COMPETITOR = """
import torch
torch.set_num_threads(2)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a * 1e-3)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1080, 2160], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compete", action="store_true", help="run a competing 2-thread job during the timings")
    ap.add_argument("--modes", nargs="+", default=["auto"], choices=["auto", "ops", "levels"])
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--child-rss", help=argparse.SUPPRESS)
    ap.add_argument("--no-render", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_rss:
        return child_rss(args.child_rss, args.threads, not args.no_render)
    torch.set_num_threads(args.threads)
    planes = torch.randn(1, 2, 540, 540, dtype=torch.complex64)
    hexagon = polygon(6)
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if args.compete else None
    try:
        for size in args.sizes:
            image, disparity, focus, K = scene(*SIZES[size])
            renderer.render_bokeh(image[:, :64, :64], disparity[:, :64, :64], focus, K, hexagon)
            reference(planes)
            refs, frames = [], {m: [] for m in args.modes}
            for _ in range(args.repeats):
                for mode in args.modes:
                    use_mode(mode)
                    refs.append(reference(planes))
                    renderer._KERNEL_SPECTRA.clear()
                    frames[mode].append(timed(lambda: renderer.render_bokeh(image, disparity, focus, K, hexagon)))
            use_mode(args.modes[0])
            near, far = float(disparity.max()), float(disparity.min())
            pull = []
            for k in range(args.frames):
                f = near + (far - near) * k / max(args.frames - 1, 1)
                k_frame = MAX_RADIUS / float((disparity - f).abs().max())  # radii up to 60 px in every frame
                refs.append(reference(planes))
                pull.append(timed(lambda: renderer.render_bokeh(image, disparity, f, k_frame, hexagon)))
            ref, per_frame = statistics.median(refs), statistics.median(pull[1:] or pull)
            row = {"size": f"{SIZES[size][1]}x{SIZES[size][0]}", "threads": args.threads, "compete": args.compete,
                   "reference_s": round(ref, 4), "load": round(os.getloadavg()[0], 1)}
            for mode, times in frames.items():
                frame = statistics.median(times)
                row[mode] = {"frame_s": round(frame, 3), "frame_per_reference": round(frame / ref, 2),
                             "quiet_equivalent_frame_s": round(frame / ref * QUIET_REFERENCE_S, 3)}
            row["pull"] = {"mode": args.modes[0], "per_frame_s": round(per_frame, 3),
                           "per_reference": round(per_frame / ref, 2),
                           "quiet_equivalent_s": round(per_frame / ref * QUIET_REFERENCE_S, 3)}
            if not args.no_rss:
                with_render, scene_only = peak_rss(size, args.threads)
                row.update(peak_rss_mib=round(with_render), scene_only_rss_mib=round(scene_only))
            print(json.dumps(row), flush=True)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()


if __name__ == "__main__":
    main()
