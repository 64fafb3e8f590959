"""What GLIP's task needs around its model: data, prompts at inference, evaluation, loading.

Inference scores every anchor against the tokens of a prompt and every class by the mean
of its tokens' probabilities; a class list longer than one prompt holds (LVIS's 1,203) is
split into prompts of `per_prompt` classes (GLIP's chunked evaluation, 40 for LVIS), each
a forward pass, and their class scores are put side by side before box decoding and NMS.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clipjax.heads import boxes, grounding


def is_synthetic(spec: str) -> bool:
    return spec == "synthetic" or spec.startswith("synthetic:")


# --- training data ------------------------------------------------------------------------


def build_data(head, config, state: dict | None):
    """Resumable host-local batches in GLIP's layout (image, tokens, boxes, box_mask,
    positive_map)."""
    from clipjax.heads import dense

    spec = config.data.source
    keys = head.batch_keys(config)
    length = head.context_length(config)
    if is_synthetic(spec):
        from clipjax.data import synthetic_det

        it = synthetic_det.SyntheticDetIterator(
            config.global_batch, image_size=config.data.image_size, context_length=length,
            seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count(), **_synthetic_train_options(head, config))
    elif not spec:
        raise ValueError("data.source is empty; give a dataset, e.g. "
                         "data.source='coco:/data/coco?split=train2017', or 'synthetic'.")
    else:
        from clipjax.data import detection

        s = head.settings(config)
        it = detection.make_det_iterator(
            spec, global_batch_size=config.global_batch, image_size=config.data.image_size,
            context_length=length, max_boxes=int(s["max_boxes"]), train=True, seed=config.seed,
            num_workers=config.data.num_workers, max_negatives=int(s["max_negatives"]))
    out = dense._Only(it, keys, config.seed, config.global_batch)
    if state:
        out.set_state(state)
    return out


def synthetic_options(config) -> dict:
    """data.max_shapes, when a config sets it, for the built-in images."""
    return {"max_shapes": int(config.data.max_shapes)} if config.data.get("max_shapes") else {}


def _synthetic_train_options(head, config) -> dict:
    s = head.settings(config)
    return {**synthetic_options(config), "max_boxes": int(s["max_boxes"]),
            "max_negatives": int(s["max_negatives"])}


def eval_set(spec: str, config, num_examples: int = 0):
    """An evaluation split: the built-in held-out images or coco:/lvis:/flickr: data."""
    spec = spec.strip()
    if is_synthetic(spec):
        from clipjax.data import synthetic_det

        n = int(spec.split(":", 1)[1]) if ":" in spec else (num_examples or 128)
        return synthetic_det.SyntheticDetSet(n, seed=config.seed,
                                             image_size=config.data.image_size,
                                             **synthetic_options(config))
    from clipjax.data import detection
    from clipjax.heads import glip

    return detection.det_eval_set(spec, image_size=config.data.image_size,
                                  max_examples=num_examples,
                                  context_length=glip.context_length(config))


# --- inference ------------------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
    """One forward pass's text: its tokens, and which classes its token spans stand for."""

    tokens_L: np.ndarray
    map_CL: np.ndarray  # rows normalised: a class score is the mean over its tokens
    classes: np.ndarray  # the class indices of the rows


def pack_classes(names, context_length: int) -> list[np.ndarray]:
    """Consecutive classes in as few prompts as the text context holds (one for COCO's 80
    in GLIP's 256 tokens)."""
    lengths = grounding.name_lengths(names)
    budget = context_length - 2  # start and end of text
    chunks, start, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > budget and i > start:
            chunks.append(np.arange(start, i))
            start, used = i, 0
        used += int(n)
    chunks.append(np.arange(start, len(names)))
    return chunks


def prompts(names, context_length: int, per_prompt: int = 0) -> list[Prompt]:
    """The class names as GLIP's prompts ("a. b. c"); `per_prompt` > 0 splits them into
    prompts of that many classes (LVIS's 40), 0 into as few as the context holds."""
    chunks = (grounding.chunk_classes(len(names), per_prompt) if per_prompt
              else pack_classes(names, context_length))
    out = []
    for idx in chunks:
        caption, spans = grounding.build_prompt([names[i] for i in idx])
        tokens, map_CL = grounding.prompt_tokens(caption, spans, context_length)
        out.append(Prompt(tokens, map_CL, np.asarray(idx)))
    return out


def parse_prompt(text: str) -> list[str]:
    """`clipjax detect --prompt "person. dog. frisbee"` -> ["person", "dog", "frisbee"]."""
    names = [n.strip() for n in text.replace(",", ".").split(".")]
    names = [n for n in names if n]
    if not names:
        raise ValueError('The prompt names nothing: give phrases separated by ". ", e.g. '
                         '--prompt "person. dog. frisbee".')
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"The prompt names {dup!r} twice; name each phrase once.")
    return names


