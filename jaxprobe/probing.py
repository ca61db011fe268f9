"""`jaxprobe probe`: probes trained on activation stores (or the reference's pickles), every
recipe x variant x layer x seed in one vectorised sweep (`probes.py`), summarised with intervals
over seeds; the tables and the plot come from `report.py`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxprobe.errors import UserError
from jaxprobe.files import claim_folder, load_npy, save_json, save_npy
from jaxprobe.report import write_results
from jaxprobe.store import LAYER_CONVENTION, ActivationStore, open_activations

RECIPES = ("vector-mlp", "logreg")


@dataclass(frozen=True)
class ProbeConfig:
    """`jaxprobe probe`: variants are (name, [paths]) pairs; a name given several paths joins their
    layers (e.g. one reference pickle per layer)."""

    train: tuple[tuple[str, tuple[str, ...]], ...]
    test: tuple[tuple[str, tuple[str, ...]], ...]
    out: str
    recipes: tuple[str, ...] = RECIPES
    seeds: int = 10
    layers: tuple[int, ...] | None = None
    progress: bool = True


@dataclass(frozen=True)
class Variant:
    name: str
    train: list[ActivationStore]
    test: list[ActivationStore]
    hook_points: tuple[int, ...]
    n_classes: int = 2  # K: the labels are 0..K-1, every one present in train


def _store_identity(s: ActivationStore) -> dict:
    m = s.manifest
    if m.get("format") == "reference-pickle":
        return {"path": str(s.path), "sha256": m["sha256"]}
    import hashlib
    import json

    settings = json.dumps(m["settings"], sort_keys=True).encode()
    return {"path": str(s.path), "settings_sha256": hashlib.sha256(settings).hexdigest()}


def _model_of(s: ActivationStore) -> tuple[str, str | None]:
    model = s.manifest.get("model", {})
    return model.get("name", "?"), model.get("fingerprint")


def load_variants(cfg: ProbeConfig) -> list[Variant]:
    """Open and cross-check the stores: same model, same hook points, labels 0..K-1 with every class
    in train and the same classes in test, finite data."""
    train, test = dict(cfg.train), dict(cfg.test)
    for name in train:
        if name not in test:
            raise UserError(f"--train {name}=... has no matching --test {name}=... "
                            f"(test variants: {', '.join(test)})")
    for name in test:
        if name not in train:
            raise UserError(f"--test {name}=... has no matching --train {name}=...")
    variants = []
    for name, train_paths in train.items():
        tr = [open_activations(p) for p in train_paths]
        te = [open_activations(p) for p in test[name]]
        points = _joined_hook_points(tr, f"--train {name}")
        test_points = _joined_hook_points(te, f"--test {name}")
        if points != test_points:
            raise UserError(f"variant {name!r}: train stores have hook points {list(points)}, "
                            f"test stores {list(test_points)}")
        for a, b in ((tr[0], s) for s in tr[1:] + te):
            if len(a.labels) != len(b.labels) and b in tr:
                raise UserError(f"{b.path} has {len(b.labels)} examples, {a.path} {len(a.labels)}; "
                                "stores joined into one variant must hold the same examples")
        variants.append(Variant(name, tr, te, points))
    stores = [s for v in variants for s in v.train + v.test]
    first = stores[0]
    for s in stores[1:]:
        if s.d_model != first.d_model or _model_of(s)[1] != _model_of(first)[1]:
            raise UserError(f"{s.path} comes from model {_model_of(s)[0]} (fingerprint "
                            f"{_model_of(s)[1]}, d_model {s.d_model}), {first.path} from "
                            f"{_model_of(first)[0]} (fingerprint {_model_of(first)[1]}, d_model "
                            f"{first.d_model}); probe stores of one model together")
    for v in variants[1:]:
        if v.hook_points != variants[0].hook_points:
            raise UserError(f"variant {v.name!r} has hook points {list(v.hook_points)}, "
                            f"{variants[0].name!r} has {list(variants[0].hook_points)}; "
                            "variants trained together need the same layers")
    n_classes = max(2, 1 + max(int(np.max(v.train[0].labels)) for v in variants))
    for i, v in enumerate(variants):
        train_labels = set(np.unique(v.train[0].labels).tolist())
        if n_classes == 2 and train_labels != {0, 1}:
            raise UserError(f"{v.train[0].path}: labels are {sorted(train_labels)}; a probe needs "
                            "both 0 and 1")
        if train_labels != set(range(n_classes)):
            raise UserError(f"{v.train[0].path}: labels are {sorted(train_labels)}; a {n_classes}-class "
                            f"probe needs class ids 0..{n_classes - 1}, each with training rows")
        variants[i] = Variant(v.name, v.train, v.test, v.hook_points, n_classes)
        for s in v.test:
            test_labels = set(np.unique(s.labels).tolist())
            if test_labels != train_labels:
                raise UserError(f"{s.path}: test label set {sorted(test_labels)} differs from the "
                                f"train set {sorted(train_labels)} of {v.train[0].path}")
    if cfg.layers is not None:
        if len(set(cfg.layers)) != len(cfg.layers):
            raise UserError(f"--layers {','.join(map(str, cfg.layers))} repeats a hook point")
        for h in cfg.layers:
            if h not in variants[0].hook_points:
                raise UserError(f"--layers {h}: the stores have hook points "
                                f"{_point_range(variants[0].hook_points)}")
    return variants


def _joined_hook_points(stores: list[ActivationStore], flag: str) -> tuple[int, ...]:
    points: list[int] = []
    for s in stores:
        repeated = set(points) & set(s.hook_points)
        if repeated:
            raise UserError(f"{flag}: {s.path} repeats hook point {min(repeated)}")
        points.extend(s.hook_points)
    return tuple(points)


def _point_range(points: Sequence[int]) -> str:
    points = list(points)
    return f"{points[0]}..{points[-1]}" if points == list(range(points[0], points[-1] + 1)) else str(points)


def _joined_layers(stores: list[ActivationStore], points: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, len(points), d] gathered from the stores that hold each point, and labels."""
    parts = []
    for h in points:
        owner = next(s for s in stores if h in s.hook_points)
        parts.append(owner.layers([h]))
    labels = stores[0].labels
    for s in stores[1:]:
        if not np.array_equal(s.labels, labels):
            raise UserError(f"{s.path}: labels differ from {stores[0].path}; stores joined into "
                            "one variant must hold the same examples in the same order")
    return np.concatenate(parts, axis=1), np.asarray(labels, np.int64)


