"""A run directory's files, and the checkpoint that makes a killed run resume to the bit.

```
RUN/config.json          what decides the result (options, caches, student, teacher)
RUN/metrics.jsonl        one JSON object per line: train windows and evaluations
RUN/checkpoints/last.pt  written atomically: model, optimizer, EMA, every rank's RNG (CPU, and its training
                         device's CUDA generator), position, metrics line count, log window (summed over ranks)
RUN/model.safetensors    the final student (ema.safetensors with `ema`)
RUN/results.json         written last: the run is finished
```

The checkpoint records where the run is (step, epoch, batch within the epoch), how many metrics lines it had
written, and the partial sums of the current logging window, so the resumed run writes the same lines an
uninterrupted run writes. It is loaded with `torch.load(weights_only=True)`: tensors and plain containers only.
Before the loop starts, the run directory's filesystem must have room for one (`check_checkpoint_room`): a run
should not train for an epoch to find out at its first save.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import AttncacheError, DiskFullError
from ..files import atomic_write_bytes, free_bytes

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
CHECKPOINT = "checkpoints/last.pt"
MODEL, EMA_MODEL = "model.safetensors", "ema.safetensors"


@dataclass
class Position:
    """Where a run is: optimizer steps done, the current epoch, and batches of it done."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


@dataclass
class Window:
    """The training losses logged as one metrics line: running sums since the last line.

    Steps hand in their loss tensors as they are (reading a GPU tensor's value waits for the device, which the
    step loop must not do); they are added, in step order, when a line or a checkpoint needs the sums."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    images: int = 0
    pending: list = field(default_factory=list, repr=False)

    def add(self, losses: dict, images: int) -> None:
        self.pending.append(losses)
        self.steps += 1
        self.images += images

    def folded(self) -> Window:
        for losses in self.pending:
            for k, v in losses.items():
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.pending = []
        return self

    def means(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.folded().sums.items()}

    def state(self) -> dict:
        self.folded()
        return {"sums": self.sums, "steps": self.steps, "images": self.images}


def save_checkpoint(run: Path, *, position: Position, window: Window, metrics_lines: int, steps_per_epoch: int,
                    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema, rng_cpu: list,
                    rng_cuda: list) -> None:
    """`rng_cpu`, `rng_cuda`: every rank's RNG states, in rank order (one entry without torchrun)."""
    state = {
        "position": asdict(position), "window": window.state(), "metrics_lines": metrics_lines,
        "steps_per_epoch": steps_per_epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "rng_cpu": rng_cpu, "rng_cuda": rng_cuda,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run / CHECKPOINT, buf.getvalue())


def checkpoint_bytes(model: torch.nn.Module, ema: bool) -> int:
    """What a checkpoint's tensors take: the model's state, AdamW's two moments per trainable parameter (in the
    parameter's dtype), and the EMA's copy of the state; the RNG states and pickling add a little."""
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state * (2 if ema else 1) + moments


def check_checkpoint_room(run: Path, model: torch.nn.Module, ema: bool) -> None:
    """Refuse to start a run whose filesystem cannot hold a checkpoint. A resumed run needs as much: the new one is
    written beside the old one, which is replaced only once the new one is whole."""
    needed, free = checkpoint_bytes(model, ema), free_bytes(run)
    if free < needed:
        raise DiskFullError(f"{run / CHECKPOINT}: a checkpoint of this run takes about {needed:,} bytes (model, "
                            f"optimizer{', EMA' if ema else ''}), its filesystem has {free:,} free; free some space "
                            "or choose another `out`")


def device_rng_state(device: torch.device) -> list[torch.Tensor]:
    """The CUDA generator state of the training device, as a one-element list ([] for a CPU run): the only CUDA
    generator a rank draws from (drop-path, dropout). Saving every visible GPU's state, as checkpoints did before,
    had each rank touch every GPU, and a run could not resume where fewer GPUs are visible."""
    if device.type != "cuda":
        return []
    return [torch.cuda.get_rng_state(device)]


def restore_device_rng(states: list[torch.Tensor], device: torch.device) -> None:
    """Set the training device's CUDA generator from `device_rng_state`'s list; a list of every visible GPU's
    state (checkpoints written before) gives the training device's entry. Nothing to do for CPU runs."""
    if device.type != "cuda" or not states:
        return
    index = device.index or 0
    if len(states) > 1 and index >= len(states):
        raise AttncacheError(f"checkpoint holds the CUDA generators of {len(states)} GPUs, this run trains on "
                             f"{device}: resume with the GPUs it was written with")
    torch.cuda.set_rng_state(states[0] if len(states) == 1 else states[index], device)


def load_checkpoint(run: Path, steps_per_epoch: int, world_size: int = 1) -> dict:
    path = run / CHECKPOINT
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        position, window = Position(**state["position"]), Window(**state["window"])
    except Exception as exc:  # noqa: BLE001
        raise AttncacheError(f"{path}: unreadable checkpoint ({exc}); delete it to restart the run") from exc
    if isinstance(state.get("rng_cpu"), torch.Tensor):  # written before checkpoints held one state per rank
        state["rng_cpu"], state["rng_cuda"] = [state["rng_cpu"]], [state["rng_cuda"]]
    if not isinstance(state.get("rng_cpu"), list) or len(state["rng_cpu"]) != world_size:
        ranks = len(state["rng_cpu"]) if isinstance(state.get("rng_cpu"), list) else 1
        raise AttncacheError(f"{path}: written by a run of {ranks} process(es); resume it with the same number "
                             f"(this one has {world_size}): each rank's drop-path randomness is in it")
    if state["steps_per_epoch"] != steps_per_epoch:
        raise AttncacheError(f"{path}: written with {state['steps_per_epoch']} steps per epoch, this run has "
                             f"{steps_per_epoch}; the data changed under the run: choose another `out`")
    return {**state, "position": position, "window": window}
