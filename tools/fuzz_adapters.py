"""Fuzzing of the adapter readers: `load_bundle` (bundle files) and `convert` (PEFT checkpoint
folders) fed malformed, lying and hostile inputs, every outcome counted.

Cases are mutations of real seeds: the bundles and PEFT checkpoints of a tiny random Llama export
and of the same model exported with --lora (built here unless given, see below). They are made by
tools/fuzz_cases.py, whose docstring lists the families (header length, header JSON, offsets,
shapes, dtypes, values, truncation, metadata, tensors, random bytes, byte flips, pickles; PEFT
configs, weights, pickles, layouts; LoRA and IA3 bundles and checkpoints; and the unchanged seeds).
Case i of seed S is made from `random.Random(f"{S}:{i}")` alone, so `--replay S:i` rebuilds and
reruns it.

Each case runs `load_bundle(path, manifest)` (15% without the manifest) or `convert(dir, manifest,
task=...)` in a worker subprocess (tools/fuzz_worker.py) and is classified. The manifest is the
--lora export's for a case made from a LoRA or IA3 seed (or a checkpoint relabelled LORA or IA3),
except the `plain_export` sub-kind's, which must be refused; else the plain export's.

  ok          accepted; then checked independently of the reader: complete string metadata, known
              kind/version/dtype, n_virtual >= 1 and equal to the tensors' dimension (0 for lora and
              ia3), tensor names and shapes of the kind (and of this export, with the manifest), one
              float dtype, all finite, `check_bundle`/`check_fits` pass, a save/load round trip is
              identical; a converted unchanged seed equals its seed bundle (rank, scalings and
              feedforward too). lora: an A [r, in] and B [out, r] per module, r >= 1, one in/out per
              path, `rank` the largest r, one scaling per module, finite with s·B finite in float32;
              with the manifest: modules, layers, dims and r <= max rank the export takes. ia3: one
              vector [dim >= 1] per module, `feedforward` a list of its paths; with the manifest: the
              export's IA3 modules, on the side and of the length it takes. A converted LORA/IA3
              checkpoint holds exactly its lora_A / lora_B / ia3_l tensors one for one (read here
              with safetensors), and each scaling is alpha / r (or / sqrt(r)) for lora_alpha or an
              alpha_pattern value and r or a rank_pattern value. A failed check: `bad_accept`.
  error       a PrefixportError with a non-empty message (the wanted outcome for a broken input)
  crash       any other exception, an empty message, or the worker died (reproducer kept)
  hang        no answer within --timeout seconds: the worker is killed and restarted
  memory      MemoryError (also as the cause of a project error), or the worker aborted on a failed
              allocation, under the worker's address-space cap (RLIMIT_AS, --memory-gb): a giant
              allocation fails there instead of taking the machine down

Every pickle written embeds a payload whose unpickling creates a marker file (checked at start with
pickle.loads on a canary path: the payload works); the marker is checked after every case and must
never appear. Recorded per family: outcomes, the sub-kinds of mutation, the slowest case, the most
common error messages; overall: the worker's peak RSS, restarts, and for every crash, hang, memory
or bad_accept case a reproducer (seed:index, description, traceback) with its files copied under
OUT/reproducers/.

Seeds: `--export DIR --seeds DIR [--lora-export DIR]` reuse an export and a folder of bundles
(*.safetensors) with the PEFT checkpoints they came from under peft/<variant>/ (the layout of the
tests' tiny_adapters fixture; a bundle named <variant>.safetensors or <variant>-task<T>.safetensors
is the expected conversion of that checkpoint); the LoRA and IA3 seeds among them (bundles of kind
lora or ia3, LORA or IA3 checkpoints) need --lora-export, the same model exported with --lora, which
they were converted for. Otherwise the seeds are built into --work (default: a temp folder, removed
after), laid out as

    WORK/model/          a tiny random Llama (tests/tiny_models.py)
    WORK/export/         it, exported with `export_model`
    WORK/export-lora/    it, exported with `export_model(..., lora=LoraOptions())` (`--lora`)
    WORK/seeds/peft/<variant>/         every PEFT variant of tests/peft_helpers.py, trained two steps
    WORK/seeds/<variant>.safetensors   each converted: the prompt and prefix variants for export/
                                       (multitask as multitask-task1), the WEIGHT_VARIANTS (lora-all,
                                       lora-qv-rs, lora-attn-r4, ia3) for export-lora/
    WORK/seeds/prompt-baked.safetensors  the soft prompt baked into a prefix

Building needs the `export` extra (torch, transformers, peft) and about two minutes; the fuzzing
itself needs only numpy and safetensors.

    python -m tools.fuzz_adapters [--cases 10000] [--seed 0] [--timeout 5] [--memory-gb 3] \\
        [--export DIR --seeds DIR [--lora-export DIR] | --work DIR] [--out benchmarks/results/fuzz_adapters]
    python -m tools.fuzz_adapters --replay SEED:INDEX --work DIR   # (or --export/--seeds/--lora-export)

Writes OUT/fuzz_adapters.json and OUT/fuzz_adapters.md (runs of fewer than 10,000 cases:
fuzz_adapters_short.*, so a smoke run never overwrites the figures); prints the table, then one
JSON line. The tests (tests/test_fuzz_adapters.py) run a few hundred cases through `run_fuzz`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import RESULTS, command, machine, machine_line, say, write_report
from tools.fuzz_cases import FAMILIES, Seeds, check_payload, load_seeds, make_case
from tools.fuzz_worker import Worker, run_one, selftest
from prefixport import manifest as mf

OUTCOMES = ("ok", "error", "crash", "hang", "memory", "bad_accept")
FAILURES = ("crash", "hang", "memory", "bad_accept")
FULL_RUN = 10_000
KEEP_REPRODUCERS = 50  # case folders copied; all failures are listed in the JSON


def build_seeds(work: Path, arch: str = "llama", say: Callable[[str], None] = print) -> tuple[Path, Path, Path]:
    """A tiny random `arch` model, exported twice (plain, and with --lora); every PEFT variant trained
    two steps and converted (the LoRA and IA3 ones for the --lora export): (export, seeds, lora export)."""
    export, seeds, lora_export = work / "export", work / "seeds", work / "export-lora"
    if all((d / mf.MANIFEST_NAME).is_file() for d in (export, lora_export)) and (seeds / "peft").is_dir():
        say(f"reusing the seeds in {work}")
        return export, seeds, lora_export
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.adapters import convert_checkpoint, convert_for_export, save_bundle
    from prefixport.exporter import LoraOptions, export_model
    from prefixport.runtime import Engine
    from tests import peft_helpers as ph
    from tests import tiny_models

    say(f"building seeds in {work}: a tiny random {arch}, exported ...")
    model_dir = tiny_models.build(arch, work / "model")
    export_model(export, model=str(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    for variant in ph.PROMPT_VARIANTS:
        say(f"  PEFT {variant}: training two steps, converting ...")
        ph.train(AutoModelForCausalLM.from_pretrained(model_dir), variant, tok, seeds / "peft" / variant, steps=2)
        task = 1 if variant == "multitask" else None
        name = variant + (f"-task{task}" if task is not None else "")
        convert_checkpoint(seeds / "peft" / variant, export, name=name, task=task, out=seeds / f"{name}.safetensors")
    engine = Engine.load(export)  # the soft prompt baked into a prefix: the runtime runs the graph over it
    try:
        baked = engine.bake_prefix(convert_for_export(seeds / "peft" / "prompt", export, name="prompt-baked"))
    finally:
        engine.close()
    save_bundle(baked, seeds / "prompt-baked.safetensors")
    say("  exported again with --lora ...")
    export_model(lora_export, model=str(model_dir), lora=LoraOptions())
    add_weight_seeds(model_dir, lora_export, seeds, say)
    return export, seeds, lora_export


def add_weight_seeds(model_dir: Path, lora_export: Path, seeds: Path, say: Callable[[str], None] = print) -> None:
    """The LoRA and IA3 seeds: each weight variant of tests/peft_helpers.py (WEIGHT_VARIANTS) trained
    two steps on the model in `model_dir` into seeds/peft/<variant>/, converted for `lora_export`
    (the model exported with --lora) into seeds/<variant>.safetensors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixport.adapters import convert_checkpoint
    from tests import peft_helpers as ph

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir)  # left as it was: a LoRA or IA3 wraps a copy
    for variant in ph.WEIGHT_VARIANTS:
        say(f"  PEFT {variant}: training two steps, converting for the --lora export ...")
        ph.train(base, variant, tok, seeds / "peft" / variant, steps=2)
        convert_checkpoint(seeds / "peft" / variant, lora_export, name=variant, out=seeds / f"{variant}.safetensors")


