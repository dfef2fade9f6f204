"""Train dense and each layer type at a set of budgets on one task, then write one table and one plot.

Every point is an ordinary `run.py` run of the task's recipes (`experiment=<task>/<model>-<layer>`,
or the `-ft` fine-tune recipes from the dense run's tested checkpoint with `--finetune`), in
logs/runs/<prefix>-<layer>-<budget>; a run whose summary.json exists is not run again, so an
interrupted comparison continues where it stopped. The table (markdown and CSV) and the
accuracy-vs-MACs plot (PNG) report the test metric, parameters, the measured MACs ratio of the
structured layers and the model's MACs per sample.

    python scripts/compare.py                                   # Fashion-MNIST ViT, β ∈ {0.15, 0.3}
    python scripts/compare.py --finetune --budgets 0.15 0.25 0.4 --layers svd tsvd gblr
    python scripts/compare.py --extra trainer.max_epochs=2      # any run.py override for every run
    python scripts/compare.py --finetune --layers svd svd:plain:layer.method=svd,layer.allocation=uniform

A layer is `LAYER` or `LAYER:LABEL:OVERRIDES` (comma-separated run.py overrides for that layer's
runs only), so one layer type can appear with several settings, each its own line in the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_point(
    name: str, experiment: str, overrides: list[str], log_dir: Path, train: bool = True
) -> dict | None:
    """The summary of run `name`, training it first unless it already finished (or `train` is off:
    then None for a run that has not finished)."""
    summary = log_dir / "runs" / name / "summary.json"
    if not summary.is_file() and not train:
        print(f"not finished, left out: {name}", flush=True)
        return None
    if not summary.is_file():
        cmd = [sys.executable, str(ROOT / "run.py"), f"experiment={experiment}", f"run_name={name}",
               f"paths.log_dir={log_dir}", "print_config=false", *overrides]  # fmt: skip
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    else:
        print(f"done already: {name}", flush=True)
    return json.loads(summary.read_text())


def parse_layer(spec: str) -> tuple[str, str, list[str]]:
    """(layer type, label, overrides) of `LAYER` or `LAYER:LABEL:OVERRIDE,OVERRIDE,...`."""
    parts = spec.split(":", 2)
    if len(parts) == 1:
        return spec, spec, []
    if len(parts) != 3 or not parts[1]:
        raise SystemExit(
            f"--layers {spec!r}: expected LAYER or LAYER:LABEL:OVERRIDES (e.g. svd:plain:layer.method=svd)"
        )
    return parts[0], f"{parts[0]}-{parts[1]}", [o for o in parts[2].split(",") if o]


def row(layer: str, budget: float | None, summary: dict, metric: str) -> dict:
    cost, test = summary["cost"], summary["test"]
    return {
        "layer": layer,
        "budget": budget if budget is not None else 1.0,
        f"test/{metric}": test[f"test/{metric}"],
        "dense init": test.get(f"test/{metric} (dense init_from)", ""),
        "macs ratio (structured layers)": cost.get("budget (structured MACs / dense)", 1.0),
        "MACs per sample (deployed)": cost["MACs per sample: deployed"],
        "parameters (as trained)": cost["parameters: as trained"],
        "run": summary["run"]["name"],
    }


def write_outputs(rows: list[dict], metric: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for layer in dict.fromkeys(r["layer"] for r in rows):
        points = sorted(
            (r["macs ratio (structured layers)"], r[f"test/{metric}"]) for r in rows if r["layer"] == layer
        )
        ax.plot(*zip(*points, strict=True), marker="o", label=layer)
    ax.set_xlabel("MACs of the structured layers / dense")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    print(f"wrote {out.with_suffix('.md')}, .csv and .png", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="fashion_mnist", help="the recipes' folder under configs/experiment")
    p.add_argument("--model", default="vit_p7", help="the recipes' model part: <task>/<model>-<layer>")
    p.add_argument("--metric", default="acc")
    p.add_argument("--layers", nargs="+", default=["svd", "tsvd", "gblr"])
    p.add_argument("--budgets", nargs="+", type=float, default=[0.15, 0.3])
    p.add_argument("--finetune", action="store_true", help="the -ft recipes, from the dense run's checkpoint")
    p.add_argument("--prefix", default="cmp")
    p.add_argument("--log-dir", type=Path, default=ROOT / "logs")
    p.add_argument("--out", type=Path, default=None, help="table/plot path without suffix")
    p.add_argument("--extra", nargs="*", default=[], help="run.py overrides for every run")
    p.add_argument("--no-train", action="store_true", help="table and plot of the finished runs only")
    args = p.parse_args()
    prefix = f"{args.prefix}-{args.task}-{args.model}"
    dense = run_point(f"{prefix}-dense", f"{args.task}/{args.model}-dense", args.extra, args.log_dir)
    rows = [row("dense", None, dense, args.metric)]
    start = [f"init_from={dense['outputs']['checkpoint']}"] if args.finetune else []
    kind = "-ft" if args.finetune else ""
    for layer, label, own in map(parse_layer, args.layers):
        for budget in args.budgets:
            name = f"{prefix}-{label}{kind}-{budget}"
            overrides = [*start, f"layer.budget={budget}", *own, *args.extra]
            experiment = f"{args.task}/{args.model}-{layer}{kind}"
            summary = run_point(name, experiment, overrides, args.log_dir, train=not args.no_train)
            if summary is not None:
                rows.append(row(label + kind, budget, summary, args.metric))
    write_outputs(rows, args.metric, args.out or args.log_dir / f"{prefix}{kind}")


if __name__ == "__main__":
    main()
