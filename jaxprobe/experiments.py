"""The experiments, end to end: `probe-experiment` (the probing reference), `active-experiment`
(the paper's SST-2 active testing) and `demo` (a look at the model, then both). The only place a
model and a sweep meet; every stage is resumable: rerun the same command after an interruption.

probe-experiment: extract train and test stores per template, probe them, report the best layer and
whether prompting helps, with intervals.

active-experiment stages (each reused on a rerun):
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

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxprobe import data, processes, prompts
from jaxprobe.active.estimators import (
    ACQUISITIONS,
    acquisition_scores,
    ase_estimate,
    mean_loss,
    per_example_loss,
)
from jaxprobe.active.inputs import check_same_rows, load_evaluation
from jaxprobe.active.sweep import run_sweep, summarise_sweep
from jaxprobe.errors import UserError
from jaxprobe.evaluate import (
    DEFAULT_SIZES,
    TASK_FIELD_DEFAULTS,
    EvaluateConfig,
    run_evaluate,
)
from jaxprobe.extract import TASK_TEMPLATE, ExtractConfig, extract
from jaxprobe.files import (
    claim_folder,
    is_leftover,
    load_npy,
    release_folder,
    save_json,
    save_npy,
    save_text,
)
from jaxprobe.probing import RECIPES, ProbeConfig, probe
from jaxprobe.report import (
    METHOD_NAMES,
    active_table,
    finite_or_none,
    group_table,
    plot_active_curves,
    probe_experiment_report,
    table_budgets,
    verdicts,
)
from jaxprobe.sources import DEFAULT_MODEL

# ---------------------------------------------------------------- probe-experiment

EXPERIMENT_TEMPLATES = ("raw", "vector-5shot", "vector-5shot-untruncated")


@dataclass(frozen=True)
class ProbeExperimentConfig:
    """`jaxprobe probe-experiment`: the reference experiment with seeds and intervals."""

    out: str = "runs/probe-experiment"
    model: str = DEFAULT_MODEL
    dataset: str = "imdb"
    train_split: str = "train"
    test_split: str = "test"
    n_train: int = 100
    n_test: int = 300
    seed: int = 42
    templates: tuple[str, ...] = EXPERIMENT_TEMPLATES
    demonstrations_from: str = "0:5"
    recipes: tuple[str, ...] = RECIPES
    seeds: int = 10
    positions: str = "last"
    batch_size: int = 8
    shard_size: int = 32
    dtype: str = "auto"  # float32 on CPUs, bfloat16 on accelerators
    text_column: str = "text"
    label_column: str = "label"
    mesh: tuple[int, int] | None = None  # (data, model) devices; None: load_model's default
    progress: bool = True
    task: str | None = None  # a task preset or file: its data, splits, label words, raw and few-shot prompts


def _probe_task(cfg: ProbeExperimentConfig):
    """(cfg with the task's dataset, splits and templates `raw` + the task's own prompt, the task)."""
    from jaxprobe.tasks import load_task

    if cfg.task is None:
        return cfg, None
    task = load_task(cfg.task)
    templates = ("raw", TASK_TEMPLATE) if cfg.templates == EXPERIMENT_TEMPLATES else cfg.templates
    return dataclasses.replace(cfg, dataset=task.dataset, train_split=task.probe_splits[0],
                               test_split=task.probe_splits[1], templates=templates), task


def _variant_name(template: str, cfg: ProbeExperimentConfig, task) -> str:
    if template == TASK_TEMPLATE and task is not None:
        return f"{task.name}-{len(prompts.parse_row_slice(cfg.demonstrations_from))}shot"
    return prompts.variant_name(template)


def probe_experiment(cfg: ProbeExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """Extract train and test stores for each template (resumable), probe them, report."""
    from jaxprobe.runner import load_model, resolve_dtype

    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype))
    cfg, task = _probe_task(cfg)
    one_split = cfg.train_split == cfg.test_split  # the test sample then follows the train one
    if data.is_single_file(cfg.dataset) and task is None:
        raise UserError(f"--dataset {cfg.dataset} is one file, so its train and test samples would "
                        "be the same rows; run `jaxprobe extract` on a train and a test file and "
                        "`jaxprobe probe` on the two stores instead")
    if len(set(cfg.templates)) != len(cfg.templates):
        raise UserError(f"--templates repeats a template: {', '.join(cfg.templates)}")
    for t in cfg.templates:
        if t != TASK_TEMPLATE or task is None:
            prompts.get_template(t)
    out = Path(cfg.out)
    jobs = [(t, split, n, role) for t in cfg.templates
            for split, n, role in ((cfg.train_split, cfg.n_train, "train"), (cfg.test_split, cfg.n_test, "test"))]
    n_steps = len(jobs) + 1
    log(f"probe-experiment: {cfg.model} on {cfg.task or cfg.dataset} ({cfg.n_train} train / {cfg.n_test} test), "
        f"templates {', '.join(cfg.templates)}, recipes {', '.join(cfg.recipes)}, {cfg.seeds} seeds "
        f"-> {out} (rerun the same command to resume)")
    log(f"loading model {cfg.model} ({cfg.dtype})")
    lm = load_model(cfg.model, dtype=cfg.dtype, mesh_shape=cfg.mesh)
    stores = {}
    names = {t: _variant_name(t, cfg, task) for t in cfg.templates}
    for step, (template, split, n, role) in enumerate(jobs, 1):
        label = role if one_split else split  # one split: name the stores by their role
        name = f"{names[template]}-{label}".replace("/", "_")
        known = template in prompts.TEMPLATES or (template == TASK_TEMPLATE and task is not None)
        store_dir = out / "stores" / (name if known else f"custom{step}-{label}")
        log(f"[{step}/{n_steps}] extract {template!r} {split} ({n} texts) -> {store_dir}")
        extract(ExtractConfig(
            out=str(store_dir), model=cfg.model, dataset=cfg.dataset, split=split, n=n,
            seed=cfg.seed, template=template, demonstrations_from=cfg.demonstrations_from,
            demonstrations_split=cfg.train_split, positions=cfg.positions,
            batch_size=cfg.batch_size, shard_size=cfg.shard_size, dtype=cfg.dtype,
            text_column=cfg.text_column, label_column=cfg.label_column,
            progress=cfg.progress, task=cfg.task, skip=cfg.n_train if one_split and role == "test" else 0),
            lm=lm, log=log)
        stores[(template, role)] = str(store_dir)
    if not processes.is_writer():
        return {}  # the model's part is done; probes train on process 0's stores, on its own
    log(f"[{n_steps}/{n_steps}] probe: {', '.join(cfg.recipes)} -> {out / 'probes'}")
    results = probe(ProbeConfig(
        train=tuple((names[t], (stores[(t, "train")],)) for t in cfg.templates),
        test=tuple((names[t], (stores[(t, "test")],)) for t in cfg.templates),
        out=str(out / "probes"), recipes=cfg.recipes, seeds=cfg.seeds, progress=cfg.progress),
        log=log)
    results["experiment"] = {"model": cfg.model, "dataset": cfg.task or cfg.dataset, "n_train": cfg.n_train,
                             "n_test": cfg.n_test}
    report = probe_experiment_report(results)
    save_text(out / "report.md", report + "\n")
    log("")
    log(report)
    log(f"\nwrote {out / 'report.md'}")
    return results


def probe_experiment_tasks(cfg: ProbeExperimentConfig, log: Callable[[str], None] = print) -> dict:
    """`probe-experiment --task all`: every preset into OUT/<task>/, then OUT/report.md with each
    task's report one after another."""
    from jaxprobe.tasks import presets

    out = Path(cfg.out)
    results, sections = {}, []
    for name in presets():
        log(f"== task {name} -> {out / name}")
        results[name] = probe_experiment(dataclasses.replace(cfg, task=name, out=str(out / name)), log=log)
        if results[name]:
            body = probe_experiment_report(results[name]).replace("\n## ", "\n### ").split("\n", 1)[1]
            sections.append(f"## {name}\n{body}")
    if processes.is_writer():
        save_text(out / "report.md", "# probe-experiment across tasks\n\n" + "\n\n".join(sections) + "\n")
        log(f"wrote {out / 'report.md'}")
    return results


