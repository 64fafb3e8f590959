"""`wds:` sources: WebDataset tars as img2dataset writes them, streamed shard by shard.

    wds:/data/laion/{00000..01023}.tar          key.jpg|jpeg|png|webp + key.txt (+ key.json)
    wds:gs://bucket/cc12m/{0000..2175}.tar      any fsspec URL; several patterns join with ::

Members are grouped by key in tar order; a group's image is the member whose suffix comes
first in sources.IMAGE_EXTENSIONS. A tar that breaks off mid-stream keeps the
samples before the break and ends with a `truncated_shard` skip.
"""

import posixpath
import re
import tarfile
from collections.abc import Iterator

from clipjax.data.sources import (IMAGE_EXTENSIONS, Record, Source, check_files_exist, open_file,
                                  skipped)


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces: `a{00..02}b{x,y}` -> a00bx a00by a01bx ... (zero padding kept)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise ValueError(f"Unbalanced braces in {pattern!r}: write e.g. "
                             "shards/{000..099}.tar.")
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo):
            raise ValueError(f"Empty range {{{body}}} in {pattern!r}: the first number must not "
                             "exceed the second.")
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"Cannot expand {{{body}}} in {pattern!r}: use {{first..last}} or "
                         "{a,b,c}.")
    return [expanded for item in items for expanded in expand_braces(head + item + tail)]


class WebDatasetSource(Source):
    """Tar shards of `key.ext` members, grouped by key, read in order."""

    kind = "wds"
    random_access = False

    def __init__(self, spec, location, options):
        super().__init__(spec, location, options)
        self.shards = [url for part in location.split("::") for url in expand_braces(part)]
        if not self.shards:
            raise ValueError(f"{spec!r} names no shards.")
        if len(set(self.shards)) != len(self.shards):
            raise ValueError(f"{spec!r} names some shards twice; each shard must appear once.")
        check_files_exist(self.shards, "WebDataset shards")

    def read_shard(self, url: str) -> Iterator[Record]:
        """The shard's samples in tar order; a broken tar ends with a skip record."""
        name = posixpath.basename(url)
        group: dict[str, bytes] = {}
        key = None
        opened = False
        try:
            with open_file(url) as f:
                opened = True
                tar = tarfile.open(fileobj=f, mode="r|*")
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = posixpath.split(member.name)
                    stem, dot, ext = base.partition(".")
                    if not dot or not stem:
                        continue  # not a `key.ext` member (e.g. a hidden file)
                    member_key = posixpath.join(directory, stem)
                    if member_key != key:
                        if key is not None:
                            yield self._record(f"{name}/{key}", group)
                        key, group = member_key, {}
                    group[ext.lower()] = tar.extractfile(member).read()
        except GeneratorExit:  # closed early (at exit, tarfile may already be torn down)
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if group:  # the members read before the break
                yield self._record(f"{name}/{key}", group)
            reason = "truncated_shard" if opened else "unreadable_file"
            yield skipped(name, reason, f"{type(e).__name__}: {e}")
            return
        if key is not None:
            yield self._record(f"{name}/{key}", group)

    @staticmethod
    def _record(key: str, group: dict[str, bytes]) -> Record:
        image = next((group[e] for e in IMAGE_EXTENSIONS if e in group), None)
        return {"key": key, "image": image, "text": group.get("txt"), "label": None}
