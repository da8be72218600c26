"""The `puma-onnx` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from puma_onnx.models import REGISTRY


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit."""
    click.echo(f"puma-onnx: error: {message}", err=True)
    sys.exit(1)


_HELP_ERRORS = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineErrors(click.Group):
    """Click's usage errors as one line (its default adds the usage and a hint: four lines on every rank)."""

    def main(self, args=None, prog_name=None, **extra):
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.ClickException as e:
            if isinstance(e, _HELP_ERRORS):  # a bare `puma-onnx`: the help, as click prints it
                e.show()
                sys.exit(e.exit_code)
            where = f"{e.ctx.command_path} --help" if getattr(e, "ctx", None) else "puma-onnx --help"
            click.echo(f"puma-onnx: error: {e.format_message()} (see {where})", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C at a prompt
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="puma-onnx")
def main() -> None:
    """Secure three-party inference of Hugging Face Transformers on ONNX (after PUMA).

    \b
    puma-onnx export bert-base -o out/bert     # Hugging Face -> ONNX (+ rewritten model)
    mpirun -n 3 puma-onnx run out/bert --text "hello"
    """


TRUNCATE_OPTION = click.option(
    "--truncate", is_flag=True, help="Cut a --text longer than the model's positions (said on stderr); else it is an error."
)
TIMEOUT_OPTION = click.option(
    "--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1.0),
    help="Seconds a rank waits for a silent peer before it ends the job with a line naming that rank.",
)
class SizeType(click.ParamType):
    """A memory size: bytes, or a number with K, M, G or T (powers of 1024), e.g. 4G, 512MB, 0."""

    name = "SIZE"
    UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}

    def convert(self, value, param, ctx):
        import re

        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
        if not match:
            self.fail(f"{value!r} is not a size (e.g. 4G, 512MB or 0)", param, ctx)
        return int(float(match[1]) * 1024 ** self.UNITS[match[2].upper()])


WEIGHT_BUDGET_OPTION = click.option(
    "--weight-budget", type=SizeType(), default="4G", show_default=True,
    help="Memory per rank the shared weights may keep (rank 1 keeps 8 bytes per weight). A model past it "
    "streams its weights: each layer's are shared just before the walk reaches it and dropped after (0: always).",
)


