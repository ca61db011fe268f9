"""Active testing for real: `jaxprobe propose` writes a labelling queue for an unlabelled pool, and
`jaxprobe estimate` turns the labels given so far into the LURE estimate of the target's loss and
accuracy with a confidence interval.

propose: one run of the acquire sampler (the same clipped proposal, spec section 1.2, and the same
sampler, `sampler.py`), seeded: step m draws with U(0, 1) number u_m = uniform(fold_in(key, m)),
key = fold_in(key(seed), crc32("propose/" + acquisition)), so the first B items never depend on how
many are asked for, and a queue extended later (a larger --size, same --out) keeps its first items.

Queue folder (`--out DIR`):
    queue.json    settings, the pool (N, K, label words, fingerprints of the target's and
                  surrogate's predictions), the surrogate's variance terms for the `hybrid`
                  interval, and a sha256 digest of the queue rows
    queue.jsonl   one object per item, in order: order, id, text, q (its probability under the
                  proposal over the items left then), score (its acquisition score), n_left, and
                  target_log_probs (the target's K log-probabilities): all the estimator needs
    queue.csv     the same rows as a table (log-probabilities in columns logp_0..logp_{K-1})

estimate: labels (CSV with columns id,label or JSONL {"id": ..., "label": ...}; a label is a class
id 0..K-1 or a label word; an empty label means not labelled yet) are used in queue order up to the
first item without one. Nothing is written unless --out is given.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

from jaxprobe.active import interval as iv
from jaxprobe.active.estimators import (
    EPS,
    REFERENCE_CLIP,
    acquisition_scores,
    proposal_pmf,
)
from jaxprobe.active.predictions import Pool, aligned, load_pool
from jaxprobe.errors import UserError
from jaxprobe.files import claim_folder, load_json_object, save_json, save_text

QUEUE_FORMAT = "jaxprobe.queue/1"
ESTIMATE_FORMAT = "jaxprobe.estimate/1"
PROPOSE_ACQUISITIONS = ("cross-entropy", "entropy", "self-entropy", "iid")  # need no labels
_NEEDS_SURROGATE = ("cross-entropy", "entropy")


@dataclasses.dataclass(frozen=True)
class ProposeConfig:
    """`jaxprobe propose`; flags of the same names (see `--help`)."""

    target: str = ""
    out: str = ""
    surrogate: str | None = None
    acquisition: str = "cross-entropy"
    size: int = 100
    seed: int = 0
    clip: float | None = None  # None: the reference's clip for the acquisition (0.1 for the surrogate ones)
    temperature: float | None = None

    @property
    def resolved_clip(self) -> float:
        return REFERENCE_CLIP[self.acquisition] if self.clip is None else float(self.clip)


@dataclasses.dataclass(frozen=True)
class EstimateConfig:
    """`jaxprobe estimate`; flags of the same names (see `--help`)."""

    queue: str = ""
    labels: str = ""
    target: str | None = None  # check the queue belongs to this pool
    level: float = 0.95
    half_width: float = 0.02
    interval: str = "auto"  # auto: hybrid when the queue has the surrogate's terms, else martingale
    out: str | None = None


# ---------------------------------------------------------------- propose

def draw_queue(scores: np.ndarray, size: int, clip: float, seed: int, acquisition: str):
    """(pool rows [size], q [size]) of one seeded run of the acquire sampler (module docstring)."""
    import jax
    import jax.numpy as jnp

    from jaxprobe.active.sampler import PreparedPool, stream_key, sweep_with_uniforms

    key = stream_key(seed, "propose/" + acquisition)
    with jax.enable_x64(True):
        u = jax.vmap(lambda m: jax.random.uniform(jax.random.fold_in(key, m), (), jnp.float64))(
            jnp.arange(size, dtype=jnp.int64))
        u = np.asarray(u)[None]
    _, rows, q = sweep_with_uniforms(PreparedPool(scores, np.zeros(len(scores))), u, clip=clip)
    return rows[0], q[0]


def _check_propose(config: ProposeConfig, target: Pool, surrogate: Pool | None) -> None:
    if config.acquisition not in PROPOSE_ACQUISITIONS:
        raise UserError(f"--acquisition {config.acquisition!r}: propose works without labels; choose from "
                        f"{', '.join(PROPOSE_ACQUISITIONS)}")
    if config.acquisition in _NEEDS_SURROGATE and surrogate is None:
        raise UserError(f"--acquisition {config.acquisition} needs --surrogate (an evaluate folder or a "
                        "predictions file on the same pool)")
    if not 1 <= config.size <= len(target.ids):
        raise UserError(f"--size must be in 1..{len(target.ids)} (the pool), not {config.size}")
    if not 0 <= config.resolved_clip < 1:
        raise UserError(f"--clip must be in [0, 1), not {config.clip}")
    if config.acquisition != "iid" and config.resolved_clip == 0:
        raise UserError("--clip 0 gives items a zero probability; LURE needs every item a chance (use > 0)")
    if config.temperature is not None and not (config.temperature > 0 and math.isfinite(config.temperature)):
        raise UserError(f"--temperature must be a positive number, not {config.temperature}")


def _texts(pool: Pool, rows: np.ndarray) -> list[str | None]:
    if pool.texts is not None:
        return [pool.texts[i] for i in rows]
    return [None] * len(rows)


def _evaluation_texts(source: str, rows: np.ndarray) -> list[str] | None:
    """The texts of an evaluate folder's pool rows, read from its dataset (None for a file)."""
    meta_path = Path(source) / "meta.json"
    if not meta_path.is_file():
        return None
    from jaxprobe.data import load_split

    meta = load_json_object(meta_path)
    settings = meta.get("settings") or {}
    ds = load_split(meta["dataset"], meta["split"], text_column=settings.get("text_column", "text"),
                    label_column=None)
    return list(ds.select(np.asarray(rows, np.int64))["text"])