# ---------------------------------------------------------------- active-experiment

EXPERIMENT_FORMAT = "jaxprobe.active-experiment/1"


PROBE_PREFIX = "probe-"  # sweeps with the probe surrogate: probe-cross-entropy, ...


# Sized for about 8 minutes on 2 CPU cores with SmolLM2 (the 50-shot prompts cost ~5x a zero-shot
# one even with the prefix cache: attention over ~1,200 cached tokens); the paper used 10k/10k.
EXPERIMENT_SIZES = {**DEFAULT_SIZES, "pool_size": 1000, "test_size": 500}


PAPER_SCALE = {**DEFAULT_SIZES, "pool_size": 10_000, "test_size": 10_000}


TRUTHS = ("test", "pool")


@dataclasses.dataclass(frozen=True)
class ActiveExperimentConfig:
    """`jaxprobe active-experiment`; flags of the same names (see `--help`)."""

    out: str | None = None  # None: runs/active-experiment[-paper-scale]
    model: str = DEFAULT_MODEL
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
    # beside the in-context surrogate: a probe on the zero-shot target's activations, trained on
    # the same `icl` labelled examples (one forward pass: evaluate --activations icl)
    probe: bool = True
    paper_scale: bool = False
    evaluate: EvaluateConfig = EvaluateConfig(out="")
    progress: bool = True
    truth: str = "test"        # the subset whose loss is the true risk (a task's; FPB: pool)
    task: str | None = None    # the task preset's name, for the report

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
        for key in ("out", "batch_size", "progress", "model", "icl", "subsets", "mesh"):
            ev.pop(key)
        for key, default in TASK_FIELD_DEFAULTS.items():  # recorded only when a task sets them
            if ev[key] == default:
                ev.pop(key)
            elif isinstance(ev[key], tuple):
                ev[key] = list(ev[key])
        ev["label_words"] = list(ev["label_words"])
        extra = {k: getattr(self, k) for k, d in (("truth", "test"), ("task", None)) if getattr(self, k) != d}
        return {"model": self.model, "surrogate_model": self.surrogate_model, "icl": self.icl,
                "acquisitions": list(self.acquisitions), "ase": self.ase, "runs": self.runs,
                "size": self.size, "clip": self.clip, "temperature": self.temperature,
                "sweep_seed": self.sweep_seed, "budget_offset": self.budget_offset, "evaluate": ev, **extra,
                **({"probe": True} if self.probe else {})}


