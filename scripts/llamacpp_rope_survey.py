"""Re-read llama.cpp's RoPE per architecture from a source tree, to check or extend ropekit.apply.gguf_archs.

    python scripts/llamacpp_rope_survey.py LLAMA_CPP_DIR           # one line per architecture
    python scripts/llamacpp_rope_survey.py LLAMA_CPP_DIR --check   # compare with ropekit's table

LLAMA_CPP_DIR is a llama.cpp checkout, e.g. `vendor/llama.cpp` of the llama-cpp-python sdist pinned in
constraints.txt (pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36). For each architecture it
lists, with line numbers in src/models/<file>.cpp: where a factor tensor is created (rope_freqs, or the longrope
long/short pair), where the graph fetches factors (get_rope_factors), its ggml_rope_ext calls, and the
sliding-window keys (rope.freq_base_swa, rope_freq_scale_train_swa). It only points at the lines; ropekit's
table records what a person concluded from reading them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PATTERNS = {
    "rope_freqs": r"LLM_TENSOR_ROPE_FREQS",
    "longrope": r"LLM_TENSOR_ROPE_FACTORS_LONG",
    "get_rope_factors": r"get_rope_factors",
    "rope_ext": r"ggml_rope_ext|ggml_rope_multi",
    "swa_base": r"ROPE_FREQ_BASE_SWA",
    "swa_scale": r"rope_freq_scale_train_swa",
    "yarn_keys": r"LLM_KV_ROPE_SCALING_YARN_",
}


def architectures(root: Path) -> dict[str, Path | None]:
    """{general.architecture name: its src/models file}, through the arch enum and the model class."""
    src = root / "src"
    names = dict(re.findall(r'\{\s*(LLM_ARCH_[A-Z0-9_]+)\s*,\s*"([^"]+)"\s*\}', (src / "llama-arch.cpp").read_text()))
    classes: dict[str, str] = {}
    pending: list[str] = []
    for line in (src / "llama-model.cpp").read_text().splitlines():
        if m := re.match(r"\s*case (LLM_ARCH_[A-Z0-9_]+):", line):
            pending.append(m.group(1))
        elif m := re.match(r"\s*return new (llama_model_[a-z0-9_]+)\(params\);", line):
            classes.update({arch: m.group(1) for arch in pending if arch not in classes})
            pending = []
        elif line.strip():
            pending = []
    files = {}
    for f in sorted((src / "models").glob("*.cpp")):
        for cls in re.findall(r"(llama_model_[a-z0-9_]+)::load_arch_tensors", f.read_text()):
            files[cls] = f
    return {name: files.get(classes.get(enum, "")) for enum, name in names.items()}


def facts(path: Path) -> dict[str, list[int]]:
    lines = path.read_text().splitlines()
    return {key: [i + 1 for i, line in enumerate(lines) if re.search(p, line)] for key, p in PATTERNS.items()}


def classify(found: dict[str, list[int]]) -> str:
    """What the lines suggest (a person confirms it by reading them)."""
    if not found["rope_ext"]:
        return "no ggml_rope_ext in the file"
    if found["rope_freqs"] and found["get_rope_factors"]:
        return "per-pair"
    if found["longrope"] and found["get_rope_factors"]:
        return "per-pair (longrope)"
    return "native only"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="a llama.cpp source tree")
    ap.add_argument("--check", action="store_true", help="compare with ropekit.apply.gguf_archs.ARCHITECTURES")
    args = ap.parse_args()
    table = {}
    for name, path in sorted(architectures(args.root).items()):
        if path is None:
            continue
        found = facts(path)
        table[name] = classify(found)
        where = "; ".join(f"{k} :{','.join(map(str, v))}" for k, v in found.items() if v)
        if not args.check:
            print(f"{name:18s} {table[name]:20s} {path.relative_to(args.root)} {where}")
    if not args.check:
        return 0
    from ropekit.apply.gguf_archs import ARCHITECTURES

    differ = 0
    for name, record in ARCHITECTURES.items():
        seen = table.get(name, "missing")
        if record.support != "refused" and not seen.startswith(record.support):
            print(f"{name}: ropekit says {record.support}, the source suggests {seen}")
            differ += 1
    print(f"{len(ARCHITECTURES)} architectures checked, {differ} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
