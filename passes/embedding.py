"""An embedding lookup on secret ids becomes `puma.Embedding(table, ids)`.

Only a Gather whose data is a 2-D initializer (a weight table) and whose
indices are secret: the many Gathers on shapes stay as they are, and so do
lookups with public indices (BERT's and GPT-2's position embeddings), which the
executor does locally on the shares of the table without a one-hot product.
"""

from __future__ import annotations

from puma_onnx.passes._common import PumaRule, puma
from puma_onnx.passes.secrecy import is_weight


class Embedding(PumaRule):
    def pattern(self, op, table, ids):
        return op.Gather(table, ids, _outputs=["rows"])

    def check(self, context, table, ids, rows, **_):
        return (
            rows.producer().attributes.get_int("axis", 0) == 0
            and is_weight(table)
            and table.shape is not None
            and table.shape.rank() == 2
            and self.levels.is_secret(ids)
        )

    def rewrite(self, op, table, ids, **_):
        return puma(op, "Embedding", table, ids)


def rules(levels):
    return [Embedding.rule(levels, "embedding")]
