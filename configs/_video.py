"""What the video heads' configs share: the built-in clips and the `runlocal` shrink."""

from clipjax.configs import _paper


def on_builtin_clips(c) -> None:
    """Train and evaluate on the built-in moving-shapes clips (512 held out)."""
    c.data.source = "synthetic"
    c.eval.zeroshot = ""
    c.eval.video = "synthetic"
    c.eval.views = "1x1"
    c.eval.num_examples = 512
    c.eval.every_steps = c.checkpoint.every_steps = 400
    c.log_every_steps = 50


def runlocal(c, arg, name: str, shrink_model: bool = False) -> None:
    """arg "runlocal": the same code path at CPU size (4 frames, 16 clips, 4 steps of the
    built-in clips; a paper recipe's towers shrunk too). Anything else is refused."""
    if arg == "runlocal":
        if shrink_model:
            c.model_overrides = _paper._tiny(c.model)
            c.init_checkpoint, c.epochs, c.data.num_workers = "", 0, 0
            c.data.image_size = c.model_overrides.vision.image_size
            c.data.context_length = c.model_overrides.text.context_length
        c.head.frames = 4
        c.global_batch, c.total_steps = 16, 4
        c.optimizer.warmup_steps, c.optimizer.warmup_fraction = 1, 0.0
        c.data.source = c.eval.video = "synthetic"
        c.eval.num_examples = 32
        c.eval.every_steps, c.checkpoint.every_steps, c.log_every_steps = 4, 2, 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; {name} takes 'runlocal' or "
                         "nothing.")
