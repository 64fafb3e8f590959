"""Conversion parity at full size: OpenCLIP's torch model (random init, fixed seed) vs clipjax.

Prints the max abs difference of image and text embeddings per architecture (fp32, CPU).
Run: python benchmarks/parity.py [ARCH ...]   (default: ViT-B-32 RN50 ViT-B-16-quickgelu)
"""

import os
import sys
import time

# A CPU comparison; with libtpu installed (test extra) JAX would first try, noisily, a TPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import clipjax  # noqa: E402
import reference  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def parity(arch: str, batch: int = 2) -> tuple[float, float, float]:
    oc = reference.open_clip()
    base = arch.removesuffix("-quickgelu")
    torch.manual_seed(0)
    cfg = oc.factory.get_model_config(base)
    tm = oc.model.CLIP(**cfg, quick_gelu=arch.endswith("-quickgelu")).eval()
    for m in tm.modules():  # non-trivial BatchNorm statistics, so BN is really compared
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    params = clipjax.convert.from_torch(tm.state_dict(), base)
    model = clipjax.create_model(arch)
    size, ctx = model.config.vision.image_size, model.config.text.context_length
    rng = np.random.default_rng(0)
    img = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    tok = clipjax.tokenize(["a photo of a cat", "a diagram of a transformer on a whiteboard"][:batch],
                           ctx)
    with torch.no_grad():
        ti = tm.encode_image(torch.from_numpy(img).permute(0, 3, 1, 2)).numpy()
        tt = tm.encode_text(torch.from_numpy(tok).long()).numpy()
    ji = np.asarray(model.apply({"params": params}, img, method="encode_image"))
    jt = np.asarray(model.apply({"params": params}, tok, method="encode_text"))
    return float(np.abs(ti - ji).max()), float(np.abs(tt - jt).max()), float(np.abs(ti).max())


def main(archs: list[str]) -> None:
    print(f"{'arch':<22}{'image max|diff|':>16}{'text max|diff|':>16}{'max|image emb|':>16}{'s':>6}")
    for arch in archs:
        t = time.time()
        di, dt, scale = parity(arch)
        print(f"{arch:<22}{di:>16.2e}{dt:>16.2e}{scale:>16.3f}{time.time() - t:>6.0f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["ViT-B-32", "RN50", "ViT-B-16-quickgelu"])
