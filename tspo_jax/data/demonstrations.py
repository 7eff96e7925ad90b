"""Demonstrated trajectories for the demo world (host side): the SFT warm start's data.

Each demonstration is drawn in a fresh small world (`tspo_jax.data.demo.draw_world` over all the name pools):
names drawn anew with random facts. No name keeps its facts from one demonstration to the next, so the only way
to imitate them is to read the documents that the searches return; memorising entities is useless (and no fact
of the demo world's train or test split is ever shown). Searches are
answered by BM25 over that small world's documents (the same bm25s library and stopwords as the retrieval
service's BM25 backend), so demonstrations see the near-duplicate names and ranking mistakes a real index makes.

A demonstration follows the expert path (search the subject, read its document, search the next entity, …,
answer the river) or makes one realistic mistake (`MistakeRates`):

    no_search     answers at once with a guessed river
    early_stop    answers one hop too early (2- and 3-hop), with a river guessed from what it has read
    wrong_entity  confuses the relations of a person's document: follows the teacher instead of the birthplace
                  (2-hop) or the birthplace instead of the teacher (3-hop)
    wrong_copy    copies the fact from another document of the same results

Each line of the written JSONL is one trajectory in the SFT format (tspo_jax.data.trajectories):

    {"id", "question", "golds", "data_source", "kind",
     "turns": [{"text": "<think> … </think>\\n<search> q </search>", "documents": [{"title", "text"}, …]},
               …, {"text": "<think> … </think>\\n<answer> a </answer>"}]}

    python -m tspo_jax.data.demonstrations --out runs/sft_demo/demonstrations.jsonl --count 20000 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import pathlib
import random
import re

from retrieval_service.corpus import split_contents
from tspo_jax.data import demo

KINDS = ("expert", "no_search", "early_stop", "wrong_entity", "wrong_copy")


@dataclasses.dataclass(frozen=True)
class MistakeRates:
    """Probability of each mistake in a demonstration (the rest are expert); a mistake that cannot happen in a
    question (early_stop on a 1-hop one, a confusable name that was not shown) falls back to the expert path."""

    no_search: float = 0.0
    early_stop: float = 0.0
    wrong_entity: float = 0.0
    wrong_copy: float = 0.0

    def __post_init__(self):
        total = self.no_search + self.early_stop + self.wrong_entity + self.wrong_copy
        if min(self.no_search, self.early_stop, self.wrong_entity, self.wrong_copy) < 0 or total > 1:
            raise ValueError(f"MistakeRates must be non-negative and sum to <= 1, got {self}")

    def draw(self, rng: random.Random) -> str:
        u = rng.random()
        for kind in KINDS[1:]:
            u -= getattr(self, kind)
            if u < 0:
                return kind
        return "expert"


@dataclasses.dataclass(frozen=True)
class DemonstrationConfig:
    """world: the size and difficulty of each demonstration's fresh world.
    mistakes: MistakeRates for 1-, 2- and 3-hop questions (a demonstrator may, say, give up on long chains
      more often than on short ones).
    top_k: documents per search (RetrievalSpec.top_k of the runs it prepares)."""

    world: demo.WorldConfig = demo.WorldConfig(towns=10, people=16, rivers=8)
    mistakes: tuple[MistakeRates, MistakeRates, MistakeRates] = (MistakeRates(),) * 3
    top_k: int = 3

    def __post_init__(self):
        object.__setattr__(self, "mistakes", tuple(self.mistakes))
        if len(self.mistakes) != 3 or not all(isinstance(m, MistakeRates) for m in self.mistakes):
            raise ValueError("DemonstrationConfig.mistakes must be three MistakeRates (for 1-, 2- and 3-hop "
                             f"questions), got {self.mistakes!r}")
        if self.top_k < 1:
            raise ValueError(f"DemonstrationConfig.top_k must be >= 1, got {self.top_k}")


# ----- retrieval in a small world ---------------------------------------------------------------------------------
class WorldSearch:
    """BM25 as Lucene scores it (idf ln(1 + (N - df + 0.5) / (df + 0.5)), tf / (tf + k1·(1 - b + b·dl/avgdl)),
    k1 = 1.5, b = 0.75) over one world's documents, each indexed as its corpus
    `contents` ('"Title"\ntext') and tokenized as bm25s tokenizes for the retrieval service (lower case,
    words of 2+ characters, English stopwords removed): the ranking the service's BM25 backend gives, computed
    in-process because every demonstration has its own small world. tests/test_demonstrations.py checks it
    against bm25s itself."""

    K1, B = 1.5, 0.75

    def __init__(self, documents: list[tuple[str, str]]):
        from bm25s.stopwords import STOPWORDS_EN

        self.documents = documents
        self._stopwords = frozenset(STOPWORDS_EN)
        self._terms = [collections.Counter(self._tokens(f'"{t}"\n{x}')) for t, x in documents]
        self._lengths = [sum(c.values()) for c in self._terms]
        self._average = sum(self._lengths) / max(len(self._lengths), 1)
        df = collections.Counter(term for counts in self._terms for term in counts)
        n = len(documents)
        self._idf = {term: math.log(1 + (n - d + 0.5) / (d + 0.5)) for term, d in df.items()}

    def _tokens(self, text: str) -> list[str]:
        return [w for w in _WORD.findall(text.lower()) if w not in self._stopwords]

    def scores(self, query: str) -> list[float]:
        terms = [t for t in self._tokens(query) if t in self._idf]
        out = []
        for counts, length in zip(self._terms, self._lengths):
            norm = self.K1 * (1 - self.B + self.B * length / self._average)
            out.append(sum(self._idf[t] * counts[t] / (counts[t] + norm) for t in terms if t in counts))
        return out

    def search(self, query: str, k: int) -> list[tuple[str, str]]:
        """The top-k documents; ties keep corpus order."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.documents[i] for i in order[:k]]


