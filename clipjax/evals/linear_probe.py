"""Linear probes: L2-regularised logistic regression on frozen image features, in JAX.

The CLIP paper's protocol (appendix A.3): multinomial logistic regression fitted with
L-BFGS; the L2 strength lambda is chosen on a validation split by a parametric binary
search that starts at lambda = 1e-6, 1e-4, ..., 1e6 and halves the interval around the best
value until it reaches 8 steps per decade; the model is then refitted with that lambda on
train + validation and scored on the test split. The objective is scikit-learn's with
C = 1 / lambda: mean cross-entropy + lambda / (2 n) * ||W||^2 (the bias is not penalised).
"""

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clipjax import sharding
from clipjax.evals.encoders import Encoders, Params, embed_images

START_LOG_LAMBDAS = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)
STEPS_PER_DECADE = 8


def objective(w, x_ND, y_N, weight_N, lam):
    """Weighted mean cross-entropy + lam / (2 n) ||W||^2; padding rows have weight 0."""
    logits_NC = jnp.dot(x_ND, w["kernel"], precision=jax.lax.Precision.HIGHEST) + w["bias"]
    ce_N = optax.softmax_cross_entropy_with_integer_labels(logits_NC, y_N)
    n = weight_N.sum()
    return (ce_N * weight_N).sum() / n + lam / (2 * n) * jnp.sum(w["kernel"] ** 2)


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fit(w0, x_ND, y_N, weight_N, lam, tol, max_iter: int):
    opt = optax.lbfgs()
    loss = functools.partial(objective, x_ND=x_ND, y_N=y_N, weight_N=weight_N, lam=lam)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(carry):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state

    def not_done(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        gmax = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)]))
        return (count == 0) | ((count < max_iter) & (gmax >= tol))

    w, state = jax.lax.while_loop(not_done, step, (w0, opt.init(w0)))
    return w, optax.tree_utils.tree_get(state, "count")


