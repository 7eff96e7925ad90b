"""The bundled demo world: an invented world of people, towns and rivers written as a Search-R1 corpus, with
1-, 2- and 3-hop questions about it. Host-side only, deterministic in its seed.

Every fact lives in exactly one document, so answering means searching and reading:

    "Kalmor"       Kalmor was born in Brisdun and taught by Tovel.
    "Brisdun"      Brisdun is a town on the Vesk river, known for clocks.
    "Vesk river"   The Vesk river flows into the Amber Sea.

    demo_1hop  Which river flows through Brisdun?                                  -> Vesk
    demo_2hop  Which river flows through the birthplace of Kalmor?                 -> Vesk
    demo_3hop  Which river flows through the birthplace of the teacher of Kalmor? -> (Tovel's town's river)

Entity names are invented words from fixed pools (`NAME_POOLS`: people, towns, rivers), one token each in the
demo tokenizer (`vocabulary_texts`), so reading means copying a name from the right document. The pools are
fixed, not drawn from the seed; worlds differ in which names exist and how they relate. The train and test
worlds use disjoint person and town names (`split_pools`), and their facts are drawn independently, so no test
question is about an entity or relation that any training question mentions: a gain on the test split comes
from searching and reading, never from memorising. (SFT demonstrations, tspo_jax.data.demonstrations, draw
fresh worlds over all the pools with random facts, so every name's token is trained without any fact sticking
to it.)

Difficulty knobs (`WorldConfig`): the mix of hops; namesakes (a person who bears a town's name, so a search
for the town also surfaces the person, and one for the person the town); and the number of people per town
(documents that mention a town, ranked by BM25 right after it).

    python -m tspo_jax.data.demo --out runs/demo_data [--format jsonl] [--seed 0]

writes corpus.jsonl (`{"id", "contents": "\\"Title\\"\\ntext"}`), train.parquet and test.parquet (Search-R1
rows, with `question` and `golden_answers` columns too) or, with `--format jsonl`, train.jsonl and test.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
from collections.abc import Sequence

# ----- the fixed vocabulary ---------------------------------------------------------------------------------------
_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "l", "n", "r", "s", "sk", "th", "m", "nd", "rk", "v")


def _pool_words(count: int, seed: int, taken: set[str]) -> tuple[str, ...]:
    """`count` pronounceable two-syllable words (distinct from `taken`, which they join)."""
    rng = random.Random(seed)
    words = []
    while len(words) < count:
        word = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_ONSETS)
                + rng.choice(_VOWELS) + rng.choice(("", "n", "r", "l", "s"))).capitalize()
        if word not in taken and 4 <= len(word) <= 8:
            taken.add(word)
            words.append(word)
    return tuple(words)


def _name_pools() -> dict[str, tuple[str, ...]]:
    taken: set[str] = set()
    return {"person": _pool_words(200, 1, taken), "town": _pool_words(120, 3, taken),
            "river": _pool_words(48, 4, taken)}


NAME_POOLS = _name_pools()
SEAS = ("Amber Sea", "Grey Sea", "Silver Gulf", "Cold Strait", "Lantern Bay", "Northern Ocean")
CRAFTS = ("clocks", "glassware", "pottery", "violins", "boats", "lanterns", "cheese", "salt")

# The instruction of the Search-R1 parquet rows (DataSpec.use_dataset_prompt); the rollout's own template
# (RolloutSpec.prompt_template) is what the main job prompts with.
INSTRUCTION = (
    "Answer the question. Think inside <think> and </think>. To search, write <search> query </search>; results "
    "come back inside <information> and </information>. Answer inside <answer> and </answer>.\n"
)

SOURCES = {1: "demo_1hop", 2: "demo_2hop", 3: "demo_3hop"}


# ----- a world ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """How a demo world is drawn.

    towns / people / rivers: entity counts (people per town sets how many documents mention a town).
    hop_weights: relative shares of 1-, 2- and 3-hop questions.
    namesake_share: the share of towns whose name a person also bears (when the person pool allows).
    questions_per_entity: questions per town (1-hop) and per person (2-, 3-hop), scaled by the hop mix.
    """

    towns: int = 60
    people: int = 120
    rivers: int = 24
    hop_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    namesake_share: float = 0.25
    questions_per_entity: float = 1.0

    def __post_init__(self):
        for name in ("towns", "people", "rivers"):
            if getattr(self, name) < 2:
                raise ValueError(f"WorldConfig.{name} must be >= 2, got {getattr(self, name)}")
        if len(self.hop_weights) != 3 or min(self.hop_weights) < 0 or sum(self.hop_weights) <= 0:
            raise ValueError(f"WorldConfig.hop_weights must be 3 non-negative weights, got {self.hop_weights}")
        if not 0.0 <= self.namesake_share <= 1.0:
            raise ValueError(f"WorldConfig.namesake_share must be in [0, 1], got {self.namesake_share}")


@dataclasses.dataclass(frozen=True)
class Town:
    name: str
    river: str
    craft: str


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    birthplace: str  # a Town name
    teacher: str  # a Person name


@dataclasses.dataclass(frozen=True)
class World:
    """Entities by name (insertion order is the generation order)."""

    towns: dict[str, Town]
    people: dict[str, Person]
    rivers: dict[str, str]  # river word -> the sea it flows into

    def documents(self) -> list[tuple[str, str]]:
        """(title, text) of every entity, in a fixed order."""
        docs = [(f"{river} river", f"The {river} river flows into the {sea}.") for river, sea in self.rivers.items()]
        docs += [(t.name, f"{t.name} is a town on the {t.river} river, known for {t.craft}.")
                 for t in self.towns.values()]
        docs += [(p.name, f"{p.name} was born in {p.birthplace} and taught by {p.teacher}.")
                 for p in self.people.values()]
        return docs

    def chain(self, person: str, hops: int) -> list[str]:
        """The entities a `hops`-hop question about `person` visits, last one a town (hops >= 2)."""
        if hops == 3:
            teacher = self.people[person].teacher
            return [person, teacher, self.people[teacher].birthplace]
        return [person, self.people[person].birthplace]


def question_text(hops: int, subject: str) -> str:
    if hops == 1:
        return f"Which river flows through {subject}?"
    if hops == 2:
        return f"Which river flows through the birthplace of {subject}?"
    return f"Which river flows through the birthplace of the teacher of {subject}?"


@dataclasses.dataclass(frozen=True)
class Question:
    """hops: 1 (subject a town), 2 or 3 (subject a person). path: the entities an expert searches, in order.
    answer: the river word; golds also accept "<word> river"."""

    hops: int
    subject: str
    path: tuple[str, ...]
    answer: str

    @property
    def text(self) -> str:
        return question_text(self.hops, self.subject)

    @property
    def golds(self) -> list[str]:
        return [self.answer, f"{self.answer} river"]


def draw_world(rng: random.Random, config: WorldConfig, *, people: Sequence[str], towns: Sequence[str],
               rivers: Sequence[str]) -> World:
    """A world over the given name pools (each at least as large as the counts asked for)."""
    for role, pool, count in (("people", people, config.people), ("towns", towns, config.towns),
                              ("rivers", rivers, config.rivers)):
        if len(pool) < count:
            raise ValueError(f"WorldConfig.{role}={count} but the name pool has only {len(pool)} names")
    river_names = rng.sample(list(rivers), config.rivers)
    town_names = rng.sample(list(towns), config.towns)
    namesakes = [t for t in town_names if rng.random() < config.namesake_share][: config.people // 4]
    others = rng.sample([p for p in people if p not in namesakes], config.people - len(namesakes))
    people_names = namesakes + others
    rng.shuffle(people_names)
    town_of = {t: Town(t, rng.choice(river_names), rng.choice(CRAFTS)) for t in town_names}
    people_of = {}
    for name in people_names:
        teacher = people_names[rng.randrange(len(people_names) - 1)]
        teacher = teacher if teacher != name else people_names[-1]
        people_of[name] = Person(name, rng.choice(town_names), teacher)
    return World(towns=town_of, people=people_of, rivers={r: rng.choice(SEAS) for r in river_names})


def draw_questions(rng: random.Random, world: World, config: WorldConfig) -> list[Question]:
    """Questions about the world's towns (1-hop) and people (2-, 3-hop), in the configured hop mix."""
    weights = config.hop_weights
    questions = []
    for hops in (1, 2, 3):
        if not weights[hops - 1]:
            continue
        subjects = list(world.towns) if hops == 1 else list(world.people)
        share = weights[hops - 1] / max(weights)
        count = max(1, round(len(subjects) * share * config.questions_per_entity))
        for subject in rng.sample(subjects, min(count, len(subjects))):
            if hops == 1:
                questions.append(Question(1, subject, (subject,), world.towns[subject].river))
            else:
                path = tuple(world.chain(subject, hops))
                questions.append(Question(hops, subject, path, world.towns[path[-1]].river))
    rng.shuffle(questions)
    return questions


