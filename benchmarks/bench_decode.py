"""Decode speed of the palettized model against the dense model and llama.cpp, as JSON.

Everything is measured in this one run and compared as ratios: batch-1 decode of the dense
float32 base and of the palettized model (each kernel mode), with 1 thread, 2 threads and the
engine's timed choice, on a quiet machine and beside a CPU-bound process; prefill; resident
memory against the compressed tensor bytes; decode against its memory-bandwidth bound; the
per-operation time split; speculative decoding on AESLC e-mails (summarize-email); and, where
`llama-cpp-python` is installed (by hand; not a dependency), llama.cpp on the same GGUF.
Each measurement runs in its own process; figures are medians of `--repeats` runs.

    python benchmarks/bench_decode.py [--repeats 3] [--emails 20] [--aeslc FILE] [--out F]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PALETTIZED = "smollm2-135m-palettized"
DENSE = "smollm2-135m-instruct"
PROMPT_TOKENS = 64
PREFILL_TOKENS = 256
NEW_TOKENS = 128
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")
FLAGS += ("amx_tile", "amx_bf16")
TEXT = (
    "The on-device model reads a message, finds what matters, and writes a short summary that a "
    "person can read at a glance. It must run on a phone with little memory, so its weights are "
    "compressed and small adapters specialise it for each task. "
)
ROOT = Path(__file__).resolve().parent.parent


def cpu() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next(
        (line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), []
    )
    model = next(
        (line.split(":")[1].strip() for line in info.splitlines() if "model name" in line), "?"
    )
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in FLAGS if f in flags]}


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


def read_bandwidth(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(128 * 1024 * 1024)
    src.sum()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.nbytes / statistics.median(times)


def bytes_per_token(model) -> int:
    """Bytes a one-token step reads: every projection's stored form, the head, norms, adapters."""
    from openafm.model import Linear
    from openafm.model.compressed import Int8Rows, PalettizedWeight

    total = 0
    for module in model.modules():
        if isinstance(module, PalettizedWeight):
            total += module.memory_bytes()
        elif isinstance(module, Int8Rows):
            total += module.values.nbytes + module.scale.nbytes
        elif isinstance(module, Linear):
            if module.weight is not None and not (
                module is model.output and model.config.tie_embeddings
            ):
                total += module.weight.nbytes
            if module.delta is not None:
                total += module.delta.a.nbytes + module.delta.b.nbytes
    total += sum(p.nbytes for n, p in model.named_parameters() if "norm" in n)
    if model.config.tie_embeddings and model.output.weight is not None:
        total += model.output.weight.nbytes
    return total


def run_memory(model_name: str) -> dict:
    """Resident bytes of the loaded model after a short generation (the libraries it needs are
    imported and the native kernels loaded before the first reading), and the bytes of every
    tensor the model holds."""
    from openafm import kernels
    from openafm.cli.common import load_named
    from openafm.compress import default_model  # noqa: F401  (imported by load_named)
    from openafm.runtime import Engine, SamplingParams

    kernels.load_native()
    before = _rss()
    pretrained = load_named(model_name)
    engine = Engine(pretrained.model, pretrained.tokenizer, tune_threads=False)
    engine.generate([_ids(pretrained.tokenizer, 8)], SamplingParams(max_tokens=4))
    resident = _rss() - before
    storages = {}
    for module in pretrained.model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        tensors += [v for v in vars(module).values() if hasattr(v, "untyped_storage")]
        delta = getattr(module, "delta", None)
        if delta is not None:
            tensors += [delta.a, delta.b]
        for t in tensors:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    on_disk = sum(f.stat().st_size for f in pretrained.path.rglob("*.safetensors"))
    return {
        "resident_model_bytes": resident,
        "model_tensor_bytes": sum(storages.values()),
        "tensor_bytes_on_disk": on_disk,
    }