class LinkType(click.ParamType):
    """BANDWIDTH,RTT (runtime/network.py), checked when the command line is read."""

    name = "BANDWIDTH,RTT"

    def convert(self, value, param, ctx):
        from puma_onnx.runtime.network import parse_link

        try:
            parse_link(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return value


def network_options(command):
    """--network (repeatable) and --simulate-network, for run and generate."""
    command = click.option(
        "--simulate-network", type=LinkType(),
        help="Make every round take as long as over this link (e.g. 1Gbit,2ms): each rank sleeps bytes/bandwidth "
        "before its sends and one RTT after its receives.",
    )(command)
    return click.option(
        "--network", "networks", multiple=True, type=LinkType(),
        help="Another BANDWIDTH,RTT (e.g. 10Gbit,0.5ms) for the report's network_estimates, besides LAN and WAN.",
    )(command)


APPROX_OPTION = click.option(
    "--approx",
    "approx_set",
    type=click.Choice(["refit", "puma"]),
    default="refit",
    show_default=True,
    help="Approximations of GeLU, SiLU and exp: refit (more accurate; GeLU and SiLU in two pieces, "
    "0 | x/2 + an even degree-8 polynomial | x, 19% fewer bytes; exp on PUMA's structure at its cost; "
    "the same rounds), or PUMA's own (the paper's numbers).",
)


@main.command()
@click.argument("name_or_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write model.onnx, tokenizer files and puma.json into.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(14, 21), help="ONNX opset of the export.")
@click.option("--layers", type=click.IntRange(min=1), help="Override the number of layers (fast tests); the rest of the config stays.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights of config-only models.")
@APPROX_OPTION
@click.option(
    "--calibration",
    type=click.Path(dir_okay=False),
    help="Texts, one per line, to record activation ranges on (default: the shipped texts).",
)
@click.option(
    "--synthetic-weights/--materialized-weights", "synthetic", default=None,
    help="Random weights the owner generates from the seed when it shares them, instead of weights in files: "
    "2 layers are built and the last repeated (default for llama-7b; models too large to write out).",
)
@click.option("--external-data", is_flag=True, help="Keep the rewritten model's weights in model.puma.onnx.data (automatic past 1 GB).")
def export(
    name_or_dir: str, out_dir: str, opset: int, layers: int | None, seed: int, approx_set: str, calibration: str | None,
    synthetic: bool | None, external_data: bool,
) -> None:
    """Export NAME_OR_DIR to ONNX with Optimum, offline; rewrite it and record its activation ranges.

    NAME_OR_DIR is a registry name or a local Hugging Face model folder.
    Registry: """  # noqa: D301 - the list of names is appended below
    from puma_onnx.export import ExportError, prepare
    from puma_onnx.export import export as do_export

    from puma_onnx.calibrate import read_texts
    from puma_onnx.passes import UnsupportedSecretOps

    if calibration:  # before the export's minute of work
        try:
            read_texts(calibration)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            fail(f"cannot read --calibration {calibration!r}: {e}")
    try:
        meta = do_export(name_or_dir, out_dir, opset=opset, layers=layers, seed=seed, synthetic=synthetic)
    except ExportError as e:
        fail(str(e))
    weights = "random weights" if meta["random_weights"] else "real weights"
    click.echo(
        f"exported {meta['model']} ({meta['num_layers']} layers, {weights}, opset {opset}) "
        f"to {out_dir}/model.onnx in {meta['export_s']:.1f} s"
    )
    try:
        report, inputs = prepare(out_dir, approx_set, calibration, external_data=external_data)
    except ExportError as e:
        fail(str(e))
    except UnsupportedSecretOps as e:
        fail(f"the export cannot run securely: {e.report.problems[0]} (and {len(e.report.problems) - 1} more; see puma-onnx inspect)")
    click.echo(f"rewrote it to {out_dir}/model.puma.onnx ({approx_set} approximations): {_matches(report)}")
    click.echo(f"recorded its activation ranges on {inputs} calibration inputs in {out_dir}/puma.json")
    if meta.get("synthetic_weights"):
        plan = json.loads((Path(out_dir) / "puma.json").read_text())["synthetic_weights"]
        repeated = f" (layer {plan['built_layers'] - 1} repeated)" if plan["layers"] > plan["built_layers"] else ""
        click.echo(
            f"made it synthetic: {plan['layers']} layers{repeated}, "
            f"{plan['fp32_bytes'] / 1e9:.2f} GB of fp32 weights generated by the owner from seed {plan['seed']}"
        )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _matches(report) -> str:
    return ", ".join(f"{n} {rule}" for rule, n in report.matches.items() if n) or "no matches"


@main.command()
@click.argument("in_path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False), help="Where to write the rewritten model.")
@APPROX_OPTION
def rewrite(in_path: str, out_path: str, approx_set: str) -> None:
    """Rewrite any ONNX file into the graph the secure executor runs (puma.* ops)."""
    from puma_onnx.passes import UnsupportedSecretOps, rewrite_file

    try:
        report = rewrite_file(in_path, out_path, approx_set)
    except UnsupportedSecretOps as e:
        fail(str(e).replace("\n", ";"))
    except Exception as e:  # noqa: BLE001 - a file that is not ONNX fails in the parser, in many ways
        fail(f"cannot rewrite {in_path!r}: {_first_line(e)}")
    click.echo(f"wrote {out_path}: {_matches(report)}")


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
def inspect(model: str) -> None:
    """Print what the rewrite matches, the ops left on secret values and the public/secret counts."""
    import onnx

    from puma_onnx.passes import UnsupportedSecretOps, rewrite

    try:
        loaded = onnx.load(model)
    except Exception as e:  # noqa: BLE001 - protobuf's parse errors come in several kinds
        fail(f"cannot read ONNX model {model!r}: {_first_line(e)}")
    try:
        _, report = rewrite(loaded)
    except UnsupportedSecretOps as e:
        report = e.report
    click.echo(report.table())
    if report.problems:
        sys.exit(1)


export.help = (export.help or "") + ", ".join(REGISTRY) + "."


@main.command()
@click.argument("model")
@click.option("--text", multiple=True, help="Input text (client side), tokenized with the model's tokenizer; several --text make a batch, padded to the longest.")
@click.option("--input-ids", type=click.Path(dir_okay=False), help="Token ids as a .npy file of shape (S,) or (B, S) (a batch).")
@click.option("--seq-len", type=int, help="Feed N random token ids.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write every graph output to this .npz (client).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write time, bytes, rounds, memory and per-op costs as JSON.")
@click.option("--profile", is_flag=True, help="Print the per-op costs summed by op type and by layer.")
@click.option("--frac-bits", default=18, show_default=True, type=click.IntRange(16, 20), help="Fractional bits of the fixed-point encoding (the nonlinear kernels are tuned for 16-20).")
@click.option("--all-logits", is_flag=True, help="A decoder's logits at every position (default: the last one only, as generation needs).")
@TRUNCATE_OPTION
@TIMEOUT_OPTION
@WEIGHT_BUDGET_OPTION
@network_options
def run(
    model, text, input_ids, seq_len, output, report, profile, frac_bits, all_logits, truncate, timeout, weight_budget,
    networks, simulate_network,
) -> None:
    """Secure inference on three MPI ranks: mpirun -n 3 puma-onnx run MODEL.

    MODEL is an export folder, an .onnx file (rewritten on the fly if it is
    not yet) or a registry name (exported once into ~/.cache/puma-onnx or
    $PUMA_ONNX_CACHE). Rank 0 is the model owner and the only rank that reads MODEL;
    rank 1 is the client: it reads the input and alone learns the output.
    """
    from puma_onnx.runtime.launch import launch
    from puma_onnx.runtime.session import RunOptions

    opts = RunOptions(
        model=model, text=(text[0] if len(text) == 1 else text) or None, input_ids=input_ids, seq_len=seq_len, output=output,
        report=report, profile=profile, frac_bits=frac_bits, all_logits=all_logits, truncate=truncate,
        timeout=timeout, networks=networks, simulate_network=simulate_network, weight_budget=weight_budget,
    )
    sys.exit(launch(opts))


@main.command()
@click.argument("model")
@click.option("--text", help="The prompt (client side), tokenized with the model's tokenizer.")
@click.option("--input-ids", type=click.Path(dir_okay=False), help="The prompt's token ids as a .npy file of shape (S,) or (1, S).")
@click.option("--max-new-tokens", default=16, show_default=True, type=int, help="Stop after this many new tokens (or at the end-of-sequence token).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--temperature", type=float, help="Sample at this temperature, in [0.01, 100] (Gumbel-max inside MPC), instead of greedy.")
@click.option("--seed", type=int, help="Seed of the sampling noise, read by the helper rank, which draws it (with --temperature).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the prompt ids, new ids and text as JSON (client).")
@click.option("--report", type=click.Path(dir_okay=False), help="Write time, bytes, rounds, memory, per-step and per-op costs as JSON.")
@click.option("--profile", is_flag=True, help="Print the per-op costs of the prompt step and of the generation steps.")
@click.option("--frac-bits", default=18, show_default=True, type=click.IntRange(16, 20), help="Fractional bits of the fixed-point encoding.")
@TRUNCATE_OPTION
@TIMEOUT_OPTION
@WEIGHT_BUDGET_OPTION
@network_options
def generate(
    model, text, input_ids, max_new_tokens, chat, temperature, seed, output, report, profile, frac_bits, truncate,
    timeout, weight_budget, networks, simulate_network,
) -> None:
    """Secure text generation: mpirun -n 3 puma-onnx generate MODEL --text PROMPT.

    The key/value cache stays secret-shared between steps; each next token is chosen inside MPC (greedy,
    or Gumbel-max sampling with --temperature) and opened to the client alone, which prints the text as
    it comes on its stdout (mpirun forwards it to where mpirun was started: start it on the client's
    side). MODEL as for run: a decoder's export folder, an .onnx file or a registry name.
    """
    from puma_onnx.runtime.generation import GenerateOptions
    from puma_onnx.runtime.launch import launch

    opts = GenerateOptions(
        model=model, text=text, input_ids=input_ids, output=output, report=report, profile=profile,
        frac_bits=frac_bits, max_new_tokens=max_new_tokens, chat=chat, temperature=temperature, seed=seed,
        truncate=truncate, timeout=timeout, networks=networks, simulate_network=simulate_network,
        weight_budget=weight_budget,
    )
    sys.exit(launch(opts, "generate"))


@main.command()
@click.argument("model")
@click.option("--listen", "listen", multiple=True, required=True, help="HOST:PORT to answer clients on: once (rank i takes PORT + i) or three times (rank 0's first).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain: serve HTTPS (with --tls-key).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--max-batch", default=16, show_default=True, type=int, help="Run queries that arrive together as one batch of at most this many inputs.")
@click.option("--batch-window", default=0.0, show_default=True, type=float, help="Seconds a batch that is not full waits for more queries.")
@click.option("--max-new-tokens", "max_new_tokens", default=512, show_default=True, type=int, help="The longest generation a query may ask for.")
@click.option("--query-wait", default=30.0, show_default=True, type=float, help="Seconds a query may wait for its piece on the other ranks before its error reply.")
@click.option("--frac-bits", default=18, show_default=True, type=click.IntRange(16, 20), help="Fractional bits of the fixed-point encoding.")
@TIMEOUT_OPTION
@WEIGHT_BUDGET_OPTION
def serve(
    model, listen, tls_cert, tls_key, max_batch, batch_window, max_new_tokens, query_wait, frac_bits, timeout, weight_budget
) -> None:
    """A secure inference service: mpirun -n 3 puma-onnx serve MODEL --listen HOST:PORT.

    Rank 0 reads MODEL and shares the weights once; then every rank answers clients outside the ranks
    (puma-onnx query, or puma_onnx.Client) over HTTP(S) on its own address, until SIGINT or SIGTERM
    (to mpirun) stops all three with exit code 0. The wire protocol is in the README.
    """
    from puma_onnx.runtime.launch import launch
    from puma_onnx.runtime.service import ServeOptions

    opts = ServeOptions(
        model=model, listen=tuple(listen), tls_cert=tls_cert, tls_key=tls_key, max_batch=max_batch,
        batch_window_s=batch_window, max_new_tokens=max_new_tokens, query_wait_s=query_wait, frac_bits=frac_bits, timeout=timeout, weight_budget=weight_budget, progress=False,
    )
    sys.exit(launch(opts, "serve"))


@main.command()
@click.option("--servers", required=True, help="The three ranks' HOST:PORT (or URLs), comma-separated, rank 0 first; or rank 0's alone.")
@click.option("--text", multiple=True, help="A text to send (tokenized here); several make a batch.")
@click.option("--input-ids", type=click.Path(dir_okay=False), help="Token ids as a .npy file of shape (S,) or (B, S).")
@click.option("--output", type=click.Path(dir_okay=False), help="Write every output to this .npz (with --max-new-tokens: the answer, as JSON).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="CA bundle (PEM) that signed the servers' certificates: use HTTPS.")
@click.option("--max-new-tokens", type=int, help="Generate this many tokens (a decoder's service); the text streams to stdout.")
@click.option("--chat", is_flag=True, help="With --max-new-tokens: wrap the prompt in the model's chat template.")
@click.option("--temperature", type=float, help="With --max-new-tokens: sample at this temperature in [0.01, 100] (default greedy).")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds to wait for the answer.")
def query(servers, text, input_ids, output, tls_ca, max_new_tokens, chat, temperature, timeout) -> None:
    """Ask a running service (puma-onnx serve); the ids are shared here, no rank sees them or the outputs.

    Writes the outputs to --output (.npz), or with --max-new-tokens prints the new text as it comes and
    writes the prompt ids, new ids and text to --output (.json).
    """
    import httpx
    import numpy as np

    from puma_onnx.client import Client, ServiceError
    from puma_onnx.runtime.session import UserError, _load_ids

    if bool(text) == bool(input_ids):
        fail("give --text (once or more) or --input-ids")
    if max_new_tokens is None and (chat or temperature is not None):
        fail("--chat and --temperature go with --max-new-tokens")
    if tls_ca is None and not all(_loopback(s) for s in servers.split(",") if s):
        print("puma-onnx: warning: plain HTTP: anyone who can read the traffic to two ranks can rebuild the ids "
              "and the answer (use --tls-ca with a service started with --tls-cert)", file=sys.stderr)
    try:
        with Client(servers, ca=tls_ca, timeout=timeout) as client:
            if max_new_tokens is not None:
                if len(text) > 1:
                    fail("generation takes one prompt: give --text once")
                prompt = text[0] if text else _load_ids(input_ids)
                answer = client.generate(
                    prompt, max_new_tokens, temperature, chat,
                    on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
                )
                print(flush=True)
                c = answer.pop("cost")
                print(
                    f"puma-onnx: {len(answer['new_ids'])} new tokens after {len(answer['prompt_ids'])}: "
                    f"{c['online_s']:.2f} s online, {c['bytes'] / 1e6:.1f} MB, {c['rounds']} rounds",
                    file=sys.stderr,
                )
                if output:
                    Path(output).write_text(json.dumps(answer, indent=1))
                return
            if text:
                feeds = {k: v for k, v in client.tokenize(text).items() if k in client.model["inputs"]}
            else:
                feeds = {"input_ids": _load_ids(input_ids)}
            answer = client.query(feeds)
    except (ServiceError, ValueError, UserError) as e:
        fail(str(e))
    except httpx.HTTPError as e:
        fail(f"cannot reach the service: {e}")
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in answer.outputs.items())
    b = answer.batch
    print(
        f"puma-onnx: answered: {shapes}; batch of {b['inputs']} inputs x {b['tokens']} tokens "
        f"({b['queries']} queries), {b['online_s']:.2f} s online, {b['bytes'] / 1e6:.1f} MB, {b['rounds']} rounds",
        file=sys.stderr,
    )
    if output:
        np.savez(output, **answer.outputs)
    else:
        for name, value in answer.outputs.items():
            print(f"{name} {list(value.shape)}: {np.array2string(value.reshape(-1)[:8], precision=4)} ...")


def _loopback(server: str) -> bool:
    """Whether a --servers entry names this machine's loopback (no network to read it from)."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(server if "://" in server else f"//{server}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