# ----- the train / test split -------------------------------------------------------------------------------------
def split_pools(test_share: float = 0.25) -> tuple[dict, dict]:
    """Name pools of the train and test worlds: disjoint people and towns (rivers shared)."""
    train, test = {}, {}
    for role in ("person", "town"):
        words = NAME_POOLS[role]
        n = max(2, round(len(words) * test_share))
        train[role], test[role] = words[n:], words[:n]
    train["river"] = test["river"] = NAME_POOLS["river"]
    return train, test


@dataclasses.dataclass(frozen=True)
class DemoData:
    corpus: list[dict]  # {"id", "contents"}
    train: list[dict]  # {"id", "question", "golden_answers", "data_source", "hops", "path"}
    test: list[dict]
    worlds: tuple[World, World]  # (train, test)


def _rows(questions: list[Question], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "question": q.text, "golden_answers": q.golds, "data_source": SOURCES[q.hops],
             "hops": q.hops, "path": list(q.path)} for i, q in enumerate(questions)]


def make_demo_data(*, seed: int = 0, train: WorldConfig = WorldConfig(),
                   test: WorldConfig = WorldConfig(towns=30, people=50)) -> DemoData:
    """The train and test worlds, their questions and one corpus holding both (same arguments, same bytes)."""
    rng = random.Random(seed)
    train_pools, test_pools = split_pools()
    worlds = []
    for config, pools in ((train, train_pools), (test, test_pools)):
        worlds.append(draw_world(rng, config, people=pools["person"], towns=pools["town"], rivers=pools["river"]))
    train_world, test_world = worlds
    # Both worlds' rivers are described once; a river shared by both keeps the train world's sea.
    test_world = dataclasses.replace(test_world, rivers={r: s for r, s in test_world.rivers.items()
                                                         if r not in train_world.rivers})
    documents = train_world.documents() + test_world.documents()
    rng.shuffle(documents)
    corpus = [{"id": str(i), "contents": f'"{title}"\n{text}'} for i, (title, text) in enumerate(documents)]
    train_rows = _rows(draw_questions(rng, train_world, train), "train")
    test_rows = _rows(draw_questions(rng, test_world, test), "test")
    return DemoData(corpus=corpus, train=train_rows, test=test_rows, worlds=(train_world, test_world))


