"""RoBERTa's position ids come from the public attention mask, not from the secret ids.

RoBERTa exports compute `mask = Not(Equal(input_ids, padding_idx))`, then
position ids as CumSum(mask) * mask + padding_idx. Only the padding test
touches secret data, so the rule replaces `Not(Equal(ids, pad))` by
`Cast(attention_mask, bool)`; the CumSum and the rest then run on public values.

Assumption: attention_mask is 1 exactly at the non-pad tokens (what every
Hugging Face tokenizer produces). Under it the rewrite is exact; it reveals
nothing beyond the mask, which is public anyway. The alternative, a secure
equality test per token and a secure CumSum, would cost comparisons and
rounds for a value the parties already know.
"""

from __future__ import annotations

import onnx_ir as ir

from puma_onnx.passes._common import PumaRule, scalar

ATTENTION_MASK = "attention_mask"


class PaddingFromAttentionMask(PumaRule):
    """Not(Equal(ids, pad)) on secret integer ids -> Cast(attention_mask, bool)."""

    def pattern(self, op, ids, pad):
        return op.Not(op.Equal(ids, pad))

    def check(self, context, ids, pad, **_):
        self.mask = next((v for v in context.model.graph.inputs if v.name == ATTENTION_MASK), None)
        return (
            self.mask is not None
            and self.levels.is_secret(ids)
            and scalar(pad) is not None
            and ids.shape is not None
            and ids.shape == self.mask.shape
        )

    def rewrite(self, op, **_):
        return op.Cast(self.mask, to=ir.DataType.BOOL)


def rules(levels):
    return [PaddingFromAttentionMask.rule(levels, "position_ids_from_mask")]
