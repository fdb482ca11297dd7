"""``pico-vllm generate`` streams a generation to the terminal and reports its timing like
``mlx_lm.generate``; ``pico-vllm bench`` runs the benchmark sandbox (see ``pico_vllm/bench.py``);
``pico-vllm serve`` is the OpenAI-compatible server. The engine flags are generated from
:class:`EngineConfig`'s fields and docstring. Parsing and checking the arguments imports no MLX
(``--version``, ``--help`` and a bad flag answer at once); each command imports what it runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from functools import partial
from pathlib import Path

from pico_vllm import __version__
from pico_vllm.bench import (
    DEFAULT_ENGINES,
    DEFAULT_WORKLOADS,
    ENGINES,
    SPECULATIVE_DEFAULT,
    WORKLOADS,
    check_selection,
    format_table,
    save,
)
from pico_vllm.config import EngineConfig
from pico_vllm.outputs import RequestOutput
from pico_vllm.sampling_params import MAX_LOGPROBS, SamplingParams

# Tool-call formats `serve --tool-call-parser` takes (pico_vllm/tool_calls.py; listed here so
# that parsing the flags imports nothing heavy).
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "qwen3_coder", "openai")

# Engine fields the CLI does not expose as flags: --model is its own flag; --seed seeds requests.
_NOT_FLAGS = {"model", "seed"}
_CHOICES = {"dtype": ["auto", "float32", "float16", "bfloat16"], "block_size": [8, 16, 32],
            "capture_graphs": ["off", "lazy", "startup"], "model_impl": ["auto", "pico-vllm", "mlx-lm"]}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" where a default says something: not for switches (their help
    says what they turn on or off) nor for ``None`` (their help says what leaving them out does)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _field_help() -> dict[str, str]:
    """Each EngineConfig attribute's description, from its docstring (one source of truth),
    in the CLI's words: ``None`` is a flag left out, ``a_field`` is ``--a-field``."""
    doc = EngineConfig.__doc__.split("Attributes:", 1)[1]
    names = {f.name for f in dataclasses.fields(EngineConfig)} - _NOT_FLAGS
    helps: dict[str, str] = {}
    for match in re.finditer(r"^ {8}(\w+): (.*?)(?=^ {8}\w+: |\Z)", doc, re.S | re.M):
        text = " ".join(match[2].split()).replace("``None``", "unset")
        text = re.sub(r"``(\w+)``", lambda m: "--" + m[1].replace("_", "-") if m[1] in names else m[1], text)
        helps[match[1]] = text.replace("``", "").replace("%", "%%")
    return helps


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every EngineConfig field: ``--block-size``, ``--no-prefix-caching``, ..."""
    helps = _field_help()
    for field in dataclasses.fields(EngineConfig):
        if field.name in _NOT_FLAGS:
            continue
        name = field.name.replace("_", "-")
        if field.type == "bool":
            if field.default:  # on by default: the flag switches it off
                parser.add_argument(f"--no-{name.removeprefix('enable-')}", dest=field.name,
                                    action="store_false",
                                    help=f"turn off (on by default): {helps[field.name]}")
            else:
                parser.add_argument(f"--{name}", action="store_true",
                                    help=f"turn on (off by default): {helps[field.name]}")
            continue
        kind = {"str": str, "dict | None": _json_object}.get(field.type, int)
        parser.add_argument(f"--{name}", type=kind, default=field.default,
                            choices=_CHOICES.get(field.name), help=helps[field.name])


def _json_object(text: str) -> dict:
    """A flag's JSON object value (``--speculative-config '{"method": "ngram"}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The validated EngineConfig the flags describe (raises before any model is loaded)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)} - _NOT_FLAGS
    return EngineConfig(model=args.model, **{n: getattr(args, n) for n in names})


