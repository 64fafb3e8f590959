"""Feasibility: ViT-tiny CLIP on clipjax.data.synthetic, plain optax AdamW + symmetric InfoNCE.

python /tmp/notes/synthetic_feasibility.py [--image-size 32] [--batch 256] [--minutes 9]
Prints zero-shot top-1 on 1024 held-out images against wall time (data + compile included).
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import clipjax
from clipjax.data import synthetic

ap = argparse.ArgumentParser()
ap.add_argument("--image-size", type=int, default=32)
ap.add_argument("--patch", type=int, default=8)
ap.add_argument("--batch", type=int, default=256)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--minutes", type=float, default=9.0)
ap.add_argument("--steps", type=int, default=3000)
ap.add_argument("--eval-every", type=int, default=250)
args = ap.parse_args()

t0 = time.time()
from clipjax.models.variants import get_config
import dataclasses
cfg = get_config("ViT-tiny")
overrides = {}
if args.image_size != 32 or args.patch != 8:
    overrides["vision"] = dataclasses.replace(cfg.vision, image_size=args.image_size, patch_size=args.patch)
model = clipjax.create_model("ViT-tiny", **overrides)
params = clipjax.init_params(model, jax.random.key(0))
ctx = model.config.text.context_length

sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 100, args.steps, args.lr * 0.05)
tx = optax.adamw(sched, b2=0.98, weight_decay=0.1,
                 mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
opt = tx.init(params)


def loss_fn(p, img, tok):
    i, t, scale, _ = model.apply({"params": p}, img, tok)
    logits = jnp.exp(jnp.minimum(scale, jnp.log(100.0))) * i @ t.T
    labels = jnp.arange(len(img))
    return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


@jax.jit
def step(p, o, img, tok):
    loss, g = jax.value_and_grad(loss_fn)(p, img, tok)
    up, o = tx.update(g, o, p)
    return optax.apply_updates(p, up), o, loss


enc_img = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_image", normalize=True))
enc_txt = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode_text", normalize=True))
ev_img, ev_lab, _ = synthetic.held_out(1024, image_size=args.image_size, seed=0)
prompts = [t.format(c) for c in synthetic.CLASSNAMES for t in synthetic.TEMPLATES]
prompt_tok = clipjax.tokenize(prompts, ctx)


def zeroshot(p):
    t = np.asarray(enc_txt(p, prompt_tok)).reshape(len(synthetic.CLASSNAMES), len(synthetic.TEMPLATES), -1)
    w = t.mean(1)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    e = np.concatenate([np.asarray(enc_img(p, ev_img[i:i + 256])) for i in range(0, 1024, 256)])
    return float(((e @ w.T).argmax(1) == ev_lab).mean())


it = synthetic.SyntheticIterator(args.batch, image_size=args.image_size, context_length=ctx, seed=1)
print(f"setup {time.time() - t0:.1f}s", flush=True)
for s in range(1, args.steps + 1):
    b = next(it)
    params, opt, loss = step(params, opt, b["image"], b["text"])
    if s % args.eval_every == 0 or s == args.steps:
        acc = zeroshot(params)
        print(f"step {s} t={time.time() - t0:.0f}s loss={float(loss):.3f} zeroshot_top1={acc:.3f}", flush=True)
    if time.time() - t0 > args.minutes * 60:
        acc = zeroshot(params)
        print(f"stop at step {s} t={time.time() - t0:.0f}s zeroshot_top1={acc:.3f}", flush=True)
        break
