"""`jaxprobe active-experiment`: the paper's SST-2 active-testing experiment in one command.

Stages (each reused on a rerun, so a killed run continues where it stopped):
  1. `evaluate` the target zero-shot and N-shot (default 50) on one pool/test draw, and the
     surrogate N-shot on the pool (the target's own N-shot evaluation when the surrogate is the
     target model, as the paper's "LURE-7B" surrogate for its 7B-few target);
  2. for each target, sweeps of `runs` x `size` steps: uniform (`iid`) and each acquisition
     (cross-entropy, entropy, nll) with the LURE estimator, plus ASE (constant over steps);
  3. the paper's table (median squared error x10^4 at 50/100/200/300/400 labels), `squared_error.png`,
     `relative_error.png`, `results.json`, and one line per acquisition saying whether it beats iid.

Layout under `--out`:
    experiment.json                      settings (a rerun with others is refused)
    evaluations/target-0shot/            `jaxprobe evaluate` folders (see evaluate.py)
    evaluations/target-<N>shot/
    evaluations/surrogate-<N>shot/       only with --surrogate-model
    sweeps/<target>/<acquisition>/estimates.npy   [size, runs] float64, the reference's layout
                                         (iid: plain mean; the others: LURE)
    results.json, table.md, squared_error.png, relative_error.png

Squared error is against the target's mean loss on the held-out test subset (the paper's truth);
`results.json` and `table.md` also give it against the pool loss, which LURE estimates without bias:
with small subsets the gap (R_pool - R_test)^2 is a floor under every method's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np

from jaxprobe.active.acquire import run_sweep, summarise_sweep
from jaxprobe.active.estimators import ACQUISITIONS, ase_estimate, mean_loss
from jaxprobe.active.evaluate import (
    DEFAULT_SIZES, EvaluateConfig, add_evaluate_arguments, check_same_rows, load_evaluation,
    run_evaluate)
from jaxprobe.errors import UserError
from jaxprobe.io import load_json, save_json, save_npy, save_text

EXPERIMENT_FORMAT = "jaxprobe.active-experiment/1"
TABLE_BUDGETS = (50, 100, 200, 300, 400)
# Sized for about 8 minutes on 2 CPU cores with SmolLM2 (the 50-shot prompts cost ~5x a zero-shot
# one even with the prefix cache: attention over ~1,200 cached tokens); the paper used 10k/10k.
EXPERIMENT_SIZES = {**DEFAULT_SIZES, "pool_size": 1000, "test_size": 500}
PAPER_SCALE = {**DEFAULT_SIZES, "pool_size": 10_000, "test_size": 10_000}
METHOD_NAMES = {"iid": "Unif", "cross-entropy": "CE", "entropy": "Entropy", "nll": "NLL",
                "nll-exact": "NLL (exact)", "self-entropy": "Self-entropy", "true-loss": "True loss",
                "ase": "ASE"}
TRUTHS = ("test", "pool")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """`jaxprobe active-experiment`; flags of the same names (see `--help`)."""

    out: str | None = None  # None: runs/active-experiment[-paper-scale]
    model: str = "smollm2-135m"
    surrogate_model: str | None = None  # None: the target model with `icl` examples
    icl: int = 50
    acquisitions: tuple[str, ...] = ("cross-entropy", "entropy", "nll")
    ase: bool = True
    runs: int = 3000
    size: int = 400
    clip: float = 0.1
    temperature: float | None = None
    sweep_seed: int = 0
    budget_offset: bool = True  # zero-shot target: k active labels vs icl + k uniform ones (paper)
    paper_scale: bool = False
    evaluate: EvaluateConfig = EvaluateConfig(out="")
    progress: bool = True

    @property
    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        return Path("runs/active-experiment" + ("-paper-scale" if self.paper_scale else ""))

    @property
    def resolved_evaluate(self) -> EvaluateConfig:
        """The evaluate settings with the subset sizes filled in (paper scale or the defaults)."""
        ev = dataclasses.replace(self.evaluate, progress=self.progress, model=self.model)
        if self.evaluate.subsets is not None:
            return ev
        scale = PAPER_SCALE if self.paper_scale else EXPERIMENT_SIZES
        return dataclasses.replace(ev, **{k: v if getattr(ev, k) is None else getattr(ev, k)
                                          for k, v in scale.items()})

    def settings(self) -> dict:
        """What decides the results; batch size, progress bars and the output path do not."""
        ev = dataclasses.asdict(self.resolved_evaluate)
        for key in ("out", "batch_size", "progress", "model", "icl", "subsets"):
            ev.pop(key)
        ev["label_words"] = list(ev["label_words"])
        return {"model": self.model, "surrogate_model": self.surrogate_model, "icl": self.icl,
                "acquisitions": list(self.acquisitions), "ase": self.ase, "runs": self.runs,
                "size": self.size, "clip": self.clip, "temperature": self.temperature,
                "sweep_seed": self.sweep_seed, "budget_offset": self.budget_offset, "evaluate": ev}


# ------------------------------------------------------------------------------------ analysis


def _finite_or_none(values: np.ndarray) -> list:
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


def format_table(per_target: dict[str, dict], truth: str, runs: int, budgets=TABLE_BUDGETS) -> str:
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


def plot(per_target: dict[str, dict], truth: str, path_se: Path, path_rel: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(kind: str, path: Path) -> None:
        fig, axes = plt.subplots(1, len(per_target), figsize=(5.5 * len(per_target), 4), squeeze=False)
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
        plt.close(fig)
        tmp.replace(path)

    figure("se", path_se)
    figure("rel", path_rel)


# ------------------------------------------------------------------------------------ stages


def _sweep(target, surrogate, *, acquisition: str, config: ExperimentConfig, true_risk: float,
           folder: Path) -> np.ndarray:
    """estimates [size, runs] of one acquisition with LURE (iid: the plain mean, as `acquire`'s
    baseline), from `folder` if already finished; a killed sweep resumes from its checkpoint."""
    final = folder / "estimates.npy"
    if final.is_file():
        return np.load(final, allow_pickle=False)
    uniform = acquisition == "iid"
    estimates = run_sweep(target.logits, surrogate.logits, target.labels, acquisition=acquisition,
                          estimator="mean" if uniform else "lure", runs=config.runs, size=config.size,
                          seed=config.sweep_seed, clip=None if uniform else config.clip,
                          temperature=config.temperature, true_risk=true_risk,
                          checkpoint_dir=folder / "checkpoint", progress=config.progress)
    save_npy(final, np.asarray(estimates, np.float64))
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # its runs now live in estimates.npy
    return estimates


def _check_config(config: ExperimentConfig) -> None:
    if config.runs < 1:
        raise UserError(f"--runs must be at least 1, not {config.runs}")
    if config.size < 1:
        raise UserError(f"--size must be at least 1, not {config.size}")
    if not 0 <= config.clip < 1:
        raise UserError(f"--clip must be in [0, 1), not {config.clip}")
    if config.temperature is not None and not config.temperature > 0:
        raise UserError(f"--temperature must be positive, not {config.temperature}")
    if config.icl < 1:
        raise UserError(f"--icl must be at least 1 (the surrogate is an in-context model), not {config.icl}")
    for a in config.acquisitions:
        if a not in ACQUISITIONS or a == "iid":
            raise UserError(f"--acquisitions: unknown acquisition {a!r}; choose from "
                            f"{', '.join(x for x in ACQUISITIONS if x != 'iid')}")
    pool = config.resolved_evaluate.pool_size
    if pool is not None and config.size > pool:
        raise UserError(f"--size {config.size} is larger than the pool (--pool-size {pool})")
    if config.resolved_evaluate.test_size == 0:
        raise UserError("--test-size 0: the experiment needs a test subset for the true risk")


def run_experiment(config: ExperimentConfig, *, log=print) -> dict:
    _check_config(config)
    out = config.out_dir
    settings = config.settings()
    if (out / "experiment.json").is_file():
        old = load_json(out / "experiment.json")
        if old.get("settings") != settings:
            changed = [k for k in settings if old.get("settings", {}).get(k) != settings[k]]
            raise UserError(f"--out {out} holds an experiment with other settings ({', '.join(changed)}); "
                            f"use a new --out")
        log(f"continuing the experiment in {out}")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds other files; give a new or empty folder")
    else:
        save_json(out / "experiment.json", {"format": EXPERIMENT_FORMAT, "settings": settings})

    evaluations = _run_evaluations(config, out, log)
    surrogate = evaluations.pop("surrogate")
    per_target = {}
    for target_name, (folder, offset) in evaluations.items():
        pool, test = load_evaluation(folder, "pool"), load_evaluation(folder, "test")
        check_same_rows(pool, surrogate, names=("target", "surrogate"))
        truths = {"test": mean_loss(test.logits, test.labels), "pool": mean_loss(pool.logits, pool.labels)}
        estimates = {}
        for method in ("iid", *config.acquisitions):
            folder = out / "sweeps" / target_name / method
            log(f"sweep: target {target_name}, {METHOD_NAMES.get(method, method)}, {config.runs} runs x "
                f"{config.size} labels" + (" (done before)" if (folder / "estimates.npy").is_file() else ""))
            estimates[method] = _sweep(pool, surrogate, acquisition=method, config=config, true_risk=truths["test"],
                                       folder=folder)
        if config.ase:  # labels play no part: one constant estimate, a single "run"
            estimates["ase"] = np.full((config.size, 1), ase_estimate(pool.logits, surrogate.logits,
                                                                       config.temperature))
        summaries = {truth: {m: summarise_sweep(e, truths[truth], None if m == "iid" else estimates["iid"],
                                                offset=offset)
                             for m, e in estimates.items()} for truth in TRUTHS}
        per_target[target_name] = {
            "offset": offset, "true_risk": truths,
            "accuracy": {"pool": pool.metrics["accuracy"], "test": test.metrics["accuracy"]},
            "median_se": {truth: {m: np.asarray(sm["median_squared_error"], np.float64) for m, sm in by.items()}
                          for truth, by in summaries.items()},
            "relative_error": {truth: {m: np.asarray(sm["relative_error"], np.float64) for m, sm in by.items()
                                       if m != "iid"} for truth, by in summaries.items()}}
    return _report(config, out, per_target, log)


def _run_evaluations(config: ExperimentConfig, out: Path, log) -> dict:
    """Evaluate target zero-/N-shot and the surrogate; returns {"surrogate": pool Evaluation,
    target name: (folder, budget offset)}."""
    import jaxprobe

    base = config.resolved_evaluate
    folders = {"0shot": out / "evaluations" / "target-0shot",
               f"{config.icl}shot": out / "evaluations" / f"target-{config.icl}shot"}
    log(f"loading {config.model}")
    lm = jaxprobe.load_model(config.model, dtype=base.dtype)
    zero = dataclasses.replace(base, out=str(folders["0shot"]), model=config.model, icl=0)
    run_evaluate(zero, lm=lm, log=log)
    same_rows = dict(pool_size=None, test_size=None, icl_candidates=None, seed=None,
                     subsets=str(folders["0shot"] / "subsets.json"))
    few = dataclasses.replace(base, out=str(folders[f"{config.icl}shot"]), model=config.model,
                              icl=config.icl, **same_rows)
    run_evaluate(few, lm=lm, log=log)
    surrogate_folder = folders[f"{config.icl}shot"]
    if config.surrogate_model is not None:
        surrogate_folder = out / "evaluations" / f"surrogate-{config.icl}shot"
        del lm
        lm = jaxprobe.load_model(config.surrogate_model, dtype=base.dtype)
        run_evaluate(dataclasses.replace(few, out=str(surrogate_folder), model=config.surrogate_model),
                     lm=lm, log=log)
    surrogate = load_evaluation(surrogate_folder, "pool", flag="surrogate")
    return {"surrogate": surrogate, "0shot": (folders["0shot"], config.icl if config.budget_offset else 0),
            f"{config.icl}shot": (folders[f"{config.icl}shot"], 0)}


def _report(config: ExperimentConfig, out: Path, per_target: dict, log) -> dict:
    tables = {truth: format_table(per_target, truth, config.runs, table_budgets(config.size)) for truth in TRUTHS}
    offset_note = (f"Zero-shot target: active methods at a budget of B labels used B - {config.icl} "
                   f"acquired labels (the surrogate already used {config.icl} in-context examples), "
                   f"as in the paper; '—' where that is none.\n") if config.budget_offset else ""
    floor = {t: (info["true_risk"]["pool"] - info["true_risk"]["test"]) ** 2 for t, info in per_target.items()}
    text = (f"# Active testing on {config.evaluate.dataset}: {config.model}, surrogate "
            f"{config.surrogate_model or config.model} {config.icl}-shot\n\n{offset_note}\n"
            + tables["test"] + "\n" + tables["pool"] + "\n"
            + "Floor of the test-truth error, (R_pool - R_test)^2 x10^4: "
            + ", ".join(f"{t} {v * 1e4:.4f}" for t, v in floor.items()) + "\n")
    save_text(out / "table.md", text)
    plot(per_target, "test", out / "squared_error.png", out / "relative_error.png")
    lines = {truth: verdicts(per_target, truth) for truth in TRUTHS}
    results = {"format": EXPERIMENT_FORMAT, "settings": config.settings(), "targets": {
        t: {"true_risk": info["true_risk"], "accuracy": info["accuracy"], "budget_offset": info["offset"],
            "median_se": {tr: {m: _finite_or_none(c) for m, c in info["median_se"][tr].items()} for tr in TRUTHS},
            "relative_error": {tr: {m: _finite_or_none(c) for m, c in info["relative_error"][tr].items()}
                               for tr in TRUTHS},
            "median_relative_error": {tr: {m: float(np.median(c[np.isfinite(c)]))
                                           for m, c in info["relative_error"][tr].items() if np.isfinite(c).any()}
                                      for tr in TRUTHS}}
        for t, info in per_target.items()}, "verdicts": lines}
    save_json(out / "results.json", results)
    for t, info in per_target.items():
        log(f"target {t}: test loss {info['true_risk']['test']:.4f}, pool loss {info['true_risk']['pool']:.4f}, "
            f"test accuracy {info['accuracy']['test']:.4f}")
    log("\n" + tables["test"])
    for line in lines["test"] + lines["pool"]:
        log(line)
    log(f"wrote {out / 'table.md'}, {out / 'squared_error.png'}, {out / 'relative_error.png'}, "
        f"{out / 'results.json'}")
    return results


# ------------------------------------------------------------------------------------ CLI


def _acquisitions(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def add_experiment_command(subparsers) -> argparse.ArgumentParser:
    d = ExperimentConfig
    parser = subparsers.add_parser(
        "active-experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the paper's SST-2 active-testing experiment in one command (evaluate + sweeps + table)",
        description="Target zero-shot and N-shot, surrogate N-shot, acquisitions vs iid with LURE, "
                    "and ASE; writes the paper's table (median squared error x10^4 at "
                    "50/100/200/300/400 labels), squared_error.png, relative_error.png and "
                    "results.json, and says whether each acquisition beats iid. Rerun the same "
                    "command to resume: every finished stage is reused.",
        epilog="example:\n  jaxprobe active-experiment                 # pool 1,000 / test 500, SmolLM2\n"
               "  jaxprobe active-experiment --paper-scale   # the paper's 10,000/10,000")
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/active-experiment, or "
                             "runs/active-experiment-paper-scale with --paper-scale)")
    parser.add_argument("--model", default=d.model, help="target model (default: %(default)s)")
    parser.add_argument("--surrogate-model", default=None,
                        help="surrogate model, run with --icl examples (default: the target model)")
    parser.add_argument("--icl", type=int, default=d.icl,
                        help="in-context examples of the few-shot target and the surrogate (default: %(default)s)")
    parser.add_argument("--acquisitions", type=_acquisitions, default=d.acquisitions, metavar="A,B,...",
                        help="compared with iid (default: %s)" % ",".join(d.acquisitions))
    parser.add_argument("--no-ase", dest="ase", action="store_false", help="leave out the ASE estimate")
    parser.add_argument("--runs", type=int, default=d.runs, help="runs per sweep (default: %(default)s)")
    parser.add_argument("--size", type=int, default=d.size, help="labels acquired per run (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=d.clip,
                        help="proposal floor as a fraction of uniform, in [0, 1) (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=None, help="surrogate temperature (default: none)")
    parser.add_argument("--sweep-seed", type=int, default=d.sweep_seed, help="(default: %(default)s)")
    parser.add_argument("--no-budget-offset", dest="budget_offset", action="store_false",
                        help="compare a zero-shot target's k active labels with k uniform ones, not "
                             "with icl + k (the paper's rule)")
    parser.add_argument("--paper-scale", action="store_true",
                        help="pool 10,000 / test 10,000 as in the paper (hours on a CPU)")
    add_evaluate_arguments(parser, sizes=EXPERIMENT_SIZES)
    parser.set_defaults(func=_experiment_command)
    return parser


def _experiment_command(args: argparse.Namespace) -> int:
    ev_fields = {f.name for f in dataclasses.fields(EvaluateConfig)}
    evaluate = EvaluateConfig(out="", **{k: v for k, v in vars(args).items()
                                         if k in ev_fields and k not in ("out", "model", "icl")})
    ex_fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"evaluate"}
    config = ExperimentConfig(evaluate=evaluate, **{k: v for k, v in vars(args).items() if k in ex_fields})
    run_experiment(config)
    return 0
