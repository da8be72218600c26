"""LayerNorm becomes `puma.LayerNorm(x, scale, bias; epsilon, axis=-1)`.

Two exported forms: the single LayerNormalization op (opset 17 on) and the
decomposition of opset-14 exports,
    d = x - ReduceMean(x); y = d / Sqrt(ReduceMean(d^2) + eps) * scale + bias.
Both normalise over the last axis only; other axes are left alone (and reported
by the secrecy check if they act on secret data).
"""

from __future__ import annotations

from puma_onnx.passes._common import PumaRule, is_last_axis, puma, reduces_last_axis, scalar


class LayerNormOp(PumaRule):
    """LayerNormalization(x, scale, bias, axis=-1) with only its first output used."""

    def pattern(self, op, x, scale, bias):
        return op.LayerNormalization(x, scale, bias, _outputs=["y"])

    def check(self, context, x, y, **_):
        node = y.producer()
        if any(out.uses() for out in node.outputs[1:]):
            return False
        return self.levels.is_secret(x) and is_last_axis(node.attributes.get_int("axis", -1), x)

    def rewrite(self, op, x, scale, bias, y):
        epsilon = y.producer().attributes.get_float("epsilon", 1e-5)
        return puma(op, "LayerNorm", x, scale, bias, epsilon=epsilon, axis=-1)


class LayerNormDecomposed(PumaRule):
    """The opset-14 form: ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div, Mul, Add."""

    def pattern(self, op, x, two, eps, scale, bias):
        d = op.Sub(x, op.ReduceMean(x, _allow_other_inputs=True, _outputs=["mean"]))
        var = op.ReduceMean(op.Pow(d, two), _allow_other_inputs=True, _outputs=["var"])
        normed = op.Div(d, op.Sqrt(op.Add(var, eps)))
        return op.Add(op.Mul(normed, scale), bias)

    def check(self, context, x, mean, var, eps, two, **_):
        return (
            self.levels.is_secret(x)
            and scalar(two) == 2.0
            and scalar(eps) is not None
            and reduces_last_axis(mean)
            and reduces_last_axis(var)
        )

    def rewrite(self, op, x, eps, scale, bias, **_):
        return puma(op, "LayerNorm", x, scale, bias, epsilon=scalar(eps), axis=-1)


def rules(levels):
    return [
        LayerNormOp.rule(levels, "layer_norm"),
        LayerNormDecomposed.rule(levels, "layer_norm_decomposed"),
    ]