def with_task(config: ActiveExperimentConfig, task, *, icl: int | None = None,
              keep: dict | None = None) -> ActiveExperimentConfig:
    """`config` for a task preset (`tasks.Task`): its data, prompt, ICL count, truth and subset sizes
    (the paper's with `paper_scale`). Subset sizes already set in `config.evaluate` win, and so do
    `icl` and the evaluate fields in `keep` (flags the user gave)."""
    fields = {**task.evaluate_fields(config.paper_scale), **(keep or {})}
    for key in DEFAULT_SIZES:
        if getattr(config.evaluate, key) is not None or config.evaluate.subsets is not None:
            fields[key] = getattr(config.evaluate, key)
    return dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, **fields),
                               icl=task.icl if icl is None else icl, truth=task.truth, task=task.name)


def active_experiment_tasks(config: ActiveExperimentConfig, task_list: list, *, icl: int | None = None,
                            keep: dict | None = None, log=print) -> dict:
    """`active-experiment --task NAME|all`: one experiment per task, each in OUT/<task> (one task with
    --out: OUT itself), then with several tasks OUT/report.md, the tasks side by side."""
    from jaxprobe.report import tasks_report

    base = config.out_dir
    results = {}
    for task in task_list:
        out = base / task.name if len(task_list) > 1 or config.out is None else base
        log(f"== task {task.name}: {task.description} -> {out}")
        results[task.name] = active_experiment(dataclasses.replace(
            with_task(config, task, icl=icl, keep=keep), out=str(out)), log=log)
    if len(task_list) > 1 and processes.is_writer():
        report = tasks_report(results)
        save_text(base / "report.md", report)
        log("\n" + report)
        log(f"wrote {base / 'report.md'}")
    return results