@dataclasses.dataclass(frozen=True)
class _Shown:
    """A document as an observation shows it (title, text)."""

    title: str
    text: str


def vocabulary_texts() -> list[str]:
    """Every word any demo world, question, demonstration or agent text can contain (for the demo tokenizer)."""
    from tspo_jax.data import demonstrations
    from tspo_jax.rollout import prompts

    words = [w for pool in NAME_POOLS.values() for w in pool] + list(CRAFTS)
    words += [w for sea in SEAS for w in sea.split()]
    world = draw_world(random.Random(0), WorldConfig(towns=8, people=8, rivers=4), people=NAME_POOLS["person"],
                       towns=NAME_POOLS["town"], rivers=NAME_POOLS["river"])
    sentences = [f'"{title}"\n{text}' for title, text in world.documents()]
    sentences += [prompts.format_documents([_Shown(title, text)]) for title, text in world.documents()]
    sentences += [question_text(h, "Kalmor") for h in (1, 2, 3)]
    sentences += [INSTRUCTION, prompts.PROMPT_TEMPLATE, prompts.INVALID_ACTION_TEXT, prompts.SEARCH_FAILED_TEXT,
                  prompts.FINAL_TURN_TEXT, prompts.OBSERVATION_OPEN + prompts.format_documents([_Shown("x", "y")] * 2)
                  + prompts.OBSERVATION_CLOSE, "<think> </think>\n<search> </search>\n<answer> </answer>",
                  "<|im_start|>user\n", "<|im_start|>assistant\n", "Question: Which river"]
    guesses = demonstrations.DemonstrationConfig(mistakes=(demonstrations.MistakeRates(no_search=0.5),) * 3)
    sentences += [turn["text"] for d in demonstrations.draw_demonstrations(20, seed=0, config=guesses)
                  for turn in d["turns"]]
    # Each word with a space before it (inside sentences) and inside quotes (a title: `(Title: "Kalmor")`).
    return sentences + [" " + " ".join(words), " " + " ".join(f'"{w}"' for w in words)]


# ----- files ------------------------------------------------------------------------------------------------------
def _search_r1_table(rows: list[dict], split: str):
    import pyarrow as pa

    return pa.Table.from_pylist([
        {
            "id": row["id"],
            "question": row["question"],
            "golden_answers": row["golden_answers"],
            "data_source": row["data_source"],
            "prompt": [{"role": "user", "content": INSTRUCTION + f"Question: {row['question']}\n"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": row["golden_answers"]}},
            "extra_info": {"split": split, "index": index, "hops": row["hops"], "path": row["path"]},
        }
        for index, row in enumerate(rows)
    ])


def write_demo_data(out_dir: str | pathlib.Path, *, fmt: str = "parquet", seed: int = 0, **configs
                    ) -> dict[str, pathlib.Path]:
    """Writes corpus.jsonl and the train/test splits; returns their paths by role."""
    import pyarrow.parquet as pq

    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"format must be 'parquet' or 'jsonl', got {fmt!r}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = make_demo_data(seed=seed, **configs)
    paths = {"corpus": out / "corpus.jsonl"}
    with open(paths["corpus"], "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in data.corpus)
    for split, rows in (("train", data.train), ("test", data.test)):
        paths[split] = out / f"{split}.{fmt}"
        if fmt == "parquet":
            pq.write_table(_search_r1_table(rows, split), paths[split])
        else:
            with open(paths[split], "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recall", type=int, metavar="K", help="also print the ideal query's recall@K per source")
    args = parser.parse_args(argv)
    paths = write_demo_data(args.out, fmt=args.format, seed=args.seed)
    for role, path in paths.items():
        print(f"{role}: {path}")
    if args.recall:
        from tspo_jax.data.demonstrations import ideal_query_recall

        for source, recall in ideal_query_recall(make_demo_data(seed=args.seed), args.recall).items():
            print(f"ideal-query recall@{args.recall} {source}: {recall:.3f}")


if __name__ == "__main__":
    main()
