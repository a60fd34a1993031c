"""The `prefixport` command: a thin layer over the library. Library errors become ClickExceptions."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from .errors import PrefixportError
from .progress import Progress

if TYPE_CHECKING:
    from .adapters import Bundle
    from .runtime import BackendSettings


def _errors(fn):
    """Turn the library's own errors into a one-line message and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PrefixportError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _backend_flags(fn):
    """--backend, --provider, --precision and --device, shared by generate, bench and serve: the
    command receives them, with --threads where it has that option, as one `BackendSettings`
    keyword, `settings` (refused there if they cannot work together). Put it below `_errors`."""

    command = fn

    @functools.wraps(command)
    def with_settings(*args, backend: str, provider: str | None, precision: str | None, device: str | None,
                      **kwargs):
        from .runtime import BackendSettings

        settings = BackendSettings(backend, provider, device, precision, kwargs.pop("threads", None))
        return command(*args, settings=settings, **kwargs)

    fn = with_settings
    fn = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                      help="cpu, or cuda (an NVIDIA GPU). Default: what the backend and provider run on.")(fn)
    fn = click.option("--precision", type=click.Choice(["fp32", "fp16"]), default=None,
                      help="tensorrt backend: which built engine to run (default: fp32 where both exist).")(fn)
    fn = click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
                      help="onnxruntime backend: the execution provider (cuda, tensorrt: onnxruntime-gpu).")(fn)
    fn = click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                      show_default=True,
                      help="tensorrt runs the engine `prefixport build-engine` built for this GPU.")(fn)
    return fn


@click.group()
@click.version_option(package_name="prefixport")
def main() -> None:
    """Deploy soft-prompt and prefix adapters on one frozen, exported LLM."""


@main.command()
@click.argument("outdir", type=click.Path(file_okay=False))
@click.option("--model", "model_spec", default="smollm2-135m-instruct", show_default=True,
              help="smollm2-135m-instruct, a local Hugging Face folder, a .gguf file, or a hub id "
                   "already in the local Hugging Face cache.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset version.")
@click.option("--no-verify", is_flag=True, help="Skip checking the graph against PyTorch.")
@click.option("--overwrite", is_flag=True, help="Replace OUTDIR if it already holds an export.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Fuse attention (GroupQueryAttention), RMSNorm and rotary into ONNX Runtime's ops. "
                   "--no-optimize keeps plain ONNX ops only (for runtimes without ONNX Runtime's contrib ops).")
@click.option("--quantize", type=click.Choice(["int8", "int4", "int4-rtn"]), default=None,
              help="Weight-only quantisation of the MatMul weights (MatMulNBits, block 32): int8 rounds to "
                   "nearest; int4 keeps the weights' own 4-bit blocks (exact for the default model's GGUF); "
                   "int4-rtn rounds to nearest (faster, less faithful). The export reports greedy agreement "
                   "with the float graph.")
@click.option("--check-adapter", "check_adapters", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="With --quantize: also report (and record in the manifest) greedy agreement with the float "
                   "graph through this adapter bundle, converted for the same base model. Repeatable.")
@click.option("--kv-cache-dtype", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="The KV cache's dtype: float (the export's --dtype) or int8 (a quarter of float32's memory per "
                   "token; per-channel scales calibrated at export, covering each --check-adapter's keys and values "
                   "too; reports greedy agreement with the float cache, through each of them). Not with --no-optimize.")
@click.option("--lora", is_flag=True,
              help="Take LoRA and IA3 tensors per row at run time (any LoRA up to --lora-max-rank on the "
                   "--lora-targets modules, any IA3 on the --ia3-targets ones), mixed per row with the other adapters.")
@click.option("--lora-targets", default="", metavar="NAMES",
              help="With --lora: the modules of a decoder layer taking LoRA, comma-separated PEFT-style names "
                   "(e.g. q_proj,v_proj). Default: every linear module (PEFT's all-linear).")
@click.option("--ia3-targets", default=None, metavar="NAMES",
              help="With --lora: the modules taking IA3, comma-separated, or 'none'. Default: PEFT's IA3 targets "
                   "for the architecture (Llama: k_proj, v_proj, down_proj).")
@click.option("--lora-max-rank", type=click.IntRange(min=1), default=16, show_default=True,
              help="With --lora: the largest LoRA rank the export takes (lower ranks are zero-padded to it).")
