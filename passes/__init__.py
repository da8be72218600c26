"""Graph passes: turn an exported Transformer into the graph the secure executor runs.

    from puma_onnx.passes import rewrite
    rewritten, report = rewrite(onnx.load("model.onnx"))
    print(report.table())

Every nonlinear op on secret data becomes an op of the custom domain `puma`
(Gelu, Softmax, LayerNorm, RMSNorm, SiLU, Embedding) whose plaintext definition,
PUMA's approximation, travels inside the model as an ONNX function. The
secrecy analysis then checks that every op left on secret data has a secure
kernel. One module per rule family; `secrecy` and `functions` hold the analysis
and the function definitions.
"""

from puma_onnx.passes._pipeline import (
    RewriteReport,
    UnsupportedSecretOps,
    analyze,
    rewrite,
    rewrite_file,
)
from puma_onnx.passes.secrecy import PUBLIC_INPUTS, SECURE_OPS

__all__ = [
    "PUBLIC_INPUTS",
    "SECURE_OPS",
    "RewriteReport",
    "UnsupportedSecretOps",
    "analyze",
    "rewrite",
    "rewrite_file",
]
