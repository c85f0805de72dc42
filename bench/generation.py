"""Cost of each tier: load time, seconds per image at a few sizes and step counts, peak memory;
and of the quality worker's CLIP scoring, per image.

Models load through the workers' own code (``workers.services.pipelines``), so the numbers are
those of a
worker process. Without ``--models`` (or ``--edge``/``--cloud``/``--clip``) the tiny models are
built into a temporary folder: their numbers measure the framework's overhead, not a real
model's. Peak memory is the device's peak allocation on CUDA and the process's peak resident
set on a CPU (which only grows, so a row shows the peak up to and including it).

Run: ``python -m bench.generation [--device cuda] [--sizes 64x64 256x256] [--steps 2 20]``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from routing.quality import ContrastiveQualityScorer
from workers.offline.tiny_models import make_tiny
from workers.services.pipelines import generate, load_clip, load_pipeline

PROMPT = "three blue birds sitting on a wire above two yellow taxis"


@dataclass(frozen=True)
class Row:
    tier: str
    load_s: float
    size: str
    steps: int | None
    seconds: list[float]
    peak_mib: float

    def cells(self) -> list[str]:
        median = statistics.median(self.seconds)
        spread = max(self.seconds) - min(self.seconds)
        return [
            self.tier,
            f"{self.load_s:.2f}",
            self.size,
            "-" if self.steps is None else str(self.steps),
            f"{median * 1000:.1f}",
            f"{spread * 1000:.1f}",
            f"{self.peak_mib:.0f}",
        ]


HEADER = ["tier", "load s", "size", "steps", "ms/image", "spread ms", "peak MiB"]


def parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: str, out: list[float]) -> Iterator[None]:
    """Appends the peak memory in MiB of the block (CUDA) or of the process so far (CPU)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.startswith("cuda"):
        out.append(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        # ru_maxrss is in KiB on Linux.
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def timed(run: Callable[[], object], device: str, repeats: int) -> list[float]:
    run()  # warm-up: kernels, caches, lazy initialisation
    seconds = []
    for _ in range(repeats):
        synchronise(device)
        start = time.perf_counter()
        run()
        synchronise(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_tier(
    tier: str, path: str, args: argparse.Namespace, sizes: list[tuple[int, int]]
) -> list[Row]:
    start = time.perf_counter()
    pipe = load_pipeline(path, device=args.device, torch_dtype=args.dtype)
    synchronise(args.device)
    load_s = time.perf_counter() - start
    rows = []
    for width, height in sizes:
        for steps in args.steps:
            peak: list[float] = []
            with peak_memory(args.device, peak):
                run = partial(
                    generate, pipe, PROMPT, width=width, height=height, steps=steps, seed=0
                )
                seconds = timed(run, args.device, args.repeats)
            rows.append(Row(tier, load_s, f"{width}x{height}", steps, seconds, peak[0]))
    return rows


def bench_clip(path: str, args: argparse.Namespace, sizes: list[tuple[int, int]]) -> list[Row]:
    start = time.perf_counter()
    model, processor = load_clip(path, device=args.device)
    scorer = ContrastiveQualityScorer(model, processor, device=args.device)
    synchronise(args.device)
    load_s = time.perf_counter() - start
    rows = []
    for width, height in sizes:
        images = [Image.new("RGB", (width, height), (40 * i, 90, 160)) for i in range(args.batch)]
        peak: list[float] = []
        with peak_memory(args.device, peak):
            seconds = timed(partial(scorer.score, images), args.device, args.repeats)
        per_image = [s / len(images) for s in seconds]
        rows.append(Row("clip", load_s, f"{width}x{height}", None, per_image, peak[0]))
    return rows


def print_table(rows: list[Row]) -> None:
    table = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADER))]
    for line in table:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder with edge/, cloud/ and clip/")
    parser.add_argument("--edge", help="edge model path or hub id (overrides --models)")
    parser.add_argument("--cloud", help="cloud model path or hub id (overrides --models)")
    parser.add_argument("--clip", help="CLIP model path or hub id (overrides --models)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="pipelines' dtype, e.g. float16")
    parser.add_argument("--sizes", nargs="+", default=[(64, 64), (128, 128)], type=parse_size)
    parser.add_argument("--steps", nargs="+", default=[2, 8], type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="images per CLIP scoring call")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-models-") as scratch:
        models = args.models
        if models is None and not (args.edge and args.cloud and args.clip):
            models = Path(scratch)
            make_tiny(models)
        paths = {
            tier: getattr(args, tier) or str(Path(models) / tier)
            for tier in ("edge", "cloud", "clip")
        }
        device_name = (
            torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
        )
        print(
            f"device {args.device} ({device_name}), dtype {args.dtype}, torch threads "
            f"{torch.get_num_threads()}, median of {args.repeats} after one warm-up",
            file=sys.stderr,
        )
        rows = []
        for tier in ("edge", "cloud"):
            rows += bench_tier(tier, paths[tier], args, args.sizes)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the tier's pipeline is gone with bench_tier's frame
        rows += bench_clip(paths["clip"], args, args.sizes)
    print_table(rows)


if __name__ == "__main__":
    main()