def run_threads(model_name: str, repeats: int, new_tokens: int) -> dict:
    """Decode with 1 thread, 2 threads and the timed choice, interleaved in one process."""
    import torch

    from openafm.cli.common import load_named
    from openafm.runtime import Engine, SamplingParams

    pretrained = load_named(model_name)
    fixed = Engine(pretrained.model, pretrained.tokenizer, tune_threads=False)
    auto = Engine(pretrained.model, pretrained.tokenizer, tune_threads=True)
    ids = _ids(pretrained.tokenizer, PROMPT_TOKENS)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    fixed.generate([ids[:8]], SamplingParams(max_tokens=4))
    speeds: dict[str, list[float]] = {"1": [], "2": [], "auto": []}
    for _ in range(repeats):
        for setting in speeds:
            torch.set_num_threads(2 if setting == "auto" else int(setting))
            engine = auto if setting == "auto" else fixed
            speeds[setting].append(engine.generate([ids], params)[0].decode_tokens_per_s)
    medians = {k: statistics.median(v) for k, v in speeds.items()}
    best = max(medians["1"], medians["2"])
    return {
        **{f"{k}_threads": v for k, v in medians.items()},
        "auto_vs_best": medians["auto"] / best,
    }


def run_decode(model_name: str, kernel: str, threads: str, repeats: int, new_tokens: int) -> dict:
    import torch

    from openafm import kernels
    from openafm.cli.common import load_named
    from openafm.runtime import Engine, SamplingParams

    if threads != "auto":
        torch.set_num_threads(int(threads))
    kernels.set_mode(kernel)
    pretrained = load_named(model_name)
    engine = Engine(pretrained.model, pretrained.tokenizer, tune_threads=threads == "auto")
    ids = _ids(pretrained.tokenizer, PROMPT_TOKENS)
    engine.generate([ids[:8]], SamplingParams(max_tokens=4))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    runs = [engine.generate([ids], params)[0] for _ in range(repeats)]
    prefill_ids = _ids(pretrained.tokenizer, PREFILL_TOKENS)
    prefill = [
        engine.generate([prefill_ids], SamplingParams(max_tokens=1))[0] for _ in range(repeats)
    ]
    weights_dir = pretrained.path
    on_disk = (
        sum(f.stat().st_size for f in weights_dir.rglob("*.safetensors"))
        if weights_dir.is_dir()
        else 0
    )
    return {
        "decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in prefill),
        "bytes_per_token": bytes_per_token(pretrained.model),
        "tensor_bytes_on_disk": on_disk,
        "kernel": kernels.mode(),
        "instruction_set": kernels.isa(),
    }


OP_GROUPS = {
    "projections": (
        "openafm::lut_linear",
        "openafm::lut_linear_many",
        "aten::mm",
        "aten::addmm",
        "mkldnn::_linear_pointwise",
    ),
    "head": ("openafm::int8_linear",),
    "attention": (
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
    ),
    "norms": ("openafm::rms_norm", "aten::_fused_rms_norm", "aten::rms_norm"),
}