def queue_rows(target: Pool, rows: np.ndarray, q: np.ndarray, scores: np.ndarray, texts) -> list[dict]:
    n = len(target.ids)
    return [{"order": m + 1, "id": target.ids[r], "text": texts[m], "q": float(q[m]), "score": float(scores[r]),
             "n_left": n - m, "target_log_probs": [float(x) for x in target.log_probs[r]]}
            for m, r in enumerate(rows)]


def rows_digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update((json.dumps(row, sort_keys=True) + "\n").encode())
    return h.hexdigest()


def _csv_text(rows: list[dict], k: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["order", "id", "text", "q", "score", "n_left", *(f"logp_{c}" for c in range(k))])
    for r in rows:
        writer.writerow([r["order"], r["id"], "" if r["text"] is None else r["text"], repr(r["q"]), repr(r["score"]),
                         r["n_left"], *(repr(x) for x in r["target_log_probs"])])
    return buf.getvalue()


def propose(config: ProposeConfig, *, log=print) -> dict:
    """Write (or extend) the labelling queue of `config.out`; returns queue.json's content."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    target = load_pool(config.target, flag="--target")
    surrogate = None
    if config.surrogate == "probe":  # a probe on the target's activations (evaluate --activations N)
        from jaxprobe.active.inputs import load_evaluation
        from jaxprobe.active.probe_surrogate import probe_surrogate

        probe = probe_surrogate(load_evaluation(config.target, "pool", need_labels=False))[0]
        surrogate = dataclasses.replace(target, source="probe", logits=np.asarray(probe.logits, np.float64))
    elif config.surrogate is not None:
        surrogate = aligned(target, load_pool(config.surrogate, flag="--surrogate"))
    _check_propose(config, target, surrogate)
    labels = np.zeros(len(target.ids), np.int64)  # no acquisition here reads them
    scores = acquisition_scores(config.acquisition, target.logits,
                                None if surrogate is None else surrogate.logits, labels,
                                temperature=config.temperature, eps=EPS)
    settings = {"acquisition": config.acquisition, "seed": config.seed, "clip": config.resolved_clip,
                "temperature": config.temperature, "pool": target.fingerprint(),
                "surrogate": None if surrogate is None else surrogate.fingerprint()}
    stored = claim_folder(out, "queue.json", settings, what="a labelling queue", format=QUEUE_FORMAT)
    have = int(stored["size"]) if stored else 0
    if config.size < have:
        raise UserError(f"--out {out} already holds a queue of {have} items; --size {config.size} would drop "
                        f"some (a queue only grows; nothing was changed)")
    rows, q = draw_queue(scores, config.size, config.resolved_clip, config.seed, config.acquisition)
    old = read_queue(out)[1] if stored else []
    texts = _texts(target, rows)
    if target.texts is None and target.row_indices is not None:
        texts = _evaluation_texts(config.target, target.row_indices[rows]) or texts
    new_rows = queue_rows(target, rows, q, scores, texts)
    if [r["id"] for r in new_rows[:have]] != [r["id"] for r in old] or any(
            a["q"] != b["q"] for a, b in zip(new_rows, old)):
        raise UserError(f"--out {out}: redrawing gave other first items than the stored queue (another JAX "
                        "version or machine?); nothing was changed")
    first_q = proposal_pmf(scores, config.resolved_clip)
    sigma2 = iv.pool_sigma2(target.log_probs, None if surrogate is None else surrogate.log_probs, first_q)
    meta = {"format": QUEUE_FORMAT, "settings": settings, "size": config.size, "pool_size": len(target.ids),
            "n_classes": target.n_classes, "label_words": target.label_words, "target": str(config.target),
            "surrogate": config.surrogate, "hybrid_sigma2": sigma2, "digest": rows_digest(new_rows)}
    save_json(out / "queue.json", meta)
    save_text(out / "queue.jsonl", "".join(json.dumps(r) + "\n" for r in new_rows))
    save_text(out / "queue.csv", _csv_text(new_rows, target.n_classes))
    added = config.size - have
    log(f"{out}: queue of {config.size} items from a pool of {len(target.ids)}"
        + (f" ({added} added after the first {have})" if have else "")
        + f"; label them in order and run jaxprobe estimate --queue {out} --labels FILE")
    return meta


# ---------------------------------------------------------------- estimate

def read_queue(folder: str | Path) -> tuple[dict, list[dict]]:
    """queue.json and the rows of queue.jsonl, checked against its digest and against queue.csv."""
    folder = Path(folder)
    meta_path, jsonl, table = folder / "queue.json", folder / "queue.jsonl", folder / "queue.csv"
    if not meta_path.is_file():
        raise UserError(f"--queue {folder}: no queue.json; not a folder written by jaxprobe propose")
    meta = load_json_object(meta_path)
    if meta.get("format") != QUEUE_FORMAT:
        raise UserError(f"--queue {meta_path}: format {meta.get('format')!r}, expected {QUEUE_FORMAT!r}")
    for path in (jsonl, table):
        if not path.is_file():
            raise UserError(f"--queue {folder}: {path.name} is missing; rerun the same jaxprobe propose")
    try:
        rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--queue {jsonl}: not JSON lines ({e})") from None
    if rows_digest(rows) != meta.get("digest") or len(rows) != meta.get("size"):
        raise UserError(f"--queue {jsonl}: edited since jaxprobe propose wrote it (its rows do not match the "
                        "digest in queue.json); rerun propose to restore it, and give labels in a separate file")
    if table.read_text(encoding="utf-8") != _csv_text(rows, int(meta["n_classes"])):
        raise UserError(f"--queue {table}: edited since jaxprobe propose wrote it; rerun propose to restore "
                        "it, and give labels in a separate file")
    return meta, rows


def _parse_label(value, words: list[str] | None, k: int, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        value = value.strip()
        if words and value in words:
            return words.index(value)
    try:
        label = int(value)
        if isinstance(value, float) and label != value or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        hint = f" or one of {words}" if words else ""
        raise UserError(f"{where}: label {value!r} is not a class id 0..{k - 1}{hint}") from None
    if not 0 <= label < k:
        raise UserError(f"{where}: label {label} is outside 0..{k - 1} (K={k})")
    return label


def read_labels(path: str | Path, meta: dict, queue_ids: list[str]) -> dict[str, int]:
    """{item id: class} from a CSV (id,label columns) or JSONL labels file, every entry checked."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels {path}: no such file")
    k, words = int(meta["n_classes"]), meta.get("label_words")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--labels {path}: not UTF-8 text") from None
    if path.suffix.lower() == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"--labels {path} line {n}: not JSON ({e})") from None
            if not isinstance(obj, dict) or "id" not in obj or "label" not in obj:
                raise UserError(f"--labels {path} line {n}: expected an object with id and label")
            entries.append((f"--labels {path} line {n}", obj["id"], obj["label"]))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "id" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise UserError(f"--labels {path}: needs columns id and label, has {reader.fieldnames}")
        entries = [(f"--labels {path} line {n}", row["id"], row["label"]) for n, row in enumerate(reader, 2)]
    else:
        raise UserError(f"--labels {path}: give a .csv (columns id,label) or a .jsonl file")
    known = set(queue_ids)
    labels: dict[str, int] = {}
    for where, item, value in entries:
        item = str(item).strip()
        if item not in known:
            raise UserError(f"{where}: item {item!r} is not in the queue (labels for another queue or pool?)")
        label = _parse_label(value, words, k, where)
        if label is None:
            continue
        if item in labels and labels[item] != label:
            raise UserError(f"{where}: item {item!r} is labelled twice, {labels[item]} and {label}")
        labels[item] = label
    return labels


