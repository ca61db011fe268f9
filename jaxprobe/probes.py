"""Probe trainers: every layer x variant x seed of a probing sweep in one jitted program.

API (what `jaxprobe.probing` calls):

    from jaxprobe.probes import RECIPES, ProbeSweepResult, train_probe_sweep, summarise
    res = train_probe_sweep(
        train=[(x_train, y_train), ...],   # one pair per variant (prompt template):
                                           #   x float32 [n, n_hook_points, d] (np.memmap is fine),
                                           #   y int [n] in 0..n_classes-1
        test=[(x_test, y_test), ...],      # same variants, hook points and d; n may differ
        recipe="vector-mlp",               # or "logreg"
        n_classes=2,                       # K: vector-mlp has K outputs, logreg is multinomial if K > 2
        seeds=range(10), layers=None,      # layers: None = every hook point, else indices
        checkpoint_dir=None,               # a folder: a killed sweep resumes from it
        progress=True, variant_names=("raw", "vector-5shot"))
    res.final_train_loss, res.test_accuracy   # np [n_variants, n_layers_used, n_seeds]
    mean, std, low, high = summarise(res.test_accuracy)

Recipes:
- `vector-mlp`, faithful to the reference notebook (specs/probing.md section 2): Linear(d, 128, no
  bias) -> ReLU -> Linear(128, 2, bias); PyTorch's default init (weights and bias
  U(+-1/sqrt(fan_in)), i.e. kaiming-uniform with a=sqrt(5)); AdamW (lr 1e-4, weight decay 1e-3,
  betas (0.9, 0.999), eps 1e-8; optax.adamw has PyTorch's semantics: eps outside the square root
  of the bias-corrected second moment, decay `lr * wd * p` on the pre-step weights, biases
  included); mean cross-entropy over batches of 128 rows, reshuffled every epoch, the last batch
  smaller (PyTorch `DataLoader(shuffle=True)`); 25 epochs; no input normalisation.
  With K > 2 classes the last layer has K outputs (Linear(128, K)); K = 2 is the reference.
  `final_train_loss` is the loss of the last epoch's last batch, computed before its update;
  `test_accuracy` is the accuracy after the last epoch. (The reference also scores the test set
  after every earlier epoch and throws those numbers away; skipping them changes nothing.)
- `logreg`: L2-regularised logistic regression on features standardised with the train rows'
  mean and standard deviation, minimised by optax L-BFGS until the gradient norm is below `tol`.
  The objective is sklearn's `LogisticRegression(C)` divided by n: mean log-loss +
  ||w||^2 / (2 C n), bias not penalised. It is convex with a unique optimum and has no
  randomness, so every seed gives the same numbers (the seed axis is kept so both recipes have
  the same result shape); `final_train_loss` is the mean train log-loss at the optimum. With K > 2
  classes it is multinomial (softmax) logistic regression, W [d, K], the same penalty on W: sklearn's
  multinomial `LogisticRegression(C)` divided by n.

Randomness: seed s uses `jax.random.key(s)` for every layer and variant, so one seed means the
same initial weights and the same batch order everywhere: layers and templates are compared on
paired runs. A row's place in an epoch's shuffle is drawn from (seed, epoch, row index) alone, so
padding a variant's rows to a longer variant's length cannot change its batches: each probe in a
sweep trains exactly as it would alone (`epoch_batches` returns that order).

How it runs fast: the seeds of one (variant, layer) pair share their input rows, so the seed axis
is `vmap`ped over the probes' split NNX state (`nnx.split`) and folds into the matmul: the first
layer of all seeds is one [seeds * 128, d] x [d, n] product. Pairs are visited by a `fori_loop`
inside the same jitted program that updates the stacked state in place (`groups_per_step` pairs
vmapped together per step; 1 is fastest on CPU, because a plain matmul beats a batched one and
one pair's optimizer state stays in cache while it trains for a block of epochs).
`scripts/bench_probe.py` measures it against the reference's PyTorch loop. Memory: parameters
and two Adam moments, 3 * 4 * (128 d + 258) bytes per probe (0.55 GB for SmolLM2's 620 probes).

Resuming: with `checkpoint_dir`, the probes' parameters, optimizer state, PRNG keys, loss curve
and the number of finished epochs are saved with Orbax at the end of a block of
`epochs_per_block` epochs once `checkpoint_interval_s` seconds have passed since the last save
(a sweep of a few seconds never writes its hundreds of MB of optimizer state). Training always
runs in those blocks, with or without a checkpoint folder, so a resumed sweep ends bit-identical
to an uninterrupted one. A folder holding another sweep (other data,
seeds, layers or settings) is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxprobe.errors import UserError

RECIPES = ("vector-mlp", "logreg")

_ROW_CHUNK = 4096  # rows per finiteness check, so a big memmap is never copied whole as booleans


# ------------------------------------------------------------------------------------------------
# Configuration and result
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VectorMLPConfig:
    """The reference notebook's MLP probe and its training settings."""

    hidden: int = 128            # width of the ReLU layer
    learning_rate: float = 1e-4  # AdamW
    weight_decay: float = 1e-3   # AdamW, decoupled (PyTorch semantics)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 128        # rows per step; the last batch of an epoch may be smaller
    epochs: int = 25