def build_parser() -> argparse.ArgumentParser:
    defaults = _HelpFormatter
    parser = argparse.ArgumentParser(prog="pico-vllm", description=__doc__, formatter_class=defaults)
    parser.add_argument("--version", action="version", version=f"pico-vllm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "HF id, local HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"

    launcher = commands.add_parser(
        "launch", help="mlx.launch (every argument passed on) exiting with the first failed rank's code",
        description="Runs MLX's mlx.launch with these arguments, e.g. `pico-vllm launch --backend ring "
                    "-n 2 .venv/bin/pico-vllm serve --tensor-parallel-size 2 ...`, and exits with the "
                    "exit code of the first rank that failed (mlx.launch itself exits 0).")
    launcher.add_argument("mlx_launch_args", nargs=argparse.REMAINDER, help="mlx.launch's arguments")

    gen = commands.add_parser("generate", help="generate text from a prompt", formatter_class=defaults)
    gen.add_argument("--model", default=None, help=model_help)
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="Hello, my name is", help="the prompt text")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from a file ('-': stdin)")
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate")
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop token before this many")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    gen.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the best")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="HF-style, over prompt + output")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style, over the output")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style, over the output")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")
    gen.add_argument("--logprobs", type=int, default=None,
                     help=f"print each streamed token's top-n log-probabilities (n <= {MAX_LOGPROBS})")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (request i uses seed + i)")
    gen.add_argument("--num-requests", type=int, default=1,
                     help="run this many copies of the request concurrently; the first is streamed")
    constraint = gen.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None,
                            help="hold the output to this JSON schema (its JSON text, or a .json file)")
    constraint.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    constraint.add_argument("--regex", default=None, help="the output matches this regular expression")
    constraint.add_argument("--choice", action="append", default=None,
                            help="the output is one of these strings (repeatable)")
    constraint.add_argument("--grammar", default=None,
                            help="the output is a sentence of this Lark grammar (its text, or a file)")
    add_engine_flags(gen)

    bench = commands.add_parser("bench", help="benchmark pico-vllm against mlx-lm on named workloads",
                                formatter_class=defaults)
    bench.add_argument("--model", default=None, help=model_help)
    bench.add_argument("--workload", action="append", choices=WORKLOADS, default=None,
                       help="workload to run (repeatable; default: all but steps)")
    bench.add_argument("--engine", action="append", choices=ENGINES, default=None,
                       help="engine to run (repeatable; default: all but 'pico-vllm mlx-lm')")
    bench.add_argument("--quick", action="store_true", help="small workloads (the `make run` sandbox)")
    bench.add_argument("--rates", default=None,
                       help="online request rates per second, comma-separated "
                            "(default: 1,2 with --quick, else 0.5,1,2,4)")
    bench.add_argument("--max-num-seqs", type=int, default=32,
                       help="concurrent sequences for pico-vllm and mlx-lm's BatchGenerator alike")
    bench.add_argument("--speculative-config", type=_json_object, default=None,
                       help="the 'pico-vllm spec' engine's speculative_config (JSON; default: "
                            + json.dumps(SPECULATIVE_DEFAULT).replace("%", "%%") + ")")
    bench.add_argument("--pipeline-parallel-size", type=int, default=1,
                       help="split the pico-vllm engines' layers over this many stages, one per rank "
                            "of mlx.launch (the pico-vllm engines only; default then: pico-vllm)")
    bench.add_argument("--output", default="bench-results", help="folder for results.json and the plots")

    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=defaults)
    serve.add_argument("--model", action="append", default=None,
                       help=f"{model_help}; repeat to serve several models, each with its own engine")
    serve.add_argument("--served-model-name", action="append", default=None,
                       help="the name clients use for each --model, in order (default: the --model value)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind")
    serve.add_argument("--port", type=int, default=8000, help="port to bind")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                            "(also from --api-key-file or the PICO_VLLM_API_KEY variable, which keep it "
                            "out of the process list)")
    serve.add_argument("--api-key-file", default=None, help="read the API key from this file's first line")
    serve.add_argument("--max-request-bytes", type=int, default=8 * 1024 * 1024,
                       help="largest request body accepted; larger ones get 413")
    serve.add_argument("--request-read-timeout", type=float, default=30.0,
                       help="seconds a client has, from connecting or from its last response, to send a "
                            "whole request (headers and body); slower clients are disconnected")
    serve.add_argument("--mlx-cache-limit", type=int, default=None,
                       help="bytes of freed MLX buffers kept for reuse while serving (default: MLX's own "
                            "limit); the cache is emptied whenever the server goes idle")
    serve.add_argument("--max-concurrent-per-key", type=int, default=None,
                       help="requests in flight per API key (without keys: per client address); more "
                            "get 429 with Retry-After")
    serve.add_argument("--allowed-origins", action="append", default=None,
                       help="a web origin whose pages may call the server (CORS; repeatable; none by "
                            "default)")
    serve.add_argument("--max-queue", type=int, default=256,
                       help="requests per model queued or running; more get 429 with Retry-After")
    serve.add_argument("--rate-limit", type=float, default=None,
                       help="requests per second per API key (or client address); more get 429")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds that SIGINT/SIGTERM lets requests in flight finish (new ones get 503)")
    serve.add_argument("--tool-call-parser", choices=list(TOOL_CALL_PARSERS), default=None,
                       help="the format the model writes tool calls in (default: picked from its chat "
                            "template; hermes where the template has no tool support)")
    serve.add_argument("--reasoning-parser", choices=["think"], default=None,
                       help="send what the model writes inside <think>...</think> as reasoning_content")
    add_engine_flags(serve)
    return parser


