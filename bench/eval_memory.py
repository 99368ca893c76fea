"""Peak memory and speed of perplexity at 4096 tokens: ropekit's chunked loss vs the naive
`model(input_ids, labels=...)`, each in a fresh process (peak RSS from the OS).

The model is Llama-shaped with Llama-2's 32,000-token vocabulary and random weights (memory
and speed do not depend on the weights): the naive path materialises 4096 × 32000 float32
logits (≈ 0.5 GB) plus the loss's copies; the chunked path never holds more than 512 rows.

    .venv/bin/python bench/eval_memory.py            # writes bench/results/eval_memory.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "eval_memory.json"
LENGTH, VOCAB = 4096, 32000

WORKER = r"""
import json, resource, sys, time, torch, transformers as T
mode, length, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
config = T.LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=length)
model = T.LlamaForCausalLM(config).eval()
ids = torch.randint(0, vocab, (1, length))
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    if mode == "naive":
        nll = float(model(ids, labels=ids).loss) * (length - 1)
    else:
        from ropekit.eval.perplexity import window_nll
        nll, _ = window_nll(model, ids[0], score_from=1, loss_chunk=512)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "peak_rss_mib": peak / 1024, "increase_mib": (peak - baseline) / 1024,
                  "seconds": seconds, "tokens_per_second": (length - 1) / seconds, "mean_nll": nll / (length - 1)}))
"""


def run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(LENGTH), str(VOCAB)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = {mode: min((run(mode) for _ in range(3)), key=lambda r: r["seconds"]) for mode in ("naive", "ropekit")}
    same = abs(rows["naive"]["mean_nll"] - rows["ropekit"]["mean_nll"]) < 1e-4
    result = {
        "length": LENGTH,
        "vocab": VOCAB,
        "runs_per_mode": 3,
        "same_loss": same,
        **rows,
        "memory_ratio": rows["naive"]["increase_mib"] / max(rows["ropekit"]["increase_mib"], 1e-9),
        "when": time.strftime("%Y-%m-%d"),
    }
    print(f"perplexity forward at {LENGTH} tokens, vocab {VOCAB} (best of 3 fresh processes each)")
    for mode in ("naive", "ropekit"):
        r = rows[mode]
        print(
            f"  {mode:8s} peak RSS {r['peak_rss_mib']:7.0f} MiB (+{r['increase_mib']:6.0f} MiB over the loaded model), "
            f"{r['tokens_per_second']:8.0f} tokens/s"
        )
    print(f"  same loss: {same}; extra memory naive / ropekit: {result['memory_ratio']:.1f}×")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
