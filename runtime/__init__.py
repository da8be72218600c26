"""Secure three-party runtime: replicated secret sharing over Z_2^64 (ABY3 / PUMA).

Layers, each using only those above it (the protocols never import ONNX):
  byte_limbs exact products in Z_2^64 as int8 GEMMs of byte limbs (onnxruntime's MatMulInteger, VNNI)
  ring       Z_2^64, FixedPoint encode/decode, exact ring_matmul through byte limbs or float64 BLAS limbs
  prg        AES-CTR correlated randomness
  comm       Communicator (ThreadComm for tests, MPIComm), cost counters, run_parties
  party      a rank: communicator, fixed point, pairwise keys, zero-sharings
  shares     AShare / BShare and their local shape operations
  arith      share, reveal, add, mul, matmul, truncate, mul_fx, matmul_fx, ...
  boolean    bit-sliced XOR, AND, AND trees
  convert    msb, b2a, mul_bit, select
  compare    ltz, less_than, equal, max, argmax (and its one-hot)
  approx     the approximation sets (refit, PUMA's) in float64: the reference
  nonlinear  exp, reciprocal, rsqrt, gelu, silu, softmax, layer_norm, rms_norm; each states its domain
  onehot     an outside client's ids as replicated shares of their one-hot rows (two seeds, one dense part)
  embedding  secret-id embedding lookup (the client a rank, or its one-hot shared from outside)
  weights    the owner's weights as shares two ranks regenerate from PRG keys
  kernels    one function per ONNX op on secret values (the first ONNX-aware layer)
  ranges     each kernel's domain against the recorded activation ranges: its variant, or a refusal
  executor   the graph walker: public nodes in plaintext, secret ones through the kernels
  wire       setup messages of unknown size (bytes, JSON), never pickled
  padding    several tokenized texts as one padded batch
  session    one inference: owner / client / helper roles, setup, input, output, report
  generation `generate`: the step loop around session's setup, a secret key/value cache, the next token in MPC
  service    `puma-onnx serve`: weights shared once, an HTTP(S) server per rank, batches agreed by a tick
  launch     `puma-onnx run` / `generate` / `serve` on one MPI rank: checks, errors, abort, the client's files
Every protocol states its rounds and bytes per element in its docstring and runs under
comm.tag(<its name>), so costs group by protocol.
"""