def estimate_from_labels(rows: list[dict], labels: dict[str, int], pool_size: int, *, sigma2: dict,
                         level: float = 0.95, method: str = "auto", half_width: float = 0.02) -> dict:
    """The estimate, interval and labels needed of every metric, from the queue's first items that
    are labelled (in order, up to the first one that is not)."""
    used = 0
    while used < len(rows) and rows[used]["id"] in labels:
        used += 1
    if used == 0:
        raise UserError(f"no label yet for the queue's first item (order 1, id {rows[0]['id']}); label the "
                        "queue in order")
    y = np.array([labels[r["id"]] for r in rows[:used]], np.int64)
    log_probs = np.array([r["target_log_probs"] for r in rows[:used]], np.float64)
    q = np.array([r["q"] for r in rows[:used]], np.float64)
    values = iv.per_example_metrics(log_probs, y)
    out = {"labels_used": used, "queue_size": len(rows), "pool_size": pool_size, "level": level,
           "half_width_asked": half_width, "next_to_label": None if used == len(rows) else rows[used]["id"],
           "metrics": {}}
    for metric in iv.METRICS:
        chosen = method if method != "auto" else ("hybrid" if sigma2.get(metric) is not None else "martingale")
        ci = iv.interval(values[metric], q, pool_size, metric=metric, level=level, method=chosen,
                         sigma2=sigma2.get(metric))
        need = iv.labels_for_half_width(ci.variance, used, pool_size, half_width, level=level)
        out["metrics"][metric] = {**ci.to_dict(), "labels_needed": need, "more_labels_needed": need - used}
    return out


