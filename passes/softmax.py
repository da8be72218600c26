"""Attention softmax becomes `puma.Softmax(x, mask)`, mask a public boolean.

Exports add the attention mask to the scores as a float tensor that holds
-3.4e38 (BERT) or -inf (GPT-2, LLaMA) at masked positions: no fixed-point
encoding holds those. The rule folds `Softmax(Add(x, m), axis=-1)` with public
`m` into a softmax whose masked positions (mask False) weigh exactly 0:

- mask = m > MASK_FLOOR, computed on public values;
- if `m` is `Where(c, a, b)` with constant branches that are 0 or at most
  MASK_FLOOR (GPT-2, LLaMA), mask is `c` or `Not(c)` and nothing else changes;
  so it is for `Where(Cast(v, bool), low, v)` (BERT's `masked_fill` of the
  inverted mask), since v is 0 wherever the condition is False;
- otherwise the kept part of `m`, `Where(mask, m, 0)`, is still added to `x`
  (a public add, local to each party) so that any finite bias survives.

GPT-2's guard after the softmax, `Where(IsNaN(s), 0, s)`, goes with it: PUMA's
softmax never produces NaN on a row with a kept position.
A softmax without an additive mask gets an all-true mask.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from puma_onnx.passes._common import PumaRule, is_close, is_last_axis, puma, scalar

# Additive mask values at or below this mean "masked": far below any score
# (PUMA's exp is already 0 for x - max < -14), while a finite bias above it stays
# inside the comparisons' exact range (|x| < 2^29), so the max tree cannot wrap.
MASK_FLOOR = -(2.0**20)


def _is_last_axis(softmax_out: ir.Value) -> bool:
    node = softmax_out.producer()
    return is_last_axis(node.attributes.get_int("axis", -1), node.inputs[0])


def _is_masked_value(value: ir.Value) -> bool | None:
    """True for a constant at or below MASK_FLOOR, False for constant 0, None otherwise."""
    number = scalar(value)
    if number is None:
        return None
    if number <= MASK_FLOOR:
        return True
    return False if number == 0.0 else None


def _bool_source(value: ir.Value) -> ir.Value:
    """The value that a chain of Casts to bool starts from."""
    node = value.producer()
    while (
        node is not None
        and node.op_type == "Cast"
        and node.attributes.get_int("to") == ir.DataType.BOOL
    ):
        value = node.inputs[0]
        node = value.producer()
    return value


def _mask(op, m: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """The public boolean mask (True = keep) and the finite bias still to add, if any."""
    node = m.producer()
    if node is not None and node.op_type == "Where" and node.domain == "":
        cond, a, b = node.inputs
        a_masked, b_masked = _is_masked_value(a), _is_masked_value(b)
        if a_masked is not None and b_masked is not None and a_masked != b_masked:
            return (op.Not(cond) if a_masked else cond), None
        if a_masked and _bool_source(cond) is b:
            # Where(Cast(v, bool), low, v): v is 0 wherever the condition is False.
            return op.Not(cond), None
    dtype = (m.dtype or ir.DataType.FLOAT).numpy()
    keep = op.Greater(m, op.Constant(value=ir.tensor(np.array(MASK_FLOOR, dtype=dtype))))
    zero = op.Constant(value=ir.tensor(np.array(0, dtype=dtype)))
    return keep, op.Where(keep, m, zero)


class SoftmaxMasked(PumaRule):
    """Softmax(Add(x, m), axis=-1), x secret, m public."""

    guarded = False

    def pattern(self, op, x, m, zero):
        s = op.Softmax(op.Add(x, m), _outputs=["s"])
        return op.Where(op.IsNaN(s), zero, s) if self.guarded else s

    def check(self, context, x, m, s, zero=None, **_):
        if self.guarded and not is_close(zero, 0.0):
            return False
        return self.levels.is_secret(x) and self.levels.is_public(m) and _is_last_axis(s)

    def rewrite(self, op, x, m, **_):
        keep, bias = _mask(op, m)
        if bias is not None:
            x = op.Add(x, bias)
        return puma(op, "Softmax", x, keep)


class SoftmaxMaskedGuarded(SoftmaxMasked):
    """Where(IsNaN(s), 0, s) after the masked softmax s (GPT-2, LLaMA)."""

    guarded = True


class SoftmaxPlain(PumaRule):
    """Softmax(x, axis=-1) on secret x with no additive mask: every position is kept."""

    def pattern(self, op, x):
        return op.Softmax(x, _outputs=["s"])

    def check(self, context, x, s, **_):
        return self.levels.is_secret(x) and _is_last_axis(s)

    def rewrite(self, op, x, **_):
        keep = op.Constant(value=ir.tensor(np.array([True])))
        return puma(op, "Softmax", x, keep)


def rules(levels):
    return [
        SoftmaxMaskedGuarded.rule(levels, "softmax_masked_guarded"),
        SoftmaxMasked.rule(levels, "softmax_masked"),
        SoftmaxPlain.rule(levels, "softmax"),
    ]
