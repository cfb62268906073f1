"""Forgetting: how much an adapted model lost of the source task, as held-out source-corpus loss.

After Biderman et al. 2024 ("LoRA Learns Less and Forgets Less"): the source-task score of the base,
against the same score with each adapter applied. The blocks are packed from source documents the
pretraining never saw (`source_heldout_blocks`), and scored by the pretraining script's own
`heldout_loss`, so the base's figure here matches the one in its `pretraining.json` up to the sample size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapterhub_lite.base import load_base
from adapterhub_lite.base.pretrain import heldout_loss, source_heldout_blocks
from adapterhub_lite.errors import TrainingError


def source_blocks(tokenizer, n_docs: int, seq_len: int = 128) -> torch.Tensor:
    """Packed held-out source-corpus blocks of ``seq_len`` tokens from ``n_docs`` unseen documents."""
    blocks = source_heldout_blocks(tokenizer, seq_len=seq_len, n_docs=n_docs)
    if len(blocks) == 0:
        raise TrainingError(f"{n_docs} source documents make no block of {seq_len} tokens", hint="use more")
    return blocks


def source_loss(model, blocks: torch.Tensor) -> float:
    """Held-out source-corpus loss of a model (a peft model scores with its adapter applied)."""
    was_training = model.training
    try:
        return heldout_loss(model, blocks)
    finally:
        model.train(was_training)


def adapter_source_loss(base_dir: Path, adapter_dir: Path, blocks: torch.Tensor) -> float:
    """Source loss of a saved PEFT adapter applied to the full-precision base it was trained on.

    QLoRA adapters are scored on the float32 base too: that is how they are served.
    """
    from peft import PeftModel

    model = load_base(base_dir, dtype=torch.float32, device="cpu")
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # peft raises several types for a mismatched adapter
        raise TrainingError(f"cannot load the adapter in {adapter_dir} on {base_dir}: {exc}") from exc
    return source_loss(model, blocks)
