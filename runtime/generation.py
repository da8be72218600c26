"""`puma-onnx generate`: text generation on three ranks with a secret key/value cache.

A decoder exported with its cache (Optimum's with-past export) takes the past keys and values and
returns the present ones, so one graph serves every step:
  step 0   the prompt, S tokens, past length 0 (what `run` does);
  step t   the token chosen at step t-1, with the cache of the steps before it.
The cache (the present.* outputs) stays secret-shared from one step to the next and is never opened,
so a step costs one token's work, not a pass over the whole prefix (PUMA's own generation in SPU
re-runs the prefix for every token).

The next token is chosen inside MPC: greedy, a secure argmax over the last position's logits
(`compare.argmax`); or, with a temperature T, the Gumbel-max trick argmax(logits / T + g),
g = -log(-log u), which samples from softmax(logits / T). The helper rank draws g from its --seed and
secret-shares it: it never sees a token, and the client, who sees the token, does not know g (a
client who knew g would learn inequalities between the logits from every sample, more than one
draw from softmax(logits / T) tells; the issue asked for the client to draw it, and this is the
closer-to-ideal choice). Only the token id is opened, and only to the client, who feeds it back
through the client-assisted embedding like a prompt token. The logits are never opened: a client who
saw them at every step could fit the model from its queries (model extraction).

Public: the prompt's length, the temperature, the number of generated tokens (the length of the step
loop: the client says when to stop, at N tokens or at the end-of-sequence token, so stopping before N
tells every rank that the last token was an end-of-sequence token). Secret: the prompt and generated
ids (the client's), the logits, the cache, the sampling noise.
Cost per step t > 0: a walk on one token (every matmul on one row, attention over S + t positions)
plus the argmax, ceil(log2 V) levels of 8 rounds (128 for GPT-2) and about 4.4 MB for V = 50,257.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from . import arith, compare
from .comm import Communicator
from .executor import OpStats
from .kernels import Context, Private
from .session import (
    CLIENT,
    HELPER,
    PAST_PREFIX,
    PRESENT_PREFIX,
    Progress,
    RunOptions,
    Started,
    UserError,
    agree,
    base_report,
    check_outputs,
    costs,
    model_feeds,
    read_ids,
    start,
)
from .shares import AShare
from .wire import broadcast_flag, broadcast_json


@dataclass
class GenerateOptions(RunOptions):
    max_new_tokens: int = 16
    chat: bool = False
    temperature: float | None = None
    seed: int | None = None  # the helper's: its sampling noise


# The temperatures whose scaling keeps its precision and its range: 1/T at 18 fractional bits keeps
# 2^11 steps at T = 100, and |logits| / T stays far below the product's 2^26 at T = 0.01.
TEMPERATURES = (0.01, 100.0)
HELPER_RANK = HELPER


@dataclass
class Prompt:
    """What the client decided: the prompt's ids (its own) and the public parameters of the loop."""

    ids: list[int]
    max_new_tokens: int
    temperature: float | None

    def public(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "length": len(self.ids)}


def check_decoder(info: dict) -> None:
    """On every rank, from the public model info: generate needs a decoder exported with its cache."""
    if not info["decoder"]:
        raise UserError(f"{info['name']} is not a decoder: it has no LM head ('logits' output) to generate from")
    if not info["past"]:
        raise UserError(
            f"{info['name']} was exported without its past keys/values: re-export it with puma-onnx export "
            "(decoders export with their cache)"
        )


def check_new_tokens(max_new_tokens: int, info: dict) -> None:
    """What is wrong with --max-new-tokens for this model (a public value: every rank prints it)."""
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    limit = info["max_positions"]
    if limit is not None and max_new_tokens >= limit:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in {info['name']}'s {limit} positions")


def check_generation(comm: Communicator, opts: GenerateOptions, info: dict) -> None:
    """What every rank checks before the client's input: the model, then the client's --max-new-tokens (the
    one the steps follow), its verdict shared in one round so that every rank prints the same line even
    where the command lines differ (a helper given --seed alone)."""
    check_decoder(info)
    agree(comm, CLIENT, lambda: check_new_tokens(opts.max_new_tokens, info))


