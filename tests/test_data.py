"""Data: Search-R1 parquet and JSONL sources, unique group ids, seeded shuffling, process sharding, a
checkpointable iterator, clear errors for bad files, and the demo world."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo_jax.data import QADataError, eval_batches, open_qa_source, open_sources, training_batches
from tspo_jax.data.demo import make_demo_data, write_demo_data


def _search_r1_parquet(path, questions, data_source="nq"):
    rows = [
        {
            "data_source": data_source,
            "prompt": [{"role": "user", "content": f"Some instruction text.\nQuestion: {q}\n"}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": [f"answer {i}", f"alias {i}"]}},
            "extra_info": {"split": "train", "index": i},  # restarts at 0 in every dataset, like Search-R1's
        }
        for i, q in enumerate(questions)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_search_r1_parquet_rows_load_with_question_golds_and_source(tmp_path):
    path = _search_r1_parquet(tmp_path / "nq" / "train.parquet", ["who wrote x?", "where is y?"])
    source = open_qa_source(path)
    example = source[1]
    assert len(source) == 2
    assert example.question == "where is y?"  # taken from after "Question:" when there is no question column
    assert example.golds == ("answer 1", "alias 1")
    assert example.data_source == "nq"
    assert example.source_id == "1"
    assert example.prompt_messages[0][0] == "user" and "Question: where is y?" in example.prompt_messages[0][1]


def test_plain_jsonl_rows_load_and_numbers_as_answers_become_text(tmp_path):
    path = _jsonl(tmp_path / "qa.jsonl", [
        {"question": "q one?", "golden_answers": ["a"], "id": "x7", "data_source": "mine"},
        "",
        {"question": "q two?", "golden_answers": 1990},
    ])
    source = open_qa_source(path)
    assert len(source) == 2
    assert source[0].source_id == "x7" and source[0].data_source == "mine"
    assert source[1].golds == ("1990",) and source[1].data_source == "qa"


def test_group_ids_are_unique_across_datasets_whose_own_indices_collide(tmp_path):
    nq = _search_r1_parquet(tmp_path / "nq" / "train.parquet", ["a?", "b?", "c?"], "nq")
    hotpot = _search_r1_parquet(tmp_path / "hotpotqa" / "train.parquet", ["d?", "e?"], "hotpotqa")
    sources = open_sources([nq, hotpot])
    examples = [e for batch in eval_batches(sources, batch_size=2) for e in batch]
    assert [e.source_id for e in examples] == ["0", "1", "2", "0", "1"]
    assert len({e.uid for e in examples}) == 5


def test_two_files_that_would_share_group_ids_are_refused(tmp_path):
    a = _search_r1_parquet(tmp_path / "x" / "train.parquet", ["a?"])
    b = _jsonl(tmp_path / "x" / "train.jsonl", [{"question": "b?", "golden_answers": ["b"]}])
    with pytest.raises(QADataError, match=r"x/train"):
        open_sources([a, b])


def test_a_corrupt_jsonl_line_fails_naming_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [
        {"question": "fine?", "golden_answers": ["a"]},
        '{"question": "cut short", "golden_ans',
    ])
    with pytest.raises(QADataError, match=re.escape(f"{path}, line 2")):
        open_qa_source(path)


def test_a_jsonl_row_without_answers_fails_naming_the_field(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [{"question": "q?"}])
    with pytest.raises(QADataError, match=r"line 1: missing 'golden_answers'"):
        open_qa_source(path)


def test_a_parquet_row_with_empty_targets_fails_naming_the_row(tmp_path):
    path = _search_r1_parquet(tmp_path / "nq" / "train.parquet", ["a?", "b?"])
    table = pq.read_table(path).to_pylist()
    table[1]["reward_model"]["ground_truth"]["target"] = []
    pq.write_table(pa.Table.from_pylist(table), path)
    with pytest.raises(QADataError, match=re.escape(f"{path}, row 1")):
        open_qa_source(path)


def test_a_missing_data_file_fails_naming_it(tmp_path):
    with pytest.raises(QADataError, match=re.escape(str(tmp_path / "nowhere" / "train.parquet"))):
        open_sources([tmp_path / "nowhere" / "train.parquet"])


def test_a_file_that_is_not_parquet_fails_naming_it(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(QADataError, match=re.escape(str(path))):
        open_qa_source(path)


@pytest.fixture(scope="module")
def twenty_prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("twenty")
    path = _jsonl(root / "qa.jsonl", [{"question": f"q{i}?", "golden_answers": [f"a{i}"]} for i in range(20)])
    return open_sources([path])


def _uids(iterator, steps):
    return [[e.uid for e in next(iterator)] for _ in range(steps)]


def test_shuffling_is_fixed_by_the_seed_and_each_epoch_covers_every_prompt(twenty_prompts):
    first = _uids(training_batches(twenty_prompts, prompts_per_step=4, seed=7), 10)
    again = _uids(training_batches(twenty_prompts, prompts_per_step=4, seed=7), 10)
    other = _uids(training_batches(twenty_prompts, prompts_per_step=4, seed=8), 10)
    assert first == again and first != other
    epoch_one = sum(first[:5], [])
    epoch_two = sum(first[5:], [])
    assert sorted(epoch_one) == sorted(epoch_two) == sorted(f"twenty0/qa:{i}" for i in range(20))
    assert epoch_one != epoch_two  # reshuffled each epoch


def test_processes_split_each_global_batch_into_disjoint_slices_whatever_the_process_count(twenty_prompts):
    single = _uids(training_batches(twenty_prompts, prompts_per_step=8, seed=0), 5)
    slices = [_uids(training_batches(twenty_prompts, prompts_per_step=8, seed=0, process_index=process,
                                     process_count=4), 5) for process in range(4)]
    for step, batch in enumerate(single):
        parts = [slices[process][step] for process in range(4)]
        assert [len(p) for p in parts] == [2, 2, 2, 2]
        assert sum(parts, []) == batch  # the same prompts, in the same order, as one process would draw
        assert len(set(batch)) == 8  # no prompt twice in a step, even across an epoch boundary


def test_a_prompt_drawn_twice_in_one_batch_gets_two_group_ids(twenty_prompts):
    batch = next(training_batches(twenty_prompts, prompts_per_step=40, seed=0))  # two epochs in one batch
    uids = [e.uid for e in batch]
    assert len(set(uids)) == 40
    assert sorted(u for u in uids if "~" not in u) == sorted(f"twenty0/qa:{i}" for i in range(20))
    assert sorted(u.split("~")[0] for u in uids if "~" in u) == sorted(f"twenty0/qa:{i}" for i in range(20))


def test_a_restored_iterator_state_continues_the_same_stream(twenty_prompts):
    iterator = training_batches(twenty_prompts, prompts_per_step=3, seed=1)
    _uids(iterator, 4)
    state = json.loads(json.dumps(iterator.get_state()))  # it travels through the checkpoint as JSON
    expected = _uids(iterator, 6)
    resumed = training_batches(twenty_prompts, prompts_per_step=3, seed=1)
    resumed.set_state(state)
    assert _uids(resumed, 6) == expected


def test_eval_is_one_in_order_pass_with_a_per_source_limit(twenty_prompts):
    batches = list(eval_batches(twenty_prompts, batch_size=3, limit_per_source=7))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [e.uid for e in sum(batches, [])] == [f"twenty0/qa:{i}" for i in range(7)]


def test_the_demo_files_load_through_the_sources_in_both_formats(tmp_path):
    for fmt in ("parquet", "jsonl"):
        paths = write_demo_data(tmp_path / fmt, fmt=fmt, seed=0)
        sources = open_sources([paths["train"], paths["test"]])
        data = make_demo_data(seed=0)
        assert [len(s) for s in sources] == [len(data.train), len(data.test)]
        assert sources[1][0].question == data.test[0]["question"]
        assert sources[1][0].golds == tuple(data.test[0]["golden_answers"])
    corpus_line = json.loads((tmp_path / "parquet" / "corpus.jsonl").read_text().splitlines()[0])
    assert set(corpus_line) == {"id", "contents"}
