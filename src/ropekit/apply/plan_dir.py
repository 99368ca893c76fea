"""Write a plan directory: what `ropekit plan --out DIR` writes, as one Python call.

    DIR/transformers_v5.json, transformers_v4.json, vllm_hf_overrides*.json,
        llama_cpp_rope_freqs.json, transformers_v5_native.json (see `ropekit.apply.export`)
    DIR/plan.json     every number of the plan, the comparison, and the export paths
    DIR/ropekit-manifest.json   every file's size and sha256, the command, kind "plan" (ropekit.manifest)

The output contract of `ropekit.output` holds: DIR is checked before any work and written atomically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ropekit.apply.export import write_exports
from ropekit.output import atomic_directory, prepare_output
from ropekit.plan.analysis.angles import DEFAULT_BINS
from ropekit.plan.geometry import RopeSpec
from ropekit.plan.registry import DEFAULT_METHOD
from ropekit.plan.report import PlanReport, plan_report

PLAN_FILE = "plan.json"


def write_plan_directory(
    spec: RopeSpec,
    target_length: int,
    out: str | Path,
    method: str = DEFAULT_METHOD,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path | None] = (),
    bins: int = DEFAULT_BINS,
    compare_methods: bool = True,
    paper_setting: bool = False,
    **params: Any,
) -> PlanReport:
    """Plan (see `ropekit.plan.report.plan_report`), then write every export and plan.json into `out`.

    `inputs`: files the plan was read from (a model, a factors file), which `out` must not overlap.
    The returned report's `exports` name the files as they are once `out` is in place.

    >>> import tempfile
    >>> spec = RopeSpec(head_dim=64, base=10000.0, context_length=256)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     report = write_plan_directory(spec, 1024, f"{tmp}/plan", "yarn")
    ...     sorted(p.name for p in Path(f"{tmp}/plan").iterdir())[:3]
    ['llama_cpp_rope_freqs.json', 'plan.json', 'ropekit-manifest.json']
    """
    target = prepare_output(out, kind="plan", overwrite=overwrite, inputs=inputs, marker=PLAN_FILE)
    report = plan_report(
        spec,
        target_length,
        method,
        bins=bins,
        compare_methods=compare_methods,
        paper_setting=paper_setting,
        **params,
    )
    with atomic_directory(target) as tmp:
        written = {kind: Path(out) / path.name for kind, path in write_exports(report.plan, tmp).items()}
        report = replace(report, exports=written)
        (tmp / PLAN_FILE).write_text(json.dumps(report.summary(), indent=2) + "\n")
    return report
