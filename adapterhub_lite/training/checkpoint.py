"""Checkpoints: the adapter weights plus everything needed to continue exactly where training stopped.

``checkpoints/step-000040/`` holds ``adapter_model.safetensors`` (the LoRA weights), ``trainer_state.pt``
(optimizer, scheduler and the RNG states of every process) and ``state.json`` (step, loss history, the
recipe settings and process count it was made with). Its files are written and fsynced in a temporary
directory that is then renamed, so a crash or a killed process never leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterhub_lite.atomic import fsync_dir
from adapterhub_lite.errors import TrainingError


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_files(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(folder)


def save_checkpoint(
    ckpt_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int, rng: list[dict]
) -> Path:
    """Write ``ckpt_dir/step-NNNNNN`` atomically and keep only the newest ``keep`` checkpoints.

    ``rng`` holds the RNG states of every process, by rank (one process: one state).
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:06d}"
    tmp = ckpt_dir / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # save_embedding_layers=False: "auto" would look the base's name up on a model hub.
    peft_state = get_peft_model_state_dict(model, save_embedding_layers=False)
    weights = {k: v.detach().contiguous().cpu() for k, v in peft_state.items()}
    save_file(weights, tmp / "adapter_model.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
        tmp / "trainer_state.pt",
    )
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1) + "\n")
    _fsync_files(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(ckpt_dir)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for d in ckpt_dir.glob("step-*"):
            if (d / "state.json").is_file() and (d / "trainer_state.pt").is_file():
                state = json.loads((d / "state.json").read_text())
                out.append(Checkpoint(d, int(state["step"]), state))
    return sorted(out, key=lambda c: c.step)


def load_checkpoint(ckpt: Checkpoint, model, optimizer, scheduler, rank: int = 0) -> None:
    """Restore adapter weights, optimizer, scheduler and this process's RNG states from a checkpoint.

    A checkpoint made by another number of processes gives rank r the state of rank r modulo that number
    (only the dropout masks depend on it).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(ckpt.path / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise TrainingError(f"{ckpt.path}: adapter weights do not fit the model ({missing[:3]}...)")
        trainer_state = torch.load(ckpt.path / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(
            f"cannot resume from {ckpt.path}: {exc}",
            hint="delete that checkpoint to resume from an older one",
        ) from exc
    rng = trainer_state["rng"]
    set_rng_state(rng[rank % len(rng)] if isinstance(rng, list) else rng)