def run_profile(model_name: str, kernel: str, tokens: int) -> dict:
    """Milliseconds per decode token by operation group, from the profiler; `other` is the
    rest of the unprofiled time per token (Python, small operations, dispatch)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from openafm import kernels
    from openafm.cli.common import load_named
    from openafm.model import KVCache
    from openafm.model.native_decode import stack_for

    torch.set_num_threads(2)
    kernels.set_mode(kernel)
    pretrained = load_named(model_name)
    model = pretrained.model
    ids = torch.tensor([_ids(pretrained.tokenizer, PROMPT_TOKENS)])
    cache = KVCache(model.config.n_layers, 1, PROMPT_TOKENS + tokens + 1)
    with torch.inference_mode():
        token = model(ids, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        model(token, cache, last_only=True)
        start_length = cache.length
        start = time.perf_counter()
        for _ in range(tokens):
            token = model(token, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        wall = (time.perf_counter() - start) / tokens * 1e3
        cache.truncate(start_length)
        stack = stack_for(model, model.embed(token), cache)  # the native decoder stack, if used
        if stack is not None:
            stack.profile(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(tokens):
                token = model(token, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    split = dict.fromkeys(OP_GROUPS, 0.0)
    for event in prof.key_averages():
        for group, names in OP_GROUPS.items():
            if event.key in names:
                split[group] += event.self_cpu_time_total / 1e3 / tokens
    if stack is not None:  # its stages, timed inside the one native call
        for group, seconds in stack.timings().items():
            if group in split:
                split[group] += seconds * 1e3 / tokens
        stack.profile(False)
    if model_name == DENSE:  # the dense head is a matrix product too: its share by FLOPs
        share = model.config.vocab_size / (
            model.config.vocab_size + model.config.num_params(embeddings=False) / model.config.dim
        )
        split["head"] = split["projections"] * share
        split["projections"] -= split["head"]
    split["other"] = max(0.0, wall - sum(split.values()))
    return {"ms_per_token": wall, "ms": {k: round(v, 3) for k, v in split.items()}}


def run_decode_quality(tokens: int) -> dict:
    """KL divergence of the default kernel's next-token distributions from the exact kernel's,
    decoding one token per step (teacher-forced through the KV cache) over real text."""
    import torch

    from openafm import kernels
    from openafm.cli.common import load_named
    from openafm.model import KVCache

    torch.set_num_threads(2)
    pretrained = load_named(PALETTIZED)
    model = pretrained.model
    text = (ROOT / "tests/fixtures/text/pride_and_prejudice_excerpt.txt").read_text()
    ids = pretrained.tokenizer.encode(text)[: tokens + 1]
    logprobs = {}
    for mode in ("exact", "default", "fast"):
        kernels.set_mode(mode)
        cache = KVCache(model.config.n_layers, 1, len(ids) + 1)
        rows = []
        with torch.inference_mode():
            for token in ids:
                rows.append(
                    model(torch.tensor([[token]]), cache, last_only=True)[0, -1].log_softmax(-1)
                )
        logprobs[mode] = torch.stack(rows)
    exact = logprobs["exact"]
    out: dict[str, float] = {"positions": len(ids)}
    for mode in ("default", "fast"):
        other = logprobs[mode]
        kld = (exact.exp() * (exact - other)).sum(-1)
        out[f"kld_{mode}_vs_exact_mean"] = kld.mean().item()
        out[f"kld_{mode}_vs_exact_max"] = kld.max().item()
        out[f"top1_agreement_{mode}"] = (exact.argmax(-1) == other.argmax(-1)).float().mean().item()
    return out


def palettized_adapter(feature: str) -> str | None:
    """The feature's adapter trained on the palettized base (`models/adapters-palettized/`; the
    shipped adapters fit the float base), if there is one."""
    folder = Path(__file__).resolve().parents[1] / "models" / "adapters-palettized" / feature
    return str(folder) if (folder / "adapter.json").is_file() else None


def run_speculation(
    model_name: str, data: str, records: int, draft: str | None, feature: str
) -> dict:
    """Plain against speculative decoding of a summarization feature's records (AESLC e-mails,
    DialogSum dialogues): drafts from the prompt, or from the `draft` model."""
    import torch

    from openafm.cli.common import load_named
    from openafm.features import get_feature
    from openafm.runtime import DraftModel, PromptLookup, SamplingParams, engine_for

    torch.set_num_threads(2)
    task = get_feature(feature)
    pretrained = load_named(model_name)
    adapter = task.adapter if model_name == DENSE else palettized_adapter(feature)
    plain = engine_for(pretrained)
    drafter = PromptLookup() if draft is None else DraftModel(load_named(draft).model)
    fast = engine_for(pretrained, speculation=drafter)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:records]]
    prompts = [plain.tokenizer.encode_chat(task.messages(r)) for r in rows]
    params = SamplingParams(max_tokens=task.max_tokens)
    plain.generate(prompts[:1], params, adapters=adapter)
    out: dict[str, dict] = {}
    identical = 0
    for name, engine in (("plain", plain), ("speculative", fast)):
        tokens = seconds = drafted = accepted = 0.0
        results = []
        for ids in prompts:
            c = engine.generate([ids], params, adapters=adapter)[0]
            results.append(c.token_ids)
            if c.completion_tokens > 1 and c.decode_tokens_per_s > 0:
                tokens += c.completion_tokens - 1
                seconds += (c.completion_tokens - 1) / c.decode_tokens_per_s
            drafted += c.draft_tokens
            accepted += c.accepted_tokens
        out[name] = {"decode_tokens_per_s": tokens / seconds, "tokens": results}
        if name == "speculative":
            out[name]["acceptance_rate"] = accepted / drafted if drafted else 0.0
            out[name]["accepted_per_step"] = accepted / max(1.0, tokens - accepted)
    identical = sum(
        a == b
        for a, b in zip(out["plain"].pop("tokens"), out["speculative"].pop("tokens"), strict=True)
    )
    return {
        "adapter": adapter,
        "drafter": "prompt lookup" if draft is None else draft,
        "feature": feature,
        "records": len(prompts),
        "identical_outputs": identical,
        "plain_decode_tokens_per_s": out["plain"]["decode_tokens_per_s"],
        "speculative_decode_tokens_per_s": out["speculative"]["decode_tokens_per_s"],
        "speedup": out["speculative"]["decode_tokens_per_s"] / out["plain"]["decode_tokens_per_s"],
        "acceptance_rate": out["speculative"]["acceptance_rate"],
    }


def run_llama_cpp(repeats: int, new_tokens: int) -> dict:
    from llama_cpp import Llama

    from openafm.io import resolve_model
    from openafm.runtime import load_tokenizer_for

    tokenizer = load_tokenizer_for()
    llm = Llama(
        str(resolve_model()), n_threads=2, n_threads_batch=2, n_ctx=512, n_batch=512, verbose=False
    )
    ids, prefill_ids = _ids(tokenizer, PROMPT_TOKENS), _ids(tokenizer, PREFILL_TOKENS)
    prefill, decode = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prefill_ids)
        prefill.append(PREFILL_TOKENS / (time.perf_counter() - t))
        llm.reset()
        llm.eval(ids)
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        decode.append((new_tokens - 1) / (time.perf_counter() - t))
    return {
        "decode_tokens_per_s": statistics.median(decode),
        "prefill_tokens_per_s": statistics.median(prefill),
    }


def worker(args: argparse.Namespace) -> dict:
    kind, *rest = args.worker.split(":")
    if kind == "bandwidth":
        return {
            "read_bytes_per_s_1_thread": read_bandwidth(1),
            "read_bytes_per_s_2_threads": read_bandwidth(2),
        }
    if kind == "decode":
        model, kernel, threads = rest
        tokens = args.new_tokens if kernel != "reference" else 8  # the old path: ~1 token/s
        return run_decode(
            model, kernel, threads, args.repeats if kernel != "reference" else 1, tokens
        )
    if kind == "profile":
        return run_profile(rest[0], rest[1], 8 if rest[1] == "reference" else 32)
    if kind == "memory":
        return run_memory(rest[0])
    if kind == "threads":
        return run_threads(rest[0], args.repeats, args.new_tokens)
    if kind == "quality":
        return run_decode_quality(256)
    if kind == "speculation":
        draft = rest[1] if len(rest) > 1 and rest[1] else None
        feature = rest[2] if len(rest) > 2 else "summarize-email"
        data = args.aeslc if feature == "summarize-email" else args.dialogsum
        return run_speculation(rest[0], data, args.emails, draft, feature)
    if kind == "llama.cpp":
        return run_llama_cpp(args.repeats, args.new_tokens)
    raise ValueError(args.worker)


def spawn(name: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)]
    cmd += [
        "--new-tokens",
        str(args.new_tokens),
        "--aeslc",
        args.aeslc,
        "--emails",
        str(args.emails),
    ]
    if args.dialogsum:
        cmd += ["--dialogsum", args.dialogsum]
    print(f"  {name}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def with_busy_neighbour(names: list[str], args: argparse.Namespace) -> dict:
    """Run each measurement while another process keeps one core busy."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return {name: spawn(name, args) for name in names}
    finally:
        burner.kill()
        burner.wait()