@dataclass(frozen=True)
class LogRegConfig:
    """L2-regularised logistic regression; `C` is sklearn's inverse regularisation strength."""

    C: float = 1.0
    max_iter: int = 1000  # L-BFGS iterations at most
    tol: float = 1e-5     # stop when the objective's gradient norm is below this


@dataclass(frozen=True)
class ProbeSweepResult:
    """Per-probe numbers of a sweep; arrays are indexed [variant, layer (position in `layers`), seed]."""

    recipe: str
    layers: tuple[int, ...]          # hook-point indices, in result order
    seeds: tuple[int, ...]
    variant_names: tuple[str, ...]
    final_train_loss: np.ndarray     # float [V, L, S]
    test_accuracy: np.ndarray        # float [V, L, S]
    n_train: tuple[int, ...]         # rows per variant
    n_test: tuple[int, ...]
    config: dict                     # the recipe's settings
    train_loss_by_epoch: np.ndarray | None = None  # vector-mlp: last batch's loss per epoch [V, L, S, E]


def _recipe_config(recipe: str, config: Any) -> VectorMLPConfig | LogRegConfig:
    expected = {"vector-mlp": VectorMLPConfig, "logreg": LogRegConfig}
    if recipe not in expected:
        raise UserError(f"unknown probe recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if config is None:
        return expected[recipe]()
    if not isinstance(config, expected[recipe]):
        raise TypeError(f"recipe {recipe!r} takes a {expected[recipe].__name__}, "
                        f"not {type(config).__name__}")
    positive = {"hidden", "learning_rate", "batch_size", "epochs", "eps", "C", "max_iter", "tol"}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in positive and not value > 0:
            raise UserError(f"{recipe} setting {field.name}={value} must be positive")
        if field.name in ("weight_decay", "beta1", "beta2") and not 0 <= value < (
                math.inf if field.name == "weight_decay" else 1):
            raise UserError(f"{recipe} setting {field.name}={value} is out of range")
    return config


# ------------------------------------------------------------------------------------------------
# Statistics over seeds
# ------------------------------------------------------------------------------------------------

def summarise(values: np.ndarray, confidence: float = 0.95
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, sample std (ddof=1) and a `confidence` t-interval for the mean over the last axis.

    The interval is mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n) (Student's t, n = number of
    seeds): it says where the mean over infinitely many seeds lies, not where one run lands.
    With a single seed std and the interval are NaN. Returns (mean, std, low, high), each with
    the shape of `values` without its last axis.
    """
    from scipy.special import (
        stdtrit,  # Student's t quantile (scipy: a dependency of jax itself)
    )

    values = np.asarray(values, dtype=np.float64)
    n = values.shape[-1]
    mean = values.mean(axis=-1)
    if n < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan.copy(), nan.copy()
    std = values.std(axis=-1, ddof=1)
    half = stdtrit(n - 1, 0.5 + confidence / 2) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


# ------------------------------------------------------------------------------------------------
# Input checks and packing
# ------------------------------------------------------------------------------------------------

def _check_split(x: Any, y: Any, where: str, n_hook_points: int | None, d: int | None, n_classes: int = 2):
    """Validate one (x, y) pair; return (x, labels int32) without copying a memmap."""
    if not hasattr(x, "shape") or len(x.shape) != 3:
        shape = getattr(x, "shape", None)
        raise UserError(f"{where}: activations must be [rows, hook points, d], got shape {shape}")
    n, n_layers, width = x.shape
    if n_hook_points is not None and n_layers != n_hook_points:
        raise UserError(f"{where}: {n_layers} hook points, but the first train variant has "
                        f"{n_hook_points}; all activations must come from the same model")
    if d is not None and width != d:
        raise UserError(f"{where}: activation width {width}, but the first train variant has {d}; "
                        f"all activations must come from the same model")
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise UserError(f"{where}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
                        f"for {n} activation rows")
    if n == 0:
        raise UserError(f"{where}: no rows")
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            raise UserError(f"{where}: row {bad[0]}: label {labels[bad[0]].item()!r} is not an integer")
    elif labels.dtype.kind not in "iub":
        raise UserError(f"{where}: labels must be integers 0..{n_classes - 1}, got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        allowed = "0 or 1 (probes are binary unless n_classes is given)" if n_classes == 2 else \
            f"a class id 0..{n_classes - 1} (n_classes={n_classes})"
        raise UserError(f"{where}: row {bad[0]}: label {labels[bad[0]].item()!r} is not {allowed}")
    present = set(np.unique(labels).astype(int).tolist())
    if len(present) == 1:
        raise UserError(f"{where}: every label is {present.pop()}; probes need both classes 0 and 1 "
                        f"in train and test" if n_classes == 2 else
                        f"{where}: every label is {present.pop()}; probes need at least two classes")
    if where.startswith("train") and present != set(range(n_classes)):
        missing = sorted(set(range(n_classes)) - present)
        raise UserError(f"{where}: no row of class {missing[0]} (n_classes={n_classes}); every class "
                        "needs training rows")
    return x, labels.astype(np.int32)


def _check_finite(x: np.ndarray, layers: Sequence[int], where: str) -> None:
    for start in range(0, x.shape[0], _ROW_CHUNK):
        block = np.asarray(x[start:start + _ROW_CHUNK][:, list(layers)])
        bad = ~np.isfinite(block).all(axis=2)
        if bad.any():
            row, pos = np.argwhere(bad)[0]
            value = block[row, pos][~np.isfinite(block[row, pos])][0]
            raise UserError(f"{where}: row {start + row}, hook point {layers[pos]}: activation is "
                            f"{value} (NaN/inf); re-extract these activations")


def _resolve_layers(layers: Sequence[int] | None, n_hook_points: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_hook_points))
    chosen = tuple(int(layer) for layer in layers)
    if not chosen:
        raise UserError("no layers chosen; pass hook-point indices or leave layers unset for all")
    for layer in chosen:
        if not 0 <= layer < n_hook_points:
            raise UserError(f"layer {layer} does not exist: the activations have {n_hook_points} "
                            f"hook points, 0-{n_hook_points - 1}")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"layers {list(chosen)} repeat an index")
    return chosen


def _resolve_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    chosen = tuple(int(s) for s in seeds)
    if not chosen:
        raise UserError("no seeds chosen; at least one is needed")
    if len(set(chosen)) != len(chosen):
        raise UserError(f"seeds {list(chosen)} repeat a value")
    if any(not 0 <= s < 2**31 for s in chosen):
        raise UserError(f"seeds must lie in [0, 2^31), got {list(chosen)}")
    return chosen


@dataclass(frozen=True)
class _Packed:
    """Every variant's rows of the chosen layers, padded to one length, as [group, row, d] with
    group = variant * n_layers + layer position."""

    x: np.ndarray          # float32 [G, n_max, d]
    y: np.ndarray          # int32 [G, n_max]
    n_rows: np.ndarray     # int32 [G]: real rows of the group's variant (the rest is padding)
    rows_per_variant: tuple[int, ...]
    digest: str            # hash of the data, so a checkpoint is only resumed on the same data


def _pack(pairs: Sequence[tuple[np.ndarray, np.ndarray]], layers: tuple[int, ...]) -> _Packed:
    n_max = max(x.shape[0] for x, _ in pairs)
    d = pairs[0][0].shape[2]
    n_groups = len(pairs) * len(layers)
    x_all = np.zeros((n_groups, n_max, d), np.float32)
    y_all = np.zeros((n_groups, n_max), np.int32)
    n_rows = np.zeros(n_groups, np.int32)
    digest = hashlib.blake2b(digest_size=16)
    for v, (x, y) in enumerate(pairs):
        for start in range(0, x.shape[0], _ROW_CHUNK):
            block = np.asarray(x[start:start + _ROW_CHUNK][:, list(layers)], dtype=np.float32)
            stop = start + block.shape[0]
            # [rows, layers, d] -> groups [layers, rows, d] of this variant
            x_all[v * len(layers):(v + 1) * len(layers), start:stop] = block.transpose(1, 0, 2)
            digest.update(np.ascontiguousarray(block).tobytes())
        y_all[v * len(layers):(v + 1) * len(layers), :x.shape[0]] = y
        n_rows[v * len(layers):(v + 1) * len(layers)] = x.shape[0]
        digest.update(y.tobytes())
        digest.update(repr(x.shape).encode())
    return _Packed(x_all, y_all, n_rows, tuple(x.shape[0] for x, _ in pairs), digest.hexdigest())


# ------------------------------------------------------------------------------------------------
# vector-mlp: the probe, its init and its batches
# ------------------------------------------------------------------------------------------------

def _torch_default_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    # torch.nn.Linear: kaiming_uniform(a=sqrt(5)) for weights and U(+-1/sqrt(fan_in)) for the bias
    # both reduce to this bound.
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, minval=-bound, maxval=bound)


class VectorMLP(nnx.Module):
    """Linear(d, hidden, no bias) -> ReLU -> Linear(hidden, 2): the reference's "simple DNN".

    Weights are stored [out, in] like torch.nn.Linear: with the seed axis in front, the first
    layer of all seeds is one contiguous [seeds * hidden, d] matrix, so both its forward and its
    gradient are single plain matmuls. The hidden activations are kept [hidden, rows] for the
    same reason (the gradient is then [seeds * hidden, rows] x [rows, d], no transposes).
    """

    def __init__(self, d_in: int, hidden: int = 128, n_classes: int = 2, *, rngs: nnx.Rngs):
        self.hidden_weight = nnx.Param(_torch_default_uniform(rngs.params(), (hidden, d_in), d_in))
        self.out_weight = nnx.Param(_torch_default_uniform(rngs.params(), (n_classes, hidden), hidden))
        self.out_bias = nnx.Param(_torch_default_uniform(rngs.params(), (n_classes,), hidden))

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.relu(jnp.einsum("hd,nd->hn", self.hidden_weight[...], x))
        return jnp.einsum("kh,hn->nk", self.out_weight[...], hidden) + self.out_bias[...]


def _seed_keys(seed: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """(init key, shuffle key) of one seed."""
    key = jax.random.key(seed)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def _init_params(init_key: jax.Array, d_in: int, hidden: int, n_classes: int = 2) -> nnx.State:
    return nnx.state(VectorMLP(d_in, hidden, n_classes, rngs=nnx.Rngs(params=init_key)))


def _graphdef(d_in: int, hidden: int, n_classes: int = 2) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: VectorMLP(d_in, hidden, n_classes, rngs=nnx.Rngs(0))))


def _epoch_order(shuffle_key: jax.Array, epoch: jax.Array, n_rows: jax.Array, n_max: int) -> jax.Array:
    """Row indices of one epoch's shuffle: a permutation of 0..n_rows-1, then the padding rows.

    Each row's sort key comes from (seed, epoch, row index) alone, so the order of the real rows
    does not depend on how much padding follows them.
    """
    epoch_key = jax.random.fold_in(shuffle_key, epoch)
    rows = jnp.arange(n_max)
    draws = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(epoch_key, i), dtype=jnp.uint32))(rows)
    draws = jnp.where(rows < n_rows, draws, jnp.uint32(np.iinfo(np.uint32).max))
    return jnp.argsort(draws, stable=True)


def initial_params(seed: int, d_in: int, config: VectorMLPConfig = VectorMLPConfig(),
                   n_classes: int = 2) -> dict[str, np.ndarray]:
    """The initial weights seed `seed` gives a vector-mlp probe, torch layout ([out, in])."""
    params = _init_params(_seed_keys(seed)[0], d_in, config.hidden, n_classes)
    return {name: np.asarray(value) for name, value in nnx.to_pure_dict(params).items()}


def epoch_batches(seed: int, epoch: int, n_rows: int, batch_size: int = 128) -> list[np.ndarray]:
    """The row indices of each batch of epoch `epoch` (0-based) that seed `seed` trains on.

    With a single batch per epoch (n_rows <= batch_size) the sweep skips the gather and feeds the
    rows in stored order; the batch holds the same rows, and the mean loss does not depend on
    their order.
    """
    order = np.asarray(_epoch_order(_seed_keys(seed)[1], jnp.asarray(epoch), jnp.asarray(n_rows), n_rows))
    return [order[start:start + batch_size] for start in range(0, n_rows, batch_size)]


# ------------------------------------------------------------------------------------------------
# vector-mlp: the jitted sweep
# ------------------------------------------------------------------------------------------------

class _ProgressRelay:
    """Where the jitted programs' progress ticks go. The programs are cached across sweeps, so
    their host callback cannot close over one sweep's tqdm bar; the sweep sets `bar` instead."""

    bar = None

    def tick(self, amount: int) -> None:
        if self.bar is not None:
            self.bar.update(amount)


_PROGRESS = _ProgressRelay()


def _optimizer(config: VectorMLPConfig) -> optax.GradientTransformation:
    return optax.adamw(config.learning_rate, b1=config.beta1, b2=config.beta2, eps=config.eps,
                       weight_decay=config.weight_decay)


@functools.cache
def _mlp_programs(config: VectorMLPConfig, d_in: int, n_max: int, groups_per_step: int, n_classes: int = 2):
    """Jitted (train_block, evaluate) for one recipe setting and data shape, built once."""
    graphdef = _graphdef(d_in, config.hidden, n_classes)
    epoch = _epoch_function(config, graphdef, n_max)
    # Seeds share the group's data (in_axes None), which is what folds them into one matmul.
    epoch_all_seeds = jax.vmap(epoch, in_axes=(0, 0, 0, None, None, None, None))

    def train_group(params, opt_state, x, y, n_rows, shuffle_keys, first_epoch, n_epochs):
        def one_epoch(carry, epoch_index):
            params, opt_state = carry
            params, opt_state, loss = epoch_all_seeds(params, opt_state, shuffle_keys, epoch_index,
                                                      x, y, n_rows)
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            one_epoch, (params, opt_state), first_epoch + jnp.arange(n_epochs))
        return params, opt_state, losses.T  # losses [seeds, epochs]

    return _train_block_program(train_group, groups_per_step), _evaluate_program(graphdef, groups_per_step)