@click.option("--merge-lora", "merge_lora", default=None, metavar="PEFT_DIR",
              type=click.Path(exists=True, file_okay=False),
              help="Fold this PEFT LoRA checkpoint (adapter_model.safetensors) into the base weights before export: "
                   "the graph computes base + LoRA at no run-time cost. Adapters are then converted against this "
                   "export (its fingerprint is the merged weights'); --lora still takes LoRA per row on top.")
@_errors
def export(outdir: str, model_spec: str, dtype: str, opset: int, no_verify: bool, overwrite: bool,
           optimize: bool, quantize: str | None, check_adapters: tuple[str, ...], kv_cache_dtype: str,
           lora: bool, lora_targets: str, ia3_targets: str | None, lora_max_rank: int,
           merge_lora: str | None) -> None:
    """Export a causal LM to OUTDIR: ONNX graph, manifest, tokenizer."""
    from .exporter import LoraOptions, export_model

    if not lora and (lora_targets or ia3_targets is not None or lora_max_rank != 16):
        raise click.UsageError("--lora-targets, --ia3-targets and --lora-max-rank go with --lora")
    names = lambda text: tuple(n.strip() for n in text.split(",") if n.strip())  # noqa: E731
    options = LoraOptions(names(lora_targets), None if ia3_targets is None else
                          () if ia3_targets.strip() == "none" else names(ia3_targets), lora_max_rank) if lora else None
    progress = Progress(_echo_err)
    report = export_model(outdir, model=model_spec, dtype=dtype, opset=opset, verify_graph=not no_verify,
                          overwrite=overwrite, optimize=optimize, quantize=quantize,
                          check_adapters=check_adapters, progress=progress, kv_cache_dtype=kv_cache_dtype,
                          lora=options, merge_lora=merge_lora)
    m = report.manifest
    dtypes = (f"{quantize} weights, {m.dtype} activations" if quantize else m.dtype) \
        + (", int8 KV cache" if m.kv_quantized else "")
    click.echo(f"exported {m.source} ({m.architecture}, {m.num_layers} layers, {dtypes}) to {report.folder}")
    click.echo(f"  time: {progress.elapsed():.1f}s ("
               + ", ".join(f"{k} {v:.1f}s" for k, v in report.seconds.items()) + ")")
    click.echo("  files: " + ", ".join(f"{k} {_mb(v)}" for k, v in report.file_bytes.items()))
    if report.verification:
        worst = max(c.logits_max_abs_diff for c in report.verification)
        click.echo(f"  verified against PyTorch: logits max abs diff {worst:.2e} (tolerance {report.tolerance:g})")
        for c in report.verification:
            click.echo(f"    {c.name}: logits {c.logits_max_abs_diff:.2e}, KV (relative) {c.present_max_rel_diff:.2e}")
    else:
        click.echo("  not verified (--no-verify)")
    if m.merged_lora:
        ml = m.merged_lora
        click.echo(f"  merged LoRA {ml['source']} (rank {ml['rank']}{', DoRA' if ml['use_dora'] else ''}, "
                   f"{ml['modules']} modules: {', '.join(ml['targets'])}); fingerprint {m.fingerprint[:19]}...")
    if m.fused_ops:
        click.echo("  fused: " + ", ".join(f"{n} x{k}" for n, k in m.fused_ops.items()))
    if m.weights:
        click.echo(f"  LoRA (rank <= {m.weights.max_rank}) on {', '.join(m.weights.lora)}; IA3 on "
                   + (", ".join(f"{p} ({side})" for p, side in m.weights.ia3.items()) or "none"))
    if report.agreement is not None:
        click.echo(f"  {quantize} weights vs float: {report.agreement.summary()}")
    for name, agreement in report.adapter_agreement.items():
        click.echo(f"    through adapter {name}: {agreement.summary()}")
    if report.kv_agreement is not None:
        click.echo(f"  int8 KV cache vs float cache: {report.kv_agreement.summary()}")
    for name, agreement in report.kv_adapter_agreement.items():
        click.echo(f"    through adapter {name}: {agreement.summary()}")
    measured = {**({f"{quantize} weights": report.agreement} if report.agreement is not None else {}),
                **{f"through {n}": a for n, a in report.adapter_agreement.items()},
                **({"int8 KV cache": report.kv_agreement} if report.kv_agreement is not None else {}),
                **{f"int8 KV cache through {n}": a for n, a in report.kv_adapter_agreement.items()}}
    if measured:
        from .runtime.agreement import MEANING, verdict

        click.echo(f"  ({MEANING})")
        click.echo(f"  verdict: {verdict(measured)}")