# --- the run ---------------------------------------------------------------------------------------

def _normalize(message: str, case_dir: Path, sources: tuple[str, ...] = ()) -> str:
    """An error message as tallied: the case folder CASE, the exports' model (quoted by some messages)
    SOURCE, numbers N."""
    message = message.replace(str(case_dir), "CASE")
    for source in sources:
        message = message.replace(source, "SOURCE")
    message = re.sub(r"\d+", "N", message)
    return message[:160]


def run_fuzz(seeds: Seeds, cases: int, seed: int = 0, timeout: float = 5.0, memory_gb: float = 3.0,
             work: Path | None = None, reproducers: Path | None = None,
             say: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Run `cases` cases; the counts, figures and failures as a dict (see the module docstring)."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="fuzz-adapters-")) if work is None else work.resolve()  # cases travel
    work.mkdir(parents=True, exist_ok=True)
    marker = work / "PICKLE-WAS-EXECUTED"
    marker.unlink(missing_ok=True)
    payload_ok = check_payload(work)
    harness = selftest(seeds.export, memory_gb, work / "selftest.log")
    case_dir = work / "case"
    worker = Worker(seeds.export, memory_gb, work / "worker.log", seeds.lora_export)
    families: dict[str, dict[str, Any]] = {
        name: {"what": what, "cases": 0, **{o: 0 for o in OUTCOMES}, "slowest_s": 0.0, "slowest": None,
               "kinds": Counter(), "messages": Counter()} for name, (_, _, what) in FAMILIES.items()}
    failures: list[dict[str, Any]] = []
    lora_outcomes: Counter[str] = Counter()  # the cases checked against the --lora export
    sources = tuple(m.source for m in (seeds.manifest, seeds.lora_manifest) if m is not None and len(m.source) > 3)
    peak_kb, peak_case, pickle_cases, marker_cases = 0, None, 0, []
    began = time.perf_counter()
    last_say = began
    try:
        worker.start()
        baseline_kb = worker.ready_rss_kb
        for index in range(cases):
            if case_dir.exists():
                shutil.rmtree(case_dir)
            case_dir.mkdir()
            case = make_case(seed, index, seeds, case_dir, marker)
            fam = families[case.family]
            pickle_cases += case.family.endswith("_pickle")
            res = worker.run(case, timeout)
            if res is None:
                res = {"outcome": "hang", "seconds": timeout, "message": f"no answer within {timeout} s"}
            outcome = res["outcome"]
            fam["cases"] += 1
            fam[outcome] += 1
            fam["kinds"][(case.kind, outcome)] += 1
            if case.lora_export:
                lora_outcomes[outcome] += 1
            if res.get("seconds") and res["seconds"] > fam["slowest_s"]:
                fam["slowest_s"], fam["slowest"] = res["seconds"], f"{seed}:{index} {case.desc}"[:200]
            if outcome == "error":
                fam["messages"][_normalize(res["message"], case_dir, sources)] += 1
            if res.get("rss_kb", 0) > peak_kb:
                peak_kb, peak_case = res["rss_kb"], f"{seed}:{index} {case.family} {case.desc}"[:200]
            if marker.exists():
                marker_cases.append(f"{seed}:{index} {case.desc}")
                marker.unlink()
            if outcome in FAILURES:
                failure = {"case": f"{seed}:{index}", "family": case.family, "desc": case.desc,
                           "target": case.target, "manifest": case.manifest, "lora_export": case.lora_export,
                           "task": case.task, "outcome": outcome,
                           **{k: res.get(k) for k in ("error_type", "message", "problems", "traceback")}}
                failures.append(failure)
                if reproducers is not None and len(failures) <= KEEP_REPRODUCERS:
                    dest = reproducers / f"{index:06d}-{case.family}"
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(case_dir, dest, symlinks=True,
                                    ignore=lambda d, names: [n for n in names if Path(d, n).is_fifo()])
                    (dest / "case.json").write_text(json.dumps(failure, indent=2) + "\n")
                if outcome == "memory":
                    worker.kill()  # a fresh worker for the next case
            if time.perf_counter() - last_say > 15:
                last_say = time.perf_counter()
                say(f"  {index + 1}/{cases} cases, {sum(f['error'] for f in families.values())} errors, "
                    f"{len(failures)} failures ({last_say - began:.0f} s)")
    finally:
        worker.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)
    totals = {o: sum(f[o] for f in families.values()) for o in ("cases", *OUTCOMES)}
    slowest = max(families.values(), key=lambda f: f["slowest_s"])
    for f in families.values():
        kinds: dict[str, dict[str, int]] = {}
        for (kind, outcome), count in sorted(f["kinds"].items()):
            kinds.setdefault(kind, {})[outcome] = count
        f["kinds"] = kinds  # sub-kind of mutation -> outcome -> cases
        f["messages"] = [{"count": n, "message": m} for m, n in f["messages"].most_common(5)]
    return {
        "cases": cases, "seed": seed, "timeout_s": timeout, "memory_cap_gb": memory_gb,
        "families": families, "totals": totals, "failures": failures,
        "slowest_case": {"seconds": slowest["slowest_s"], "case": slowest["slowest"]},
        "worker": {"peak_rss_mb": peak_kb / 1024, "after_start_rss_mb": baseline_kb / 1024,
                   "rss_note": "VmHWM: the peak of a case, reset before each case (Linux clear_refs)",
                   "peak_case": peak_case, "starts": worker.starts},
        "harness_selftest": harness,
        "pickle": {"cases_with_a_payload": pickle_cases, "payload_fires_when_unpickled": payload_ok,
                   "marker_written": bool(marker_cases), "marker_cases": marker_cases},
        "seeds": {"bundles": sorted(seeds.bundles), "peft": sorted(seeds.peft),
                  "references": {k: Path(v[0]).name for k, v in seeds.references.items()}},
        "manifest": {k: getattr(seeds.manifest, k) for k in ("architecture", "num_layers", "num_kv_heads", "head_dim",
                                                              "hidden_size", "dtype")},
        "lora_export": (seeds.lora_manifest.weight_adapters if seeds.lora_manifest else None),
        "lora_export_cases": {"cases": sum(lora_outcomes.values()), **{o: lora_outcomes[o] for o in OUTCOMES}},
        "seconds_fuzzing": time.perf_counter() - began,
    }


