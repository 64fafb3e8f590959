"""The built wheel carries what an installed clipjax needs: the vocabulary, its license, the CLI."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path)], check=True, timeout=300,
                   cwd=tmp_path)
    (wheel,) = tmp_path.glob("clipjax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("clipjax/bpe_simple_vocab_16e6.txt.gz", "clipjax/LICENSE-clip-bpe",
                     "clipjax/models/clip.py", "clipjax/data/transforms.py",
                     "clipjax/evals/prompts.json", "clipjax/configs/default.py",
                     "clipjax/configs/clip_vit_b16.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "clipjax = clipjax.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert not any(n.startswith("tests/") for n in names)
