"""The video heads' commands: `eval video-retrieval`, `eval action` and `classify-video` print
and write what the evaluators compute, and a bad input gets one sentence, not a traceback.

One ActionCLIP workdir is trained with the real loop (one step of the runlocal config, most
of this file's time); the CLIP4Clip checkpoint is a clipjax .safetensors of a seqTransf head
started from that run's towers (a second training run would double the time), so both heads
and both kinds of checkpoint are read.
"""

import json

import flax
import jax
import numpy as np
import pytest

from clipjax import cli, sharding, weights
from clipjax import config as config_lib
from clipjax.data import synthetic_video
from clipjax.evals import video as video_evals
from clipjax.heads import actionclip, clip4clip, video
from clipjax.heads import cli as heads_cli

LABELS = ("moving left", "moving right", "growing")


@pytest.fixture(scope="module")
def actionclip_run(tmp_path_factory):
    from clipjax import train

    workdir = tmp_path_factory.mktemp("actionclip")
    config = config_lib.load_config("actionclip_synthetic:runlocal",
                                    ["total_steps=1", "optimizer.warmup_steps=0"])
    train.train_and_evaluate(config, str(workdir))
    return workdir


@pytest.fixture(scope="module")
def clip4clip_file(actionclip_run, tmp_path_factory):
    """A seqTransf CLIP4Clip head started from the ActionCLIP run's towers, as a run with
    init_checkpoint starts, written as `clipjax export` writes a run's parameters."""
    config = config_lib.load_config("clip4clip_synthetic:runlocal")
    model = clip4clip.build_models(config)[1]
    towers = {k: v for k, v in weights.load(actionclip_run).params.items() if k != "temporal"}
    derived = clip4clip.derived_params(model, towers)  # the temporal blocks: text blocks 0-1
    params = {**towers, **flax.traverse_util.unflatten_dict(derived, sep="/")}
    path = tmp_path_factory.mktemp("clip4clip") / "clip4clip.safetensors"
    weights.write(weights.from_params(params, config, "test"), path)
    return path


def _run(argv, capsys) -> tuple[str, str]:
    cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return out.out, out.err


def _table(out: str) -> dict[str, str]:
    rows = [line.split("  ", 1) for line in out.splitlines() if "  " in line]
    return {k.strip(): v.strip() for k, v in rows}


def _direct(checkpoint, task: str):
    """The evaluation pieces, called as a notebook would: heads.video + evals.video."""
    module, model, params, config = video.load(str(checkpoint), task)
    mesh = sharding.create_mesh()
    params = jax.device_put(params, sharding.param_shardings(model, mesh))
    return module, params, config, video.make_encoders(module, model, mesh, 64)


def test_video_retrieval_prints_and_writes_the_evaluators_figures(clip4clip_file, tmp_path,
                                                                   capsys):
    out_json = tmp_path / "vr.json"
    out, _ = _run(["eval", "video-retrieval", "--checkpoint", clip4clip_file,
                   "--dataset", "synthetic:32", "--out", out_json], capsys)
    table, saved = _table(out), json.loads(out_json.read_text())

    module, params, config, encoders = _direct(clip4clip_file, "clip4clip")
    videos = video.eval_set(module, "synthetic:32", config)
    sim_TV, video_of_T = video_evals.retrieval_scores(encoders, params, videos)
    want = video_evals.retrieval_metrics(sim_TV, video_of_T)
    direction = video.direction_evaluator(videos)(encoders, params)

    assert table["model"].startswith("ViT-tiny, CLIP4Clip seqTransf, 4 frames (weights ")
    assert (table["videos"], table["captions"]) == ("32", "32")
    for key, value in want.items():
        name = key.split("/")[1]
        assert saved[name] == pytest.approx(value, abs=1e-12), name
        if "R@" in name:
            assert table[name.replace("_", " ")] == f"{100 * value:.2f}%"
    assert saved["t2v_MnR"] > 1  # ranks were computed, not defaulted
    assert saved["direction"] == {"top1": direction["direction/top1"],
                                  "mirror": direction["direction/mirror"]}
    assert table["direction mirror"] == f"{100 * direction['direction/mirror']:.2f}%"
    assert saved["fingerprint"] == weights.fingerprint(jax.tree.map(np.asarray, params))
    assert saved["head"]["sim_header"] == "seqTransf" and saved["num_videos"] == 32