def _probe_settings(cfg: ProbeConfig, variants: list[Variant], points: Sequence[int]) -> dict:
    return {"format": "jaxprobe-probe", "recipes": list(cfg.recipes), "seeds": cfg.seeds,
            "hook_points": list(points),
            "variants": {v.name: {"train": [_store_identity(s) for s in v.train],
                                  "test": [_store_identity(s) for s in v.test]} for v in variants}}


def probe(cfg: ProbeConfig, log: Callable[[str], None] = print) -> dict:
    """Train every recipe on every variant x layer x seed; write results.json/.csv and the plot."""
    for r in cfg.recipes:
        if r not in RECIPES:
            raise UserError(f"--recipe {r!r}: choose from {', '.join(RECIPES)}, both")
    if cfg.seeds < 1:
        raise UserError(f"--seeds must be at least 1, not {cfg.seeds}")
    variants = load_variants(cfg)
    points = list(cfg.layers) if cfg.layers is not None else list(variants[0].hook_points)
    train = [_joined_layers(v.train, points) for v in variants]  # refuses NaN/inf before any write
    test = [_joined_layers(v.test, points) for v in variants]
    out = Path(cfg.out)
    settings = _probe_settings(cfg, variants, points)
    if claim_folder(out, "probe_settings.json", settings, what="probe results") is None:
        save_json(out / "probe_settings.json", {"format": settings["format"], "settings": settings})
    from jaxprobe.cpu import enable_compilation_cache
    from jaxprobe.probes import train_probe_sweep

    enable_compilation_cache()

    sweeps = {}
    for recipe in cfg.recipes:
        folder = out / "sweeps" / recipe
        files = {k: folder / f"{k}.npy" for k in ("final_train_loss", "test_accuracy")}
        if all(f.is_file() for f in files.values()):
            log(f"probe {recipe}: done before, reading {folder}")
            sweeps[recipe] = {k: load_npy(f) for k, f in files.items()}
            expected = (len(variants), len(points), cfg.seeds)
            for k, f in files.items():
                if sweeps[recipe][k].shape != expected or sweeps[recipe][k].dtype != np.float64:
                    raise UserError(f"{f}: holds {sweeps[recipe][k].dtype}{list(sweeps[recipe][k].shape)}, "
                                    f"expected float64{list(expected)}; delete it and rerun to recompute it")
            continue
        log(f"probe {recipe}: {len(variants)} variant(s) x {len(points)} layers x {cfg.seeds} "
            f"seeds = {len(variants) * len(points) * cfg.seeds} probes in one vmapped program")
        res = train_probe_sweep(train=train, test=test, recipe=recipe, seeds=range(cfg.seeds),
                                layers=None, checkpoint_dir=out / "checkpoints" / recipe,
                                progress=cfg.progress, variant_names=[v.name for v in variants],
                                n_classes=variants[0].n_classes)
        sweeps[recipe] = {"final_train_loss": np.asarray(res.final_train_loss, np.float64),
                          "test_accuracy": np.asarray(res.test_accuracy, np.float64)}
        for k, f in files.items():
            save_npy(f, sweeps[recipe][k])
    results = summarise_sweeps(variants, points, sweeps, cfg)
    write_results(out, results, log)
    return results


