"""The demo world and its demonstrations: worlds that cannot be memorised, searches ranked as the service's BM25
ranks them, and demonstrations that are exactly what they say (expert paths are right, mistakes are wrong)."""

import collections
import random

import bm25s
from bm25s.tokenization import Tokenizer

from retrieval_service.bm25_index import STOPWORDS
from tspo_jax.data import demo, demonstrations
from tspo_jax.rewards import exact_match, first_occurrence_turn


def test_train_and_test_worlds_share_no_person_or_town_and_every_answer_is_in_its_documents():
    data = demo.make_demo_data(seed=0)
    train_world, test_world = data.worlds
    assert not set(train_world.people) & set(test_world.people)
    assert not set(train_world.towns) & set(test_world.towns)
    train_text = " ".join(row["question"] + " " + " ".join(row["path"]) for row in data.train)
    for row in data.test:  # no test question's entities appear in any training question or its path
        assert not set(row["path"]) & set(train_text.split()), row
    contents = [doc["contents"] for doc in data.corpus]
    for row in data.train + data.test:
        assert any(f" {row['golden_answers'][0]} river" in c for c in contents)
    assert {row["data_source"] for row in data.test} == {"demo_1hop", "demo_2hop", "demo_3hop"}
    assert demo.make_demo_data(seed=0) == data and demo.make_demo_data(seed=1) != data


def test_the_questions_chain_follows_the_documents():
    data = demo.make_demo_data(seed=2)
    train_world = data.worlds[0]
    by_title = collections.defaultdict(list)
    for title, text in train_world.documents():
        by_title[title].append(text)
    for row in data.train:
        path = row["path"]
        assert row["question"].endswith(f"{path[0]}?")
        for here, there in zip(path, path[1:]):  # each next entity is written in the current one's document
            assert any(f" {there}" in text for text in by_title[here])
        assert any(f"on the {row['golden_answers'][0]} river" in text for text in by_title[path[-1]])


def test_world_search_ranks_like_the_services_bm25_library():
    world = demo.draw_world(random.Random(3), demo.WorldConfig(towns=12, people=20, rivers=6),
                            people=demo.NAME_POOLS["person"], towns=demo.NAME_POOLS["town"],
                            rivers=demo.NAME_POOLS["river"])
    documents = world.documents()
    ours = demonstrations.WorldSearch(documents)
    tokenizer = Tokenizer(stopwords=STOPWORDS)
    ids = tokenizer.tokenize([f'"{t}"\n{x}' for t, x in documents], update_vocab=True, return_as="ids",
                             show_progress=False)
    peer = bm25s.BM25()
    peer.index(ids, show_progress=False)
    for query in list(world.people)[:8] + list(world.towns)[:8]:
        query_ids = tokenizer.tokenize([query], update_vocab=False, return_as="ids", show_progress=False)
        rows, scores = peer.retrieve(query_ids, k=len(documents), show_progress=False)
        expected = dict(zip(rows[0].tolist(), scores[0].tolist()))
        got = ours.scores(query)
        for row, score in expected.items():
            assert abs(got[row] - score) < 1e-4 * max(1.0, abs(score)), (query, row)


def test_no_name_keeps_its_facts_across_demonstrations_so_memorising_cannot_imitate_them():
    records = demonstrations.draw_demonstrations(400, seed=0)
    birthplaces = collections.defaultdict(set)
    for record in records:
        for turn in record["turns"]:
            for doc in turn.get("documents", []):
                if " was born in " in doc["text"]:
                    birthplaces[doc["title"]].add(doc["text"].split(" was born in ")[1].split()[0])
    repeated = [name for name, towns in birthplaces.items() if len(towns) > 1]
    assert len(repeated) > 20  # names recur, each time with other facts


def test_expert_demonstrations_answer_right_and_mistakes_mostly_wrong():
    mistakes = demonstrations.MistakeRates(no_search=0.2, early_stop=0.2, wrong_entity=0.2, wrong_copy=0.2)
    records = demonstrations.draw_demonstrations(
        600, seed=1, config=demonstrations.DemonstrationConfig(mistakes=(mistakes,) * 3))
    by_kind = collections.defaultdict(list)
    for record in records:
        answer = record["turns"][-1]["text"].split("<answer>")[1].split("</answer>")[0]
        by_kind[record["kind"]].append(exact_match(answer, record["golds"]))
    assert set(by_kind) >= {"expert", "no_search", "early_stop", "wrong_entity", "wrong_copy"}
    assert min(by_kind["expert"]) == 1.0
    for kind in ("no_search", "early_stop", "wrong_entity", "wrong_copy"):
        assert sum(by_kind[kind]) / len(by_kind[kind]) < 0.5, kind  # a lucky guess can still be right
    # an expert's last search shows the gold: FOLR fires on its last searching turn
    expert = next(r for r in records if r["kind"] == "expert" and r["hops"] == 3)
    observations = [" ".join(d["text"] for d in t.get("documents", [])) or None for t in expert["turns"]]
    assert first_occurrence_turn(observations, expert["golds"]) == len(expert["turns"]) - 2


def test_the_ideal_query_recall_is_the_share_of_chains_bm25_ranks_in_the_top_k():
    data = demo.make_demo_data(seed=0, train=demo.WorldConfig(namesake_share=1.0),
                               test=demo.WorldConfig(towns=30, people=50, namesake_share=1.0))
    at_1, at_3 = demonstrations.ideal_query_recall(data, 1), demonstrations.ideal_query_recall(data, 3)
    assert set(at_1) == {f"{split}/demo_{h}hop" for split in ("train", "test") for h in (1, 2, 3)}
    assert all(at_1[key] <= at_3[key] for key in at_1)
    # The peer: bm25s over the same corpus text, every chain entity searched by name.
    tokenizer = Tokenizer(stopwords=STOPWORDS)
    ids = tokenizer.tokenize([c["contents"] for c in data.corpus], update_vocab=True, return_as="ids",
                             show_progress=False)
    peer = bm25s.BM25()
    peer.index(ids, show_progress=False)
    titles = [c["contents"].split("\n", 1)[0].strip('"') for c in data.corpus]

    def top(entity, k):
        query = tokenizer.tokenize([entity], update_vocab=False, return_as="ids", show_progress=False)
        rows, _ = peer.retrieve(query, k=k, show_progress=False)
        return {titles[i] for i in rows[0].tolist()}

    for k, recall in ((1, at_1), (3, at_3)):
        rows = [r for r in data.train if r["data_source"] == "demo_2hop"]
        expected = sum(all(e in top(e, k) for e in r["path"]) for r in rows) / len(rows)
        assert recall["train/demo_2hop"] == expected
    assert at_1["train/demo_2hop"] < 1.0  # namesakes: a town's search can rank its namesake person first