def render_chat(template: str, text: str) -> str:
    """The prompt wrapped in the tokenizer's chat template (a user message, then the assistant's turn)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": text}], add_generation_prompt=True, bos_token="", eos_token=""
        )
    except Exception as e:  # noqa: BLE001 - a template is the model's code: any failure is one line
        raise UserError(f"the model's chat template failed: {type(e).__name__}: {e}") from None


def prompt_input(opts: GenerateOptions, info: dict) -> tuple[dict, Prompt]:
    """The client's prompt feeds and its decisions for the step loop, checked (its files first; the
    public --max-new-tokens was checked on every rank before, `check_new_tokens`)."""
    check_outputs(opts)
    if (opts.text is None) == (opts.input_ids is None):
        raise UserError("give the prompt as --text or as --input-ids")
    lo, hi = TEMPERATURES
    if opts.temperature is not None and not lo <= opts.temperature <= hi:
        raise UserError(f"--temperature must lie in [{lo}, {hi}], got {opts.temperature}")
    if opts.seed is not None and opts.temperature is None:
        raise UserError("--seed draws the sampling noise: give it with --temperature")
    if opts.chat:
        if opts.text is None:
            raise UserError("--chat wraps a --text prompt")
        if not info["chat_template"]:
            raise UserError(f"{info['name']} has no chat template; drop --chat")
        opts = replace(opts, text=render_chat(info["chat_template"], opts.text))
    ids, _, _ = read_ids(opts, info, new_tokens=opts.max_new_tokens)
    if ids.shape[0] != 1:
        raise UserError(f"generate takes one prompt; --input-ids holds {ids.shape[0]} (a batch runs with `run`)")
    names = [n for n in info["inputs"] if n not in info["past"]]
    return model_feeds(names, ids), Prompt(ids[0].tolist(), opts.max_new_tokens, opts.temperature)


def gumbel(rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws of -log(-log u), u uniform on (0, 1): argmax(z + g) samples from softmax(z)."""
    u = rng.uniform(np.finfo(np.float64).tiny, 1.0, n)
    return -np.log(-np.log(u))


def next_token(party, logits: AShare, temperature: float | None, noise: AShare | None) -> AShare:
    """The chosen token's id as an integer share: argmax(logits), or argmax(logits / T + g).

    Rounds: the argmax's, 8 ceil(log2 V) (plus 2 for the 1/T scaling); bytes about 88 per logit over the
    three ranks (plus 44 for the scaling); see compare.argmax.
    """
    scores = logits
    if temperature is not None:
        scores = arith.add(arith.mul_public_fx(party, logits, np.float64(1.0 / temperature)), noise)
    return compare.argmax(party, scores)[1]


class Streamer:
    """The client's view of the answer: prints each new piece of text as its token arrives."""

    def __init__(self, tokenizer_json: str | None, prompt: list[int], out=sys.stdout):
        self.tokenizer = None
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.prompt, self.new, self.text, self.out = prompt, [], "", out

    def add(self, token: int) -> None:
        self.new.append(token)
        if self.tokenizer is None:
            piece = f"{token} "
        else:
            text = self.tokenizer.decode(self.new, skip_special_tokens=True)
            # A piece of a multi-byte character decodes to U+FFFD until its last byte arrives.
            if text.endswith("\ufffd"):
                return
            piece, self.text = text[len(self.text) :], text
        self.out.write(piece)
        self.out.flush()

    def result(self) -> dict:
        text = self.text if self.tokenizer is not None else " ".join(map(str, self.new))
        return {"prompt_ids": self.prompt, "new_ids": self.new, "text": text}


def _step_feeds(info: dict, token: int | None, context: int, cache: dict) -> dict:
    """The inputs of a step after the first: the new token (the client's), the mask and position over
    the whole context (public), and the cache (shares)."""
    feeds = {
        "input_ids": Private(CLIENT, (1, 1), None if token is None else np.array([[token]], np.int64)),
        "attention_mask": np.ones((1, context + 1), np.int64),
        "position_ids": np.array([[context]], np.int64),
    }
    past = {name: cache[PRESENT_PREFIX + name[len(PAST_PREFIX) :]] for name in info["past"]}
    return {name: {**feeds, **past}[name] for name in info["inputs"]}