def _epoch_function(config: VectorMLPConfig, graphdef: nnx.GraphDef, n_max: int) -> Callable:
    """One epoch of one probe: (params, opt_state, shuffle_key, epoch_index, x, y, n_rows) ->
    (params, opt_state, the last batch's pre-update loss)."""
    tx = _optimizer(config)
    batch = config.batch_size
    n_batches = -(-n_max // batch)

    def step(params, opt_state, x, y, row_weight):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(losses * row_weight) / jnp.maximum(jnp.sum(row_weight), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def epoch(params, opt_state, shuffle_key, epoch_index, x, y, n_rows):
        if n_batches == 1:
            # One batch holds every row; the mean over it does not depend on the shuffle, so
            # the rows stay in place (and the seeds share them: one matmul for all seeds).
            mask = (jnp.arange(n_max) < n_rows).astype(jnp.float32)
            return step(params, opt_state, x, y, mask)
        order = _epoch_order(shuffle_key, epoch_index, n_rows, n_max)
        positions = jnp.arange(n_batches * batch)
        valid = positions < n_rows
        rows = jnp.where(valid, jnp.pad(order, (0, n_batches * batch - n_max)), 0)

        def one_batch(carry, batch_rows_and_weight):
            params, opt_state, last_loss = carry
            rows_b, weight_b = batch_rows_and_weight
            new_params, new_opt, loss = step(params, opt_state, x[rows_b], y[rows_b], weight_b)
            # A shorter variant runs out of batches before the longest one: skip the update.
            has_rows = jnp.sum(weight_b) > 0
            keep = functools.partial(jnp.where, has_rows)
            return (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state),
                    keep(loss, last_loss)), None

        (params, opt_state, last_loss), _ = jax.lax.scan(
            one_batch, (params, opt_state, jnp.float32(jnp.nan)),
            (rows.reshape(n_batches, batch), valid.astype(jnp.float32).reshape(n_batches, batch)))
        return params, opt_state, last_loss

    return epoch


def _train_block_program(train_group: Callable, groups_per_step: int) -> Callable:
    """The jitted loop over groups; one step trains `groups_per_step` of them (vmapped when > 1)."""
    if groups_per_step == 1:
        def take(a, start):
            return jax.lax.dynamic_index_in_dim(a, start, keepdims=False)

        def put(a, b, start):
            return jax.lax.dynamic_update_index_in_dim(a, b, start, 0)

        train_chunk = train_group
    else:
        def take(a, start):
            return jax.lax.dynamic_slice_in_dim(a, start, groups_per_step)

        def put(a, b, start):
            return jax.lax.dynamic_update_slice_in_dim(a, b, start, 0)

        train_chunk = jax.vmap(train_group, in_axes=(0, 0, 0, 0, 0, None, None, None))

    @functools.partial(jax.jit, static_argnames=("n_epochs",), donate_argnums=(0, 1))
    def train_block(params, opt_state, shuffle_keys, first_epoch, x, y, n_rows, n_real_groups, *,
                    n_epochs):
        """Train every group for `n_epochs` epochs: (params, opt_state, losses [G, S, n_epochs]).

        The stacked state is the loop's carry, read and written one chunk of groups at a time,
        so XLA updates it in place (no second copy of hundreds of MB of optimizer state). G is a
        multiple of groups_per_step; groups from n_real_groups on are padding.
        """
        n_seeds = shuffle_keys.shape[0]

        def body(step, carry):
            params, opt_state, losses = carry
            start = step * groups_per_step
            new_params, new_opt, new_losses = train_chunk(
                jax.tree.map(lambda a: take(a, start), params),
                jax.tree.map(lambda a: take(a, start), opt_state),
                take(x, start), take(y, start), take(n_rows, start),
                shuffle_keys, first_epoch, n_epochs)
            real = jnp.clip(n_real_groups - start, 0, groups_per_step)
            jax.debug.callback(lambda k: _PROGRESS.tick(int(k) * n_seeds * n_epochs), real)
            return (jax.tree.map(lambda a, b: put(a, b, start), params, new_params),
                    jax.tree.map(lambda a, b: put(a, b, start), opt_state, new_opt),
                    put(losses, new_losses, start))

        losses = jnp.zeros((n_rows.shape[0], n_seeds, n_epochs), jnp.float32)
        return jax.lax.fori_loop(0, n_rows.shape[0] // groups_per_step, body,
                                 (params, opt_state, losses))

    return train_block


def _evaluate_program(graphdef: nnx.GraphDef, groups_per_step: int) -> Callable:
    def n_correct(params, x, y, n_rows):
        predicted = jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1)
        real = jnp.arange(x.shape[0]) < n_rows
        return jnp.sum((predicted == y) & real)

    @jax.jit
    def evaluate(params, x, y, n_rows):
        """Correctly classified test rows per probe [G, S] (a count, so it is exact)."""
        by_seed = jax.vmap(n_correct, in_axes=(0, None, None, None))
        return jax.lax.map(lambda args: by_seed(*args), (params, x, y, n_rows),
                           batch_size=None if groups_per_step == 1 else groups_per_step)

    return evaluate