@main.command()
@click.argument("outdir", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--chat/--raw", default=None,
              help="Wrap PROMPT in the export's chat template, or not. Default: the adapter's prompt format "
                   "(recorded at conversion: raw, chat or a template), else chat when the export has a template.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--seed", type=int, default=None, help="Makes sampling reproducible.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--stop", "stop", multiple=True, help="A stop string (repeatable); cut from the output.")
@click.option("--adapter", "adapter", default=None, metavar="NAME_OR_PATH",
              help="An adapter bundle: a file, or a NAME under OUTDIR/adapters/.")
@click.option("--speculative", default=None, metavar="prompt-lookup|draft:EXPORT_DIR",
              help="Speculative decoding: propose tokens by n-gram lookup in the prompt and the output, or with a "
                   "draft export of the same model (e.g. --quantize int8), and verify several per pass over the "
                   "weights; the output does not change (greedy, or sampled with the same seed).")
@_errors
@_backend_flags
def generate(outdir: str, prompt: str, max_new_tokens: int, chat: bool | None, temperature: float,
             top_p: float, top_k: int, seed: int | None, repetition_penalty: float, stop: tuple[str, ...],
             adapter: str | None, speculative: str | None, settings: BackendSettings) -> None:
    """Generate text from PROMPT with the export in OUTDIR, streamed as it is produced."""
    from .adapters import resolve_adapter
    from .runtime import Engine
    from .runtime.speculative import parse_method

    progress = Progress(_echo_err)
    backend, options = settings.load_kwargs()
    speculative, draft = parse_method(speculative)
    with progress.stage(f"loading {outdir} ({backend})"):
        engine = Engine.load(outdir, backend=backend, draft=draft, **options)
        if adapter:
            engine.add_adapter(adapter, resolve_adapter(outdir, adapter))
    if chat is None and (adapter is None or engine.store.prompt_format(adapter) is None):
        chat = engine.tokenizer.chat_template is not None  # else None: the Engine applies the adapter's format
    stream = engine.stream(prompt, max_new_tokens=max_new_tokens, chat=chat, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed, repetition_penalty=repetition_penalty,
                           stop=stop, adapter=adapter, speculative=speculative)
    for delta in stream:
        click.echo(delta, nl=False)
        sys.stdout.flush()
    click.echo()
    r = stream.result
    spec = engine.stats().speculative.method(speculative)
    accepted = f", {spec.mean_accepted:.2f} proposed tokens accepted per pass" if spec else ""
    _echo_err(f"[{len(r.token_ids)} tokens, {r.finish_reason}; prefill {r.timings['prefill_s'] * 1000:.0f} ms "
              f"({r.prompt_tokens} prompt tokens), decode {r.timings['decode_tokens_per_s']:.1f} tok/s{accepted}]")


class _BenchGroup(click.Group):
    """`prefixport bench suite|serve ...`, and `prefixport bench OUTDIR [OPTIONS]` as before: a first
    argument that names no subcommand (an export folder, an option) goes to `suite`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in self.get_help_option_names(ctx):
            args = ["suite", *args]
        return super().parse_args(ctx, args)


@main.group(cls=_BenchGroup)
def bench() -> None:
    """Benchmark an export (`prefixport bench OUTDIR`: the suite) or a serving endpoint (`serve`)."""


@bench.command("suite")
@click.argument("outdir", type=click.Path(exists=True, file_okay=False))
@click.option("--adapters", "adapters", multiple=True, metavar="NAME_OR_PATH",
              help="Bundles to use (repeatable; default: all under OUTDIR/adapters).")
@click.option("--peft", "peft_dirs", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="The same adapters as PEFT checkpoints, for the PEFT-on-PyTorch columns (repeatable).")
@click.option("--quick", is_flag=True, help="Fewer sizes and repeats (about two minutes).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Default: OUTDIR/bench.")
@_errors
@_backend_flags
def bench_suite(outdir: str, adapters: tuple[str, ...], peft_dirs: tuple[str, ...], quick: bool, out: str | None,
                settings: BackendSettings) -> None:
    """Benchmark adapter swap, memory, latency and throughput against PEFT and the naive way
    (also `prefixport bench OUTDIR`).

    On a GPU (--device cuda, or a GPU backend) memory is the device's VRAM counter."""
    from .bench import run_bench

    progress = Progress(_echo_err)
    results, written = run_bench(outdir, list(adapters), list(peft_dirs), settings=settings, quick=quick, out=out,
                                 say=progress.say)
    click.echo(written["markdown"].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))