def markdown(result: dict[str, Any]) -> str:
    """The report: outcomes by family, the pickle marker, the worker, failures, the machine."""
    t, w, p = result["totals"], result["worker"], result["pickle"]
    man = result["manifest"]
    lines = [
        f"# Fuzzing the adapter readers: {t['cases']:,} cases", "",
        f"Mutations of real seeds ({len(result['seeds']['bundles'])} bundles, {len(result['seeds']['peft'])} PEFT "
        f"checkpoints of a tiny {man['architecture']} export: {man['num_layers']} layers, {man['num_kv_heads']} KV "
        f"heads, head dim {man['head_dim']}, hidden {man['hidden_size']}{_lora_words(result['lora_export'])}) fed to "
        f"`load_bundle(path, manifest)` and `convert(dir, manifest)`, each case in a worker process capped at {result['memory_cap_gb']:g} GiB of "
        f"address space (RLIMIT_AS) with a {result['timeout_s']:g} s watchdog. ok: accepted, then checked "
        "independently (metadata, shapes of the kind and the export, LoRA ranks, scalings and IA3 sides, finite, round "
        "trip, a converted LoRA/IA3 holds exactly its checkpoint's tensors, a converted seed equals its bundle); error: a PrefixportError with a message; crash: any other exception or an empty message; "
        "bad accept: accepted but failing those checks. A case is named seed:index: `--replay seed:index` rebuilds it "
        "from the same seeds (a failing case's files are also kept under reproducers/).", "",
        "| family | what | cases | ok | error | crash | hang | memory | bad accept | slowest ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in result["families"].items():
        lines.append(f"| {name} | {f['what']} | {f['cases']} | {f['ok']} | {f['error']} | {f['crash']} | {f['hang']} | "
                     f"{f['memory']} | {f['bad_accept']} | {1000 * f['slowest_s']:.1f} |")
    lines.append(f"| **all** | | **{t['cases']}** | **{t['ok']}** | **{t['error']}** | **{t['crash']}** | "
                 f"**{t['hang']}** | **{t['memory']}** | **{t['bad_accept']}** | "
                 f"{1000 * result['slowest_case']['seconds']:.1f} |")
    lora = result["lora_export_cases"]
    if lora["cases"]:
        lines += ["", f"{lora['cases']:,} cases (from LoRA and IA3 seeds, in every family) were checked against the "
                  f"--lora export: {lora['ok']:,} ok, {lora['error']:,} errors."]
    lines += ["", f"Pickles: {p['cases_with_a_payload']} cases carried a pickle whose unpickling writes a marker file "
              f"(the payload fires under pickle.loads: {'yes' if p['payload_fires_when_unpickled'] else 'NO'}); "
              f"marker written: {'**yes**, ' + ', '.join(p['marker_cases'][:5]) if p['marker_written'] else 'never'}.",
              f"Worker: peak RSS {w['peak_rss_mb']:.0f} MB ({w['after_start_rss_mb']:.0f} MB after start-up), "
              f"{w['starts']} start(s). Harness self-test (a non-project exception, an empty message, a 1 TiB "
              f"allocation, an abort, a hang, each caused on purpose in a worker): "
              f"{'all classified right' if result['harness_selftest']['ok'] else result['harness_selftest']['seen']}. "
              f"Slowest case: {1000 * result['slowest_case']['seconds']:.1f} ms "
              f"({result['slowest_case']['case']})."]
    if result["failures"]:
        lines += ["", f"**{len(result['failures'])} failures** (reproducers under `reproducers/`):", ""]
        lines += [f"- `{f['case']}` {f['family']} {f['outcome']}: {f['desc']} -> {f.get('error_type')}: "
                  f"{(f.get('message') or '; '.join(f.get('problems') or []))[:200]}" for f in result["failures"][:30]]
    else:
        lines += ["", "No crash, hang, memory blow-up or bad accept."]
    lines += ["", machine_line(result["machine"], ("numpy", "safetensors", "prefixport")), "",
              f"Command: `{result['command']}` ({result['seconds']:.0f} s in all, "
              f"{result['seconds_fuzzing']:.0f} s fuzzing)", ""]
    # a message may quote a tensor name with a lone surrogate: keep the text writable
    return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


def _lora_words(weights: dict[str, Any] | None) -> str:
    """How the report names the --lora export the LoRA and IA3 seeds belong to."""
    if not weights:
        return ""
    ia3 = ", ".join(f"{p} ({side})" for p, side in weights["ia3"].items())
    return (f"; LoRA and IA3 seeds against the same model exported with --lora: LoRA up to rank {weights['max_rank']} "
            f"on {len(weights['lora'])} modules per layer, IA3 on {ia3}")


def replay(spec: str, seeds: Seeds) -> None:
    """Rebuild case SEED:INDEX and run it in this process (no worker, no cap), printing what happened."""
    seed, index = (int(x) for x in spec.split(":"))
    with tempfile.TemporaryDirectory(prefix="fuzz-replay-") as tmp:
        case_dir = Path(tmp) / "case"
        case_dir.mkdir()
        marker = Path(tmp) / "PICKLE-WAS-EXECUTED"
        case = make_case(seed, index, seeds, case_dir, marker)
        print(f"case {spec}: {case.family}: {case.desc} ({case.target} {case.path}, manifest {case.manifest}, "
              f"--lora export {case.lora_export}, task {case.task})")
        out = run_one(asdict(case), seeds.manifest, seeds.lora_manifest)
        print(json.dumps({k: v for k, v in out.items() if k != "traceback"}, indent=2))
        if out.get("traceback"):
            print(out["traceback"])
        print(f"pickle marker written: {marker.exists()}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz_adapters", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=FULL_RUN)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="the worker's address-space cap (0: none)")
    parser.add_argument("--export", type=Path, help="an export folder (with --seeds)")
    parser.add_argument("--seeds", type=Path, help="seed bundles *.safetensors and PEFT checkpoints peft/<variant>/")
    parser.add_argument("--lora-export", type=Path, help="the same model exported with --lora (with --export: the "
                                                          "LoRA and IA3 seeds')")
    parser.add_argument("--work", type=Path, help="build the seeds here and keep them (reused when present)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz_adapters")
    parser.add_argument("--replay", metavar="SEED:INDEX", help="rebuild one case and run it in this process")
    args = parser.parse_args()
    began = time.perf_counter()
    tmp = None
    if (args.export is None) != (args.seeds is None):
        parser.error("--export and --seeds go together")
    if args.lora_export is not None and args.export is None:
        parser.error("--lora-export goes with --export and --seeds")
    if args.export is not None:
        export, seeds_dir, lora_export = args.export, args.seeds, args.lora_export
    else:
        work = args.work or Path(tmp := tempfile.mkdtemp(prefix="fuzz-seeds-"))
        export, seeds_dir, lora_export = build_seeds(work, say=say)
    try:
        seeds = load_seeds(export, seeds_dir, lora_export)
        if args.replay:
            replay(args.replay, seeds)
            return
        stem = "fuzz_adapters" + ("" if args.cases >= FULL_RUN else "_short")
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
        repro = out / "reproducers" if stem == "fuzz_adapters" else out / "reproducers_short"
        shutil.rmtree(repro, ignore_errors=True)
        say(f"fuzzing: {args.cases} cases, seed {args.seed}, seeds from {seeds_dir} ...")
        result = run_fuzz(seeds, args.cases, args.seed, args.timeout, args.memory_gb, reproducers=repro, say=say)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if not result["failures"]:
        shutil.rmtree(repro, ignore_errors=True)
    info = machine("safetensors")
    result = {"benchmark": "fuzz_adapters", "command": command("fuzz_adapters", "tools"), **result,
              "safetensors": info["versions"].get("safetensors"), "machine": info,
              "seconds": time.perf_counter() - began}
    table = markdown(result)
    wrote = write_report(out, stem, result, table)
    print(table)
    t = result["totals"]
    print(json.dumps({"benchmark": "fuzz_adapters", "cases": t["cases"], "seed": args.seed,
                      "seconds": round(result["seconds"], 1), **{o: t[o] for o in OUTCOMES},
                      "pickle_marker_written": result["pickle"]["marker_written"],
                      "peak_rss_mb": round(result["worker"]["peak_rss_mb"]),
                      "slowest_case_ms": round(1000 * result["slowest_case"]["seconds"], 1),
                      "wrote": [str(p) for p in wrote]}))


if __name__ == "__main__":
    main()