def test_eval_action_on_the_workdir_equals_the_evaluator_and_the_runs_own_log(
        actionclip_run, tmp_path, capsys):
    out_json = tmp_path / "action.json"
    out, _ = _run(["eval", "action", "--checkpoint", actionclip_run, "--dataset", "synthetic:32",
                   "--out", out_json], capsys)
    table, saved = _table(out), json.loads(out_json.read_text())

    module, params, config, encoders = _direct(actionclip_run, "actionclip")
    videos = video.eval_set(module, "synthetic:32", config)
    probs_VC, _, labels_V = video_evals.score_videos(
        encoders, params, videos, synthetic_video.CLASSNAMES, actionclip.TEMPLATES)
    topk = video_evals.topk_accuracy(probs_VC, labels_V, (1, 5))
    logged = [json.loads(line) for line in (actionclip_run / "metrics.jsonl").read_text()
              .splitlines()]
    logged = [r for r in logged if "action/top1" in r][-1]  # the run's evaluation: same videos

    assert saved["top1"] == topk[1] == logged["action/top1"]
    assert saved["top5"] == topk[5] == logged["action/top5"]
    assert table["top-1"] == f"{100 * topk[1]:.2f}%" and table["top-5"] == f"{100 * topk[5]:.2f}%"
    assert table["model"].startswith("ViT-tiny, ActionCLIP Transf, 4 frames (weights ")
    assert (table["videos"], table["classes"], table["templates"]) == ("32", "6", "16")
    assert table["views"] == "1x1"  # the default 10x3 does not apply to the built-in clips
    per_class = {c["class"]: c for c in saved["per_class"]}
    for c, name in enumerate(synthetic_video.CLASSNAMES):
        mine = labels_V == c
        assert per_class[name]["videos"] == int(mine.sum())
        if mine.any():
            assert per_class[name]["accuracy"] == pytest.approx(
                float(np.mean(probs_VC[mine].argmax(1) == c)))
    worst = min(per_class.values(), key=lambda c: c["accuracy"])
    assert table["worst classes"].startswith(f"{worst['class']} {100 * worst['accuracy']:.0f}%")