_WORD = re.compile(r"(?u)\b\w\w+\b")


# ----- turn texts -------------------------------------------------------------------------------------------------
def search_turn(thought: str, query: str) -> str:
    return f"<think> {thought} </think>\n<search> {query} </search>"


def answer_turn(thought: str, answer: str) -> str:
    return f"<think> {thought} </think>\n<answer> {answer} </answer>"


_BORN = re.compile(r"born in (\w+) and")
_TAUGHT = re.compile(r"taught by (\w+)\.")
_RIVER = re.compile(r"on the (\w+) river,")
_RELATIONS = {1: (_RIVER,), 2: (_BORN, _RIVER), 3: (_TAUGHT, _BORN, _RIVER)}


def _read(documents: list[tuple[str, str]], title: str, relation: re.Pattern) -> str | None:
    """The value `relation` states in the shown document titled `title` (None if it was not shown)."""
    for doc_title, text in documents:
        if doc_title == title and (match := relation.search(text)):
            return match.group(1)
    return None


def _fact(title: str, relation: re.Pattern, value: str) -> str:
    """The sentence the expert writes in its thought after reading `value` in the document of `title`."""
    if relation is _TAUGHT:
        return f"{title} was taught by {value}."
    if relation is _BORN:
        return f"{title} was born in {value}."
    return f"{title} is on the {value} river."