def _summed(runs: list[list[OpStats]]) -> list[OpStats]:
    """Per node, its costs summed over walks of the same graph."""
    return [
        replace(same[0], time_s=sum(s.time_s for s in same), bytes=sum(s.bytes for s in same),
                rounds=sum(s.rounds for s in same))
        for same in zip(*runs)
    ]


def prompt_step(steps: list[dict]) -> dict:
    """The prompt step's share of the time, bytes and rounds of all the steps."""
    shares = {}
    for key in ("time_s", "bytes", "rounds"):
        total = sum(s[key] for s in steps)
        shares[f"{key.removesuffix('_s')}_share"] = round(steps[0][key] / total, 4) if total else 1.0
    return shares


def generate(comm: Communicator, opts: GenerateOptions) -> dict | None:
    """Secure generation on this rank; the client returns the report (with the answer), the others None."""
    started: Started = start(
        comm, opts, lambda info: prompt_input(opts, info), check=lambda info: check_generation(comm, opts, info),
        caches=True, prepare=True,
    )  # the prompt's walk runs on prepared masks (prepared.py); each later token's multiplies online
    comm.begin_trace()  # the online rounds start here (the prompt's public parameters are one)
    party, info, executor = started.party, started.info, started.executor
    executor.answers_stay_secret()
    client = comm.rank == CLIENT
    params = broadcast_json(comm, started.extra.public() if client else None, CLIENT)
    streamer = Streamer(info["tokenizer"], started.extra.ids, sys.stdout) if client else None
    noise_source = np.random.default_rng(opts.seed) if comm.rank == HELPER_RANK else None
    eos = info["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    feeds, context = started.feeds, params["length"]
    steps, walks, product_paths = [], [], {}
    online_start = time.perf_counter()
    for step in range(params["max_new_tokens"]):
        began, before = time.perf_counter(), comm.stats.snapshot()
        streamed_before, streamed_s_before = started.streamed()
        if step == 0:  # the prompt: the long walk, with its progress bar
            with Progress(executor, opts.progress and client) as progress:
                outputs = executor.run(feeds, on_node=progress)
        else:
            outputs = executor.run(feeds)
        walks.append(executor.stats)
        for path, count in executor.product_paths.items():
            product_paths[path] = product_paths.get(path, 0) + count
        logits = Context(party).secret(outputs["logits"])
        logits = logits.reshape(-1)[-logits.shape[-1] :]
        noise = None
        if params["temperature"] is not None:
            g = party.fxp.encode(gumbel(noise_source, logits.size)) if comm.rank == HELPER_RANK else None
            noise = arith.share(party, g, HELPER_RANK, logits.shape)
        with comm.tag("next_token"):
            chosen = arith.reveal(party, next_token(party, logits, params["temperature"], noise), to=CLIENT)
            token = int(chosen.view(np.int64)[0]) if client else None
            if client:
                streamer.add(token)
            done = broadcast_flag(comm, client and (token in eos or step + 1 == params["max_new_tokens"]), CLIENT)
        streamed, streamed_s = started.streamed()  # weights streamed into this step: not its online cost
        cost = comm.stats.snapshot() - before - (streamed - streamed_before)
        took = time.perf_counter() - began - (streamed_s - streamed_s_before)
        steps.append({"time_s": round(took, 6), "bytes": cost.bytes, "rounds": cost.rounds,
                      "tokens_in_context": context})
        if done:
            break
        feeds = _step_feeds(info, token, context, outputs)
        context += 1
    online_s = time.perf_counter() - online_start
    stats = walks[0] + (_summed(walks[1:]) if len(walks) > 1 else [])
    everyone = costs(comm, started, stats, extra={"steps": steps})
    if not client:
        return None
    print(file=sys.stdout, flush=True)
    report = base_report(started, everyone, opts, online_s, stats)
    prompt_nodes = len(walks[0])
    for i, row in enumerate(report["per_op"]):
        row["phase"] = "prompt" if i < prompt_nodes else "generation"
    report["steps"] = [
        {"step": i, **mine, "bytes": sum(e["steps"][i]["bytes"] for e in everyone)} for i, mine in enumerate(steps)
    ]
    report["prompt_step"] = prompt_step(report["steps"])
    report["resident_weights"] = started.resident
    # Over every step: the prompt's on prepared masks, each later token's online.
    report["weight_products"] = {**report["weight_products"], **product_paths}
    report["outputs"] = streamer.result()
    return report


# ----------------------------------------------------------------------------- for a client outside the ranks


class OneHotRows:
    """A one-hot share computed inside MPC (`compare.argmax_onehot`), in the form that
    `embedding.shared_embedding` reads (as `onehot.OneHotShare` gives a client's)."""

    def __init__(self, share: AShare):
        self.share = share
        self.rows, self.vocab = share.shape

    def blocks(self, size: int):
        for start in range(0, self.rows, size):
            yield start, self.share[start : start + size]


def generate_shared(party, executor, info: dict, feeds: dict, context: int, max_new_tokens: int,
                    temperature: float | None, emit, keep_going=None) -> list[dict]:
    """Generation for a client outside the ranks (`puma-onnx serve`): `feeds` hold its prompt (one row,
    as `SharedIds`), `context` its length. No token is opened to any rank: the chosen token comes out of
    `compare.argmax_onehot` as an index share, which `emit(step, index)` sends on to the client, and a
    one-hot share, which is the next step's input ids (the embedding multiplies it by the table, as it
    does the client's one-hot). With an end-of-sequence token, the ranks open one bit per step, whether
    the token is one, so that they stop: the number of steps is public, as in `generate`. With a
    temperature, the helper rank draws the Gumbel noise from os.urandom and shares it. `keep_going()`,
    asked after every step alike on every rank, ends the generation early when it says no (the last
    step is then marked "stopped").
    Cost per step beyond `generate`'s: the one-hot, 2 rounds and 32 bytes per compared pair a level
    (about 0.8 MB for 50,257 entries), and 1 round for the end-of-sequence bit. Returns per step:
    time_s, bytes and rounds on this rank, tokens_in_context."""
    from .kernels import SharedIds

    comm = party.comm
    eos = info["eos_token_id"]
    eos = sorted(set(eos if isinstance(eos, list) else [] if eos is None else [eos]))
    noise_source = np.random.default_rng(int.from_bytes(os.urandom(16), "little")) if party.rank == HELPER else None
    steps = []
    for step in range(max_new_tokens):
        began, before = time.perf_counter(), comm.stats.snapshot()
        outputs = executor.run(feeds)
        logits = Context(party).secret(outputs["logits"])
        logits = logits.reshape(-1)[-logits.shape[-1] :]
        scores = logits
        if temperature is not None:
            g = party.fxp.encode(gumbel(noise_source, logits.size)) if party.rank == HELPER else None
            scores = arith.add(
                arith.mul_public_fx(party, logits, np.float64(1.0 / temperature)), arith.share(party, g, HELPER, logits.shape)
            )
        with comm.tag("next_token"):
            index, onehot = compare.argmax_onehot(party, scores)
            emit(step, index)
            done = step + 1 == max_new_tokens
            ends = [e for e in eos if e < onehot.size]  # (ids past the vocabulary never come)
            if ends and not done:
                picked = onehot[np.array(ends)]
                bit = AShare(picked.first.sum(keepdims=True), picked.second.sum(keepdims=True))
                done = bool(arith.reveal(party, bit)[0])
        cost = comm.stats.snapshot() - before
        steps.append({"time_s": round(time.perf_counter() - began, 6), "bytes": cost.bytes, "rounds": cost.rounds,
                      "tokens_in_context": context})
        if done:
            break
        if keep_going is not None and not keep_going():
            steps[-1]["stopped"] = True
            break
        feeds = _step_feeds(info, None, context, outputs)
        feeds["input_ids"] = SharedIds((1, 1), [(OneHotRows(onehot.reshape(1, -1)), np.zeros(1, np.int64))])
        context += 1
    return steps