def _write_mp4(path, frames: int = 8, size: int = 32) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):  # a yellow square moving right over a dark red field
            img = np.zeros((size, size, 3), np.uint8)
            img[..., 0] = 40
            img[12:20, 3 * t + 2:3 * t + 10] = (230, 200, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _direct_probs(workdir, path, labels) -> np.ndarray:
    """ActionCLIP's test on one clip by hand: the file's TSN centre frames, 100 x cosine with
    every template x label, a softmax per template, the mean over templates."""
    import av

    from clipjax.data import transforms
    from clipjax.data.video import segment_indices

    _, params, _, encoders = _direct(workdir, "actionclip")
    with av.open(str(path)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    idx = segment_indices(len(frames), encoders.num_frames, train=False)
    size = encoders.image_size
    clip_THWC = np.stack([transforms.rgb_array(transforms.center_crop(
        transforms.resize_shortest_side(frames[i], size), size)) for i in idx])
    rows = encoders.batch_size  # one clip, padded to the batch the encoder compiled for
    batch = {"video": np.repeat(clip_THWC[None], rows, 0),
             "frame_mask": np.ones((rows, len(idx)), bool)}
    vid_E = np.asarray(encoders.encode_video(params, sharding.shard_batch(batch,
                                                                          encoders.mesh)))[0]
    prompts = [t.format(c) for t in actionclip.TEMPLATES for c in labels]
    txt_QE = video_evals.encode_texts(encoders, params, prompts)
    logits_KC = (100.0 * txt_QE @ vid_E).reshape(len(actionclip.TEMPLATES), len(labels))
    return video_evals.action_scores(logits_KC[None])[0]


def test_classify_video_ranks_labels_and_reports_a_corrupt_file(actionclip_run, tmp_path,
                                                                capsys):
    good, bad = tmp_path / "square.mp4", tmp_path / "broken.mp4"
    _write_mp4(good)
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(SystemExit) as e:
        cli.main(["classify-video", str(good), str(bad), "--labels", ", ".join(LABELS),
                  "--checkpoint", str(actionclip_run)])
    assert e.value.code != 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"# {good}" and len(lines) == 1 + len(LABELS)

    probs = _direct_probs(actionclip_run, good, LABELS)
    printed = [line.split(maxsplit=2) for line in lines[1:]]
    assert [int(r) for r, _, _ in printed] == [1, 2, 3]
    assert [name for _, _, name in printed] == [LABELS[c] for c in np.argsort(-probs)]
    for _, p, name in printed:
        assert float(p) == pytest.approx(probs[LABELS.index(name)], abs=1e-4)
    errors = [line for line in captured.err.splitlines() if str(bad) in line]
    assert len(errors) == 2 and "corrupt video" in errors[0]  # the file, then the summary
    assert errors[1] == f"clipjax classify-video: 1 of 2 videos could not be read: {bad}."
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("argv, says", [
    (["eval", "action", "--checkpoint", "{tmp}/nowhere", "--dataset", "synthetic"],
     "does not exist"),
    (["eval", "video-retrieval", "--checkpoint", "{run}", "--dataset", "msrvtt:{tmp}"],
     "MSRVTT_JSFUSION_test.csv is not in"),
    (["eval", "action", "--checkpoint", "{run}", "--dataset", "ucf101:{tmp}/ucf?split=1"],
     "does not exist: point the spec at the folder"),
    (["eval", "action", "--checkpoint", "{run}", "--dataset", "synthetic", "--views", "10by3"],
     "give clips x crops like 1x1 or 10x3"),
    (["classify-video", "{tmp}/a.mp4", "--labels", " , ", "--checkpoint", "{run}"],
     "names no labels"),
    (["eval", "action", "--checkpoint", "{run}", "--dataset", "synthetic:8", "--frames", "40"],
     "use at most 16 frames"),
    (["eval", "video-retrieval", "--checkpoint", "{run}", "--dataset", "synthetic:x"],
     "synthetic:N"),
])
def test_a_bad_input_gets_one_sentence(actionclip_run, tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        cli.main([a.format(tmp=tmp_path, run=actionclip_run) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert err.startswith(f"clipjax {argv[0]}: ") and err.endswith(".")


def test_a_clip_checkpoint_becomes_the_mean_over_frames_baseline(tmp_path):
    import argparse

    import clipjax

    path = tmp_path / "clip.safetensors"
    model = clipjax.create_model("ViT-tiny")
    from clipjax import files

    files.save_params(path, clipjax.init_params(model, jax.random.key(0)), "ViT-tiny")
    assert heads_cli.trained_task(str(path)) == "clip"
    args = argparse.Namespace(checkpoint=str(path), frames=6, batch_size=8)
    m = heads_cli.load(args, "actionclip")
    assert (m.config.task, m.model.fusion, m.model.frames) == ("actionclip", "meanP", 6)
    assert m.name == "ViT-tiny, CLIP zero-shot (mean over frames), 6 frames"
    assert m.config.data.image_size == model.config.vision.image_size


def test_test_splits_are_read_unless_the_spec_names_one(actionclip_run):
    assert heads_cli.eval_spec("msrvtt:/d") == "msrvtt:/d?split=test"
    assert heads_cli.eval_spec("msvd:/d?split=val") == "msvd:/d?split=val"
    assert heads_cli.eval_spec("k400:/d") == "k400:/d?split=val"
    assert heads_cli.eval_spec("ucf101:/d?split=2") == "ucf101:/d?split=2&subset=test"
    assert heads_cli.eval_spec(" synthetic:16 ") == "synthetic:16"
    for checkpoint in (actionclip_run, actionclip_run / "checkpoints" / "1",
                       actionclip_run / weights.FINAL_FILE):
        assert heads_cli.trained_task(str(checkpoint)) == "actionclip"