def _sweep(target, surrogate, *, acquisition: str, config: ActiveExperimentConfig, true_risk: float,
           folder: Path, surrogate_logits: np.ndarray | None = None) -> np.ndarray:
    """estimates [size, runs] of one acquisition with LURE (iid: the plain mean, as `acquire`'s
    baseline), from `folder` if already finished; a killed sweep resumes from its checkpoint."""
    final = folder / "estimates.npy"
    if final.is_file():
        estimates = load_npy(final)
        if estimates.shape != (config.size, config.runs) or estimates.dtype.kind != "f":
            raise UserError(f"{final}: holds {estimates.dtype}{list(estimates.shape)}, expected float "
                            f"[{config.size}, {config.runs}]; delete it and rerun to recompute it")
        return estimates
    uniform = acquisition == "iid"
    surrogate_logits = surrogate.logits if surrogate_logits is None else surrogate_logits
    estimates = run_sweep(target.logits, surrogate_logits, target.labels, acquisition=acquisition,
                          estimator="mean" if uniform else "lure", runs=config.runs, size=config.size,
                          seed=config.sweep_seed, clip=None if uniform else config.clip,
                          temperature=config.temperature, true_risk=true_risk,
                          checkpoint_dir=folder / "checkpoint", progress=config.progress)
    save_npy(final, np.asarray(estimates, np.float64))
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)  # its runs now live in estimates.npy
    return estimates


def _check_config(config: ActiveExperimentConfig) -> None:
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
    if config.truth not in TRUTHS:
        raise UserError(f"truth must be one of {', '.join(TRUTHS)}, not {config.truth!r}")
    if config.resolved_evaluate.test_size == 0 and config.truth == "test":
        raise UserError("--test-size 0: the experiment needs a test subset for the true risk")


