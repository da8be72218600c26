"""Several tokenized texts as one batch, padded to the longest (used by `run` and by the service's client)."""

from __future__ import annotations

import numpy as np


def pad_encodings(rows, left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, attention mask, token types), each (B, S), from tokenizer encodings: padded to the longest
    with id 0 and mask 0, on the right, or on the left (`left`, a decoder: so that the last position,
    the one the LM head reads, is every row's own)."""
    width = max(len(r.ids) for r in rows)
    out = np.zeros((3, len(rows), width), dtype=np.int64)  # ids, mask, token types
    for b, r in enumerate(rows):
        at = slice(width - len(r.ids), width) if left else slice(0, len(r.ids))
        out[:, b, at] = [r.ids, r.attention_mask, r.type_ids]
    return out[0], out[1], out[2]
