"""Every table, plot and report jaxprobe writes, built from results dicts: the probe results
(results.csv, the accuracy-by-layer plot), the probe experiment's report.md, and the active-testing
experiment's table and error curves."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from jaxprobe.files import save_json, save_text

# ---------------------------------------------------------------- probing

def write_results(out: Path, results: dict, log: Callable[[str], None] = print) -> None:
    save_json(out / "results.json", results)
    header = ["variant", "recipe", "layer", "n_seeds", "test_accuracy_mean", "test_accuracy_std",
              "test_accuracy_lo95", "test_accuracy_hi95", "final_train_loss_mean",
              "final_train_loss_std", "final_train_loss_lo95", "final_train_loss_hi95"]
    lines = [",".join(header)]
    for r in results["results"]:
        acc, loss = r["test_accuracy"], r["final_train_loss"]
        lines.append(",".join(str(x) for x in (
            _csv_field(r["variant"]), r["recipe"], r["layer"], len(acc["seeds"]),
            acc["mean"], acc["std"], *acc["ci95"], loss["mean"], loss["std"], *loss["ci95"])))
    save_text(out / "results.csv", "\n".join(lines) + "\n")
    log(probe_table(results))
    plot_accuracy_by_layer(results, out / "accuracy_by_layer.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.csv'}, {out / 'accuracy_by_layer.png'}")


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def probe_table(results: dict) -> str:
    head = f"{'variant':<26} {'recipe':<10} {'layer':>5}  {'test accuracy (95% CI)':<26} {'train loss':>10}"
    lines = [head, "-" * len(head)]
    for r in results["results"]:
        acc = r["test_accuracy"]
        lo, hi = acc["ci95"]
        lines.append(f"{r['variant'][:26]:<26} {r['recipe']:<10} {r['layer']:>5}  "
                     f"{acc['mean']:.4f} ± {acc['std']:.4f} [{lo:.3f}, {hi:.3f}]  "
                     f"{r['final_train_loss']['mean']:>10.4f}")
    lines.append("")
    lines.append("best layer per variant and recipe:")
    for b in results["best"]:
        acc = b["test_accuracy"]
        lines.append(f"  {b['variant']:<26} {b['recipe']:<10} layer {b['layer']:>3}: "
                     f"{acc['mean']:.4f} [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}]")
    return "\n".join(lines)


def plot_accuracy_by_layer(results: dict, path: Path) -> None:
    """Test accuracy vs layer, one line per (variant, recipe), 95% bands over seeds."""
    from matplotlib.figure import (
        Figure,  # not pyplot: no GUI backend, half a second less to import
    )

    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    keys = dict.fromkeys((r["variant"], r["recipe"]) for r in results["results"])
    # one colour per variant, one line style per recipe
    colours = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(v for v, _ in keys))}
    for variant, recipe in keys:
        mine = [r for r in results["results"] if r["variant"] == variant and r["recipe"] == recipe]
        x = [r["layer"] for r in mine]
        mean = [r["test_accuracy"]["mean"] for r in mine]
        lo = [r["test_accuracy"]["ci95"][0] for r in mine]
        hi = [r["test_accuracy"]["ci95"][1] for r in mine]
        style = "-" if recipe == "vector-mlp" else "--"
        ax.plot(x, mean, style, color=colours[variant], marker="o", markersize=3,
                label=f"{variant} / {recipe}")
        # an accuracy cannot leave [0, 1]; a t-interval over few seeds can
        ax.fill_between(x, np.clip(lo, 0, 1), np.clip(hi, 0, 1), color=colours[variant],
                        alpha=0.15, linewidth=0)
    model = (results.get("model") or {}).get("name", "")
    ax.set_xlabel("layer (0 = embeddings, i = after block i-1)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{model}: probe test accuracy by layer (mean of {len(results['seeds'])} seeds, 95% band)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def _t_quantile_975(dof: int) -> float:
    from scipy.special import (
        stdtrit,  # Student's t quantile; scipy.stats takes ~1 s to import
    )

    return float(stdtrit(dof, 0.975)) if dof > 0 else float("nan")


def probe_experiment_report(results: dict) -> str:
    """Best layer per template and recipe, and whether prompting beats `raw`, with intervals."""
    best = {(b["variant"], b["recipe"]): b for b in results["best"]}
    run = results["experiment"]  # model, dataset, n_train, n_test as the command named them
    n_test = run["n_test"]
    lines = [f"# probe-experiment: {run['model']}, {run['dataset']} ({run['n_train']} train / {n_test} test), "
             f"{len(results['seeds'])} seeds", "",
             "Layer = hook point (0 = embeddings, i = after block i-1; the reference's layers.N is N+1).",
             "Intervals: 95% over probe seeds. A single test accuracy on "
             f"{n_test} examples also carries sampling error of about ±{1.96 * math.sqrt(0.25 / n_test):.3f} "
             "(95%, worst case p = 0.5), which seeds do not show.", "",
             "## Best layer", "",
             "| template | recipe | best layer | test accuracy | 95% interval |", "|---|---|---|---|---|"]
    for (variant, recipe), b in best.items():
        acc = b["test_accuracy"]
        lines.append(f"| {variant} | {recipe} | {b['layer']} | {acc['mean']:.4f} ± {acc['std']:.4f} "
                     f"| [{acc['ci95'][0]:.3f}, {acc['ci95'][1]:.3f}] |")
    baseline = "raw"
    prompted = [v for v in results["variants"] if v != baseline]
    if baseline in {v for v, _ in best} and prompted:
        lines += ["", "## Does prompting help? (best layer vs best layer of `raw`)", "",
                  "| template | recipe | difference | 95% interval (seeds) | with test-sampling error "
                  "| verdict |", "|---|---|---|---|---|---|"]
        for recipe in results["recipes"]:
            base = best[(baseline, recipe)]["test_accuracy"]
            for variant in prompted:
                mine = best[(variant, recipe)]["test_accuracy"]
                diff = mine["mean"] - base["mean"]
                k = len(mine["seeds"])
                seed_se = math.sqrt((mine["std"] ** 2 + base["std"] ** 2) / k)
                half = _t_quantile_975(2 * k - 2) * seed_se if k > 1 else 0.0
                # unpaired binomial error of two accuracies on n_test examples (conservative)
                sampling_se = math.sqrt(sum(p * (1 - p) for p in (mine["mean"], base["mean"])) / n_test)
                wide = 1.96 * math.sqrt(seed_se ** 2 + sampling_se ** 2)
                if abs(diff) > wide:
                    verdict = "helps" if diff > 0 else "hurts"
                elif abs(diff) > half:
                    verdict = (f"{'better' if diff > 0 else 'worse'} over seeds, but within the "
                               "test-sampling error")
                else:
                    verdict = "no clear difference"
                lines.append(f"| {variant} | {recipe} | {diff:+.4f} | [{diff - half:+.3f}, {diff + half:+.3f}] "
                             f"| [{diff - wide:+.3f}, {diff + wide:+.3f}] | {verdict} |")
    lines += ["", "The verdict needs the wider interval (seeds and the test sample's sampling error, "
              "treated as unpaired, so conservative) to exclude 0. The best layer is picked on the "
              "test accuracy itself, so best-layer numbers lean optimistic.", "",
              "Full table: probes/results.csv; plot: probes/accuracy_by_layer.png."]
    return "\n".join(lines)


# ---------------------------------------------------------------- active testing

TABLE_BUDGETS = (50, 100, 200, 300, 400)


METHOD_NAMES = {"iid": "Unif", "cross-entropy": "CE", "entropy": "Entropy", "nll": "NLL",
                "nll-exact": "NLL (exact)", "self-entropy": "Self-entropy", "true-loss": "True loss",
                "ase": "ASE"}
METHOD_NAMES.update({f"probe-{k}": f"{v} (probe surrogate)" for k, v in list(METHOD_NAMES.items())
                     if k not in ("iid", "ase")})


def finite_or_none(values: np.ndarray) -> list:
    return [float(v) if np.isfinite(v) else None for v in values]


def table_rows(curves: dict[str, np.ndarray], offset: int, budgets=TABLE_BUDGETS) -> list[list[str]]:
    """One row per method of MedSE x10^4 at each total label budget; a budget B is B - offset
    active labels for an active method (the "---" cells of the paper's zero-shot rows)."""
    rows = []
    for method, curve in curves.items():
        cells = []
        for b in budgets:
            k = b if method in ("iid", "ase") else b - offset
            cells.append("—" if k < 1 or k > len(curve) else f"{curve[k - 1] * 1e4:.4f}")
        rows.append([METHOD_NAMES.get(method, method) + ("" if method in ("iid", "ase") else " (LURE)"), *cells])
    return rows


def table_budgets(size: int) -> tuple[int, ...]:
    """The paper's 50/100/200/300/400 labels, or the same fractions of a smaller `size`."""
    if size >= TABLE_BUDGETS[-1]:
        return TABLE_BUDGETS
    return tuple(sorted({max(1, round(size * b / TABLE_BUDGETS[-1])) for b in TABLE_BUDGETS}))


def active_table(per_target: dict[str, dict], truth: str, runs: int, budgets=TABLE_BUDGETS) -> str:
    header = "| Target | Method | " + " | ".join(str(b) for b in budgets) + " |"
    lines = [f"Median squared error x10^4 over {runs} runs; true risk = {truth} loss.", "",
             header, "|" + "---|" * (len(budgets) + 2)]
    for target, info in per_target.items():
        for i, row in enumerate(table_rows(info["median_se"][truth], info["offset"], budgets)):
            lines.append(f"| {target if i == 0 else ''} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def verdicts(per_target: dict[str, dict], truth: str) -> list[str]:
    """Per target and acquisition: the median over label budgets of the relative error vs iid
    (the paper's summary statistic), and whether it is below 1."""
    out = []
    for target, info in per_target.items():
        for method, rel in info["relative_error"][truth].items():
            if method == "iid" or len(rel) == 0:
                continue
            rel = rel[np.isfinite(rel)]  # 0/0 where iid's median error is exactly 0
            if rel.size == 0:
                continue
            med = float(np.median(rel))
            wins = float(np.mean(rel < 1.0))
            verdict = "beats iid" if med < 1.0 else "does not beat iid"
            name = METHOD_NAMES.get(method, method) + ("" if method == "ase" else " (LURE)")
            out.append(f"{target}: {name} {verdict} (true risk = {truth} loss): median relative error "
                       f"{med:.3f}, lower than iid at {wins:.0%} of {len(rel)} label budgets")
    return out


def plot_active_curves(per_target: dict[str, dict], truth: str, path_se: Path, path_rel: Path) -> None:
    from matplotlib.figure import Figure

    def figure(kind: str, path: Path) -> None:
        fig = Figure(figsize=(5.5 * len(per_target), 4))
        axes = fig.subplots(1, len(per_target), squeeze=False)
        for ax, (target, info) in zip(axes[0], per_target.items()):
            curves = info["median_se"][truth] if kind == "se" else info["relative_error"][truth]
            for method, y in curves.items():
                if kind == "rel" and method == "iid":
                    continue
                x = np.arange(1, len(y) + 1) + (info["offset"] if kind == "se" and method not in ("iid", "ase") else 0)
                label = METHOD_NAMES.get(method, method)
                ax.plot(x, y, label=label, lw=1.4, color="black" if method == "iid" else None,
                        ls="--" if method == "ase" else "-")
            if kind == "rel":
                ax.axhline(1.0, color="black", lw=0.8)
            ax.set_yscale("log")
            ax.set_title(f"target {target}")
            ax.set_xlabel("acquired labels" if kind == "rel" or not info["offset"]
                          else f"labels (active methods: + {info['offset']} ICL examples)")
            ax.set_ylabel("median squared error" if kind == "se" else "MedSE active / MedSE iid")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"true risk = {truth} loss", fontsize=10)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)

    figure("se", path_se)
    figure("rel", path_rel)