def active_experiment(config: ActiveExperimentConfig, *, log=print) -> dict:
    from jaxprobe.runner import resolve_dtype

    evaluate = dataclasses.replace(config.evaluate, dtype=resolve_dtype(config.evaluate.dtype))
    config = dataclasses.replace(config, evaluate=evaluate)  # settings record a concrete dtype
    _check_config(config)
    out = config.out_dir
    settings = config.settings()
    created = not out.exists()
    new = processes.decided(lambda: claim_folder(out, "experiment.json", settings, what="an active-testing "
                                                 "experiment", format=EXPERIMENT_FORMAT)) is None
    if new:
        save_json(out / "experiment.json", {"format": EXPERIMENT_FORMAT, "settings": settings})
    else:
        log(f"continuing the experiment in {out}")
    try:
        evaluations = _run_evaluations(config, out, log)
    except UserError:
        # A flag only evaluate can check (label words, sizes against the data) was wrong: take back
        # the settings just written, so the corrected command is not refused as "other settings".
        if new and not [p for p in out.iterdir() if p.name != "experiment.json" and not is_leftover(p)]:
            (out / "experiment.json").unlink()
            release_folder(out)
            if created:
                shutil.rmtree(out, ignore_errors=True)
        raise
    if not processes.is_writer():
        return {}  # the models' part is done; the sweeps run on process 0's evaluations, on its own
    surrogate = evaluations.pop("surrogate")
    probe = None
    if config.probe:  # the probe surrogate: trained on the zero-shot target's activations of the icl examples
        from jaxprobe.active.probe_surrogate import probe_surrogate

        probe, info = probe_surrogate(load_evaluation(evaluations["0shot"][0], "pool"))
        log(f"probe surrogate: hook point {info['layer']} by {len(info['cv_log_loss'])}-layer cross-validation on "
            f"{info['examples']} examples (held-out log-loss {min(info['cv_log_loss']):.4f})")
    per_target = {}
    truth_names = TRUTHS if config.resolved_evaluate.test_size else ("pool",)
    for target_name, (folder, offset) in evaluations.items():
        pool = load_evaluation(folder, "pool")
        test = load_evaluation(folder, "test") if "test" in truth_names else None
        check_same_rows(pool, surrogate, names=("target", "surrogate"))
        truths = {"pool": mean_loss(pool.logits, pool.labels)}
        if test is not None:
            truths = {"test": mean_loss(test.logits, test.labels), **truths}
        estimates = {}
        for method in ("iid", *config.acquisitions):
            folder = out / "sweeps" / target_name / method
            log(f"sweep: target {target_name}, {METHOD_NAMES.get(method, method)}, {config.runs} runs x "
                f"{config.size} labels" + (" (done before)" if (folder / "estimates.npy").is_file() else ""))
            estimates[method] = _sweep(pool, surrogate, acquisition=method, config=config, true_risk=truths[config.truth],
                                       folder=folder)
        if probe is not None:
            for method in config.acquisitions:
                name = PROBE_PREFIX + method
                folder = out / "sweeps" / target_name / name
                log(f"sweep: target {target_name}, {method} with the probe surrogate")
                estimates[name] = _sweep(pool, surrogate, acquisition=method, config=config, true_risk=truths[config.truth],
                                         folder=folder, surrogate_logits=probe.logits)
        if config.ase:  # labels play no part: one constant estimate, a single "run"
            estimates["ase"] = np.full((config.size, 1), ase_estimate(pool.logits, surrogate.logits,
                                                                       config.temperature))
        summaries = {truth: {m: summarise_sweep(e, truths[truth], None if m == "iid" else estimates["iid"],
                                                offset=offset)
                             for m, e in estimates.items()} for truth in truth_names}
        # The paper's correlation table: how well the CE acquisition score tracks the target's loss.
        ce = acquisition_scores("cross-entropy", pool.logits, surrogate.logits, pool.labels,
                                temperature=config.temperature)
        per_target[target_name] = {
            "offset": offset, "true_risk": truths,
            "pearson_ce_loss": float(np.corrcoef(ce, per_example_loss(pool.logits, pool.labels))[0, 1]),
            "accuracy": {name: ev.metrics["accuracy"] for name, ev in (("pool", pool), ("test", test))
                         if ev is not None},
            "by_group": {name: ev.metrics["by_group"] for name, ev in (("pool", pool), ("test", test))
                         if ev is not None and "by_group" in ev.metrics},
            "median_se": {truth: {m: np.asarray(sm["median_squared_error"], np.float64) for m, sm in by.items()}
                          for truth, by in summaries.items()},
            "relative_error": {truth: {m: np.asarray(sm["relative_error"], np.float64) for m, sm in by.items()
                                       if m != "iid"} for truth, by in summaries.items()}}
    return _report(config, out, per_target, log)