class _Terminal:
    """stdout that remembers whether its last line is unfinished, so errors and the end of a
    run start on a line of their own."""

    def __init__(self) -> None:
        self.open_line = False

    def write(self, text: str) -> None:
        if text:
            print(text, end="", flush=True)
            self.open_line = not text.endswith("\n")

    def end_line(self) -> None:
        if self.open_line:
            print(flush=True)
            self.open_line = False


def _structured_outputs(args: argparse.Namespace) -> dict | None:
    """The output constraint the flags ask for; a schema or grammar may be given as a file."""
    def text_or_file(value: str) -> str:
        path = Path(value)
        return path.read_text() if len(value) < 4096 and path.is_file() else value

    if args.json_schema is not None:
        return {"json": text_or_file(args.json_schema)}
    if args.json_object:
        return {"json_object": True}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice:
        return {"choice": args.choice}
    if args.grammar is not None:
        return {"grammar": text_or_file(args.grammar)}
    return None


def generate(args: argparse.Namespace, terminal: _Terminal) -> None:
    # Everything the user typed is checked before the model loads (which takes seconds).
    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1, got {args.num_requests}")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat")
    constraint = _structured_outputs(args)
    params = [
        SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
            repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
            frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens,
            min_tokens=args.min_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
            logprobs=args.logprobs, seed=None if args.seed is None else args.seed + i,
            structured_outputs=constraint,
        )
        for i in range(args.num_requests)
    ]
    config = engine_config(args)
    text = args.prompt
    if args.prompt_file is not None:
        text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
    if not text:
        raise ValueError("the prompt is empty")

    import mlx.core as mx
    from tqdm import tqdm

    from metal_kernels import metal_available
    from pico_vllm.llm import LLM

    if config.dtype in ("float16", "bfloat16") and not metal_available():
        print(f"pico-vllm: warning: {config.dtype} on the CPU is ~27x slower than float32 "
              "(--dtype auto picks float32 here)", file=sys.stderr)
    started = time.perf_counter()
    llm = LLM(**vars(config))
    if llm.engine.group is not None and llm.engine.group.rank() != 0:
        # Tensor or pipeline parallel: every rank runs the same requests; rank 0 alone speaks. (Start-up
        # errors, raised above, are printed by every rank.)
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    print(f"[pico-vllm] loaded {config.model or 'embedded SmolLM2-135M-Instruct'} in "
          f"{time.perf_counter() - started:.1f}s; {llm.engine.memory_summary()}", file=sys.stderr)
    prompt = text
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = llm.apply_chat_template(messages + [{"role": "user", "content": text}])

    engine, stats = llm.engine, llm.engine.stats
    prompt_before, generated_before = stats.prompt_tokens, stats.generated_tokens
    mx.reset_peak_memory()
    started = time.perf_counter()
    first_token_at, last = None, None
    streamed = engine.add_request(prompt, params[0])  # a request that can never fit raises here
    for p in params[1:]:
        engine.add_request(prompt, p)
    # A prompt longer than one step's token budget takes several steps: show how far it got.
    computed, total = engine.prompt_progress(streamed)
    prefill = tqdm(total=total, desc="prefill", unit="tok", leave=False, file=sys.stderr,
                   disable=total <= config.max_num_batched_tokens)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_token_at is None:
                first_token_at = time.perf_counter() - started
                prefill.close()
                if not args.chat:
                    terminal.write(text)
            if out.request_id == streamed:
                terminal.write(out.delta_text)
                last = out
        if first_token_at is None:
            prefill.update(engine.prompt_progress(streamed)[0] - prefill.n)
    terminal.end_line()
    if args.logprobs is not None:  # after the text, which they would cut into on a terminal
        print_logprobs(last, llm.engine.tokenizer)
    elapsed = time.perf_counter() - started
    prompt_tokens = stats.prompt_tokens - prompt_before
    generated = stats.generated_tokens - generated_before
    decode_time = max(elapsed - first_token_at, 1e-9)
    print("==========", file=sys.stderr)
    print(f"Prompt: {prompt_tokens} tokens, {prompt_tokens / first_token_at:.1f} tokens-per-sec "
          f"({args.num_requests} request(s); {stats.cached_prompt_tokens} from the prefix cache)",
          file=sys.stderr)
    print(f"Generation: {generated} tokens, {(generated - args.num_requests) / decode_time:.1f} "
          f"tokens-per-sec", file=sys.stderr)
    print(f"Time to first token: {first_token_at:.3f} s", file=sys.stderr)
    print(f"Peak memory: {mx.get_peak_memory() / 1e9:.3f} GB", file=sys.stderr)


