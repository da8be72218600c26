"""Plausible single faults in runtime/ and passes/: (file, old text, new text, why).

`old` must occur exactly once in `file`. Each is a mistake someone could make while editing:
a constant mistyped, a coefficient off by one, an attribute dropped or misread, a threshold
off by one unit, a bias of one unit of the last place.
"""

MUTANTS = [
    # --- approximation constants (runtime/approx.py)
    ("runtime/approx.py", "0.3603292692789629", "0.3604292692789629", "PUMA GeLU x^2 coefficient mistyped (+1e-4)"),
    ("runtime/approx.py", "-0.0819767021525476", "-0.0818767021525476", "PUMA SiLU low piece x coefficient mistyped"),
    ("runtime/approx.py", "breaks=(-4.0, -1.95, 3.0)", "breaks=(-4.0, -1.96, 3.0)", "PUMA GeLU middle break moved"),
    ("runtime/approx.py", "0.03166681890314486", "0.03116681890314486", "refit exp base x^4 coefficient mistyped"),
    ("runtime/approx.py", "-0.16034877990494079", "-0.16024877990494079", "refit GeLU cubic's x coefficient mistyped"),
    ("runtime/approx.py", "0.00026215324188428625", "0.00026315324188428625", "refit SiLU x^6 coefficient mistyped"),
    ("runtime/approx.py", "squarings=5, cut=14.0", "squarings=5, cut=16.0", "PUMA exp clip at -16 instead of -14"),
    # --- series and guesses (runtime/nonlinear.py)
    ("runtime/nonlinear.py", "RSQRT_SERIES = (32, 16, 12, 10, 9)", "RSQRT_SERIES = (32, 16, 12, 10, 8)",
     "rsqrt's last series coefficient 9 -> 8"),
    ("runtime/nonlinear.py", "y = _steps(party, below, 2.0 / (a + b), bits)", "y = _steps(party, below, 1.0 / b, bits)",
     "reciprocal guess from the interval's top instead of its middle"),
    ("runtime/nonlinear.py", "g2 = 2.0 / (a + b)", "g2 = 2.0 / (a + b + (b - a) / 8)", "rsqrt guess off-centre"),
    ("runtime/nonlinear.py", "b = np.maximum(np.concatenate([thresholds - ulp, [hi]]), a)",
     "b = np.maximum(np.concatenate([thresholds, [hi]]), a)", "guess intervals' top edge one ulp too high"),
    ("runtime/nonlinear.py", "[_encode(b, f) for b in breaks]", "[_encode(b, f) + np.uint64(1) for b in breaks]",
     "piecewise thresholds one ulp above their encoded breaks"),
    ("runtime/nonlinear.py", "_encode(plan.n * plan.eps, plan.sum_bits)", "_encode(plan.eps, plan.sum_bits)",
     "norm adds eps once to the row's sum of squares instead of n eps"),
    ("runtime/nonlinear.py", "first = np.argmax(keep, axis=-1)[..., None]", "first = np.zeros_like(keep[..., :1], dtype=np.int64)",
     "softmax fills masked scores from position 0, not from the first kept one"),
    ("runtime/nonlinear.py", "_encode(fit.cut_far, f)), bits=cmp_bits, drop=f + slack)",
     "_encode(fit.cut, f)), bits=cmp_bits, drop=f + slack)", "exp clips at the near cut with the far cut's slack"),
    # --- protocols
    ("runtime/arith.py", "y = ((c & _LOW63) >> d) - rc_a + (e_a << (U64(63) - d)) - (U64(1) << (U64(62) - d))\n    else:\n        r_b",
     "y = ((c & _LOW63) >> d) - rc_a + (e_a << (U64(63) - d)) - (U64(1) << (U64(62) - d)) + U64(1)\n    else:\n        r_b",
     "the products' truncation biased by one unit of the last place"),
    ("runtime/compare.py", "out = and_all(party, not_(party, xor(u, v)))", "out = not_(party, and_all(party, xor(u, v)))",
     "equality tests 'all bits differ' instead of 'all bits agree'"),
    # --- ONNX kernels (runtime/kernels.py)
    ("runtime/kernels.py", "c = scale(ctx, ctx.secret(c), np.asarray(beta)) if is_secret(c) else np.asarray(c) * beta",
     "c = c if is_secret(c) else np.asarray(c) * beta", "Gemm ignores beta for a secret C"),
    ("runtime/kernels.py", 'alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)',
     'alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("alpha", 1.0)', "Gemm reads alpha for beta"),
    ("runtime/kernels.py", 'eps = float(node.attrs.get("epsilon", 1e-5))', "eps = 1e-5", "LayerNorm kernel ignores epsilon"),
    ("runtime/kernels.py", 'eps = float(node.attrs.get("epsilon", 1e-6))', "eps = 1e-6", "RMSNorm kernel ignores epsilon"),
    ("runtime/kernels.py", 'if axis not in (-1, x.ndim - 1):', 'if axis not in (-1, x.ndim - 1, 0):',
     "Softmax kernel takes axis 0 as the last axis"),
    ("runtime/kernels.py", 'return a.transpose(node.attrs.get("perm"))', "return a.transpose()",
     "Transpose ignores perm"),
    ("runtime/kernels.py", 'b = ctx.secret(b).transpose() if is_secret(b) else np.asarray(b).T',
     'b = ctx.secret(b) if is_secret(b) else np.asarray(b).T', "Gemm ignores transB for a secret B"),
    # --- rewrite passes (passes/)
    ("passes/layer_norm.py", "return puma(op, \"LayerNorm\", x, scale, bias, epsilon=epsilon, axis=-1)",
     "return puma(op, \"LayerNorm\", x, scale, bias, axis=-1)", "LayerNorm rule drops epsilon"),
    ("passes/layer_norm.py", 'return puma(op, "LayerNorm", x, scale, bias, epsilon=scalar(eps), axis=-1)',
     'return puma(op, "LayerNorm", x, scale, bias, epsilon=1e-5, axis=-1)', "decomposed LayerNorm rule drops its eps"),
    ("passes/rms_norm.py", 'return puma(op, "RMSNorm", x, scale, epsilon=scalar(eps))',
     'return puma(op, "RMSNorm", x, scale, epsilon=1e-6)', "RMSNorm rule drops its eps"),
    ("passes/_common.py", "return axis == -1 or (rank is not None and axis == rank - 1)",
     "return axis < 0 or (rank is not None and axis == rank - 1)", "any negative axis taken for the last one"),
    ("passes/functions.py", 'upper = self.op("Where", self.op("Less", x, self.const(b2)), self.poly(x, fit.mid), x)',
     'upper = self.op("Where", self.op("LessOrEqual", x, self.const(b2)), self.poly(x, fit.mid), x)',
     "ONNX function's upper break closed on the wrong side"),
    ("passes/functions.py", 'e = b.op("Where", b.op("Less", d, b.const(-exp.cut)), b.const(0.0), y)',
     'e = b.op("Where", b.op("Less", d, b.const(-exp.cut_far)), b.const(0.0), y)', "ONNX softmax clips at the far cut"),
]
