import pytest
from datasets import Dataset

from finetune.data.tables import apply_overflow, load_table, map_columns
from finetune.errors import DataError


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON line"):
        load_table(str(path), "data.train")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="data.train: file not found"):
        load_table(str(tmp_path / "nope.jsonl"), "data.train")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_table(str(tmp_path / "empty.jsonl"), "data.train")


def test_csv_parquet_json_and_several_files(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"text": ["a b", "c d"], "label": [0, 1]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_json(tmp_path / "d.json", orient="records")
    for name in ("d.csv", "d.parquet", "d.json"):
        table = load_table(str(tmp_path / name), "data.train")
        assert table["label"] == [0, 1] and table["text"] == ["a b", "c d"]
    both = load_table([str(tmp_path / "d.csv"), str(tmp_path / "d.parquet")], "data.train")
    assert len(both) == 4


def test_column_mapping_errors_name_the_column():
    table = Dataset.from_list([{"body": "x", "topic": "a", "extra": 1}])
    mapped = map_columns(table, {"text": "body", "label": "topic"}, ("text", "label"), ("text_pair",), "data.train")
    assert mapped.column_names == ["text", "label"]
    with pytest.raises(
        DataError, match="column 'label' for field 'label' not found; columns are: 'body', 'extra', 'topic'"
    ):
        map_columns(table, {"text": "body"}, ("text", "label"), (), "data.train")
    # A semicolon-separated .csv read split on commas: one column named 'body;topic'.
    with pytest.raises(DataError, match=r"columns are: 'body;topic' \(one column whose name holds ';'"):
        map_columns(Dataset.from_list([{"body;topic": "x;a"}]), {}, ("text", "label"), (), "data.train")
    with pytest.raises(DataError, match=r"SQuAD's nested layout"):
        map_columns(Dataset.from_list([{"title": "t", "paragraphs": [{"context": "c"}]}]), {}, ("question",), (), "d")


def test_an_explicit_mapping_owns_its_column():
    # `positive_id: id` where the task also has an optional `id` field: the mapping applies (it was undone silently).
    table = Dataset.from_list([{"id": "p-1", "question": "q"}])
    fields = (("query",), ("positive_id", "id"))
    mapped = map_columns(table, {"query": "question", "positive_id": "id"}, *fields, "data.train")
    assert mapped.column_names == ["query", "positive_id"] and mapped["positive_id"] == ["p-1"]
    with pytest.raises(DataError, match="field 'query' reads column 'query', which data.columns.positive_id gives"):
        map_columns(Dataset.from_list([{"query": "q"}]), {"positive_id": "query"}, *fields, "data.train")


def test_overflow_policies():
    keep, report = apply_overflow([5, 50, 7], 10, "truncate", "data.train")
    assert keep.tolist() == [0, 1, 2] and report.truncated == 1 and report.percentiles["max"] == 50
    keep, report = apply_overflow([5, 50, 7], 10, "drop", "data.train")
    assert keep.tolist() == [0, 2] and report.dropped == 1
    with pytest.raises(DataError, match="rows 2"):
        apply_overflow([5, 50, 7], 10, "error", "data.train")
    with pytest.raises(DataError, match="every row was dropped"):
        apply_overflow([50], 10, "drop", "data.train")


def test_token_lengths_of_grouped_rows_are_their_longest_sequence():
    """A reranker's row holds a group of sequences: length grouping must sort by the longest, not the group size."""
    from datasets import Dataset

    from finetune.data.tables import token_lengths

    flat = Dataset.from_dict({"input_ids": [[1, 2, 3], [1], [1, 2]]})
    grouped = Dataset.from_dict({"input_ids": [[[1, 2], [1, 2, 3, 4]], [[1]], [[1, 2, 3], [1]]]})
    assert token_lengths(flat).tolist() == [3, 1, 2]
    assert token_lengths(grouped).tolist() == [4, 1, 3]
    assert token_lengths(grouped.select([2, 0])).tolist() == [3, 4]
    from datasets import concatenate_datasets

    chunked = concatenate_datasets([grouped, Dataset.from_dict({"input_ids": [[[5, 6, 7, 8, 9]], []]})])
    assert chunked.data.column("input_ids").num_chunks == 2  # read chunk by chunk, the groups' offsets per chunk
    assert token_lengths(chunked).tolist() == [4, 1, 3, 5, 0]