def print_logprobs(out: RequestOutput, tokenizer) -> None:
    """On stderr, one line per generated token: its text (as the server shows it: the token
    decoded alone, so a piece of a multi-byte character reads '\ufffd'), id and log-probability,
    then the top-n alternatives: ``' Paris' 7042 -0.262  top: ' Paris' -0.262, ' the' -2.011``."""
    def text(token_id: int) -> str:
        return repr(tokenizer.decode([token_id]))

    print("Logprobs (token, id, logprob; top-n):", file=sys.stderr)
    for token, logprob, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        alternatives = ", ".join(f"{text(t)} {lp:.3f}" for t, lp in top)
        print(f"  {text(token)} {token} {logprob:.3f}" + (f"  top: {alternatives}" if top else ""),
              file=sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    default_rates = "1,2" if args.quick else "0.5,1,2,4"
    try:
        rates = [float(r) for r in (args.rates or default_rates).split(",")]
    except ValueError:
        raise ValueError(f"--rates must be comma-separated numbers, got {args.rates!r}") from None
    if not all(0 < r < math.inf for r in rates):
        raise ValueError(f"--rates must be positive and finite, got {args.rates!r}")
    if args.max_num_seqs < 1:
        raise ValueError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    split = args.pipeline_parallel_size
    if split < 1:
        raise ValueError(f"--pipeline-parallel-size must be >= 1, got {split}")
    workloads = args.workload or list(DEFAULT_WORKLOADS)
    engines = args.engine or (list(DEFAULT_ENGINES) if split == 1 else ["pico-vllm"])
    check_selection(workloads, engines, args.speculative_config, split)
    if args.speculative_config is not None:
        EngineConfig(speculative_config=args.speculative_config)  # a bad one fails before loading
    from pico_vllm.bench_engines import benchmark  # MLX: only once the arguments are good

    results, facts = benchmark(args.model, workloads, engines, args.quick, rates, args.max_num_seqs,
                               speculative_config=args.speculative_config, pipeline_parallel_size=split)
    if facts["rank"] != 0:  # every rank ran the same engines; rank 0 alone reports
        return
    print(f"model {facts['model']} ({facts['parameters'] / 1e6:.0f}M parameters) on {facts['device']}; "
          f"peak fp32 matmul {facts['peak_matmul_flops'] / 1e9:.1f} GFLOP/s")
    print(format_table(results, facts))
    paths = save(results, facts, Path(args.output))
    print("wrote " + ", ".join(str(p) for p in paths))


def serve(args: argparse.Namespace) -> None:
    models = args.model or [None]
    names = args.served_model_name or [m or "pico-vllm-default" for m in models]
    if len(names) != len(models):
        raise ValueError(f"got {len(names)} --served-model-name for {len(models)} --model")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.rate_limit is not None and not args.rate_limit > 0:
        raise ValueError(f"--rate-limit must be > 0, got {args.rate_limit}")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if not args.request_read_timeout > 0:
        raise ValueError(f"--request-read-timeout must be > 0, got {args.request_read_timeout}")
    if args.max_concurrent_per_key is not None and args.max_concurrent_per_key < 1:
        raise ValueError(f"--max-concurrent-per-key must be >= 1, got {args.max_concurrent_per_key}")
    if args.mlx_cache_limit is not None and args.mlx_cache_limit < 0:
        raise ValueError(f"--mlx-cache-limit must be >= 0, got {args.mlx_cache_limit}")
    api_key = _api_key(args)
    configs = []
    for model in models:
        args.model = model
        configs.append(engine_config(args))

    import uvicorn

    from pico_vllm.server.app import create_app
    from pico_vllm.server.async_engine import AsyncEngine
    from pico_vllm.server.drain import DrainingServer
    from pico_vllm.server.limits import TimedH11Protocol

    if configs[0].tensor_parallel_size > 1 or configs[0].pipeline_parallel_size > 1:
        if len(configs) > 1:
            raise ValueError("--tensor-parallel-size and --pipeline-parallel-size serve one --model")
        import mlx.core as mx

        if mx.distributed.init().rank() != 0:  # no HTTP here: follow rank 0's requests
            from pico_vllm.server.async_engine import follow

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 drains, then tells us to stop
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            follow(configs[0])
            _exit_skipping_destructors()
    _check_port_free(args.host, args.port)  # before minutes of loading, not after
    if args.mlx_cache_limit is not None:
        import mlx.core as mx

        mx.set_cache_limit(args.mlx_cache_limit)
    engines, code = [], 1
    try:
        for config, name in zip(configs, names):
            engines.append(AsyncEngine(config, name, args.tool_call_parser, args.reasoning_parser))
            print(f"[pico-vllm] {name}: {engines[-1].engine.memory_summary()}", file=sys.stderr)
        print(f"[pico-vllm] serving {', '.join(names)} on http://{args.host}:{args.port}/v1", file=sys.stderr)
        app = create_app(engines, api_key, args.max_queue, args.rate_limit, args.max_request_bytes,
                         args.allowed_origins, args.max_concurrent_per_key)
        # Each connection is its own asyncio task, so a slow or silent client holds only its own,
        # and not for long: an idle keep-alive connection is closed after 5 s, one that does not
        # send its whole request in time after --request-read-timeout.
        protocol = partial(TimedH11Protocol, read_timeout=args.request_read_timeout)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", http=protocol,
                                timeout_graceful_shutdown=5, timeout_keep_alive=5)
        server = DrainingServer(config, app, engines, args.shutdown_timeout)
        server.run()
        code = server.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"pico-vllm: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("[pico-vllm] interrupted", file=sys.stderr)
        code = 130
    except SystemExit as e:  # uvicorn's, after logging why it could not start
        code = e.code if isinstance(e.code, int) and e.code else 1
    except BaseException as e:
        print(f"pico-vllm: error: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        for engine in engines:  # their threads would keep the process alive
            engine.shutdown()
        _exit_skipping_destructors(code)


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key, --api-key-file or PICO_VLLM_API_KEY (at most one of them)."""
    given = {name: value for name, value in (
        ("--api-key", args.api_key), ("--api-key-file", args.api_key_file),
        ("PICO_VLLM_API_KEY", os.environ.get("PICO_VLLM_API_KEY"))) if value}
    if len(given) > 1:
        raise ValueError(f"give the API key one way, not {' and '.join(given)}")
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--api-key-file: {e.strerror}: {args.api_key_file}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"--api-key-file: {args.api_key_file} is empty")
        return lines[0].strip()
    return args.api_key or os.environ.get("PICO_VLLM_API_KEY") or None


def _check_port_free(host: str, port: int) -> None:
    """ValueError (one line, exit 2) if ``host:port`` cannot be listened on."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _exit_skipping_destructors(code: int = 0) -> None:
    """Exit with ``code`` now. MLX (0.32, Linux) can abort in its exit-time destructors once a
    worker thread has run the model ("terminate called without an active exception"); the server
    has shut everything down by the time it calls this, so leave without running them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """The ``pico-vllm`` entry point; returns the exit status (2: bad input, 130: Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"] and argv[1:2] not in (["-h"], ["--help"]):
        from pico_vllm.launch import launch

        return launch(argv[1:])  # mlx.launch's own options, which argparse would take for ours
    args = build_parser().parse_args(argv)
    terminal = _Terminal()
    try:
        if args.command == "generate":
            generate(args, terminal)
        elif args.command == "bench":
            run_bench(args)
        elif args.command == "serve":
            serve(args)
    except (ValueError, FileNotFoundError) as e:
        terminal.end_line()
        print(f"pico-vllm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        terminal.end_line()  # the partial output stays on screen
        print("[pico-vllm] interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
