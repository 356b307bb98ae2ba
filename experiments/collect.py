#!/usr/bin/env python
"""Gather a sweep's results into a table (markdown printed, CSV written) and a plot (PNG).

    python experiments/collect.py multirun/sweep_grid/2026-01-01_12-00-00_ab12cd            # offline
    python experiments/collect.py multirun/sweep_grid/... --source wandb                     # W&B API
    python experiments/collect.py --source wandb --group sweep_grid-2026-01-01_12-00-00_ab12cd \
        --project mobilesam-se --entity me                                                   # no files

Offline (default when W&B is not set up, or when W&B has no runs of the group): every job directory
of the sweep (<sweep dir>/<job num>/) holds checkpoints/last.ckpt (history, best_score, epoch,
step), config_resolved.yaml, .hydra/overrides.yaml and checkpoints/training_log.txt (used when
last.ckpt is missing or unreadable). Through W&B: the runs of the sweep's group (the group is read
from a job's config_resolved.yaml, or given with --group); the swept values come from the run names
(Hydra's override_dirname), the scores from the run summaries and histories.

The swept parameters are the overrides whose values differ between jobs plus the sweeper's
parameters named in <sweep dir>/multirun.yaml. Output (default: the sweep directory):
results.csv, results.md and results.png (left: the score against the first swept parameter, one
line per combination of the others; right: the score per epoch of every run).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml


@dataclass
class RunResult:
    job: str
    params: Dict[str, str]  # every override of the job, key -> value (as typed)
    metric: str
    best: float = math.nan
    final: float = math.nan
    epochs: int = 0
    steps: int = 0
    status: str = "missing"
    path: str = ""
    curve: List[Tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    extra: Dict[str, float] = field(default_factory=dict)  # --extra keys: their final values


# -- offline ------------------------------------------------------------------------------------
def _parse_overrides(items: Sequence[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if sep:
            out[key.lstrip("+~")] = value
    return out


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def read_training_log(path: Path) -> List[Dict[str, Any]]:
    """checkpoints/training_log.txt: one tab-separated `key=value` line per epoch."""
    rows = []
    for line in path.read_text().splitlines():
        rec: Dict[str, Any] = {}
        for part in line.split("\t"):
            k, sep, v = part.partition("=")
            if sep:
                rec[k] = _num(v)
        if rec:
            rows.append(rec)
    return rows


def _read_last(path: Path) -> Optional[Dict[str, Any]]:
    try:
        import torch

        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a half-written or foreign file: fall back to the text log
        print(f"warning: cannot read {path}: {e}", file=sys.stderr)
        return None


def _tuned_amg(run_dir: Path) -> Dict[str, float]:
    """Stock and tuned AMG scores of the final best.pt, from checkpoints/best.amg.yaml (trainer.tune_amg)."""
    f = run_dir / "checkpoints" / "best.amg.yaml"
    if not f.exists():
        return {}
    info = (yaml.safe_load(f.read_text()) or {}).get("info") or {}
    out = {}
    for which in ("stock", "tuned"):
        for k, v in (info.get(which) or {}).items():
            out[f"amg_{which}/{k}"] = _num(v)
    return out


def collect_run(run_dir: Path, metric: Optional[str] = None, extra: Sequence[str] = ()) -> RunResult:
    cfg = yaml.safe_load((run_dir / "config_resolved.yaml").read_text()) if (run_dir / "config_resolved.yaml").exists() else {}
    ov_file = run_dir / ".hydra" / "overrides.yaml"
    params = _parse_overrides(yaml.safe_load(ov_file.read_text()) or []) if ov_file.exists() else {}
    trainer = (cfg or {}).get("trainer", {}) or {}
    monitor = trainer.get("monitor", "dice")
    metric = metric or f"val/{monitor}"
    res = RunResult(job=run_dir.name, params=params, metric=metric, path=str(run_dir))
    state = _read_last(run_dir / "checkpoints" / "last.ckpt") if (run_dir / "checkpoints" / "last.ckpt").exists() else None
    if state is not None:
        history = list(state.get("history") or [])
        res.epochs, res.steps = int(state.get("epoch", 0)), int(state.get("step", 0))
        best_score = _num(state.get("best_score"))
    elif (run_dir / "checkpoints" / "training_log.txt").exists():
        history = read_training_log(run_dir / "checkpoints" / "training_log.txt")
        res.epochs = int(history[-1]["epoch"]) + 1 if history else 0
        res.steps = int(history[-1].get("step", 0)) if history else 0
        best_score = math.nan
    else:
        return res
    res.curve = [(int(h.get("epoch", i)), _num(h[metric])) for i, h in enumerate(history) if metric in h]
    tuned = _tuned_amg(run_dir)
    for key in extra:
        vals = [_num(h[key]) for h in history if key in h]
        res.extra[key] = vals[-1] if vals else tuned.get(key, math.nan)
    values = [v for _, v in res.curve if not math.isnan(v)]
    res.final = values[-1] if values else math.nan
    if metric == f"val/{monitor}" and math.isfinite(best_score):
        res.best = best_score  # the trainer's own best (what best.pt holds)
    else:
        res.best = max(values) if values else math.nan
    max_epochs = trainer.get("max_epochs")
    if max_epochs is not None and res.epochs >= int(max_epochs):
        res.status = "complete"
    elif state is not None and state.get("bad_validations") is not None and trainer.get("early_stop_patience") \
            and state["bad_validations"] >= trainer["early_stop_patience"]:
        res.status = "early-stopped"
    else:
        res.status = f"partial ({res.epochs}/{max_epochs} epochs)" if max_epochs else "partial"
    return res


def job_dirs(sweep_dir: Path) -> List[Path]:
    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
            and ((d / "config_resolved.yaml").exists() or (d / ".hydra").exists() or (d / "checkpoints").exists())]
    return sorted(dirs, key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))


def sweeper_keys(sweep_dir: Path) -> List[str]:
    """Keys the sweep varied, from multirun.yaml: the sweeper's params and comma/range overrides."""
    f = sweep_dir / "multirun.yaml"
    if not f.exists():
        return []
    hydra = (yaml.safe_load(f.read_text()) or {}).get("hydra", {}) or {}
    keys = list(((hydra.get("sweeper") or {}).get("params") or {}).keys())
    for item in (hydra.get("overrides") or {}).get("task") or []:
        k, sep, v = str(item).partition("=")
        if sep and ("," in v or v.startswith(("range(", "choice(", "interval(", "glob("))):
            keys.append(k.lstrip("+~"))
    return list(dict.fromkeys(keys))