def estimate(config: EstimateConfig, *, log=print) -> dict:
    if config.interval not in ("auto", *iv.INTERVAL_METHODS):
        raise UserError(f"--interval {config.interval!r}: choose from auto, {', '.join(iv.INTERVAL_METHODS)}")
    if not 0 < config.level < 1:
        raise UserError(f"--level must be in (0, 1), not {config.level}")
    if not config.half_width > 0:
        raise UserError(f"--half-width must be positive, not {config.half_width}")
    if config.out is not None and Path(config.out).is_dir():
        raise UserError(f"--out {config.out} is a folder; give a file name for the JSON result")
    meta, rows = read_queue(config.queue)
    if config.target is not None:
        pool = load_pool(config.target, flag="--target")
        if pool.fingerprint() != meta["settings"]["pool"]:
            raise UserError(f"--queue {config.queue} was proposed on another pool than --target {config.target} "
                            "(the predictions differ)")
    labels = read_labels(config.labels, meta, [r["id"] for r in rows])
    sigma2 = meta.get("hybrid_sigma2") or {}
    if config.interval == "hybrid" and not any(v is not None for v in sigma2.values()):
        raise UserError("--interval hybrid needs a queue proposed with --surrogate; use martingale")
    result = {"format": ESTIMATE_FORMAT, "queue": str(config.queue), "labels_file": str(config.labels),
              **estimate_from_labels(rows, labels, int(meta["pool_size"]), sigma2=sigma2, level=config.level,
                                     method=config.interval, half_width=config.half_width)}
    _log_estimate(result, log)
    if config.out is not None:
        save_json(config.out, result)
    return result


def _log_estimate(result: dict, log) -> None:
    used, size = result["labels_used"], result["queue_size"]
    log(f"{used} of {size} queue items labelled (pool {result['pool_size']})"
        + (f"; next to label: id {result['next_to_label']}" if result["next_to_label"] is not None else ""))
    pct = f"{result['level']:.0%}"
    for metric, m in result["metrics"].items():
        low, high = (m["low"], m["high"]) if m["half_width"] is not None else (-math.inf, math.inf)
        log(f"  {metric:9s} {m['estimate']:.4f}  {pct} CI [{low:.4f}, {high:.4f}] ({m['method']}); "
            f"+-{result['half_width_asked']} needs about {m['labels_needed']} labels "
            f"({m['more_labels_needed']} more)")
