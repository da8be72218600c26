"""puma-onnx: secure three-party inference of Hugging Face Transformers, after PUMA, on ONNX and MPI.

`puma_onnx.Client` queries a service started with `mpirun -n 3 puma-onnx serve` (client.py).
"""


def __getattr__(name: str):
    if name == "Client":  # imported on first use: the command line does not need it
        from .client import Client

        return Client
    raise AttributeError(f"module 'puma_onnx' has no attribute {name!r}")