def swept_keys(results: Sequence[RunResult], hinted: Sequence[str] = ()) -> List[str]:
    keys = [k for k in hinted if any(k in r.params for r in results)]
    all_keys = list(dict.fromkeys(k for r in results for k in r.params))
    keys += [k for k in all_keys if k not in keys and len({r.params.get(k) for r in results}) > 1]
    return keys


def collect_offline(sweep_dir: Path, metric: Optional[str] = None, extra: Sequence[str] = ()) -> Tuple[List[RunResult], List[str]]:
    results = [collect_run(d, metric, extra) for d in job_dirs(sweep_dir)]
    return results, swept_keys(results, sweeper_keys(sweep_dir))


# -- W&B ----------------------------------------------------------------------------------------
def sweep_group(sweep_dir: Path) -> Optional[str]:
    for d in job_dirs(sweep_dir):
        f = d / "config_resolved.yaml"
        if f.exists():
            logger = (yaml.safe_load(f.read_text()) or {}).get("logger") or {}
            if logger.get("group"):
                return logger["group"]
    return None


def collect_wandb(group: str, project: str, entity: Optional[str], metric: str) -> Tuple[List[RunResult], List[str]]:
    import wandb

    api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    results = []
    for run in api.runs(path, filters={"group": group}):
        # run names are Hydra's override_dirname: "a.b=1,c=x" (values with commas are not split right)
        params = _parse_overrides(run.name.split(",")) if "=" in (run.name or "") else {}
        monitor = ((run.config.get("trainer") or {}).get("monitor")) or "dice"
        m = metric or f"val/{monitor}"
        res = RunResult(job=run.name or run.id, params=params, metric=m, path=run.url)
        rows = [r for r in run.scan_history(keys=[m, "epoch"]) if r.get(m) is not None] if m else []
        if not rows:
            rows = [r for r in run.scan_history(keys=[m]) if r.get(m) is not None]
        res.curve = [(int(r.get("epoch", i)), _num(r[m])) for i, r in enumerate(rows)]
        values = [v for _, v in res.curve if not math.isnan(v)]
        res.final = values[-1] if values else _num(run.summary.get(m))
        best = run.summary.get(f"best/{monitor}") if m == f"val/{monitor}" else None
        res.best = _num(best) if best is not None else (max(values) if values else math.nan)
        res.epochs = int(_num(run.summary.get("epochs", 0)) or 0)
        res.steps = int(_num(run.summary.get("steps", run.summary.get("_step", 0))) or 0)
        res.status = run.state
        results.append(res)
    results.sort(key=lambda r: r.job)
    return results, swept_keys(results)


