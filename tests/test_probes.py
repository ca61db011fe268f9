"""Probe trainers: the vmapped sweep against one probe alone and against PyTorch, resume, logreg
against a float64 Newton solve, the seed statistics, and one-line errors for bad input.

Compilation dominates the cost here, so the tests share three program shapes: the sweep
(2 variants x 2 layers x 2 seeds, 150/100 train rows) and single probes of 150 and 100 rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxprobe import probes
from jaxprobe.errors import UserError
from jaxprobe.probes import (LogRegConfig, VectorMLPConfig, epoch_batches, initial_params,
                             summarise, train_probe_sweep)

D = 8
N_TRAIN = (150, 100)   # 150 rows = two batches of 128 and 22; 100 rows = one batch
N_TEST = (60, 40)
LAYERS = 3
# Large steps and eps make AdamW's details (eps placement, bias correction, decoupled decay)
# visible within a few epochs; the recipe's code path is the same as with the defaults.
LOUD = VectorMLPConfig(learning_rate=3e-2, weight_decay=0.5, eps=1e-3, epochs=4)


def _variant(rng, n, shift):
    y = np.arange(n) % 2
    rng.shuffle(y)
    x = rng.standard_normal((n, LAYERS, D)).astype(np.float32)
    x[:, :, 0] += shift * (2 * y[:, None] - 1)  # a little signal, stronger in later layers
    x[:, :, 1] *= np.arange(1, LAYERS + 1)
    return x, y


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = [_variant(rng, n, 0.4) for n in N_TRAIN]
    test = [_variant(rng, n, 0.4) for n in N_TEST]
    return train, test


def _sweep(data, **kw):
    train, test = data
    kw = {"seeds": [3, 7], "layers": [0, 2], "progress": False, "config": LOUD,
          "epochs_per_block": 1, **kw}
    return train_probe_sweep(train, test, "vector-mlp", **kw)


@pytest.fixture(scope="module")
def sweep(data):
    return _sweep(data, variant_names=("long", "short"))


def test_sweep_shapes_and_bookkeeping(sweep):
    assert sweep.final_train_loss.shape == sweep.test_accuracy.shape == (2, 2, 2)
    assert sweep.train_loss_by_epoch.shape == (2, 2, 2, LOUD.epochs)
    assert sweep.layers == (0, 2) and sweep.seeds == (3, 7)
    assert sweep.n_train == N_TRAIN and sweep.n_test == N_TEST
    assert np.array_equal(sweep.final_train_loss, sweep.train_loss_by_epoch[..., -1])
    assert np.all(np.isfinite(sweep.final_train_loss))
    # accuracies are counts over the real test rows, never over padding
    counts = sweep.test_accuracy * np.asarray(N_TEST)[:, None, None]
    assert np.allclose(counts, np.round(counts), atol=1e-4)
    # the probes learn: on average the loss falls over the epochs (one 22-row batch is noisy)
    assert sweep.train_loss_by_epoch[..., -1].mean() < sweep.train_loss_by_epoch[..., 0].mean()


@pytest.mark.parametrize("variant, layer_pos, seed_pos", [(0, 1, 0), (1, 0, 1)])
def test_vmapped_sweep_equals_one_probe_alone(data, sweep, variant, layer_pos, seed_pos):
    train, test = data
    alone = train_probe_sweep([train[variant]], [test[variant]], "vector-mlp",
                              seeds=[sweep.seeds[seed_pos]], layers=[sweep.layers[layer_pos]],
                              progress=False, config=LOUD, epochs_per_block=1)
    index = (variant, layer_pos, seed_pos)
    np.testing.assert_allclose(alone.train_loss_by_epoch[0, 0, 0], sweep.train_loss_by_epoch[index],
                               rtol=1e-5, atol=1e-6)
    assert alone.test_accuracy[0, 0, 0] == sweep.test_accuracy[index]


def test_groups_vmapped_together_give_the_same_numbers(data, sweep, monkeypatch):
    ticks = []
    monkeypatch.setattr(probes._ProgressRelay, "tick", lambda self, amount: ticks.append(amount))
    # 4 (variant, layer) groups in steps of 3: one vmapped chunk plus a remainder
    chunked = _sweep(data, groups_per_step=3, progress=True)
    assert sum(ticks) == 4 * 2 * LOUD.epochs  # the progress bar counts every probe-epoch once
    np.testing.assert_allclose(chunked.train_loss_by_epoch, sweep.train_loss_by_epoch,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(chunked.test_accuracy, sweep.test_accuracy)


def test_seeds_differ_and_are_paired_across_layers(sweep):
    curves = sweep.train_loss_by_epoch
    assert not np.allclose(curves[:, :, 0], curves[:, :, 1])  # different seeds, different runs
    init = [initial_params(s, D, LOUD) for s in sweep.seeds]
    assert init[0]["hidden_weight"].shape == (128, D)
    bound = 1 / np.sqrt(D)
    assert np.abs(init[0]["hidden_weight"]).max() <= bound
    assert np.abs(init[0]["hidden_weight"]).max() > 0.9 * bound  # U(+-1/sqrt(fan_in)), not smaller
    assert np.abs(init[0]["out_bias"]).max() <= 1 / np.sqrt(128)


def _torch_recipe(x_train, y_train, x_test, y_test, seed, config, n_classes=2):
    """The reference notebook's loop in plain PyTorch, fed our initial weights and batch order."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    d = x_train.shape[1]
    model = torch.nn.Sequential(torch.nn.Linear(d, config.hidden, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(config.hidden, n_classes))
    init = {k: torch.tensor(v) for k, v in initial_params(seed, d, config, n_classes).items()}
    with torch.no_grad():
        model[0].weight.copy_(init["hidden_weight"])
        model[2].weight.copy_(init["out_weight"])
        model[2].bias.copy_(init["out_bias"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.beta1, config.beta2), eps=config.eps,
                                  weight_decay=config.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    curve = []
    for epoch in range(config.epochs):
        for rows in epoch_batches(seed, epoch, len(x_train), config.batch_size):
            rows = torch.from_numpy(rows.astype(np.int64))
            loss = criterion(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        curve.append(loss.item())
    with torch.no_grad():
        predicted = model(torch.from_numpy(x_test)).argmax(dim=1).numpy()
    return np.asarray(curve), float(np.mean(predicted == y_test))


@pytest.mark.parametrize("variant", [0, 1])  # two batches per epoch, and one
def test_matches_plain_pytorch_given_same_init_and_batches(data, sweep, variant):
    train, test = data
    seed, layer = 7, 2
    (x_train, y_train), (x_test, y_test) = train[variant], test[variant]
    curve, accuracy = _torch_recipe(x_train[:, layer], y_train, x_test[:, layer], y_test, seed, LOUD)
    index = (variant, sweep.layers.index(layer), sweep.seeds.index(seed))
    np.testing.assert_allclose(sweep.train_loss_by_epoch[index], curve, rtol=2e-4, atol=1e-5)
    assert sweep.test_accuracy[index] == pytest.approx(accuracy)
    assert curve[-1] < curve[0] - 0.1  # the loud settings really moved the weights


def test_epoch_batches_are_a_fresh_permutation_each_epoch():
    first, second = epoch_batches(1, 0, 300), epoch_batches(1, 1, 300)
    assert [len(b) for b in first] == [128, 128, 44]
    assert sorted(np.concatenate(first).tolist()) == list(range(300))
    assert not np.array_equal(np.concatenate(first), np.concatenate(second))
    assert np.array_equal(np.concatenate(first), np.concatenate(epoch_batches(1, 0, 300)))


class _Crash(Exception):
    pass


def test_killed_sweep_resumes_bit_identical(data, sweep, tmp_path):
    def crash_after_two_epochs(epochs_done):
        if epochs_done == 2:
            raise _Crash

    with pytest.raises(_Crash):
        _sweep(data, variant_names=("long", "short"), checkpoint_dir=tmp_path,
               checkpoint_interval_s=0, after_block=crash_after_two_epochs)
    resumed_from = []
    resumed = _sweep(data, variant_names=("long", "short"), checkpoint_dir=tmp_path,
                     checkpoint_interval_s=0, after_block=resumed_from.append)
    assert resumed_from == [3, 4]  # epochs 1-2 were not run again
    np.testing.assert_array_equal(resumed.train_loss_by_epoch, sweep.train_loss_by_epoch)
    np.testing.assert_array_equal(resumed.test_accuracy, sweep.test_accuracy)

    # a different sweep must not reuse (or clobber) that checkpoint
    other = dataclasses.replace(LOUD, weight_decay=0.1)
    with pytest.raises(UserError, match=r"different probe sweep \(differs in: config\)"):
        _sweep(data, variant_names=("long", "short"), checkpoint_dir=tmp_path, config=other)


# ------------------------------------------------------------------------------------------------
# logreg
# ------------------------------------------------------------------------------------------------

def _newton_logreg(x, y, C):
    """float64 Newton solve of mean log-loss + ||w||^2 / (2 C n) on standardised x (bias free)."""
    n, d = x.shape
    z = (x - x.mean(0)) / x.std(0)
    a = np.hstack([z, np.ones((n, 1))])
    reg = np.full(d + 1, 1.0 / (C * n))
    reg[-1] = 0.0
    theta = np.zeros(d + 1)
    for _ in range(50):
        p = 1 / (1 + np.exp(-a @ theta))
        grad = a.T @ (p - y) / n + reg * theta
        hess = (a * (p * (1 - p))[:, None]).T @ a / n + np.diag(reg)
        theta -= np.linalg.solve(hess, grad)
    p = 1 / (1 + np.exp(-a @ theta))
    loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return theta[:-1], theta[-1], loss


@pytest.mark.parametrize("C", [1.0, 0.05])
def test_logreg_matches_float64_newton_on_standardised_train_rows(data, C):
    train, test = data
    res = train_probe_sweep(train, test, "logreg", seeds=[0, 1, 2], progress=False,
                            config=LogRegConfig(C=C))
    assert res.test_accuracy.shape == (2, LAYERS, 3)
    assert np.all(res.test_accuracy == res.test_accuracy[..., :1])  # deterministic optimum
    for v in range(2):
        for layer in range(LAYERS):
            x, y = train[v][0][:, layer].astype(np.float64), train[v][1]
            w, b, loss = _newton_logreg(x, y, C)
            assert res.final_train_loss[v, layer, 0] == pytest.approx(loss, rel=1e-5)
            x_test, y_test = test[v][0][:, layer].astype(np.float64), test[v][1]
            z_test = (x_test - x.mean(0)) / x.std(0)  # train statistics applied to test rows
            assert res.test_accuracy[v, layer, 0] == np.mean((z_test @ w + b > 0) == y_test)


# ------------------------------------------------------------------------------------------------
# K classes
# ------------------------------------------------------------------------------------------------

def _three_class(rng, n):
    y = np.arange(n) % 3
    rng.shuffle(y)
    x = rng.standard_normal((n, 2, D)).astype(np.float32)
    x[:, :, 0] += 0.8 * (y[:, None] == 1)
    x[:, :, 1] += 0.8 * (y[:, None] == 2)
    return x, y


@pytest.fixture(scope="module")
def three():
    rng = np.random.default_rng(5)
    return [_three_class(rng, 150)], [_three_class(rng, 60)]


def test_vector_mlp_with_three_outputs_matches_plain_pytorch(three):
    train, test = three
    res = train_probe_sweep(train, test, "vector-mlp", seeds=[7], layers=[1], progress=False, config=LOUD,
                            epochs_per_block=1, n_classes=3)
    assert initial_params(7, D, LOUD, 3)["out_weight"].shape == (3, 128)
    (x_train, y_train), (x_test, y_test) = train[0], test[0]
    curve, accuracy = _torch_recipe(x_train[:, 1], y_train, x_test[:, 1], y_test, 7, LOUD, n_classes=3)
    np.testing.assert_allclose(res.train_loss_by_epoch[0, 0, 0], curve, rtol=2e-4, atol=1e-5)
    assert res.test_accuracy[0, 0, 0] == pytest.approx(accuracy)
    assert curve[-1] < curve[0]  # the weights moved (the last batch holds only 22 rows: noisy)


def test_multinomial_logreg_matches_a_float64_solve(three):
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    train, test = three
    C = 0.5
    res = train_probe_sweep(train, test, "logreg", seeds=[0], progress=False, config=LogRegConfig(C=C),
                            n_classes=3)
    for layer in range(2):
        x, y = train[0][0][:, layer].astype(np.float64), train[0][1]
        n, d = x.shape
        z = (x - x.mean(0)) / x.std(0)

        def objective(theta, z=z, y=y, n=n, d=d):
            w, b = theta[:d * 3].reshape(d, 3), theta[d * 3:]
            return -log_softmax(z @ w + b, axis=1)[np.arange(n), y].mean() + np.sum(w * w) / (2 * C * n)

        theta = minimize(objective, np.zeros(d * 3 + 3), method="BFGS", options={"gtol": 1e-10}).x
        w, b = theta[:d * 3].reshape(d, 3), theta[d * 3:]
        loss = -log_softmax(z @ w + b, axis=1)[np.arange(n), y].mean()
        assert res.final_train_loss[0, layer, 0] == pytest.approx(loss, rel=1e-4)
        z_test = (test[0][0][:, layer] - x.mean(0)) / x.std(0)
        assert res.test_accuracy[0, layer, 0] == np.mean(np.argmax(z_test @ w + b, axis=1) == test[0][1])
        assert res.test_accuracy[0, layer, 0] > 0.4  # above chance (1/3)


@pytest.mark.parametrize("edit, message", [
    (lambda tr, te: tr[0][1].__setitem__(3, 3), r"train activations of a: row 3: label 3 is not a class id 0..2"),
    (lambda tr, te: tr[0][1].__setitem__(tr[0][1] == 2, 1), r"train activations of a: no row of class 2"),
    (lambda tr, te: te[0][1].__setitem__(slice(None), 2), r"test activations of a: every label is 2"),
])
def test_k_class_labels_are_checked(three, edit, message):
    train, test = ([(x.copy(), y.copy()) for x, y in part] for part in three)
    edit(train, test)
    with pytest.raises(UserError, match=message):
        train_probe_sweep(train, test, "logreg", progress=False, variant_names=("a",), n_classes=3)


# ------------------------------------------------------------------------------------------------
# statistics and bad input
# ------------------------------------------------------------------------------------------------

def test_summarise_gives_mean_sample_std_and_t_interval():
    values = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    mean, std, low, high = summarise(values)
    np.testing.assert_allclose(mean, [2.5, 5.0])
    np.testing.assert_allclose(std, [np.sqrt(5 / 3), 0.0])
    half = 3.182446305284263 * np.sqrt(5 / 3) / 2  # t_{0.975, 3} from tables
    np.testing.assert_allclose([low[0], high[0]], [2.5 - half, 2.5 + half])
    assert low[1] == high[1] == 5.0
    mean, std, low, high = summarise(np.array([0.7]))
    assert mean == 0.7 and np.isnan(std) and np.isnan(low) and np.isnan(high)


def _bad(data, **changes):
    train, test = data
    train = [(x.copy(), y.copy()) for x, y in train]
    test = [(x.copy(), y.copy()) for x, y in test]
    for edit in changes.values():
        edit(train, test)
    return train, test


@pytest.mark.parametrize("edit, message", [
    (lambda tr, te: tr[1][1].__setitem__(5, 2), r"train activations of short: row 5: label 2 is not 0 or 1"),
    (lambda tr, te: te[0][1].__setitem__(slice(None), 1),
     r"test activations of long: every label is 1; probes need both classes"),
    (lambda tr, te: tr[0][0].__setitem__((17, 2, 3), np.nan),
     r"train activations of long: row 17, hook point 2: activation is nan"),
    (lambda tr, te: te[1][0].__setitem__((3, 0, 0), np.inf),
     r"test activations of short: row 3, hook point 0: activation is inf"),
    (lambda tr, te: te.__setitem__(1, (te[1][0][:, :, :4], te[1][1])),
     r"test activations of short: activation width 4, but the first train variant has 8"),
    (lambda tr, te: tr.__setitem__(1, (tr[1][0][:, :2], tr[1][1])),
     r"train activations of short: 2 hook points, but the first train variant has 3"),
    (lambda tr, te: tr.__setitem__(0, (tr[0][0], tr[0][1][:-1])),
     r"train activations of long: 149 labels for 150 activation rows"),
])
def test_bad_input_is_one_line_naming_the_place(data, edit, message):
    train, test = _bad(data, edit=edit)
    with pytest.raises(UserError, match=message) as info:
        train_probe_sweep(train, test, progress=False, variant_names=("long", "short"))
    assert "\n" not in str(info.value)


def test_bad_arguments_are_user_errors(data):
    train, test = data
    with pytest.raises(UserError, match=r"layer 3 does not exist: the activations have 3 hook points, 0-2"):
        train_probe_sweep(train, test, layers=[0, 3], progress=False)
    with pytest.raises(UserError, match=r"unknown probe recipe 'svm'"):
        train_probe_sweep(train, test, recipe="svm", progress=False)
    with pytest.raises(UserError, match=r"seeds \[1, 1\] repeat a value"):
        train_probe_sweep(train, test, seeds=[1, 1], progress=False)
    with pytest.raises(UserError, match=r"2 train variants but 1 test variants"):
        train_probe_sweep(train, test[:1], progress=False)


def test_memmapped_activations_are_read_as_given(data, sweep, tmp_path):
    train, test = data
    np.save(tmp_path / "x.npy", train[1][0])
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    # one probe alone (same program as above), fed from a memmap
    a = train_probe_sweep([(mapped, train[1][1])], [test[1]], seeds=[7], layers=[0],
                          progress=False, config=LOUD, epochs_per_block=1)
    np.testing.assert_allclose(a.train_loss_by_epoch[0, 0, 0], sweep.train_loss_by_epoch[1, 0, 1],
                               rtol=1e-5, atol=1e-6)


def test_out_of_range_settings_are_user_errors(data):
    train, test = data
    with pytest.raises(UserError, match=r"vector-mlp setting epochs=0 must be positive"):
        train_probe_sweep(train, test, config=VectorMLPConfig(epochs=0), progress=False)
    with pytest.raises(UserError, match=r"logreg setting C=-1.0 must be positive"):
        train_probe_sweep(train, test, "logreg", config=LogRegConfig(C=-1.0), progress=False)
    assert VectorMLPConfig() == VectorMLPConfig(hidden=128, learning_rate=1e-4, weight_decay=1e-3,
                                                beta1=0.9, beta2=0.999, eps=1e-8, batch_size=128,
                                                epochs=25)  # the reference notebook's recipe
