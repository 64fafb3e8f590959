"""Caption words for GroupViT's multi-label prompts, tagged offline.

GroupViT (datasets/builder.py, word_type "noun") keeps the words nltk tags NN, NNS, NNP
or any VB* form, draws up to `multi_label` of them without replacement, puts each in a
random ImageNet template and fills the remaining slots with the raw caption. Here
textblob's PatternTagger gives the Penn tags: a lexicon and rules shipped with the
package, so nothing is downloaded (nltk's tagger needs `nltk.download`). Its tags are not
guaranteed to equal nltk's averaged perceptron's on every caption.
"""

import functools
import threading
from collections.abc import Sequence

import numpy as np

NOUN_TAGS = ("NN", "NNS", "NNP")  # GroupViT leaves out NNPS
VERB_TAGS = ("VB", "VBD", "VBG", "VBN", "VBP", "VBZ")
GROUPVIT_TAGS = NOUN_TAGS + VERB_TAGS


_LOCK = threading.Lock()


@functools.cache
def _tagger():
    from textblob.en.taggers import PatternTagger

    tagger = PatternTagger()
    # Pattern loads its lexicon on first use; loaded by two threads at once, one sees it
    # half-built and tags every word it lacks as a noun ("a red circle" -> a, red, circle).
    tagger.tag("a warm up")
    return tagger


def tagged_words(caption: str, tags: Sequence[str] = GROUPVIT_TAGS) -> list[str]:
    """The words of `caption` whose Penn tag is in `tags`, in order, repeats kept."""
    if not caption.strip():
        return []
    with _LOCK:  # the grain read threads tag captions side by side
        tagged = _tagger().tag(caption)
    return [word for word, tag in tagged if tag in tags]


def nouns(caption: str, max_nouns: int = 3, rng: np.random.Generator | None = None,
          tags: Sequence[str] = GROUPVIT_TAGS) -> list[str]:
    """Up to `max_nouns` tagged words: drawn without replacement by `rng` (in drawn order,
    as GroupViT does even when there are few), or the first ones without it."""
    words = tagged_words(caption, tags)
    if rng is None:
        return words[:max_nouns]
    pick = rng.choice(len(words), min(max_nouns, len(words)), replace=False)
    return [words[i] for i in pick]


def multi_label_prompts(caption: str, k: int, rng: np.random.Generator,
                        templates: Sequence[str], tags: Sequence[str] = GROUPVIT_TAGS
                        ) -> list[str]:
    """GroupViT's k prompts of a caption: each drawn word in a random template, then the
    caption itself in the slots left over."""
    out = [templates[rng.integers(len(templates))].format(word)
           for word in nouns(caption, k, rng, tags)]
    return out + [caption] * (k - len(out))