@dataclasses.dataclass
class DetEncoders:
    """GLIP's jitted forward pass, spread over the mesh, and the host-side decoding."""

    forward: Any  # jitted (params, uint8 [B, S, S, 3], tokens [B, L]) -> (probs, deltas, ctr)
    mesh: Any
    batch_size: int
    image_size: int
    strides: tuple[int, ...]
    anchor_scale: float
    context_length: int
    post: dict  # boxes.postprocess options

    def detect(self, params, canvases_BSS3: np.ndarray, prompt_list: list[Prompt],
               num_classes: int):
        """Per canvas (boxes [n, 4] xyxy in canvas pixels, scores [n], class indices [n])."""
        from clipjax import sharding

        anchors_A4, levels = boxes.anchors((self.image_size, self.image_size), self.strides,
                                           self.anchor_scale)
        shards = sharding.batch_size(self.mesh) if self.mesh is not None else 1
        out = []
        for lo in range(0, len(canvases_BSS3), self.batch_size):
            part = np.asarray(canvases_BSS3[lo:lo + self.batch_size])
            n = len(part)
            pad = -n % shards
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
            scores_BAC = np.zeros((len(part), len(anchors_A4), num_classes), np.float32)
            for p in prompt_list:
                tokens = np.broadcast_to(p.tokens_L, (len(part), len(p.tokens_L)))
                images = part
                if self.mesh is not None:
                    images = jax.device_put(part, sharding.batch_sharding(self.mesh, 4))
                    tokens = jax.device_put(tokens, sharding.batch_sharding(self.mesh, 2))
                probs_BAL, deltas_BA4, ctr_BA = jax.device_get(
                    self.forward(params, images, tokens))
                scores_BAC[:, :, p.classes] = grounding.class_scores(probs_BAL, p.map_CL)
            for i in range(n):
                out.append(boxes.postprocess(scores_BAC[i], deltas_BA4[i], ctr_BA[i], anchors_A4,
                                             levels, **self.post))
        return out


def make_encoders(head, model, mesh, batch_size: int = 16, **post) -> DetEncoders:
    from clipjax import sharding

    if mesh is not None:
        batch_size = -(-batch_size // sharding.batch_size(mesh)) * sharding.batch_size(mesh)
    return DetEncoders(jax.jit(head.predict(model)), mesh, batch_size, model.crop,
                       tuple(model.strides), model.anchor_scale, model.config.text.context_length,
                       {"pre_nms_thresh": 0.05, "pre_nms_top_n": 1000, "nms": 0.6,
                        "max_detections": 100, "image_size": (model.crop, model.crop), **post})


def detect_split(encoders: DetEncoders, params, dataset, names, per_prompt: int = 0,
                 progress=None) -> list[dict]:
    """COCO-format results over an evaluation split (boxes mapped back to each original
    image), in the dataset's category ids."""
    from clipjax.evals import detection as det_evals

    prompt_list = prompts(names, encoders.context_length, per_prompt)
    results, batch = [], []

    def flush():
        canvases = np.stack([b.canvas for b in batch])
        for ex, (bx, sc, lb) in zip(batch, encoders.detect(params, canvases, prompt_list,
                                                            len(names))):
            results.extend(det_evals.results_json(
                [ex.image_id], [to_original(bx, ex)], [sc], [lb], dataset.category_ids))
        if progress is not None:
            progress(len(batch))
        batch.clear()

    for ex in dataset:
        batch.append(ex)
        if len(batch) == encoders.batch_size:
            flush()
    if batch:
        flush()
    return results


def to_original(boxes_N4: np.ndarray, example) -> np.ndarray:
    """Canvas pixels -> the original image's pixels (undo the resize), clipped to it."""
    h, w = example.image.shape[:2]
    ox, oy = getattr(example, "offset", (0.0, 0.0))
    out = (np.asarray(boxes_N4, np.float32) - np.float32([ox, oy, ox, oy])) / float(example.scale)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h)
    return out


# --- evaluation during training -----------------------------------------------------------


def split_gt(gt: dict, category_ids) -> dict:
    """A COCO ground truth restricted to some categories (seen / unseen AP)."""
    keep = set(int(c) for c in category_ids)
    return {**gt, "categories": [c for c in gt["categories"] if c["id"] in keep],
            "annotations": [a for a in gt["annotations"] if a["category_id"] in keep]}


def entities_root(dataset) -> str:
    """The Flickr30k Entities folder (Annotations/*.xml, Sentences/*.txt) beside MDETR's
    annotations: ROOT/flickr30k_entities or ROOT itself."""
    import os

    root = dataset.source.location
    for folder in (os.path.join(root, "flickr30k_entities"), root):
        if os.path.isdir(os.path.join(folder, "Annotations")):
            return folder
    raise ValueError(f"No Flickr30k Entities annotations under {root}; put its Annotations/ "
                     "and Sentences/ folders in ROOT/flickr30k_entities (recall needs them).")


