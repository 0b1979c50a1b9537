"""Training checkpoints: everything a resumed run needs to continue exactly.

One file per saved step, ``checkpoints/step_00000120.pt``, written to a temporary name and
renamed (atomic on POSIX), so a kill leaves either the old set or the new file, never half a
file. Contents: step, recipe, full (unsharded) model and optimizer state dicts keyed by
parameter name (so DDP, FSDP and single-process runs read each other's), the data position,
and the RNG states of every rank. The learning rate and λ are pure functions of the step.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from . import distributed as dist

class TrainingError(RuntimeError):
    """A run cannot start or resume as asked; the message says why and what to do."""


CHECKPOINT_RE = re.compile(r"step_(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_RE.search(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, optimizer, recipe: dict, extra: dict,
                    keep: int = 2) -> Path | None:
    """Collective under torch.distributed (every rank must call it); rank 0 writes."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    rngs = dist.all_gather_objects(rng_state())
    path = None
    if dist.is_main():
        path = checkpoint_path(run_dir, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"step": step, "recipe": recipe, "model": model_state, "optimizer": optim_state,
                    "rng": rngs, "world_size": dist.world_size(), **extra}, tmp)
        os.replace(tmp, path)
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink()
    dist.barrier()
    return path


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Restore model, optimizer and this rank's RNG state; return the checkpoint's other fields."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    rngs = state.pop("rng")
    if len(rngs) != dist.world_size():
        raise TrainingError(f"checkpoint {path} was written by {len(rngs)} processes, this run has "
                            f"{dist.world_size()}; resume with the same --nproc_per_node")
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=state.pop("model"),
                   optim_state_dict=state.pop("optimizer"), options=options)
    set_rng_state(rngs[dist.rank()])
    return state
