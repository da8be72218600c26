"""GeLU in its exported forms becomes `puma.Gelu` (PUMA's piecewise polynomial).

- Erf form (BERT, RoBERTa): x * (1 + erf(x / sqrt 2)) * 0.5, with the 0.5
  applied last or first (`x * 0.5 * (1 + erf(...))`);
- tanh form as Optimum exports GPT-2 (onnxscript's stock rule expects another
  order): x * 0.5 * (1 + tanh(0.7978846 * (x + 0.044715 * x^3)));
- the single Gelu op of opset 20, approximate "none" or "tanh".

Every rule fires only on secret input: a public GeLU stays exact.
"""

from __future__ import annotations

import math

from puma_onnx.passes._common import PumaRule, is_close, puma

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GeluErf(PumaRule):
    """x * (1 + erf(x / sqrt 2)) * 0.5."""

    def pattern(self, op, x, root2, one, half):
        return op.Mul(op.Mul(x, op.Add(op.Erf(op.Div(x, root2)), one)), half)

    def check(self, context, x, root2, one, half, **_):
        return (
            self.levels.is_secret(x)
            and is_close(root2, _SQRT_2)
            and is_close(one, 1.0)
            and is_close(half, 0.5)
        )

    def rewrite(self, op, x, **_):
        return puma(op, "Gelu", x)


class GeluErfHalfFirst(GeluErf):
    """x * 0.5 * (1 + erf(x / sqrt 2))."""

    def pattern(self, op, x, root2, one, half):
        return op.Mul(op.Mul(x, half), op.Add(op.Erf(op.Div(x, root2)), one))


class GeluTanh(PumaRule):
    """x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), GPT-2's order."""

    def pattern(self, op, x, half, three, cubic, scale, one):
        inner = op.Add(x, op.Mul(op.Pow(x, three), cubic))
        return op.Mul(op.Mul(x, half), op.Add(op.Tanh(op.Mul(inner, scale)), one))

    def check(self, context, x, half, three, cubic, scale, one, **_):
        return (
            self.levels.is_secret(x)
            and is_close(half, 0.5)
            and is_close(three, 3.0)
            and is_close(cubic, 0.044715)
            and is_close(scale, _SQRT_2_OVER_PI)
            and is_close(one, 1.0)
        )

    def rewrite(self, op, x, **_):
        return puma(op, "Gelu", x)


class GeluOp(PumaRule):
    """The Gelu op of opset 20, either `approximate`."""

    def pattern(self, op, x):
        return op.Gelu(x)

    def check(self, context, x, **_):
        return self.levels.is_secret(x)

    def rewrite(self, op, x, **_):
        return puma(op, "Gelu", x)


def rules(levels):
    return [
        GeluErf.rule(levels, "gelu_erf"),
        GeluErfHalfFirst.rule(levels, "gelu_erf_half_first"),
        GeluTanh.rule(levels, "gelu_tanh"),
        GeluOp.rule(levels, "gelu_op"),
    ]
