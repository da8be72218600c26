"""SiLU (LLaMA's MLP gate) becomes `puma.SiLU(x)` (PUMA's piecewise polynomial).

Exported as x * Sigmoid(x); the opset-22 Swish form is not produced by the
exports this project targets.
"""

from __future__ import annotations

from puma_onnx.passes._common import PumaRule, puma


class SiLU(PumaRule):
    def pattern(self, op, x):
        return op.Mul(x, op.Sigmoid(x))

    def check(self, context, x, **_):
        return self.levels.is_secret(x)

    def rewrite(self, op, x):
        return puma(op, "SiLU", x)


def rules(levels):
    return [SiLU.rule(levels, "silu")]
