"""The `puma-onnx` command line."""

from __future__ import annotations

import sys

import click

from puma_onnx.models import REGISTRY


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit."""
    click.echo(f"puma-onnx: error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="puma-onnx")
def main() -> None:
    """Secure three-party inference of Hugging Face Transformers on ONNX (after PUMA).

    \b
    puma-onnx export bert-base -o out/bert     # Hugging Face -> ONNX (+ rewritten model)
    mpirun -n 3 puma-onnx run out/bert --text "hello"
    """


@main.command()
@click.argument("name_or_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write model.onnx, tokenizer files and puma.json into.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(14, 21), help="ONNX opset of the export.")
@click.option("--layers", type=click.IntRange(min=1), help="Override the number of layers (fast tests); the rest of the config stays.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights of config-only models.")
def export(name_or_dir: str, out_dir: str, opset: int, layers: int | None, seed: int) -> None:
    """Export NAME_OR_DIR to ONNX with Optimum, offline.

    NAME_OR_DIR is a registry name or a local Hugging Face model folder.
    Registry: """  # noqa: D301 - the list of names is appended below
    from puma_onnx.export import ExportError
    from puma_onnx.export import export as do_export

    try:
        meta = do_export(name_or_dir, out_dir, opset=opset, layers=layers, seed=seed)
    except ExportError as e:
        fail(str(e))
    weights = "random weights" if meta["random_weights"] else "real weights"
    click.echo(
        f"exported {meta['model']} ({meta['num_layers']} layers, {weights}, opset {opset}) "
        f"to {out_dir}/model.onnx in {meta['export_s']:.1f} s"
    )


export.help = (export.help or "") + ", ".join(REGISTRY) + "."