def _run_evaluations(config: ActiveExperimentConfig, out: Path, log) -> dict:
    """Evaluate target zero-/N-shot and the surrogate; returns {"surrogate": pool Evaluation,
    target name: (folder, budget offset)}."""
    from jaxprobe.runner import load_model

    base = config.resolved_evaluate
    folders = {"0shot": out / "evaluations" / "target-0shot",
               f"{config.icl}shot": out / "evaluations" / f"target-{config.icl}shot"}
    log(f"loading {config.model}")
    lm = load_model(config.model, dtype=base.dtype, mesh_shape=base.mesh)
    zero = dataclasses.replace(base, out=str(folders["0shot"]), model=config.model, icl=0,
                               activations=config.icl if config.probe else None)
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
        lm = load_model(config.surrogate_model, dtype=base.dtype, mesh_shape=base.mesh)
        run_evaluate(dataclasses.replace(few, out=str(surrogate_folder), model=config.surrogate_model),
                     lm=lm, log=log)
    surrogate = load_evaluation(surrogate_folder, "pool", flag="surrogate")
    return {"surrogate": surrogate, "0shot": (folders["0shot"], config.icl if config.budget_offset else 0),
            f"{config.icl}shot": (folders[f"{config.icl}shot"], 0)}


def _report(config: ActiveExperimentConfig, out: Path, per_target: dict, log) -> dict:
    truths = tuple(t for t in TRUTHS if t in next(iter(per_target.values()))["true_risk"])
    main_truth = config.truth
    tables = {truth: active_table(per_target, truth, config.runs, table_budgets(config.size)) for truth in truths}
    offset_note = (f"Zero-shot target: active methods at a budget of B labels used B - {config.icl} "
                   f"acquired labels (the surrogate already used {config.icl} in-context examples), "
                   f"as in the paper; '—' where that is none.\n") if config.budget_offset else ""
    text = (f"# Active testing on {config.task or config.evaluate.dataset}: {config.model}, surrogate "
            f"{config.surrogate_model or config.model} {config.icl}-shot\n\n{offset_note}\n"
            + "".join(tables[t] + "\n" for t in (main_truth, *(t for t in truths if t != main_truth))))
    if "test" in truths:
        floor = {t: (info["true_risk"]["pool"] - info["true_risk"]["test"]) ** 2 for t, info in per_target.items()}
        text += ("Floor of the test-truth error, (R_pool - R_test)^2 x10^4: "
                 + ", ".join(f"{t} {v * 1e4:.4f}" for t, v in floor.items()) + "\n")
    if config.task is not None:
        text += ("\nPearson correlation of the CE acquisition score with the target's per-example loss "
                 "(pool): " + ", ".join(f"{t} {info['pearson_ce_loss']:.3f}" for t, info in per_target.items())
                 + "\n")
    text += group_table(per_target)
    save_text(out / "table.md", text)
    plot_active_curves(per_target, main_truth, out / "squared_error.png", out / "relative_error.png")
    lines = {truth: verdicts(per_target, truth) for truth in truths}
    results = {"format": EXPERIMENT_FORMAT, "settings": config.settings(), "targets": {
        t: {"true_risk": info["true_risk"], "accuracy": info["accuracy"], "budget_offset": info["offset"],
            "median_se": {tr: {m: finite_or_none(c) for m, c in info["median_se"][tr].items()} for tr in truths},
            "relative_error": {tr: {m: finite_or_none(c) for m, c in info["relative_error"][tr].items()}
                               for tr in truths},
            "median_relative_error": {tr: {m: float(np.median(c[np.isfinite(c)]))
                                           for m, c in info["relative_error"][tr].items() if np.isfinite(c).any()}
                                      for tr in truths},
            **({"pearson_ce_loss": info["pearson_ce_loss"]} if config.task is not None else {}),
            **({"by_group": info["by_group"]} if info["by_group"] else {})}
        for t, info in per_target.items()}, "verdicts": lines}
    save_json(out / "results.json", results)
    for t, info in per_target.items():
        log(f"target {t}: " + ", ".join(f"{tr} loss {info['true_risk'][tr]:.4f}" for tr in truths)
            + f", {truths[0]} accuracy {info['accuracy'][truths[0]]:.4f}")
    log("\n" + tables[main_truth])
    for line in [line for t in truths for line in lines[t]]:
        log(line)
    log(f"wrote {out / 'table.md'}, {out / 'squared_error.png'}, {out / 'relative_error.png'}, "
        f"{out / 'results.json'}")
    return results