def _sweep_meta(recipe, config, seeds, layers, names, train, test, epochs_per_block, groups_per_step,
                n_classes=2):
    # Everything that changes the numbers; a checkpoint made under other values is not resumed.
    return {"recipe": recipe, "config": dataclasses.asdict(config), "seeds": list(seeds),
            "layers": list(layers), "variants": list(names),
            "train_digest": train.digest, "test_digest": test.digest,
            "epochs_per_block": epochs_per_block, "groups_per_step": groups_per_step,
            **({"n_classes": n_classes} if n_classes != 2 else {})}  # binary checkpoints read as before


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 4))
def _initial_state(config: VectorMLPConfig, d_in: int, n_groups: int, seeds: jax.Array, n_classes: int = 2):
    """(shuffle keys, params, optimizer state) of every probe, in one compiled program
    (bit-identical to its ops run one by one, which would compile each)."""
    init_keys, shuffle_keys = jax.vmap(_seed_keys)(seeds)
    seed_params = jax.vmap(lambda k: _init_params(k, d_in, config.hidden, n_classes))(init_keys)
    # Every (variant, layer) group starts from the same per-seed weights (paired comparisons).
    params = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_groups, *a.shape)), seed_params)
    return shuffle_keys, params, jax.vmap(jax.vmap(_optimizer(config).init))(params)


