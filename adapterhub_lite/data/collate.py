"""Padding a list of `Features` into a batch of tensors."""

from __future__ import annotations

import torch

from adapterhub_lite.data.tokenize import IGNORE_INDEX, Features


def collate(batch: list[Features], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch: ``input_ids``, ``attention_mask``, ``labels``."""
    width = max(len(f.input_ids) for f in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, f in enumerate(batch):
        n = len(f.input_ids)
        input_ids[row, :n] = torch.tensor(f.input_ids)
        labels[row, :n] = torch.tensor(f.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