def summarise_sweeps(variants: list[Variant], points: Sequence[int], sweeps: dict,
                     cfg: ProbeConfig) -> dict:
    from jaxprobe.probes import summarise

    rows = []
    for recipe, arrays in sweeps.items():
        for vi, v in enumerate(variants):
            for li, h in enumerate(points):
                row = {"variant": v.name, "recipe": recipe, "layer": int(h),
                       "reference_layer": int(h) - 1 if h > 0 else None}
                for metric, values in arrays.items():
                    per_seed = np.asarray(values[vi, li], np.float64)
                    mean, std, lo, hi = (float(x) for x in summarise(per_seed))
                    row[metric] = {"seeds": per_seed.tolist(), "mean": mean, "std": std,
                                   "ci95": [lo, hi]}
                rows.append(row)
    best = []
    for recipe in sweeps:
        for v in variants:
            mine = [r for r in rows if r["recipe"] == recipe and r["variant"] == v.name]
            top = max(mine, key=lambda r: r["test_accuracy"]["mean"])
            best.append({"variant": v.name, "recipe": recipe, "layer": top["layer"],
                         "test_accuracy": top["test_accuracy"]})
    first = variants[0].train[0]
    return {
        "layer_convention": LAYER_CONVENTION,
        "interval": "95% interval of the mean over seeds (probe initialisation and batch order only; "
                    "the test sample's own sampling error is not included)",
        "model": first.manifest.get("model"), "seeds": list(range(cfg.seeds)),
        "recipes": list(sweeps), "hook_points": [int(h) for h in points],
        "n_classes": variants[0].n_classes,
        "variants": {v.name: {"train": [str(s.path) for s in v.train],
                              "test": [str(s.path) for s in v.test],
                              "n_train": int(len(v.train[0].labels)),
                              "n_test": int(len(v.test[0].labels)),
                              "template": v.train[0].manifest.get("template")}
                     for v in variants},
        "results": rows, "best": best,
    }
