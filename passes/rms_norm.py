"""RMSNorm (LLaMA) becomes `puma.RMSNorm(x, scale; epsilon)`.

As Optimum exports it:
    r = 1 / Sqrt(ReduceMean(x^2, axis=-1) + eps); y = scale * Cast(x * r)
where the Cast is float to float (the model's compute type equals its storage
type here); a form without the Cast matches too. The Cast in front of x stays:
its output also feeds the residual connection.
"""

from __future__ import annotations

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


def rules(levels):
    return [RMSNormCast.rule(levels, "rms_norm_cast"), RMSNorm.rule(levels, "rms_norm")]
