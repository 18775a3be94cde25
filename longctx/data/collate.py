"""Batching rows for a causal LM: packed rows stacked with their position_ids, other rows right-padded."""

from __future__ import annotations

import torch


def collate(features: list[dict], pad_token_id: int | None, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """Batch rows for a causal LM.

    Rows with ``position_ids`` (packed documents or conversations) are stacked with their position_ids and no
    attention_mask, so transformers keeps attention inside each document. Other rows are right-padded to the
    longest row (rounded up to ``pad_to_multiple_of``): input_ids with ``pad_token_id``, labels with -100,
    attention_mask 1 on tokens and 0 on padding; rows of equal length are stacked as they are.
    """
    if not features:
        raise ValueError("collate: empty batch")
    if "position_ids" in features[0]:
        return {key: torch.tensor([f[key] for f in features], dtype=torch.long)
                for key in ("input_ids", "labels", "position_ids")}
    lengths = [len(f["input_ids"]) for f in features]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    if width != min(lengths) and pad_token_id is None:
        raise ValueError("collate: rows have different lengths but pad_token_id is None")
    input_ids = torch.full((len(features), width), pad_token_id if pad_token_id is not None else 0, dtype=torch.long)
    labels = torch.full((len(features), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = lengths[i]
        input_ids[i, :n] = torch.as_tensor(f["input_ids"])
        labels[i, :n] = torch.as_tensor(f.get("labels", f["input_ids"]))
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class DataCollator:
    """``collate`` as a callable for ``Trainer(data_collator=...)``."""

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return collate(features, self.pad_token_id, self.pad_to_multiple_of)
