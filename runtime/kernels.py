"""ONNX op kernels on secret values: one function per op, found through `KERNELS`.

A kernel runs when at least one input of a node is secret; nodes on public
values only run in plaintext (see `executor.PublicOps`). Inputs arrive as:
  np.ndarray   public (every rank holds the same array),
  AShare       secret, fixed point with `party.fxp.frac_bits` fractional bits,
  WeightShare  a secret weight, kept compact until read (weights.py),
  Scaled       a secret times a public scalar, not yet multiplied out,
  Unscaled     a product not yet truncated (the last node before a graph output),
  Softmaxed    a softmax before its last product, which a MatMul may take after its own,
  Held         a secret held 2-of-2 by ranks 1 and 2 before its reshare, which a prepared weight product takes so,
  Private      a client input only its owner rank knows (token ids).
  SharedIds    token ids a client outside the ranks sent as shares of their one-hot rows.
`Context.secret` turns any secret kind into an AShare.
Shape-only ops (Shape, Size) give public outputs. Every other kernel returns
secret outputs. The costs are those of the protocols each kernel calls; shape
kernels are local and free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import approx, arith, embedding, nonlinear, prepared
from .nonlinear import NormDomain
from .party import Party
from .prepared import Prepared, Product
from .ring import ring_matmul
from .shares import AShare, concat, split
from .weights import WeightShare, matmul_part


@dataclass
class Private:
    """A value only rank `owner` holds in plaintext (value is None elsewhere); its shape is public."""

    owner: int
    shape: tuple[int, ...]
    value: np.ndarray | None
    shared: AShare | None = None  # its secret share, once an op needed one


@dataclass
class SharedIds:
    """Token ids (public shape) that clients outside the ranks sent as replicated shares of their one-hot
    rows (onehot.py). A batch may hold several queries: `sources` pairs each one's share with the flat
    positions its rows take; the other positions are padding."""

    shape: tuple[int, ...]
    sources: list


@dataclass
class Node:
    """An ONNX node with its attributes read once."""

    name: str
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict

    @property
    def key(self) -> tuple[str, str]:
        return (self.domain, self.op_type)

    def describe(self) -> str:
        op = f"{self.domain}.{self.op_type}" if self.domain else self.op_type
        return f"node {self.name!r} ({op})"


# Ops that relabel a shape and keep the row-major order of the elements: they pass SharedIds through.
FLAT_ORDER = frozenset(("", op) for op in ("Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"))
# Ops that move or retype values without arithmetic: on a private value (the
# client's ids) its owner applies them in the clear and the value stays private.
PRIVATE_LOCAL = frozenset(
    ("", op) for op in ("Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Slice", "Transpose")
)


@dataclass
class Scaled:
    """A secret times a public scalar, not yet multiplied out.

    Attention multiplies q and k by 1/sqrt(sqrt(d)) each before q @ k^T; when the
    factors of a product's operands multiply to 2^-k, the product's own truncation
    takes k more bits and the two scalings cost nothing (BERT: 0.1 GB less).
    Any other consumer multiplies it out (`Context.secret`).
    """

    share: AShare
    factor: float
    product: AShare | None = None  # the multiplied-out share, once an op needed it

    @property
    def shape(self) -> tuple[int, ...]:
        return self.share.shape


@dataclass
class Unscaled:
    """A secret at scale f + bits: a product whose truncation waits for a consumer (`Context.secret`).

    The executor asks for it (`Context.final`) from a product node whose outputs are graph outputs:
    there the client opens it and rescales in the clear. A probabilistic truncation as the last step
    before the opening would let the client tell which way it rounded (it knows its own mask word,
    or r as the dealer), which the output alone does not say. So the declared output is the
    untruncated product instead: the client learns its f more fractional bits by design, nothing
    beyond it, and the node saves the truncation's round and bytes (MatMul:
    8 B/elem per rank in one round instead of 14.7 in two).
    """

    share: AShare
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        return self.share.shape


@dataclass
class Softmaxed:
    """A softmax before its last product (`nonlinear.SoftmaxRows`: e and each row's 1/sum).

    Attention multiplies the softmax by v next. Where v's heads are narrower than the kept keys
    per query (BERT-base: 64 against 128), the MatMul takes (e @ v) times 1/sum instead
    (`SoftmaxRows.times`): one product per output element instead of one per score. Any other
    consumer multiplies it out (`Context.secret`), once.
    """

    rows: nonlinear.SoftmaxRows
    product: AShare | None = None  # the softmax itself, once an op needed it

    @property
    def shape(self) -> tuple[int, ...]:
        return self.rows.shape


@dataclass
class Held:
    """A kernel's answer held 2-of-2 by ranks 1 and 2 before its truncation's reshare (`arith.HeldByTwo`).

    GeLU's answer goes to the FFN's second weight product, whose prepared masks take it as it is
    (`prepared.products`): the owner receives x - R from ranks 1 and 2 instead of the reshare and then
    x_2 - R (8 B per element and a round less). Any other consumer reshares it (`Context.secret`), once.
    """

    value: arith.HeldByTwo
    product: AShare | None = None  # the replicated share, once an op needed it
    source: Held | None = None  # the value this one reshapes (`_order_kernel`): one reshare serves both

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def reshared(self) -> bool:
        """Whether an op already needed the replicated share (then every consumer takes that)."""
        return (self.source or self).product is not None

    @property
    def size(self) -> int:
        return self.value.size


class KernelError(ValueError):
    """A node whose inputs the secure kernels cannot handle; names the node."""


class Context:
    """What kernels need besides their inputs: the party, the approximation set, each node's planned
    variant (`ranges.plan_kernels`: comparison widths, norm domains), and conversions between value kinds."""

    def __init__(self, party: Party, fits: approx.ApproxSet = approx.REFIT, plan: dict | None = None):
        self.party = party
        self.fits = fits
        self.plan = plan or {}
        self.final = False  # the node's outputs are graph outputs only: products may stay `Unscaled`
        self.ready = {}  # node name -> its weight product, computed ahead with its group (`weight_products`)
        self.prepared: Prepared | None = None  # masks prepared for weight products before the input came
        # Weight products by how they ran, and how many groups took their input held by ranks 1 and 2 (`Held`).
        self.product_paths = {"prepared": 0, "online": 0, "held_inputs": 0}

    def params(self, node: Node) -> dict:
        """The planned variant of `node` ({} for the defaults)."""
        return self.plan.get(node.name, {})

    def norm_domain(self, node: Node) -> NormDomain:
        given = self.params(node).get("domain")
        return NormDomain() if given is None else NormDomain(*given)

    def encode(self, c: np.ndarray) -> np.ndarray:
        return self.party.fxp.encode(c)

    def secret(self, v) -> AShare:
        """Any value as a secret share: public ones trivially, private ones shared by their owner."""
        if isinstance(v, AShare):
            return v
        if isinstance(v, WeightShare):
            return v.materialize()
        if isinstance(v, Unscaled):
            return arith.truncate(self.party, v.share, v.bits)
        if isinstance(v, Scaled):
            if v.product is None:
                v.product = arith.mul_public_fx(self.party, v.share, np.float64(v.factor))
            return v.product
        if isinstance(v, Softmaxed):
            if v.product is None:
                v.product = v.rows.normalised(self.party)
            return v.product
        if isinstance(v, Held):
            if v.source is not None:
                return self.secret(v.source).reshape(v.shape)
            if v.product is None:
                v.product = v.value.reshare(self.party)
            return v.product
        if isinstance(v, Private):
            if v.shared is None:
                value = self.encode(v.value) if self.party.rank == v.owner else None
                v.shared = arith.share(self.party, value, v.owner, v.shape)
            return v.shared
        c = self.encode(np.asarray(v))
        zero = np.zeros(c.shape, dtype=np.uint64)
        return arith.add_public(self.party, AShare(zero, zero), c)


def is_secret(v) -> bool:
    return isinstance(v, (AShare, Private, SharedIds, WeightShare, Scaled, Unscaled, Softmaxed, Held))


def integral(c: np.ndarray) -> bool:
    """A public factor that is a small integer needs no truncation after multiplying."""
    c = np.asarray(c)
    if np.issubdtype(c.dtype, np.integer) or c.dtype == bool:
        return True
    return bool(np.all(np.isfinite(c)) and np.all(c == np.round(c)) and np.all(np.abs(c) < 2**31))


def scale(ctx: Context, x: AShare, c: np.ndarray) -> AShare:
    """x * c for a public c: exact for integers, fixed-point product otherwise."""
    if integral(c):
        return arith.mul_public(x, np.asarray(c).astype(np.int64))
    return arith.mul_public_fx(ctx.party, x, np.asarray(c, dtype=np.float64))


def _shape_kernel(fn: Callable) -> Callable:
    """A kernel that maps both share components (and Private values) by the same local shape op."""

    def kernel(ctx: Context, node: Node, x, *rest):
        if not is_secret(x) or any(is_secret(r) for r in rest):
            raise KernelError(f"{node.describe()}: only its data input may be secret, its other inputs must be public")
        x = ctx.secret(x)
        return (AShare(fn(node, x.first, *rest), fn(node, x.second, *rest)),)

    return kernel


def _order_kernel(fn: Callable) -> Callable:
    """A shape op that keeps the elements' order (Reshape, Flatten, Squeeze, Unsqueeze): as `_shape_kernel`,
    and a `Held` value stays held, under its new shape (its parts are flat in that order already)."""
    general = _shape_kernel(fn)

    def kernel(ctx: Context, node: Node, x, *rest):
        if isinstance(x, Held) and not x.reshared and not any(is_secret(r) for r in rest):
            shape = tuple(fn(node, np.zeros(x.shape, np.uint8), *rest).shape)
            return (Held(arith.HeldByTwo(x.value.dealer, x.value.part, shape), source=x.source or x),)
        return general(ctx, node, x, *rest)

    return kernel


def _axes(node: Node, given) -> list[int] | None:
    if given is not None:
        return [int(a) for a in np.asarray(given).ravel()]
    axes = node.attrs.get("axes")
    return None if axes is None else list(axes)


def _reshape(node, a, shape):
    shape = [int(s) for s in shape]
    if not node.attrs.get("allowzero", 0):
        shape = [a.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return a.reshape(shape)


def _transpose(node, a):
    return a.transpose(node.attrs.get("perm"))


def transpose(ctx, node, x):
    """A 2-D weight stays a WeightShare, read transposed (a tied LM head then multiplies as a weight:
    one ring product per rank); anything else is a local shape op."""
    perm = node.attrs.get("perm")
    if isinstance(x, WeightShare) and len(x.shape) == 2 and perm in (None, [1, 0]):
        return (x.transpose(),)
    return _shape_kernel(_transpose)(ctx, node, x)


def _unsqueeze(node, a, axes=None):
    axes = _axes(node, axes)
    out_rank = a.ndim + len(axes)
    for ax in sorted(ax % out_rank for ax in axes):
        a = np.expand_dims(a, ax)
    return a


def _squeeze(node, a, axes=None):
    axes = _axes(node, axes)
    return np.squeeze(a, axis=None if axes is None else tuple(axes))


def _flatten(node, a):
    axis = node.attrs.get("axis", 1)
    if axis < 0:
        axis += a.ndim
    return a.reshape(int(np.prod(a.shape[:axis])), int(np.prod(a.shape[axis:])))


def _expand(node, a, shape):
    return np.broadcast_to(a, np.broadcast_shapes(a.shape, tuple(int(s) for s in shape)))


def _slice(node, a, starts, ends, axes=None, steps=None):
    index = [slice(None)] * a.ndim
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return a[tuple(index)]


def _gather(node, a, indices):
    axis = node.attrs.get("axis", 0)
    indices = np.asarray(indices)
    indices = np.where(indices < 0, indices + a.shape[axis], indices)
    return np.take(a, indices, axis=axis)


def _cumsum(node, a, axis):
    axis = int(np.asarray(axis))
    if node.attrs.get("reverse", 0):
        a = np.flip(a, axis)
    out = np.cumsum(a, axis=axis, dtype=np.uint64)
    if node.attrs.get("exclusive", 0):
        out = out - a
    return np.flip(out, axis) if node.attrs.get("reverse", 0) else out


def identity(ctx, node, x, *unused):
    return (x,)


def cast(ctx, node, x):
    import onnx

    to = onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"])
    if not np.issubdtype(to, np.floating):
        raise KernelError(f"{node.describe()} casts a secret value to {to}: only float-to-float casts are secure here")
    return (x,)


def shape(ctx, node, x):
    dims = np.array(x.value_shape if isinstance(x, WeightShare) else x.shape, dtype=np.int64)
    return (dims[node.attrs.get("start", 0) : node.attrs.get("end", None)],)


def size(ctx, node, x):
    return (np.array(int(np.prod(x.shape)), dtype=np.int64),)


def add(ctx, node, x, y):
    if is_secret(x) and is_secret(y):
        return (arith.add(ctx.secret(x), ctx.secret(y)),)
    s, c = (x, y) if is_secret(x) else (y, x)
    return (arith.add_public(ctx.party, ctx.secret(s), ctx.encode(c)),)


def sub(ctx, node, x, y):
    if is_secret(x) and is_secret(y):
        return (arith.sub(ctx.secret(x), ctx.secret(y)),)
    if is_secret(x):
        return (arith.add_public(ctx.party, ctx.secret(x), ctx.encode(-np.asarray(y, dtype=np.float64))),)
    return (arith.add_public(ctx.party, arith.neg(ctx.secret(y)), ctx.encode(x)),)


def neg(ctx, node, x):
    return (arith.neg(ctx.secret(x)),)


def mul(ctx, node, x, y):
    if is_secret(x) and is_secret(y):
        if ctx.final:  # the ring product, reshared; the client rescales
            return (Unscaled(arith.mul(ctx.party, ctx.secret(x), ctx.secret(y)), ctx.party.fxp.frac_bits),)
        return (arith.mul_fx(ctx.party, ctx.secret(x), ctx.secret(y)),)
    s, c = (x, y) if is_secret(x) else (y, x)
    s = ctx.secret(s)
    if np.size(c) == 1 and np.ndim(c) <= s.ndim and not integral(c):  # an answer opens it as it is
        return (Scaled(s, float(np.asarray(c).reshape(()))),)
    if ctx.final and not integral(c):  # the client rescales
        return (Unscaled(arith.mul_public(s, ctx.encode(np.asarray(c, dtype=np.float64))), ctx.party.fxp.frac_bits),)
    return (scale(ctx, s, c),)


def power_of_two_bits(factor: float) -> int | None:
    """k if factor is 2^-k for a whole k in [0, 24], else None.

    "Is" within a relative 2^-20: sqrt(1/sqrt(64))^2 computed in float32 misses 1/8 by 3e-8,
    far below the fixed-point resolution the product is kept at.
    """
    k = round(-np.log2(factor)) if factor > 0 else -1
    return k if 0 <= k <= 24 and abs(factor * 2.0**k - 1.0) < 2.0**-20 else None


def div(ctx, node, x, y):
    if is_secret(y):
        raise KernelError(f"{node.describe()} divides by a secret value; only public divisors are supported")
    return mul(ctx, node, x, 1.0 / np.asarray(y, dtype=np.float64))


def _matmul_public(ctx: Context, x: AShare, c: np.ndarray, left: bool) -> AShare:
    """x @ c (or c @ x when left) for public c: local ring products, then one truncation."""
    if integral(c):
        enc, bits = np.asarray(c).astype(np.int64).view(np.uint64), 0
    else:
        enc, bits = ctx.encode(c), ctx.party.fxp.frac_bits
    prod = (lambda a: ring_matmul(enc, a)) if left else (lambda a: ring_matmul(a, enc))
    out = AShare(prod(x.first), prod(x.second))
    if bits and ctx.final:
        return Unscaled(out, bits)
    return arith.truncate(ctx.party, out, bits) if bits else out


# A secret right operand above this many elements is multiplied in column blocks,
# batched into one protocol call: same rounds, bounded temporaries (GPT-2's 768 x 50257
# output projection would otherwise need several GB of scratch per rank).
MATMUL_BLOCK_ELEMENTS = 2**22


def weight_products(ctx: Context, x, members: list[Product], group=None) -> list:
    """x @ W for each member's weight, in one batch (the products that read one input: attention's q, k, v).

    From masks prepared before the input arrived when they cover x (`prepared.products`: 3 rounds, 8 B per
    input element and 24 per output element with the truncation prepared too, 44 without, one product
    online); else each rank's part
    (`weights.matmul_part`, one product per rank) and one truncation (2 rounds, 44 B per output element).
    With `ctx.final` the products are reshared untruncated (`Unscaled`): 1 round less.
    x is any secret value; a `Held` one goes to prepared masks as ranks 1 and 2 hold it (no reshare: rank 1
    sends the owner 8 B per input element beside rank 2's, instead of 16 B over ranks 1 and 2 and a round).
    """
    if not isinstance(x, Held) or x.reshared:
        x = ctx.secret(x)
    f = ctx.party.fxp.frac_bits
    k = x.shape[-1]
    rows = x.size // max(k, 1)
    keys = [m.key for m in members]
    covered = ctx.prepared is not None and group is not None and ctx.prepared.covers(group, rows, k, keys)
    path = "prepared" if covered else "online"
    ctx.product_paths[path] += len(members)
    if path == "prepared":
        given = x.value if isinstance(x, Held) else x
        ctx.product_paths["held_inputs"] += isinstance(x, Held)
        outs = prepared.products(ctx.party, given, group, members, ctx.prepared, None if ctx.final else f)
    else:
        x = ctx.secret(x)
        parts = [matmul_part(x, m.weight, m.transpose) for m in members]
        outs = arith.reshare_parts(ctx.party, parts) if ctx.final else arith.truncate_parts(ctx.party, parts, f)
    return [Unscaled(o, f) for o in outs] if ctx.final else outs


def _matmul_weight(ctx: Context, node: Node, x, w: WeightShare, transpose: bool = False):
    """x @ W for a weight: the product its group computed ahead (`Context.ready`), or this one alone."""
    ready = ctx.ready.pop(node.name, None)
    if ready is not None:
        return ready
    return weight_products(ctx, x, [Product(node.name, None, w, transpose)])[0]


def _fold_fits(ctx: Context, node: Node, extra: int) -> bool:
    """Whether the product before a truncation that also takes the operands' 2^-extra scalings stays
    below 2^61: it is the output times 2^extra. The planned bound of the output (`ranges`) decides; without
    one, the scalings ride (attention scores are small)."""
    y_max = ctx.params(node).get("y_max")
    return y_max is None or y_max * 2.0 ** (extra + 2 * ctx.party.fxp.frac_bits) < 2.0**61


def _softmax_times(ctx: Context, node: Node, x: Softmaxed, y) -> AShare | None:
    """softmax @ y with the row scaling after the product (`SoftmaxRows.times`), where that takes fewer
    products than the softmax's own (output elements < kept scores) and the planned bound of the output
    (`ranges`) keeps e @ y in range; None where it does not apply."""
    if ctx.final or x.product is not None:
        return None
    rows, y_shape = x.rows, tuple(y.shape)
    if len(y_shape) < 2 or len(rows.shape) < 2:
        return None
    out = np.broadcast_shapes(rows.shape[:-2], y_shape[:-2]) + (rows.shape[-2], y_shape[-1])
    y_max = ctx.params(node).get("y_max")
    if int(np.prod(out)) >= rows.kept or y_max is None:
        return None
    if not nonlinear.SoftmaxRows.fits(ctx.party.fxp.frac_bits, rows.shape[-1], y_max):
        return None
    return rows.times(ctx.party, ctx.secret(y))


def matmul(ctx, node, x, y):
    if isinstance(y, WeightShare):
        return (_matmul_weight(ctx, node, x, y),)
    if isinstance(x, Softmaxed) and is_secret(y):
        fused = _softmax_times(ctx, node, x, y)
        if fused is not None:
            return (fused,)
    if is_secret(x) and is_secret(y):
        factor = (x.factor if isinstance(x, Scaled) else 1.0) * (y.factor if isinstance(y, Scaled) else 1.0)
        extra = power_of_two_bits(factor)
        if extra is not None and not _fold_fits(ctx, node, extra):
            extra = None
        if extra is not None:  # the factors ride in the truncation; otherwise ctx.secret multiplies them out
            x, y = (v.share if isinstance(v, Scaled) else v for v in (x, y))
        x, y = ctx.secret(x), ctx.secret(y)
        bits = ctx.party.fxp.frac_bits + (extra or 0)
        n = y.shape[-1]
        step = max(1, MATMUL_BLOCK_ELEMENTS // max(1, y.size // n))
        blocks = [y[..., lo : lo + step] for lo in range(0, n, step)]
        if ctx.final:  # the ring product, reshared; the client rescales
            return (Unscaled(concat(arith.matmul(ctx.party, [x] * len(blocks), blocks), axis=-1), bits),)
        if n <= step:
            return (arith.matmul_fx(ctx.party, x, y, bits=bits),)
        return (concat(arith.matmul_fx(ctx.party, [x] * len(blocks), blocks, bits=bits), axis=-1),)
    if is_secret(x):
        return (_matmul_public(ctx, ctx.secret(x), np.asarray(y), left=False),)
    return (_matmul_public(ctx, ctx.secret(y), np.asarray(x), left=True),)


def gemm(ctx, node, a, b, c=None):
    alpha, beta = node.attrs.get("alpha", 1.0), node.attrs.get("beta", 1.0)
    if alpha != 1.0 or beta != 1.0:  # scaled after the product: truncated in the product, as before
        ctx.final = False
    if node.attrs.get("transA", 0):
        a = ctx.secret(a).transpose() if is_secret(a) else np.asarray(a).T
    if isinstance(b, WeightShare):
        out = _matmul_weight(ctx, node, a, b, transpose=bool(node.attrs.get("transB", 0)))
    else:
        if node.attrs.get("transB", 0):
            b = ctx.secret(b).transpose() if is_secret(b) else np.asarray(b).T
        (out,) = matmul(ctx, node, a, b)
    if isinstance(out, Unscaled):  # C joins the untruncated product at its scale, exactly
        return (out if c is None else Unscaled(_plus_lifted(ctx, out.share, c, out.bits), out.bits),)
    if alpha != 1.0:
        out = scale(ctx, out, np.asarray(alpha))
    if c is not None:
        if beta != 1.0:
            c = scale(ctx, ctx.secret(c), np.asarray(beta)) if is_secret(c) else np.asarray(c) * beta
        (out,) = add(ctx, node, out, c)
    return (out,)


def _plus_lifted(ctx: Context, x: AShare, c, bits: int) -> AShare:
    """x + c for x at scale f + bits and c (secret or public) at scale f: c shifted up exactly."""
    lift = np.uint64(1 << bits)
    if is_secret(c):
        return arith.add(x, arith.mul_public(ctx.secret(c), lift))
    return arith.add_public(ctx.party, x, ctx.encode(np.asarray(c, dtype=np.float64)) * lift)


def where(ctx, node, cond, x, y):
    if is_secret(cond):
        raise KernelError(f"{node.describe()} selects on a secret condition; only public conditions are supported")
    keep = np.asarray(cond).astype(np.int64)
    picked_x = scale(ctx, ctx.secret(x), keep)
    picked_y = scale(ctx, ctx.secret(y), 1 - keep)
    return (arith.add(picked_x, picked_y),)


def concat_kernel(ctx, node, *xs):
    return (concat([ctx.secret(x) for x in xs], axis=node.attrs["axis"]),)


def split_kernel(ctx, node, x, sizes=None):
    x = ctx.secret(x)
    axis = node.attrs.get("axis", 0)
    sizes = node.attrs.get("split") if sizes is None else [int(s) for s in np.asarray(sizes)]
    if sizes is None:
        # Equal parts, the last one smaller when the axis does not divide (opset 18).
        step = -(-x.shape[axis] // len(node.outputs))
        sizes = [min(step, x.shape[axis] - i * step) for i in range(len(node.outputs))]
    return tuple(split(x, np.cumsum(sizes)[:-1], axis=axis))


def reduce_sum(ctx, node, x, axes=None):
    x = ctx.secret(x)
    axes = _axes(node, axes)
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return (x,)
        axes = list(range(x.ndim))
    return (x.sum(axis=tuple(axes), keepdims=bool(node.attrs.get("keepdims", 1))),)


def reduce_mean(ctx, node, x, axes=None):
    (total,) = reduce_sum(ctx, node, x, axes)
    count = int(np.prod(x.shape)) // max(int(np.prod(total.shape)), 1)
    return (scale(ctx, total, np.asarray(1.0 / count)),)


def gelu(ctx, node, x):
    # Held 2-of-2 before its reshare (`Held`): the FFN's prepared product takes it so.
    out = nonlinear.gelu(ctx.party, ctx.secret(x), ctx.fits.gelu, ctx.params(node).get("cmp_bits"), held=not ctx.final)
    return (out if ctx.final else Held(out),)


def silu(ctx, node, x):
    return (nonlinear.silu(ctx.party, ctx.secret(x), ctx.fits.silu, ctx.params(node).get("cmp_bits")),)


def softmax(ctx, node, x, mask=None):
    axis = node.attrs.get("axis", -1)
    x = ctx.secret(x)
    if axis not in (-1, x.ndim - 1):
        raise KernelError(f"{node.describe()} takes softmax over axis {axis}; only the last axis is supported")
    if is_secret(mask):
        raise KernelError(f"{node.describe()} has a secret mask; the attention mask must be public")
    mask = None if mask is None else np.asarray(mask).astype(bool)
    rows = nonlinear.softmax_rows(ctx.party, x, mask, ctx.fits.exp, ctx.params(node).get("cmp_bits"))
    if isinstance(rows, AShare):
        return (rows,)
    # The last product waits for the consumer: a MatMul with v may take it after its own (`Softmaxed`).
    return (rows.normalised(ctx.party) if ctx.final else Softmaxed(rows),)


def layer_norm(ctx, node, x, scale_, bias=None):
    x = ctx.secret(x)
    if node.attrs.get("axis", -1) not in (-1, x.ndim - 1):
        raise KernelError(f"{node.describe()} normalises over axis {node.attrs['axis']}; only the last axis is supported")
    if bias is None:
        bias = np.zeros(x.shape[-1])
    eps = float(node.attrs.get("epsilon", 1e-5))
    return (nonlinear.layer_norm(ctx.party, x, ctx.secret(scale_), ctx.secret(bias), eps, ctx.norm_domain(node)),)


def rms_norm(ctx, node, x, scale_):
    eps = float(node.attrs.get("epsilon", 1e-6))
    return (nonlinear.rms_norm(ctx.party, ctx.secret(x), ctx.secret(scale_), eps, ctx.norm_domain(node)),)


def embedding_kernel(ctx, node, table, ids):
    if isinstance(ids, SharedIds):
        rows = int(np.prod(ids.shape, dtype=np.int64))
        weight = table if isinstance(table, WeightShare) else ctx.secret(table)
        out = embedding.shared_embedding(ctx.party, weight, ids.sources, rows)
        return (out.reshape(tuple(ids.shape) + (out.shape[-1],)),)
    if isinstance(ids, Private):
        weight = table if isinstance(table, WeightShare) and not table.transposed else ctx.secret(table)
        return (embedding.embedding(ctx.party, weight, ids.value, ids.owner, ids.shape),)
    if is_secret(ids):
        raise KernelError(
            f"{node.describe()} looks up secret ids computed inside the graph; "
            "only the client's own input ids (or public ids) are supported"
        )
    (out,) = _shape_kernel(_gather)(ctx, node, ctx.secret(table), ids)
    return (out,)


KERNELS: dict[tuple[str, str], Callable] = {
    ("", "Identity"): identity,
    ("", "Cast"): cast,
    ("", "Shape"): shape,
    ("", "Size"): size,
    ("", "Reshape"): _order_kernel(_reshape),
    ("", "Transpose"): transpose,
    ("", "Unsqueeze"): _order_kernel(_unsqueeze),
    ("", "Squeeze"): _order_kernel(_squeeze),
    ("", "Flatten"): _order_kernel(_flatten),
    ("", "Expand"): _shape_kernel(_expand),
    ("", "Slice"): _shape_kernel(_slice),
    ("", "Gather"): _shape_kernel(_gather),
    ("", "CumSum"): _shape_kernel(_cumsum),
    ("", "Concat"): concat_kernel,
    ("", "Split"): split_kernel,
    ("", "Add"): add,
    ("", "Sub"): sub,
    ("", "Neg"): neg,
    ("", "Mul"): mul,
    ("", "Div"): div,
    ("", "MatMul"): matmul,
    ("", "Gemm"): gemm,
    ("", "Where"): where,
    ("", "ReduceSum"): reduce_sum,
    ("", "ReduceMean"): reduce_mean,
    ("puma", "Gelu"): gelu,
    ("puma", "SiLU"): silu,
    ("puma", "Softmax"): softmax,
    ("puma", "LayerNorm"): layer_norm,
    ("puma", "RMSNorm"): rms_norm,
    ("puma", "Embedding"): embedding_kernel,
}