# -- output -------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def table_rows(results: Sequence[RunResult], keys: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    metric = results[0].metric if results else "metric"
    extra = list(dict.fromkeys(k for r in results for k in r.extra))
    header = ["job", *keys, f"best {metric}", f"final {metric}", *[f"final {k}" for k in extra], "epochs", "steps",
              "status", "path"]
    rows = [[r.job, *[r.params.get(k, "") for k in keys], _fmt(r.best), _fmt(r.final),
             *[_fmt(r.extra.get(k, math.nan)) for k in extra], str(r.epochs), str(r.steps), r.status, r.path]
            for r in results]
    return header, rows


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def to_csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def plot(results: Sequence[RunResult], keys: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = results[0].metric
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    # x axis and legend: the parameters that really vary (a swept key fixed on the command line does not)
    keys = [k for k in keys if len({r.params.get(k) for r in results}) > 1] or list(keys)
    if keys:
        x_key, others = keys[0], list(keys[1:])
        xs_raw = sorted({r.params.get(x_key, "") for r in results}, key=lambda v: (math.isnan(_num(v)), _num(v), v))
        numeric = all(not math.isnan(_num(v)) for v in xs_raw)
        groups: Dict[Tuple[str, ...], List[RunResult]] = {}
        for r in results:
            groups.setdefault(tuple(r.params.get(k, "") for k in others), []).append(r)
        for combo, rs in sorted(groups.items()):
            rs = sorted(rs, key=lambda r: xs_raw.index(r.params.get(x_key, "")))
            xs = [_num(r.params.get(x_key)) if numeric else xs_raw.index(r.params.get(x_key, "")) for r in rs]
            label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or None
            ax.plot(xs, [r.best for r in rs], marker="o", label=label)
        if not numeric:
            ax.set_xticks(range(len(xs_raw)), xs_raw)
        ax.set_xlabel(x_key)
        if others:
            ax.legend(fontsize=7)
    else:
        ax.bar(range(len(results)), [r.best for r in results], tick_label=[r.job for r in results])
        ax.set_xlabel("job")
    ax.set_ylabel(f"best {metric}")
    ax.set_title("score vs swept parameter")
    for r in results:
        if r.curve:
            label = ",".join(f"{k}={r.params.get(k, '')}" for k in keys) or r.job
            ax2.plot([e for e, _ in r.curve], [v for _, v in r.curve], marker=".", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(metric)
    ax2.set_title("per epoch")
    if any(r.curve for r in results):
        ax2.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", type=Path, help="the sweep's directory (hydra.sweep.dir)")
    p.add_argument("--source", choices=("auto", "offline", "wandb"), default="auto",
                   help="auto: W&B when it is set up and has the group's runs, else the run directories")
    p.add_argument("--metric", default=None, help="history key to report (default: val/<trainer.monitor>)")
    p.add_argument("--extra", default="", help="comma-separated history keys whose final values become columns "
                   "(e.g. val/recall,val/calibration/gap; amg_tuned/AR_100 and amg_stock/AR_100 come from best.amg.yaml)")
    p.add_argument("--group", default=None, help="W&B group (default: logger.group of the sweep's jobs)")
    p.add_argument("--project", default="mobilesam-se")
    p.add_argument("--entity", default=None)
    p.add_argument("--out", type=Path, default=None, help="where results.{csv,md,png} go (default: the sweep dir)")
    args = p.parse_args(argv)
    if args.sweep_dir is None and (args.source != "wandb" or not args.group):
        p.error("give the sweep directory, or --source wandb --group GROUP")

    results: List[RunResult] = []
    keys: List[str] = []
    want_wandb = args.source == "wandb"
    if args.source == "auto":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from mobilesam_se.loggers import wandb_is_configured

        want_wandb = wandb_is_configured() and os.environ.get("WANDB_MODE") not in ("offline", "disabled")
    if want_wandb:
        group = args.group or (sweep_group(args.sweep_dir) if args.sweep_dir else None)
        if group is None:
            print("no W&B group (logger=none?): reading the run directories", file=sys.stderr)
        else:
            try:
                results, keys = collect_wandb(group, args.project, args.entity, args.metric)
            except Exception as e:  # noqa: BLE001 - offline machine, wrong entity, ...
                if args.source == "wandb" or args.sweep_dir is None:
                    raise
                print(f"W&B query failed ({e}): reading the run directories", file=sys.stderr)
            if not results and args.sweep_dir is not None:
                print(f"no W&B runs in group {group!r}: reading the run directories", file=sys.stderr)
    if not results:
        if args.sweep_dir is None or not args.sweep_dir.is_dir():
            p.error(f"not a directory: {args.sweep_dir}")
        results, keys = collect_offline(args.sweep_dir, args.metric, [k for k in args.extra.split(",") if k])
    if not results:
        print(f"no runs found in {args.sweep_dir}", file=sys.stderr)
        return 1

    header, rows = table_rows(results, keys)
    out = args.out or args.sweep_dir or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(header, rows)
    (out / "results.md").write_text(md + "\n")
    (out / "results.csv").write_text(to_csv(header, rows))
    plot(results, keys, out / "results.png")
    print(md)
    print(f"\nwrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
