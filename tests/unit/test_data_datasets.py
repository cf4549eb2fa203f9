"""Prompt files: JSONL and Parquet rows become records; malformed rows name file and line, or
are skipped and counted, as configured."""
import json

import pytest

from r1mega.config import DataConfig
from r1mega.data import BadRowError, build_prompt_source, load_prompt_file

GOOD = [
    {"prompt": "What is 1/2 + 1/4?", "answer": "3/4"},
    {"prompt": "Write inc(x).", "kind": "code", "tests": "assert inc(1) == 2", "entry_point": "inc",
     "metadata": {"source": "hand"}},
    {"prompt": "Make 10 from [2, 5].", "task": "countdown",
     "reference": {"numbers": [2, 5], "target": 10}, "id": "cd-1"},
]


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_rows_become_records(tmp_path):
    recs = load_prompt_file(_write_jsonl(tmp_path / "p.jsonl", GOOD))
    assert [r.kind for r in recs] == ["math", "code", "countdown"]
    assert recs[0].reference == {"answer": "3/4"}
    assert recs[1].reference == {"tests": "assert inc(1) == 2", "entry_point": "inc"}
    assert recs[1].metadata == {"source": "hand"}
    assert recs[2].reference == {"numbers": [2, 5], "target": 10}
    assert recs[2].metadata == {"id": "cd-1"}


def test_parquet_rows_become_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "1+1=", "kind": "arithmetic", "answer": "2"},
            {"prompt": "2+2=", "kind": "arithmetic", "answer": "4"}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    recs = load_prompt_file(str(path))
    assert [(r.prompt, r.reference["answer"]) for r in recs] == [("1+1=", "2"), ("2+2=", "4")]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows + [{"prompt": "", "kind": "arithmetic",
                                                 "answer": "0"}]), bad)
    with pytest.raises(BadRowError, match=r"bad\.parquet: row 3: 'prompt'"):
        load_prompt_file(str(bad))


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"answer": "1"}', "'prompt' must be a non-empty string"),
    ('{"prompt": "q"}', "kind 'math' needs \\['answer'\\]"),
    ('{"prompt": "q", "kind": "code", "entry_point": "f"}', "needs \\['tests'\\]"),
    ('{"prompt": "q", "kind": "countdown", "numbers": [1]}', "needs \\['target'\\]"),
    ('{"prompt": "q", "answer": "1", "metadata": 5}', "'metadata' must be an object"),
    ('{"prompt": "q", "reference": [1]}', "'reference' must be an object"),
])
def test_bad_row_names_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "data.jsonl", GOOD[:2] + [bad] + GOOD[2:])
    with pytest.raises(BadRowError, match=rf"data\.jsonl:3: .*{message}.*on_bad_row=skip"):
        load_prompt_file(path)
    stats = {}
    recs = load_prompt_file(path, on_bad_row="skip", stats=stats)
    assert len(recs) == 3 and stats["bad_rows"] == 1
    assert "data.jsonl:3" in stats["bad_row_errors"][0]


def test_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n\n   \n" + json.dumps(GOOD[0]) + "\n")
    assert len(load_prompt_file(str(path))) == 2


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source"):
        load_prompt_file(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="jsonl or .parquet"):
        load_prompt_file(str(tmp_path / "x.csv"))
    only_bad = _write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(ValueError, match="no usable rows \\(2 malformed\\)"):
        load_prompt_file(only_bad, on_bad_row="skip")


def test_build_prompt_source_dispatch(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", GOOD)
    assert len(build_prompt_source(DataConfig(source=path))) == 3
    assert len(build_prompt_source(DataConfig(source="builtin:countdown", num_examples=7))) == 7
    assert build_prompt_source(DataConfig(), eval=True) is None
    ev = build_prompt_source(DataConfig(eval_source="builtin:arithmetic", eval_examples=5), eval=True)
    train = build_prompt_source(DataConfig(num_examples=5))
    assert len(ev) == 5 and [r.prompt for r in ev] != [r.prompt for r in train]
    with pytest.raises(ValueError, match="builtin:arithmetic"):
        build_prompt_source(DataConfig(source="builtin:arithmetc"))
