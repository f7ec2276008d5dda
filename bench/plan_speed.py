"""How long planning takes: 70B over 1,024 H100s (p5), the issue's target (< 2 s).

    python bench/plan_speed.py [--repeat 3]

Prints the import time (the planner imports no torch) separately from the planning time
(enumeration, memory of every layout, step time of the non-dominated fitting ones, ranking and
the report), best of --repeat runs in fresh caches.
"""

from __future__ import annotations

import argparse
import time

t0 = time.perf_counter()
from triaxis.plan.hardware import load_catalog, resolve_hardware  # noqa: E402
from triaxis.plan.layouts import SearchSpace  # noqa: E402
from triaxis.plan.problem import Problem, load_model  # noqa: E402
from triaxis.plan.report import explain, tables, toml_snippet  # noqa: E402
from triaxis.plan.runtimes import RUNTIMES  # noqa: E402
from triaxis.plan.search import plan  # noqa: E402

IMPORT_S = time.perf_counter() - t0


def once(space: SearchSpace) -> tuple[float, object]:
    start = time.perf_counter()
    catalog = load_catalog()
    shape, _ = load_model("70b")
    # A fresh Problem: the cost model's caches are keyed on it, so nothing carries over.
    problem = Problem(
        shape, resolve_hardware(catalog, "h100", "p5"), RUNTIMES["triaxis"], 4096, 1024
    )
    result = plan(problem, 1024, "speed", space, catalog=catalog)
    tables(result), explain(result), toml_snippet(result)
    return time.perf_counter() - start, result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"imports (no torch): {IMPORT_S:.2f} s")
    # What `triaxis plan` and parallel.auto search (cp up to the GPUs per node), then without cp.
    for label, space in (("cp <= 8", SearchSpace(max_cp=0)), ("no cp", SearchSpace())):
        runs = [once(space) for _ in range(a.repeat)]
        best, result = min(runs, key=lambda r: r[0])
        print(
            f"plan 70b on 1024 x h100 (p5), seq 4096, batch 1024, {label}: best {best:.2f} s "
            f"of {[round(r[0], 2) for r in runs]}; {result.num_layouts} layouts, "
            f"{result.num_fit} fit, {result.num_timed} timed"
        )
        print(f"  winner: {result.plans[0].layout.describe()}")