# ---------------------------------------------------------------- propose -> label -> estimate

def label_demo(experiment_out: str | Path, *, size: int = 100, log=print) -> dict:
    """Active testing for real, once, on an active-experiment's zero-shot target: `propose` a queue
    of `size` items (probe surrogate when the experiment had one, else the in-context one), label
    it from the held-back truth, `estimate`, and print the estimate and interval next to the pool
    value. Writes `queue/`, `labels-from-truth.csv` and `estimate.json` under `experiment_out`."""
    import csv

    from jaxprobe.active.interval import per_example_metrics
    from jaxprobe.active.queue import (
        EstimateConfig,
        ProposeConfig,
        estimate,
        propose,
        read_queue,
    )

    out = Path(experiment_out)
    target = out / "evaluations" / "target-0shot"
    few = sorted(p for p in (out / "evaluations").glob("*shot") if p.name != "target-0shot")
    surrogate = "probe" if (target / "pool" / "activations.npy").is_file() else str(few[0])
    ev = load_evaluation(target, "pool")
    size = min(size, len(ev.labels))
    propose(ProposeConfig(target=str(target), surrogate=surrogate, size=size, out=str(out / "queue")), log=log)
    truth = dict(zip((str(i) for i in ev.indices.tolist()), ev.labels.tolist()))
    labels = out / "labels-from-truth.csv"
    with open(labels, "w", newline="") as f:  # the truth held back from propose, given as a labeller would
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        writer.writerows((row["id"], truth[row["id"]]) for row in read_queue(out / "queue")[1])
    result = estimate(EstimateConfig(queue=str(out / "queue"), labels=str(labels), out=str(out / "estimate.json")),
                      log=log)
    pool = {m: float(v.mean()) for m, v in per_example_metrics(ev.logits, ev.labels).items()}
    for metric, m in result["metrics"].items():
        inside = m["low"] <= pool[metric] <= m["high"]
        log(f"  {metric}: estimate {m['estimate']:.4f}, 95% CI [{m['low']:.4f}, {m['high']:.4f}] from {size} labels "
            f"({'probe' if surrogate == 'probe' else 'in-context'} surrogate); true pool value {pool[metric]:.4f} "
            f"({'inside' if inside else 'OUTSIDE'} the interval)")
    return {**result, "pool_truth": pool}


# ---------------------------------------------------------------- demo

SENTENCES = [
    "The capital of France is",
    "I loved this movie: the acting was wonderful and the story moving. Sentiment:",
    "I hated this movie: the acting was wooden and the plot dull. Sentiment:",
]


def run_demo(model: str = DEFAULT_MODEL, top_k: int = 5) -> None:
    from jaxprobe.runner import load_model

    lm = load_model(model)
    print(f"model {lm.name}: {lm.config.n_layers} layers, d_model {lm.config.d_model}, "
          f"{lm.config.n_params:,} parameters, fingerprint {lm.fingerprint}")
    out = lm.run(SENTENCES, activations=True, all_logits=True)
    norms = np.linalg.norm(out["activations"], axis=-1)  # [n, L+1]
    for text, logits, layer_norms in zip(SENTENCES, out["logits"], norms):
        top = np.argsort(-logits)[:top_k]
        probs = np.exp(logits[top] - logits.max()) / np.exp(logits - logits.max()).sum()
        print(f"\n{text!r}")
        print("  next token: " + ", ".join(f"{lm.tokenizer.decode([t])!r} {p:.2f}" for t, p in zip(top, probs)))
        print("  |resid| by hook point (embed, blocks.0 .. blocks.%d):" % (lm.config.n_layers - 1))
        print("  " + " ".join(f"{x:.0f}" for x in layer_norms))
