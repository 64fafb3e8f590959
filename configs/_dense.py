"""What the segmentation heads' configs share: the built-in images and `runlocal`."""

from clipjax.configs import _paper


def on_builtin_images(c, image_size: int = 64) -> None:
    """Train and evaluate on the built-in shapes with masks (256 held-out images)."""
    c.data.source = "synthetic"
    c.data.image_size = image_size
    c.data.max_shapes = 3  # shapes an image, 1..max_shapes
    c.data.shape_size = (0.11, 0.22)  # their half-extents, as fractions of the image
    c.eval.zeroshot = ""
    c.eval.segmentation = "synthetic"
    c.eval.num_examples = 256
    c.log_every_steps = 50


def runlocal(c, arg, name: str, shrink_model: bool = False) -> None:
    """arg "runlocal": the same code path at CPU size (16 images, 4 steps of the built-in
    data; a paper recipe's towers shrunk too). Anything else is refused."""
    if arg == "runlocal":
        if shrink_model:
            c.model_overrides = _paper._tiny(c.model)
            c.init_checkpoint, c.epochs, c.data.num_workers = "", 0, 0
            c.data.context_length = c.model_overrides.text.context_length
        c.data.image_size = 64
        c.global_batch, c.total_steps = 16, 4
        c.optimizer.warmup_steps, c.optimizer.warmup_fraction = 0, 0.0
        c.data.source = c.eval.segmentation = "synthetic"
        c.eval.num_examples = 16
        c.eval.every_steps, c.checkpoint.every_steps, c.log_every_steps = 4, 2, 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; {name} takes 'runlocal' or "
                         "nothing.")