def demonstrate(rng: random.Random, world: demo.World, question: demo.Question, kind: str, *, top_k: int,
                search: WorldSearch | None = None) -> dict | None:
    """One trajectory of `kind` for `question` in `world`; None when that mistake cannot happen here.

    The expert searches each entity of the question's path, reads the next one from its document (writing the
    sentence it read as its thought) and answers the river. A mistake happens at one step, and the rest of the
    trajectory follows it consistently. When the searched document is not among the results, the expert
    guesses (kind "expert_missed")."""
    search = search or WorldSearch(world.documents())
    rivers = sorted(world.rivers)
    relations = _RELATIONS[question.hops]
    turns: list[dict] = []

    def guess(kind_: str, thought: str = "") -> dict:
        river = rng.choice(rivers)
        turns.append({"text": answer_turn(f"{thought} I think it is the {river} river.".strip(), river)})
        return _record(question, kind_, turns)

    if kind == "no_search":
        return guess(kind)
    if kind == "early_stop" and len(relations) == 1:
        return None
    stop = len(relations) - 1 if kind == "early_stop" else len(relations)
    if kind == "wrong_entity":
        wrong = rng.randrange(stop - 1) if stop > 1 else -1  # a person's document (every step but the last)
        if wrong < 0:
            return None
    else:
        wrong = rng.randrange(stop) if kind == "wrong_copy" else -1
    entity, thought = question.subject, f"I search {question.subject}."
    for step in range(stop):
        docs = search.search(entity, top_k)
        turns.append({"text": search_turn(thought, entity),
                      "documents": [{"title": t, "text": x} for t, x in docs]})
        source = entity
        if step == wrong and kind == "wrong_copy":  # read the fact from another shown document
            others = [t for t, _ in docs if t != entity and _read(docs, t, relations[step])]
            if not others:
                return None
            source = rng.choice(others)
        relation = relations[step]
        if step == wrong and kind == "wrong_entity":  # the other relation of a person's document
            if relation is _RIVER:
                return None
            relation = _BORN if relation is _TAUGHT else _TAUGHT
        value = _read(docs, source, relation)
        if value is None:
            return guess("expert_missed" if kind == "expert" else kind)
        fact = _fact(source, relation, value)
        if relations[step] is _RIVER:
            turns.append({"text": answer_turn(fact, value)})
            return _record(question, kind, turns)
        entity, thought = value, fact
    # early stop: a river named in what was read, else a guess
    shown = [m.group(1) for turn in turns for d in turn["documents"] if (m := _RIVER.search(d["text"]))]
    river = rng.choice(shown) if shown else rng.choice(rivers)
    turns.append({"text": answer_turn(f"{thought} I think it is the {river} river.", river)})
    return _record(question, kind, turns)


def _record(question: demo.Question, kind: str, turns: list[dict]) -> dict:
    return {"question": question.text, "golds": question.golds, "data_source": demo.SOURCES[question.hops],
            "kind": kind, "hops": question.hops, "turns": turns}


def draw_demonstrations(count: int, *, seed: int, config: DemonstrationConfig = DemonstrationConfig()
                        ) -> list[dict]:
    """`count` demonstrations, each in its own fresh world with random facts over all the name pools."""
    pools = demo.NAME_POOLS
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < count:
        world = demo.draw_world(rng, config.world, people=pools["person"], towns=pools["town"],
                                rivers=pools["river"])
        questions = demo.draw_questions(rng, world, config.world)
        search = WorldSearch(world.documents())
        for question in questions[:4]:  # a few per world, so worlds stay fresh
            kind = config.mistakes[question.hops - 1].draw(rng)
            record = demonstrate(rng, world, question, kind, top_k=config.top_k, search=search)
            if record is None:
                record = demonstrate(rng, world, question, "expert", top_k=config.top_k, search=search)
            if record is None:
                continue
            record["id"] = f"demo-sft-{seed}-{len(out)}"
            out.append(record)
            if len(out) == count:
                break
    return out


def ideal_query_recall(data: demo.DemoData, k: int) -> dict[str, float]:
    """The retrieval ceiling of a demo world: per "<split>/<data_source>", the share of questions whose every
    chain document (the subject's, each bridge entity's, the town's) is in the top `k` (BM25 over the whole
    corpus, as the service ranks it) when searched by its own name, the expert's query. A reader that searches
    perfectly can answer at most this share."""
    documents = [split_contents(c["contents"]) for c in data.corpus]
    search = WorldSearch(documents)
    hits: dict[str, list[bool]] = {}
    for split, rows in (("train", data.train), ("test", data.test)):
        for row in rows:
            found = all(entity in [title for title, _ in search.search(entity, k)] for entity in row["path"])
            hits.setdefault(f"{split}/{row['data_source']}", []).append(found)
    return {key: sum(found) / len(found) for key, found in sorted(hits.items())}


def write_demonstrations(path: str | pathlib.Path, count: int, *, seed: int,
                         config: DemonstrationConfig = DemonstrationConfig()) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for record in draw_demonstrations(count, seed=seed, config=config):
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_demonstrations(args.out, args.count, seed=args.seed))


if __name__ == "__main__":
    main()
