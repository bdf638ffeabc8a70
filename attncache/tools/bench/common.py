"""What the benchmarks share: a scratch directory that never costs a user a file, best-of-N timing, the device's
name for the report, training views rendered as a cache stores them, and the divergence of a map row from its
exact reference (the KL, extended to fp16 rows that do not sum to one exactly)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from ...errors import AttncacheError
from ...files import atomic_write_json
from ...sources import open_image
from ...views import ViewPolicy, render


class BenchDir:
    """A benchmark's scratch directory: created empty, or one this benchmark made before (it holds the marker
    file); anything else is refused, and only the benchmark's own sub-directories are ever removed."""

    def __init__(self, out: str | Path, marker: str, owned: tuple[str, ...]):
        self.out, self.marker, self.owned = Path(out), marker, owned
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir())
                                                            and not (self.out / marker).is_file())):
            raise AttncacheError(f"`out` {self.out}: not empty and not an attncache benchmark directory; "
                                 "choose an empty or new directory")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / marker, {"status": "running"})

    def fresh(self, name: str) -> Path:
        assert name in self.owned
        path = self.out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        return path

    def finish(self, result: dict, keep: tuple[str, ...] = ()) -> None:
        for name in self.owned:
            path = self.out / name
            if name not in keep and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
        atomic_write_json(self.out / self.marker, result)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_best(fn, repeats: int):
    """(the last call's result, the best seconds of `repeats` calls of `fn`, at least one)."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def best_rate(fn, n: int, repeats: int) -> float:
    """Items/s of `fn` over `n` items, the best of `repeats` calls."""
    return n / timed_best(fn, repeats)[1]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def view_renderer(source, spec, views: int):
    """(jobs, render): one (image index, view) job per training view of every image of `source` (view-major, as a
    cache stores them), and `render(job, image bytes)` -> that view's pixels at the teacher's geometry."""
    samples = source.scan()
    policy = ViewPolicy(views_per_image=views)
    drawn = [policy.draw(s.key, s.width, s.height, spec.image_size) for s in samples]

    def one(job: tuple[int, int], data: bytes) -> torch.Tensor:
        i, v = job
        return render(open_image(data, samples[i].key), drawn[i][v], spec.image_size, spec.interpolation,
                      spec.mean, spec.std)

    return [(i, v) for v in range(views) for i in range(len(samples))], one


def rendered_views(source, spec, views: int) -> torch.Tensor:
    """`views` training views of every image of `source`, rendered at the teacher's geometry."""
    jobs, one = view_renderer(source, spec, views)
    images = dict(source.iter_bytes(range(len(jobs) // views)))
    return torch.stack([one(job, images[job[0]]) for job in jobs])


def row_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, in float64: Σ_j p log(p/q) − p + q, the KL(p ‖ q) extended to rows that do not sum to one exactly
    (fp16 maps). Every term is ≥ 0 by construction (x log x − x + 1 ≥ 0, computed through log1p so that rows equal
    up to round-off give tiny positive terms, never negative ones). Entries below 1e-30 count as 1e-30."""
    p, q = p.double().clamp_min(1e-30), q.double().clamp_min(1e-30)
    r, delta = p / q, (p - q) / q
    near = (1 + delta) * torch.log1p(delta) - delta  # r = 1 + delta close to 1: no cancellation
    far = torch.xlogy(r, r) - r + 1  # r far from 1 (r = 0 included): nothing cancels
    return (q * torch.where(delta.abs() < 0.5, near, far)).sum(-1)