def _parsed(name: str):
    """A click callback: prefixport.bench's parser `name` of the option's value (None stays None),
    its ValueError the option's usage error."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        from .bench import serve_data, serve_metrics

        parse = getattr(serve_data, name, None) or getattr(serve_metrics, name)
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


@bench.command("serve")
@click.option("--base-url", required=True, help="The server, e.g. http://127.0.0.1:8000 (with or without /v1).")
@click.option("--model", required=True, help="The model name to send (with --dataset adapters: the base model).")
@click.option("--api-key", default=None, help="Sent as `Authorization: Bearer KEY`.")
@click.option("--tokenizer", required=True, type=click.Path(exists=True),
              help="An export folder (with tokenizer.json) or a tokenizer.json: makes prompts of exact token "
                   "lengths and counts tokens where the server sends no usage.")
@click.option("--dataset", type=click.Choice(["random", "shared-prefix", "adapters", "file"]), default="random",
              show_default=True, help="random: lengths from --input-len/--output-len; shared-prefix: every prompt "
              "starts with the same --prefix-len tokens; adapters: random, the models of --adapters in turn; "
              "file: the lengths in --lengths.")
@click.option("--input-len", default="100:1000", show_default=True, callback=_parsed("parse_range"),
              help="Prompt tokens, N or LO:HI (uniform); shared-prefix: the part after the prefix.")
@click.option("--output-len", default="64", show_default=True, callback=_parsed("parse_range"),
              help="max_tokens per request, N or LO:HI (uniform).")
@click.option("--prefix-len", type=click.IntRange(min=1), default=512, show_default=True,
              help="shared-prefix: the tokens every prompt starts with.")
@click.option("--adapters", default=None, metavar="A,B,...",
              callback=_parsed("parse_names"),
              help="--dataset adapters: the model names to cycle through, one per request.")
@click.option("--lengths", "lengths_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="--dataset file: JSON lines {\"input_len\": N, \"output_len\": M}, or CSV input_len,output_len.")
@click.option("--num-prompts", type=click.IntRange(min=1), default=None,
              help="Requests per sweep point (default 48; --dataset file: the file's rows).")
@click.option("--concurrency", default=None, callback=_parsed("parse_concurrency"),
              help="A sweep of fixed concurrencies (closed loop), e.g. 1,4,16 (the default without --rate).")
@click.option("--rate", default=None, callback=_parsed("parse_rates"),
              help="A sweep of Poisson request rates (req/s, open loop), e.g. 0.5,1,2,inf (inf: all at once).")
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="With --rate: the most requests in flight (later arrivals wait).")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="completions sends the prompt text (exact lengths); chat one user message holding it.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Send ignore_eos, so every request generates its max_tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the lengths, texts and arrivals.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True,
              help="Requests sent before the sweep, not counted.")
@click.option("--slo", default="", callback=_parsed("parse_slo"),
              help="Goodput's bounds, e.g. ttft=2s,itl=200ms (keys ttft, itl: the request's p99 gap, tpot, e2e; "
                   "units ms or s).")
@click.option("--label", default=None, help="Names this side in the report (default: --model).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write DIR/serve.json, serve.md and serve.png (default: print the report only).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600, show_default=True,
              help="Seconds a request may take before it counts as failed.")
@_errors
def bench_serve(base_url: str, model: str, api_key: str | None, tokenizer: str, dataset: str,
                input_len: tuple[int, int], output_len: tuple[int, int], prefix_len: int,
                adapters: tuple[str, ...] | None, lengths_file: str | None, num_prompts: int | None,
                concurrency: list[int] | None, rate: list[float] | None, max_concurrency: int | None, endpoint: str,
                ignore_eos: bool, seed: int, warmup: int, slo: dict[str, float], label: str | None, out: str | None,
                timeout: float) -> None:
    """Benchmark an OpenAI-compatible server (prefixport serve, llama-server, vLLM) under load.

    Streamed requests at each concurrency or request rate of the sweep; per point: requests, duration,
    throughputs, TTFT, inter-token latency, time per output token, end-to-end latency and goodput
    (docs/benchmarks.md, "Serving benchmark")."""
    from .bench.serve import ServeBenchConfig, run_serve_bench
    from .bench.serve_report import markdown

    if concurrency and rate:
        raise click.UsageError("give --concurrency or --rate, not both")
    config = ServeBenchConfig(base_url=base_url, model=model, tokenizer=tokenizer, dataset=dataset,
                              input_len=input_len, output_len=output_len, prefix_len=prefix_len,
                              adapters=adapters or (), lengths_file=lengths_file, num_prompts=num_prompts,
                              concurrency=tuple(concurrency or (() if rate else (1, 4, 16))), rates=tuple(rate or ()),
                              max_concurrency=max_concurrency, endpoint=endpoint, ignore_eos=ignore_eos, seed=seed,
                              warmup=warmup, slo=slo, label=label, api_key=api_key, timeout_s=timeout)
    progress = Progress(_echo_err)
    result, written = run_serve_bench(config, out, say=progress.say)
    click.echo(markdown(result))
    if written:
        click.echo("wrote " + ", ".join(str(p) for p in written.values()))
    if not any(point["requests"]["ok"] for point in result["points"]):
        raise click.ClickException("no request was answered: the errors are in the report")


@main.command()
@click.argument("outdir", type=click.Path(exists=True, file_okay=False))
@click.option("--adapters", "adapters_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of bundles, each NAME.safetensors served as model NAME; POST /v1/adapters (with "
                   "--allow-adapter-admin) loads more from it. Default: OUTDIR/adapters.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Most requests decoding at once; more wait in a queue.")
@click.option("--prefill-budget", type=int, default=32, show_default=True,  # = runtime.scheduler.DEFAULT_PREFILL_BUDGET
              help="About the most prompt tokens prefilled per decode step of up to 4 rows, proportionally more for "
                   "larger batches (chunked prefill: a long prompt comes in over several steps while the running "
                   "requests go on; prompts earliest deadline first, short ones before long ones, none starved), so "
                   "arrivals delay running requests by a bounded amount.")
@click.option("--max-waiting", type=int, default=256, show_default=True,
              help="Most requests queued for the batch; more are refused with 503 and Retry-After.")
@click.option("--max-body-mb", type=float, default=4.0, show_default=True,
              help="Largest request body accepted, in MiB (413 beyond).")
@click.option("--api-key", envvar="PREFIXPORT_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on /v1/* (or set PREFIXPORT_API_KEY): one admin key.")
@click.option("--keys", "keys_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A TOML file of API keys: id, key (or its sha256), role admin|user, the models each may use, "
                   "max_concurrent, tokens_per_minute (docs/security.md). Reloaded when it changes and on SIGHUP.")
@click.option("--allow-adapter-admin", is_flag=True,
              help="Let admin keys register and delete adapters over HTTP (POST/DELETE /v1/adapters; off: 403).")
@click.option("--private-metrics/--public-metrics", "private_metrics", default=None,
              help="Whether /metrics and /health need an admin key (default: private with --keys, where tenants "
                   "must not see each other's adapters and traffic; public otherwise).")
@click.option("--max-refused-per-minute", type=click.IntRange(min=1), default=None,
              help="With --keys: a key with more refused requests (4xx) in a minute (default: 60) waits 1 s and gets "
                   "429 for each request, unread, while it goes on (a flood of bad requests costs the other tenants "
                   "nothing).")
@click.option("--max-stops", type=click.IntRange(min=1), default=4, show_default=True,
              help="Most stop strings per request (OpenAI's 4; each at most 256 characters): more is a 400.")
@click.option("--shared-prompt-cache", is_flag=True,
              help="Share prompt-cache blocks across keys (default: each key's own; a request's cache_salt "
                   "narrows further).")
@click.option("--model-name", default=None, help="The base model's name in the API (default: the export's model).")
@click.option("--adapter-budget-mb", type=float, default=None,
              help="Keep at most this many MiB of adapters in memory (LRU); default: all.")
@click.option("--kv-cache-mb", type=float, default=2048, show_default=True,
              help="Most MiB the KV cache may hold (rows x capacity x 2 x layers x kv_heads x head_dim x dtype "
                   "size); a request that cannot fit yet waits, one that never can is refused (400).")
@click.option("--max-context", type=int, default=None,
              help="Most positions per request (virtual tokens + prompt + new tokens); default: the model's.")
@click.option("--prompt-cache-mb", type=click.FloatRange(min=0), default=512, show_default=True,
              help="Most MiB of prompt prefixes' keys and values kept for reuse by adapter (LRU); 0 turns "
                   "the prompt cache off.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--speculative", default=None, metavar="prompt-lookup|draft:EXPORT_DIR",
              help="Speculative decoding for every request while the batch is small (see --speculate-max-batch): "
                   "n-gram lookup, or a draft export of the same model (e.g. --quantize int8).")
@click.option("--speculate-max-batch", type=click.IntRange(min=1), default=None,
              help="Speculate while at most this many requests decode (default: the measured break-even, "
                   "docs/serving.md).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run as a Ray Serve deployment (serve.multiplexed adapters) instead of one process.")
@click.option("--replicas", type=int, default=1, show_default=True, help="Ray Serve replicas (with --ray).")
@click.option("--max-adapters", type=int, default=8, show_default=True,
              help="Adapters each Ray Serve replica keeps registered, least recently used dropped (with --ray).")
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=None,
              help="CPUs each Ray Serve replica reserves (with --ray; default: --threads, or 1).")
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=0,
              help="GPUs each Ray Serve replica reserves (with --ray; at least 1 where the backend runs on a GPU).")
@click.option("--app-name", default="prefixport", show_default=True,
              help="The Ray Serve application's name (with --ray); one of that name already running is refused "
                   "unless --replace.")
@click.option("--route-prefix", default="/", show_default=True,
              help="Where the application is served on the cluster's HTTP proxy (with --ray): the API is at "
                   "PREFIX/v1.")
@click.option("--replace", is_flag=True, help="Redeploy over a running application of the same --app-name.")
@_errors
@_backend_flags
def serve(outdir: str, host: str, port: int, use_ray: bool, settings: BackendSettings, **options: Any) -> None:
    """Serve the export in OUTDIR and its adapters with an OpenAI-compatible API."""
    from .server.settings import ServeSettings

    options["private_ops"] = options.pop("private_metrics")
    serving = ServeSettings.from_options(outdir, backend=settings, **options)
    ray_only = {"--app-name": options["app_name"] != "prefixport", "--route-prefix": options["route_prefix"] != "/",
                "--replace": options["replace"], "--replica-cpus": options["replica_cpus"] is not None,
                "--replica-gpus": bool(options["replica_gpus"]), "--replicas": options["replicas"] != 1,
                "--max-adapters": options["max_adapters"] != 8}
    if not use_ray and any(ray_only.values()):
        raise click.UsageError(f"{', '.join(k for k, v in ray_only.items() if v)} go with --ray")
    _audit_to_stderr()
    if use_ray:
        from .server.ray_serve import run_ray

        run_ray(outdir, serving, host=host, port=port)
        return
    import uvicorn

    from .runtime import Engine
    from .server import create_app

    access = serving.server.access.build()  # a bad keys file: one clear error before anything loads
    sock = _bind(host, port)  # before loading anything: a busy port is one clear error, nothing claimed
    engine = Engine.load(outdir, settings=serving.engine)
    app = create_app(engine, serving.server, access=access)
    server = app.state.server
    _echo_err(f"serving {server.model_name} and {len(engine.adapters)} adapters "
              f"({', '.join(engine.adapters) or 'none'}) on http://{host}:{port}/v1 (max batch "
              f"{serving.server.max_batch}, {engine.backend.name} on {engine.backend.device})")
    signal.signal(signal.SIGHUP, lambda *_: access.keys.reload())  # new keys without dropping a request
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on (uvicorn.run swallows it too)
        pass


def _audit_to_stderr() -> None:
    """Audit events (adapter admin, key reloads: JSON lines, `server.tenants.audit`) to stderr."""
    audit = logging.getLogger("prefixport.audit")
    if not audit.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        audit.addHandler(handler)
        audit.setLevel(logging.INFO)
        audit.propagate = False


def _bind(host: str, port: int):
    """A listening socket on host:port, or a ClickException saying why not (the port in use, say)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a closed server's port is free
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is already in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise click.ClickException(f"{host}:{port} {why}; choose another with --port (and --host)") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@main.command("build-engine")
@click.argument("outdir", type=click.Path(exists=True, file_okay=False))
@click.option("--fp16", is_flag=True, help="Half precision: the float32 graph converted (inputs and outputs "
              "stay float32); a float16 export is always built in float16.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="Most rows in one call.")
@click.option("--max-seq", type=int, default=None, help="Most prompt tokens in one prefill (default: 512).")
@click.option("--max-past", type=int, default=None,
              help="Most cached positions a decode step reads; a row's context is this + 1. "
                   "Default: 2047, or the model's context - 1 if smaller.")
@click.option("--max-virtual", type=int, default=None,
              help="Most virtual tokens of an adapter, soft prompt or prefix (default: 128).")
@click.option("--workspace-mb", type=int, default=None, help="Cap TensorRT's builder workspace.")
@click.option("--no-verify", is_flag=True, help="Skip checking the engine against ONNX Runtime on the CPU.")
@click.option("--list", "list_only", is_flag=True, help="List the engines built in OUTDIR and exit.")
@_errors
def build_engine(outdir: str, fp16: bool, max_batch: int, max_seq: int | None, max_past: int | None,
                 max_virtual: int | None, workspace_mb: int | None, no_verify: bool, list_only: bool) -> None:
    """Build a TensorRT engine for this GPU from OUTDIR's model.onnx (a --no-optimize export).

    Saved as OUTDIR/engines/KEY.plan, KEY = GPU model, compute capability, TensorRT version and
    precision; `--backend tensorrt` then runs it with any adapter."""
    from .engines import records

    if list_only:
        found = records(outdir)
        for r in found:
            click.echo(f"{r.describe()}: {r.plan}, {r.plan_bytes / 1e6:.1f} MB, limits {r.limits}")
        if not found:
            click.echo(f"no engines in {outdir}; build one with `prefixport build-engine {outdir}`")
        return
    from .engines.build import build_engine as build

    progress = Progress(_echo_err)
    record = build(outdir, fp16=fp16, max_batch=max_batch, max_seq=max_seq, max_past=max_past,
                   max_virtual=max_virtual, workspace_mb=workspace_mb, verify=not no_verify, say=progress.say)
    click.echo(f"built {record.describe()} in {record.build_seconds:.0f}s: {record.plan}")
    for check in record.verification:
        click.echo(f"  {check['name']}: logits {check['logits_max_abs_diff']:.2e} vs ONNX Runtime (CPU), "
                   f"KV (relative) {check['present_max_rel_diff']:.2e}")
    if not record.verification:
        click.echo("  not verified (--no-verify)")


@main.group()
def adapter() -> None:
    """Convert and inspect adapters."""


@adapter.command("convert")
@click.argument("peft_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The export the adapter is for (its base model).")
@click.option("--name", default=None, help="Bundle name (default: the checkpoint folder's name).")
@click.option("--task", type=int, default=None, help="Task id of a multitask prompt-tuning checkpoint.")
@click.option("--bake-prefix", is_flag=True, help="Turn a soft prompt into a prefix (KV) bundle.")
@click.option("--prompt-format", default=None, metavar="raw|chat|TEMPLATE",
              help="How the adapter's prompts were formatted in training, recorded in the bundle: raw (the text "
                   "as is), chat (the model's chat template, one user message) or a template with one {prompt}, "
                   "e.g. $'Question: {prompt}\\nAnswer:' in bash. generate and serve then apply it. Default: not "
                   "recorded.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Output file (default: EXPORT/adapters/NAME.safetensors).")
@click.option("--force", is_flag=True,
              help="Convert even though the checkpoint's base_model_name_or_path names another model than the "
                   "export's (refused otherwise: its outputs would be wrong). For the same model under another name.")
@_errors
def adapter_convert(peft_dir: str, export_dir: str, name: str | None, task: int | None, bake_prefix: bool,
                    prompt_format: str | None, out: str | None, force: bool) -> None:
    """Convert a PEFT prompt-tuning, p-tuning, multitask, prefix-tuning, LoRA or IA3 checkpoint to a bundle."""
    from pathlib import Path

    from .adapters import bundle_path, convert_for_export, save_bundle

    bundle = convert_for_export(peft_dir, export_dir, name=name, task=task, prompt_format=prompt_format,
                                force=force)
    path = Path(out) if out else bundle_path(export_dir, bundle.name)
    if bake_prefix:  # the graph runs once over the virtual tokens: the runtime's work
        from .runtime import Engine

        engine = Engine.load(export_dir)
        try:
            bundle = engine.bake_prefix(bundle)
        finally:
            engine.close()
    path = save_bundle(bundle, path)
    if bundle.kind in ("lora", "ia3"):  # weight adapters: no virtual tokens
        size = (f"rank {bundle.rank}, " if bundle.kind == "lora" else "") + f"{len(bundle.modules)} modules"
    else:
        size = f"{bundle.n_virtual} virtual tokens"
    click.echo(f"wrote {path}: {bundle.kind} adapter {bundle.name!r} ({bundle.metadata['peft_type']}), "
               f"{size}, {bundle.nbytes:,} bytes"
               + (f", prompt format {prompt_format!r}" if prompt_format is not None else ""))


@adapter.command("inspect")
@click.argument("adapter_file", metavar="FILE|NAME")
@click.option("--export", "export_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="An export folder: NAME is then a bundle in its adapters/ (as generate --adapter takes it), "
                   "and the bundle is checked against the export (base model, shapes).")
@_errors
def adapter_inspect(adapter_file: str, export_dir: str | None) -> None:
    """Show what an adapter bundle holds (and, with --export, that it fits that export)."""
    from .adapters import load_bundle, resolve_adapter
    from .adapters.base_model import model_name
    from .manifest import Manifest

    if export_dir is None:
        b = load_bundle(adapter_file)
    else:
        path = resolve_adapter(export_dir, adapter_file)
        b = load_bundle(path, Manifest.load(export_dir))
    meta = b.metadata
    rows = [("name", b.name), ("kind", b.kind), ("source PEFT type", meta["peft_type"]),
            *(_weight_rows(b) if b.kind in ("lora", "ia3") else [("n_virtual", str(b.n_virtual))]),
            ("dtype", meta["dtype"]), ("bytes", f"{b.nbytes:,}"),
            ("tensors", str(len(b.tensors))), ("base fingerprint", meta["fingerprint"]),
            ("format version", meta["format_version"])]
    rows += [(k, model_name(v) if k == "source" else v) for k, v in meta.items()  # a name, not a path
             if k in ("task", "source", "baked_from") and v]
    rows.append(("prompt format", repr(meta["prompt_format"]) if "prompt_format" in meta else "not recorded"))
    if export_dir is not None:
        rows.append(("fits", f"{export_dir} (its base model and shapes)"))
    for key, value in rows:
        click.echo(f"{key:>17}: {value}")


def _weight_rows(b: Bundle) -> list[tuple[str, str]]:
    """inspect's rows for a lora or ia3 bundle: its rank, modules, layers, scalings or sides."""
    paths = sorted({path for _, path in b.modules})
    layers = sorted({layer for layer, _ in b.modules})
    runs: list[list[int]] = []
    for layer in layers:  # consecutive layers as one run, "0-29"
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    spans = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)
    rows = [("targets", ", ".join(paths)), ("layers", spans)]
    if b.kind == "ia3":
        return rows + [("scale inputs", ", ".join(b.feedforward) or "none (every vector scales its output)")]
    scalings = b.scalings
    by_path = {p: {s for key, s in scalings.items() if key.split(".", 1)[1] == p} for p in paths}
    if len(set(scalings.values())) == 1:
        scaling = ("scaling", f"{next(iter(scalings.values())):g}")
    elif all(len(values) == 1 for values in by_path.values()):
        scaling = ("scalings", ", ".join(f"{p} {next(iter(v)):g}" for p, v in by_path.items()))
    else:
        scaling = ("scalings", f"{min(scalings.values()):g} to {max(scalings.values()):g}, per module (the "
                               "bundle's `scalings` metadata)")
    rule = " (alpha / sqrt(r): rsLoRA)" if b.metadata.get("use_rslora") == "true" else ""
    return [("rank", str(b.rank))] + rows + [(scaling[0], scaling[1] + rule)]


if __name__ == "__main__":
    main()
