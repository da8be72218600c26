"""RMSNorm (LLaMA), and L2 normalisation, become `puma.RMSNorm(x, scale; epsilon)`.

As Optimum exports it:
    r = 1 / Sqrt(ReduceMean(x^2, axis=-1) + eps); y = scale * Cast(x * r)
where the Cast is float to float (the model's compute type equals its storage
type here); a form without the Cast matches too. The Cast in front of x stays:
its output also feeds the residual connection.

Sentence-transformers exports (MiniLM) end with an L2 normalisation,
    x / Expand(Clip(ReduceL2(x, axis=-1), min=eps), Shape(x)),
which is an RMSNorm over the n features of the last axis:
    x / max(|x|, eps) = x / sqrt(mean(x^2) + eps^2 / n) * (1 / sqrt n)
whenever |x| > eps (and both are ~0 otherwise), so it needs no kernel of its own.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from puma_onnx.passes._common import PumaRule, is_close, puma, reduces_last_axis, scalar


class RMSNorm(PumaRule):
    with_cast = False

    def pattern(self, op, x, two, eps, one, scale):
        ms = op.ReduceMean(op.Pow(x, two), _allow_other_inputs=True, _outputs=["ms"])
        normed = op.Mul(x, op.Div(one, op.Sqrt(op.Add(ms, eps))))
        if self.with_cast:
            normed = op.Cast(normed, _outputs=["cast"])
        return op.Mul(scale, normed)

    def check(self, context, x, ms, two, eps, one, cast=None, **_):
        return (
            self.levels.is_secret(x)
            and (cast is None or cast.dtype == x.dtype)
            and scalar(two) == 2.0
            and is_close(one, 1.0)
            and scalar(eps) is not None
            and reduces_last_axis(ms)
        )

    def rewrite(self, op, x, eps, scale, **_):
        return puma(op, "RMSNorm", x, scale, epsilon=scalar(eps))


class RMSNormCast(RMSNorm):
    with_cast = True


class L2Normalize(PumaRule):
    def pattern(self, op, x, eps, shape):
        norm = op.ReduceL2(x, _allow_other_inputs=True, _outputs=["norm"])
        clipped = op.Clip(norm, eps, _allow_other_inputs=True, _outputs=["clipped"])
        return op.Div(x, op.Expand(clipped, shape))

    def check(self, context, x, norm, clipped, eps, **_):
        clip = clipped.producer()
        has_max = len(clip.inputs) > 2 and clip.inputs[2] is not None
        return (
            self.levels.is_secret(x)
            and not has_max
            and scalar(eps) is not None
            and reduces_last_axis(norm)
            and x.shape is not None
            and isinstance(x.shape[-1], int)
        )

    def rewrite(self, op, x, eps, **_):
        n = x.shape[-1]
        scale = np.full((n,), 1.0 / math.sqrt(n), dtype=x.dtype.numpy())
        return puma(
            op, "RMSNorm", x, op.Constant(value=ir.tensor(scale)), epsilon=scalar(eps) ** 2 / n
        )


def rules(levels):
    return [
        RMSNormCast.rule(levels, "rms_norm_cast"),
        RMSNorm.rule(levels, "rms_norm"),
        L2Normalize.rule(levels, "l2_normalize"),
    ]