def group_table(per_target: dict[str, dict]) -> str:
    """Accuracy and loss per group (MMLU: per subject) of each target on the pool, or ""."""
    targets = [t for t, info in per_target.items() if info.get("by_group", {}).get("pool")]
    if not targets:
        return ""
    groups = sorted(per_target[targets[0]]["by_group"]["pool"])
    lines = ["", "## Per group (pool): accuracy / cross-entropy", "",
             "| group | n | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for g in groups:
        cells = []
        for t in targets:
            m = per_target[t]["by_group"]["pool"][g]
            cells.append(f"{m['accuracy']:.3f} / {m['cross_entropy']:.3f}")
        lines.append(f"| {g} | {per_target[targets[0]]['by_group']['pool'][g]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tasks_report(results: dict[str, dict], budgets=TABLE_BUDGETS) -> str:
    """The paper's layout over several tasks side by side (`active-experiment --task all`): per task,
    target and method the median squared error x10^4 at each label budget (against the task's true
    risk), then the median relative error against uniform sampling, then the Pearson correlation of
    the CE acquisition score with the target's per-example loss. `results`: task -> the results.json
    of its experiment."""
    lines = ["# Active testing across tasks", "",
             ("Median squared error x10^4 over runs at each label budget (true risk: the task's, the "
              "test loss except FPB's pool loss, as in the paper); '—' where a zero-shot target's active "
              "budget is not reached (the surrogate's in-context examples count as labels)."), "",
             "| Task | Target | Method | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for task, res in results.items():
        truth = res["settings"].get("truth", "test")
        for target, info in res["targets"].items():
            curves = {m: np.array([np.nan if v is None else v for v in c], np.float64)
                      for m, c in info["median_se"][truth].items()}
            for i, row in enumerate(table_rows(curves, info["budget_offset"], budgets)):
                lines.append(f"| {task if i == 0 else ''} | {target if i == 0 else ''} | " + " | ".join(row) + " |")
    lines += ["", "## Relative error against uniform sampling (median over label budgets; < 1 beats it)", ""]
    methods = list(dict.fromkeys(m for res in results.values() for info in res["targets"].values()
                                 for m in info["median_relative_error"][res["settings"].get("truth", "test")]))
    lines += ["| Task | Target | " + " | ".join(METHOD_NAMES.get(m, m) for m in methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for task, res in results.items():
        truth = res["settings"].get("truth", "test")
        for target, info in res["targets"].items():
            rel = info["median_relative_error"][truth]
            lines.append(f"| {task} | {target} | "
                         + " | ".join(f"{rel[m]:.3f}" if m in rel else "—" for m in methods) + " |")
    targets = list(dict.fromkeys(t for res in results.values() for t in res["targets"]))
    lines += ["", "## Pearson correlation: CE acquisition score vs the target's per-example loss (pool)", "",
              "| Task | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for task, res in results.items():
        cells = [res["targets"][t].get("pearson_ce_loss") if t in res["targets"] else None for t in targets]
        lines.append(f"| {task} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"