def ground_phrases(encoders, params, dataset, progress=None) -> dict:
    """{(image id, sentence index): one ranked box list a phrase} for Flickr30k: each
    sentence is its own prompt; a phrase's score is the mean over its tokens."""
    preds = {}
    for ex in dataset:
        if ex.tokens is None:  # its phrases do not fit the text context: nothing predicted
            preds[(ex.original_img_id, ex.sentence_id)] = [[] for _ in ex.phrase_boxes]
            continue
        n = len(ex.phrase_maps)
        prompt = Prompt(ex.tokens, ex.phrase_maps, np.arange(n))
        (bx, sc, lb), = encoders.detect(params, ex.canvas[None], [prompt], n)
        bx = to_original(bx, ex)
        preds[(ex.original_img_id, ex.sentence_id)] = [
            bx[lb == p][np.argsort(-sc[lb == p], kind="stable")].tolist() for p in range(n)]
        if progress is not None:
            progress(1)
    return preds


def flickr_evaluate(encoders, params, dataset, progress=None) -> dict:
    """Recall@1/5/10 at IoU 0.5 against the Entities XML, over the sentences predicted."""
    from clipjax.evals import detection as det_evals

    preds = ground_phrases(encoders, params, dataset, progress)
    targets = det_evals.flickr_targets(entities_root(dataset),
                                       sorted({image for image, _ in preds}))
    targets = {key: value for key, value in targets.items() if key in preds}
    return {"metrics": {"all": det_evals.flickr_recall(preds, targets)},
            "results": [{"image_id": i, "sentence": s, "boxes": b}
                        for (i, s), b in preds.items()]}


def evaluate(encoders, params, dataset, names, per_prompt: int = 0, progress=None) -> dict:
    """AP metrics (pycocotools; faster-coco-eval's LVIS mode for lvis) and the results;
    the built-in split adds AP over seen and held-out (unseen) colour-shape pairs."""
    from clipjax.evals import detection as det_evals

    kind = getattr(dataset, "kind", "coco")
    if kind == "flickr":
        return flickr_evaluate(encoders, params, dataset, progress)
    results = detect_split(encoders, params, dataset, names, per_prompt, progress)
    if kind == "lvis":
        out = {"all": det_evals.lvis_evaluate(dataset.coco_gt, results)}
    else:
        out = {"all": det_evals.coco_evaluate(dataset.coco_gt, results)}
    for group in ("seen", "unseen"):
        ids = getattr(dataset, f"{group}_category_ids", None)
        if ids:
            keep = set(int(c) for c in ids)
            out[group] = det_evals.coco_evaluate(split_gt(dataset.coco_gt, ids),
                                                 [r for r in results
                                                  if r["category_id"] in keep])
    return {"metrics": out, "results": results}


def evaluator(dataset, names, prefix: str, per_prompt: int = 0):
    """evaluator(encoders, params) -> {prefix/AP, prefix/AP50, ...; prefix/unseen_AP, ...}."""

    def run(encoders: DetEncoders, params) -> dict[str, float]:
        out = evaluate(encoders, params, dataset, names, per_prompt)["metrics"]
        metrics = {}
        for group, m in out.items():
            tag = "" if group == "all" else f"{group}_"
            for key in ("AP", "AP50", "AP75", "APr", "APc", "APf", "R@1", "R@5", "R@10"):
                if key in m:
                    metrics[f"{prefix}/{tag}{key}"] = float(m[key])
        return metrics

    return run


def build_evaluators(head, config) -> dict:
    spec = config.eval.get("detection", "")
    if not spec:
        return {}
    dataset = eval_set(spec, config, config.eval.num_examples)
    per_prompt = int(head.settings(config)["per_prompt"]) if getattr(
        dataset, "kind", "") == "lvis" else 0
    return {"det": evaluator(dataset, list(dataset.classnames), "det", per_prompt)}


# --- the task -------------------------------------------------------------------------------


def task(head, name: str = "glip"):
    from clipjax.heads import Task, dense

    return Task(
        name=name, batch_ndim=head.BATCH_NDIM, build_models=head.build_models,
        encode=head.encode, loss=head.loss, batch_keys=head.batch_keys,
        build_data=lambda config, state: build_data(head, config, state),
        build_evaluators=lambda config: build_evaluators(head, config),
        make_encoders=lambda model, mesh: make_encoders(head, model, mesh),
        derive=lambda model, params, loaded=frozenset(): params,
        identity=lambda config: {"task": name, "head": dense._jsonable(head.settings(config))},
        next_command=head.next_command, frozen=tuple(getattr(head, "FROZEN", ())))


def load(checkpoint: str) -> tuple:
    """(head module, eval model, params, config) of a GLIP checkpoint (a training workdir
    or the model.safetensors it wrote)."""
    from clipjax import weights
    from clipjax.heads import glip

    w = weights.load(checkpoint)
    trained = (w.config or {}).get("task", "clip")
    if trained != "glip":
        raise ValueError(f"{checkpoint} holds a {trained} model; detection needs a GLIP "
                         "checkpoint: train one with clipjax train --config glip_synthetic "
                         "first.")
    config = ml_collections.ConfigDict(w.config)
    config.scan, config.remat, config.dtype = False, "none", "float32"
    model = glip.build_models(config)[1]
    params = jax.tree.map(jnp.asarray, w.params)
    return glip, model, params, config