def run_contention(args: argparse.Namespace) -> dict:
    """1 vs 2 threads vs the engine's choice, quiet and (unless skipped) beside a busy process."""
    contention = {f"{m} quiet": spawn(f"threads:{m}", args) for m in (DENSE, PALETTIZED)}
    if not args.skip_contention:
        busy = with_busy_neighbour([f"threads:{m}" for m in (DENSE, PALETTIZED)], args)
        contention |= {f"{name.split(':')[1]} busy": r for name, r in busy.items()}
    return contention


def _ratio(a: dict | None, b: dict | None, key: str = "decode_tokens_per_s") -> float | None:
    return None if not a or not b or not b.get(key) else a[key] / b[key]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--emails", type=int, default=20, help="records per speculation run")
    parser.add_argument(
        "--aeslc", default=str(ROOT / "tests/fixtures/summaries/aeslc_test_head4.jsonl")
    )
    parser.add_argument("--dialogsum", help="DialogSum JSONL (the draft model on dialogues)")
    parser.add_argument("--skip-contention", action="store_true")
    parser.add_argument(
        "--only-contention", action="store_true", help="only 1 vs 2 threads vs auto, quiet and busy"
    )
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    if args.only_contention:
        print(json.dumps({"machine": cpu(), "contention": run_contention(args)}, indent=2))
        return
    machine = {**cpu(), **(spawn("bandwidth", args) or {})}
    quiet_names = [f"decode:{DENSE}:default:2"]
    quiet_names += [f"decode:{PALETTIZED}:{k}:2" for k in ("default", "fast", "exact", "reference")]
    quiet = {name: spawn(name, args) for name in quiet_names}
    contention = run_contention(args)
    memory = spawn(f"memory:{PALETTIZED}", args)
    profiles = {
        "palettized_before (reference)": spawn(f"profile:{PALETTIZED}:reference", args),
        "palettized_after (default)": spawn(f"profile:{PALETTIZED}:default", args),
        "dense": spawn(f"profile:{DENSE}:default", args),
    }
    speculation = {m: spawn(f"speculation:{m}", args) for m in (PALETTIZED, DENSE)}
    speculation[f"{DENSE} drafted by {PALETTIZED}"] = spawn(
        f"speculation:{DENSE}:{PALETTIZED}", args
    )
    if args.dialogsum:  # longer outputs: the drafter's own prefill is spread over more tokens
        speculation[f"{PALETTIZED}, dialogues"] = spawn(
            f"speculation:{PALETTIZED}::summarize-dialogue", args
        )
        speculation[f"{DENSE} drafted by {PALETTIZED}, dialogues"] = spawn(
            f"speculation:{DENSE}:{PALETTIZED}:summarize-dialogue", args
        )
    quality = spawn("quality", args)
    try:
        import llama_cpp  # noqa: F401

        llama = spawn("llama.cpp", args)
    except ImportError:
        llama = None

    def q(model: str, kernel: str = "default", t: str = "2") -> dict | None:
        return quiet.get(f"decode:{model}:{kernel}:{t}")

    pal, dense = q(PALETTIZED), q(DENSE)
    bandwidth = machine.get("read_bytes_per_s_2_threads", 0.0)
    targets = {
        "palettized_vs_dense_decode": _ratio(pal, dense),
        "palettized_vs_llama_cpp_decode": _ratio(pal, llama),
        "palettized_fraction_of_bandwidth_bound": pal["decode_tokens_per_s"]
        * pal["bytes_per_token"]
        / bandwidth
        if pal and bandwidth
        else None,
        "palettized_vs_dense_prefill": _ratio(pal, dense, "prefill_tokens_per_s"),
        "palettized_model_tensor_bytes_vs_on_disk": memory["model_tensor_bytes"]
        / memory["tensor_bytes_on_disk"]
        if memory
        else None,
        "speculative_speedup_palettized": (speculation.get(PALETTIZED) or {}).get("speedup"),
        "speculative_speedup_dense_with_adapter": (speculation.get(DENSE) or {}).get("speedup"),
        "draft_model_speedup_dense_with_adapter": (
            speculation.get(f"{DENSE} drafted by {PALETTIZED}") or {}
        ).get("speedup"),
        "draft_model_speedup_dense_with_adapter_dialogues": (
            speculation.get(f"{DENSE} drafted by {PALETTIZED}, dialogues") or {}
        ).get("speedup"),
        "palettized_new_vs_reference_decode": _ratio(pal, q(PALETTIZED, "reference")),
        "palettized_fast_vs_default_decode": _ratio(q(PALETTIZED, "fast"), pal),
    }
    report = {
        "machine": machine,
        "setup": {
            "prompt_tokens": PROMPT_TOKENS,
            "prefill_tokens": PREFILL_TOKENS,
            "new_tokens": args.new_tokens,
            "batch": 1,
            "repeats": args.repeats,
        },
        "targets": targets,
        "contention": contention,
        "decode": quiet,
        "memory": memory,
        "op_split_ms_per_token": profiles,
        "speculation_aeslc": speculation,
        "decode_quality": quality,
        "llama_cpp_q4_1": llama,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