def _place(x_ND, y_N, mesh, rows: int | None):
    """Rows padded (weight 0) to `rows` rounded up to divide over the mesh's batch shards
    (one shape, so one compilation, for every fit of a sweep), and sharded."""
    x_ND, y_N = np.asarray(x_ND, np.float32), np.asarray(y_N, np.int32)
    shards = sharding.batch_size(mesh)
    rows = -(-max(rows or 0, len(x_ND)) // shards) * shards
    pad = rows - len(x_ND)
    weight = np.concatenate([np.ones(len(x_ND), np.float32), np.zeros(pad, np.float32)])
    x_ND = np.concatenate([x_ND, np.zeros((pad, x_ND.shape[1]), np.float32)])
    y_N = np.concatenate([y_N, np.zeros(pad, np.int32)])
    # Every host holds all rows; each device takes its own from them.
    return tuple(jax.make_array_from_callback(a.shape, sharding.batch_sharding(mesh, a.ndim),
                                              lambda index, a=a: a[index])
                 for a in (x_ND, y_N, weight))


def fit(x_ND: np.ndarray, y_N: np.ndarray, num_classes: int, lam: float, *, tol: float = 1e-5,
        max_iter: int = 1000, init: dict | None = None, mesh=None, rows: int | None = None
        ) -> dict[str, np.ndarray]:
    """{"kernel" [D, C], "bias" [C]} minimising `objective` (L-BFGS, warm start from `init`);
    `rows` pads the data to a fixed row count so that fits of several sizes share a compile."""
    mesh = sharding.create_mesh() if mesh is None else mesh
    x, y, weight = _place(x_ND, y_N, mesh, rows)
    w0 = init or {"kernel": jnp.zeros((x_ND.shape[1], num_classes), jnp.float32),
                  "bias": jnp.zeros((num_classes,), jnp.float32)}
    w, _ = _fit(w0, x, y, weight, jnp.float32(lam), jnp.float32(tol), max_iter)
    return jax.tree.map(np.asarray, w)


def predict(w: Mapping[str, np.ndarray], x_ND: np.ndarray) -> np.ndarray:
    return (np.asarray(x_ND, np.float32) @ w["kernel"] + w["bias"]).argmax(1)


def accuracy(w, x_ND, y_N) -> float:
    return float((predict(w, x_ND) == y_N).mean())


def sweep(x_train, y_train, x_val, y_val, num_classes: int, *, mesh=None, **fit_kwargs
          ) -> tuple[float, dict[float, float]]:
    """(best log10 lambda, {log10 lambda: validation accuracy}) by the paper's binary search.

    Among equal accuracies the larger lambda (the simpler model) wins.
    """
    scores: dict[float, float] = {}
    fits: dict[float, dict] = {}

    def visit(log_lam: float) -> None:
        if log_lam in scores:
            return
        near = min(fits, key=lambda k: abs(k - log_lam)) if fits else None
        w = fit(x_train, y_train, num_classes, 10.0**log_lam, init=fits.get(near), mesh=mesh,
                **fit_kwargs)
        fits[log_lam], scores[log_lam] = w, accuracy(w, x_val, y_val)

    def best() -> float:
        return max(scores, key=lambda k: (scores[k], k))

    for log_lam in START_LOG_LAMBDAS:
        visit(log_lam)
    step = START_LOG_LAMBDAS[1] - START_LOG_LAMBDAS[0]
    lo, hi = START_LOG_LAMBDAS[0], START_LOG_LAMBDAS[-1]
    while step > 1.0 / STEPS_PER_DECADE:
        step /= 2
        centre = best()
        for log_lam in (centre - step, centre + step):
            if lo <= log_lam <= hi:
                visit(log_lam)
    return best(), dict(sorted(scores.items()))


@dataclasses.dataclass
class Result:
    top1: float
    mean_per_class: float
    log10_lambda: float
    val_scores: dict[float, float]

    def metrics(self, prefix: str = "linear_probe") -> dict[str, float]:
        return {f"{prefix}/top1": self.top1, f"{prefix}/mean_per_class": self.mean_per_class,
                f"{prefix}/log10_lambda": self.log10_lambda}

    def to_json(self) -> dict:
        return {"top1": self.top1, "mean_per_class": self.mean_per_class,
                "log10_lambda": self.log10_lambda,
                "val_accuracy_by_log10_lambda": {str(k): v for k, v in self.val_scores.items()}}


def split_validation(n: int, fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a fixed random `fraction` held out, for datasets
    without a validation split."""
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, round(n * fraction))
    return np.sort(perm[k:]), np.sort(perm[:k])


def probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
          val: tuple[np.ndarray, np.ndarray] | None = None, num_classes: int | None = None, *,
          mesh=None, **fit_kwargs) -> Result:
    """The whole protocol on (features, labels) pairs; without `val`, 20% of train is held out."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    if num_classes is None:
        num_classes = int(max(y_tr.max(), y_te.max(), -1 if val is None else val[1].max())) + 1
    if val is None:
        tr, va = split_validation(len(x_tr))
        (x_tr, y_tr), val = (x_tr[tr], y_tr[tr]), (x_tr[va], y_tr[va])
    rows = len(x_tr) + len(val[0])
    log_lam, scores = sweep(x_tr, y_tr, *val, num_classes, mesh=mesh, rows=rows, **fit_kwargs)
    w = fit(np.concatenate([x_tr, val[0]]), np.concatenate([y_tr, val[1]]), num_classes,
            10.0**log_lam, mesh=mesh, rows=rows, **fit_kwargs)
    pred = predict(w, x_te)
    per_class = [float((pred[y_te == c] == c).mean()) for c in np.unique(y_te)]
    return Result(float((pred == y_te).mean()), float(np.mean(per_class)), log_lam, scores)


def features(encoders: Encoders, params: Params, batches: Iterable[Mapping[str, np.ndarray]],
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], labels [N]) of {"image", "label"} batches."""
    out = embed_images(encoders, params, batches, features=True, progress=progress)
    if "label" not in out:
        raise ValueError("The linear-probe data yielded no images; check the dataset and split.")
    return out["features"], out["label"].astype(np.int64)


BatchesFn = Callable[[Encoders], Iterable[Mapping[str, np.ndarray]]]


def evaluator(train: BatchesFn, test: BatchesFn, val: BatchesFn | None = None,
              num_classes: int | None = None, name: str = "linear_probe", **fit_kwargs):
    """An Evaluator: features of each split ({"image", "label"} batches), then `probe`."""
    def run(encoders: Encoders, params: Params) -> dict[str, float]:
        splits = [features(encoders, params, f(encoders)) for f in (train, test)]
        v = None if val is None else features(encoders, params, val(encoders))
        return probe(*splits, val=v, num_classes=num_classes, mesh=encoders.mesh,
                     **fit_kwargs).metrics(name)

    return run