def _restore_checkpoint(ckpt, meta: dict, like: dict) -> dict:
    """The latest checkpoint of this sweep, refused in one line if it was made by another."""
    step = ckpt.latest_step()
    saved_meta = ckpt.restore_meta(step)
    if saved_meta != meta:
        changed = sorted(k for k in meta if saved_meta.get(k) != meta[k])
        raise UserError(f"checkpoint folder {ckpt.directory} holds a different probe sweep "
                        f"(differs in: {', '.join(changed)}); use another folder or "
                        f"delete it to start over")
    return ckpt.restore(step, like)[0]


def _train_vector_mlp(config: VectorMLPConfig, train: _Packed, test: _Packed, seeds, layers,
                      names, checkpoint_dir, progress, epochs_per_block, groups_per_step,
                      checkpoint_interval_s: float, after_block: Callable[[int], None] | None,
                      n_classes: int = 2):
    from tqdm.auto import tqdm

    from jaxprobe.sweep_checkpoint import SweepCheckpoint

    n_groups, n_max, d_in = train.x.shape
    # Pad to whole chunks of groups with copies of group 0 (trained, then dropped).
    n_padded = -(-n_groups // groups_per_step) * groups_per_step
    x_train, y_train, n_train = (np.concatenate([a, np.repeat(a[:1], n_padded - n_groups, axis=0)])
                                 for a in (train.x, train.y, train.n_rows))
    n_seeds = len(seeds)
    train_block, evaluate = _mlp_programs(config, d_in, n_max, groups_per_step, n_classes)

    shuffle_keys, params, opt_state = _initial_state(config, d_in, n_padded, jnp.asarray(seeds, jnp.uint32),
                                                     n_classes)
    losses = np.full((n_padded, n_seeds, config.epochs), np.nan, np.float32)
    epochs_done = 0

    meta = _sweep_meta("vector-mlp", config, seeds, layers, names, train, test,
                       epochs_per_block, groups_per_step, n_classes)
    ckpt = SweepCheckpoint(checkpoint_dir) if checkpoint_dir is not None else None
    leaves, treedef = jax.tree.flatten((params, opt_state))

    def as_checkpoint(leaves, losses, epochs_done):
        return {"probe_state": {f"{i:03d}": leaf for i, leaf in enumerate(leaves)},
                "shuffle_keys": jax.random.key_data(shuffle_keys),
                "train_loss_by_epoch": losses, "epochs_done": np.asarray(epochs_done, np.int32)}

    try:
        if ckpt is not None and ckpt.latest_step() is not None:
            saved = _restore_checkpoint(ckpt, meta, as_checkpoint(leaves, losses, 0))
            leaves = [saved["probe_state"][f"{i:03d}"] for i in range(len(leaves))]
            losses = np.asarray(saved["train_loss_by_epoch"])
            epochs_done = int(saved["epochs_done"])
            params, opt_state = jax.tree.unflatten(treedef, leaves)

        x_train, y_train, n_train = map(jnp.asarray, (x_train, y_train, n_train))
        bar = tqdm(total=n_groups * n_seeds * config.epochs, initial=n_groups * n_seeds * epochs_done,
                   unit="probe-epoch", desc="vector-mlp probes", disable=not progress, leave=False)
        _PROGRESS.bar = bar
        last_save = time.monotonic()
        try:
            while epochs_done < config.epochs:
                # Blocks end at multiples of epochs_per_block, whatever epoch a run starts from,
                # so a resumed run runs the same programs as an uninterrupted one.
                n_epochs = min(epochs_per_block - epochs_done % epochs_per_block,
                               config.epochs - epochs_done)
                params, opt_state, block_losses = train_block(
                    params, opt_state, shuffle_keys, jnp.int32(epochs_done), x_train, y_train,
                    n_train, jnp.int32(n_groups), n_epochs=n_epochs)
                losses[:, :, epochs_done:epochs_done + n_epochs] = np.asarray(block_losses)
                epochs_done += n_epochs
                if ckpt is not None and time.monotonic() - last_save >= checkpoint_interval_s:
                    leaves = jax.tree.leaves((params, opt_state))
                    ckpt.save(epochs_done, as_checkpoint(leaves, losses, epochs_done), meta)
                    last_save = time.monotonic()
                if after_block is not None:
                    after_block(epochs_done)
        finally:
            _PROGRESS.bar = None
            bar.close()
        real_params = jax.tree.map(lambda a: a[:n_groups], params)
        correct = np.asarray(evaluate(real_params, jnp.asarray(test.x), jnp.asarray(test.y),
                                      jnp.asarray(test.n_rows)))
        accuracy = correct / test.n_rows[:, None]
    finally:
        if ckpt is not None:
            ckpt.close()
    losses = losses[:n_groups]
    return losses[:, :, -1], accuracy, losses


# ------------------------------------------------------------------------------------------------
# logreg
# ------------------------------------------------------------------------------------------------

def _standardiser(x: jax.Array, n_rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and std over a group's real rows (ddof=0); constant features get std 1."""
    real = (jnp.arange(x.shape[0]) < n_rows)[:, None]
    mean = jnp.sum(jnp.where(real, x, 0.0), axis=0) / n_rows
    var = jnp.sum(jnp.where(real, (x - mean) ** 2, 0.0), axis=0) / n_rows
    std = jnp.sqrt(var)
    return mean, jnp.where(std > 0, std, 1.0)


def _logistic_loss(weights, bias, z, y, real):
    margin = z @ weights + bias
    # log(1 + e^m) - y m, written to stay finite for large |m|
    per_row = jax.nn.softplus(margin) - y * margin
    return jnp.sum(jnp.where(real, per_row, 0.0)) / jnp.sum(real)


def _softmax_loss(weights, bias, z, y, real):
    per_row = optax.softmax_cross_entropy_with_integer_labels(z @ weights + bias, y)
    return jnp.sum(jnp.where(real, per_row, 0.0)) / jnp.sum(real)


@functools.cache
def _logreg_program(n_classes: int = 2):
    """Jitted fit of every (variant, layer) group; C, tol and max_iter are traced arguments, so
    one compiled program serves every setting. Two classes: binary logistic regression (w [d]);
    K > 2: softmax regression (W [d, K], b [K]) with the same penalty on the weights."""
    solver = optax.lbfgs()
    binary = n_classes == 2

    def fit_group(x_train, y_train, n_train, x_test, y_test, n_test, C, tol, max_iter):
        mean, std = _standardiser(x_train, n_train)
        z_train = (x_train - mean) / std
        real = jnp.arange(x_train.shape[0]) < n_train
        l2 = 1.0 / (C * n_train.astype(jnp.float32))
        y = y_train.astype(jnp.float32) if binary else y_train
        loss = _logistic_loss if binary else _softmax_loss

        def objective(params):
            w, b = params
            return loss(w, b, z_train, y, real) + 0.5 * l2 * jnp.sum(w * w)

        value_and_grad = optax.value_and_grad_from_state(objective)

        def not_done(carry):
            _, state, grad_norm = carry
            return (optax.tree.get(state, "count") < max_iter) & (grad_norm >= tol)

        def iterate(carry):
            params, state, _ = carry
            value, grad = value_and_grad(params, state=state)
            updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                           value_fn=objective)
            params = optax.apply_updates(params, updates)
            # The line search leaves the gradient at the new point in the state.
            return params, state, optax.tree.norm(optax.tree.get(state, "grad"))

        d = x_train.shape[1]
        params = (jnp.zeros(d), jnp.zeros(())) if binary else (jnp.zeros((d, n_classes)), jnp.zeros(n_classes))
        params, _, _ = jax.lax.while_loop(not_done, iterate, (params, solver.init(params), jnp.inf))
        w, b = params
        train_loss = loss(w, b, z_train, y, real)
        scores = ((x_test - mean) / std) @ w + b
        right = (scores > 0) == (y_test == 1) if binary else jnp.argmax(scores, axis=-1) == y_test
        test_real = jnp.arange(x_test.shape[0]) < n_test
        return train_loss, jnp.sum(right & test_real)

    @jax.jit
    def fit_all(x_train, y_train, n_train, x_test, y_test, n_test, C, tol, max_iter):
        # lax.map, not vmap: each group's L-BFGS loop and line search stop on their own.
        return jax.lax.map(lambda g: fit_group(*g, C, tol, max_iter),
                           (x_train, y_train, n_train, x_test, y_test, n_test))

    return fit_all


def _train_logreg(config: LogRegConfig, train: _Packed, test: _Packed, n_classes: int = 2):
    train_loss, correct = _logreg_program(n_classes)(
        *map(jnp.asarray, (train.x, train.y, train.n_rows, test.x, test.y, test.n_rows)),
        jnp.float32(config.C), jnp.float32(config.tol), jnp.int32(config.max_iter))
    return np.asarray(train_loss), np.asarray(correct) / test.n_rows


# ------------------------------------------------------------------------------------------------
# The sweep
# ------------------------------------------------------------------------------------------------

def train_probe_sweep(train: Sequence[tuple[np.ndarray, np.ndarray]],
                      test: Sequence[tuple[np.ndarray, np.ndarray]],
                      recipe: str = "vector-mlp",
                      seeds: Sequence[int] = range(10),
                      layers: Sequence[int] | None = None,
                      checkpoint_dir: str | Path | None = None,
                      progress: bool = True,
                      *,
                      config: VectorMLPConfig | LogRegConfig | None = None,
                      variant_names: Sequence[str] | None = None,
                      epochs_per_block: int = 5,
                      groups_per_step: int = 1,
                      checkpoint_interval_s: float = 60.0,
                      after_block: Callable[[int], None] | None = None,
                      n_classes: int = 2) -> ProbeSweepResult:
    """Train one probe per (variant, layer, seed) and score it on the variant's test rows.

    `train[v]` and `test[v]` are variant v's (activations [n, hook points, d], labels [n]).
    `config` overrides the recipe's settings (`VectorMLPConfig` / `LogRegConfig`).
    `variant_names` name the variants in errors and in the result (default "variant 0", ...).
    `epochs_per_block`: vector-mlp trains (and checkpoints) in blocks of this many epochs.
    `groups_per_step`: (variant, layer) pairs vmapped together per step of the compiled loop.
    `checkpoint_interval_s`: with `checkpoint_dir`, save at the first block end this many
    seconds after the previous save (0: after every block).
    `after_block(epochs_done)` runs after each block's checkpoint (tests use it to stop a sweep).
    `n_classes`: K; labels are class ids 0..K-1 and every class must have training rows.
    Bad input (labels, NaN/inf, shapes, layer indices) raises `UserError` naming the variant,
    split, row and hook point.
    """
    config = _recipe_config(recipe, config)
    if not train:
        raise UserError("no training data: pass at least one variant")
    if len(train) != len(test):
        raise UserError(f"{len(train)} train variants but {len(test)} test variants")
    names = tuple(variant_names) if variant_names is not None else tuple(
        f"variant {v}" for v in range(len(train)))
    if len(names) != len(train):
        raise ValueError(f"{len(names)} variant names for {len(train)} variants")
    if epochs_per_block < 1 or groups_per_step < 1:
        raise ValueError("epochs_per_block and groups_per_step must be at least 1")
    if n_classes < 2:
        raise UserError(f"n_classes must be at least 2, not {n_classes}")

    first_x = train[0][0]
    if not hasattr(first_x, "shape") or len(first_x.shape) != 3:
        raise UserError(f"train activations of {names[0]}: must be [rows, hook points, d], "
                        f"got shape {getattr(first_x, 'shape', None)}")
    n_hook_points, d = first_x.shape[1], first_x.shape[2]
    checked = {"train": [], "test": []}
    for split, pairs in (("train", train), ("test", test)):
        for name, (x, y) in zip(names, pairs):
            checked[split].append(_check_split(x, y, f"{split} activations of {name}", n_hook_points, d,
                                               n_classes))
    layers = _resolve_layers(layers, n_hook_points)
    seeds = _resolve_seeds(seeds)
    for split in ("train", "test"):
        for name, (x, _) in zip(names, checked[split]):
            _check_finite(x, layers, f"{split} activations of {name}")

    train_packed = _pack(checked["train"], layers)
    test_packed = _pack(checked["test"], layers)
    shape = (len(names), len(layers), len(seeds))
    curve = None
    if recipe == "vector-mlp":
        final_loss, accuracy, curve = _train_vector_mlp(
            config, train_packed, test_packed, seeds, layers, names,
            None if checkpoint_dir is None else Path(checkpoint_dir), progress, epochs_per_block,
            groups_per_step, checkpoint_interval_s, after_block, n_classes)
        final_loss, accuracy = final_loss.reshape(shape), accuracy.reshape(shape)
        curve = curve.reshape(*shape, config.epochs)
    else:
        final_loss, accuracy = _train_logreg(config, train_packed, test_packed, n_classes)
        # No randomness: every seed has the same (unique) optimum.
        final_loss = np.repeat(final_loss.reshape(shape[:2])[..., None], len(seeds), axis=-1)
        accuracy = np.repeat(accuracy.reshape(shape[:2])[..., None], len(seeds), axis=-1)
    return ProbeSweepResult(
        recipe=recipe, layers=layers, seeds=seeds, variant_names=names,
        final_train_loss=final_loss.astype(np.float64), test_accuracy=accuracy.astype(np.float64),
        n_train=train_packed.rows_per_variant, n_test=test_packed.rows_per_variant,
        config=dataclasses.asdict(config), train_loss_by_epoch=curve)
