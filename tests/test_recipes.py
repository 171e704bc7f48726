"""analysis.data.recipes: each recipe on a small hand-made folder, with the documents it must yield."""

import gzip
import json

from analysis.data import recipes


def test_source_files_follow_include_and_exclude(tmp_path):
    base = tmp_path / "src"
    (base / "pkg" / "testdata").mkdir(parents=True)
    (base / "pkg" / "a.go").write_text("package a\n")
    (base / "pkg" / "a_test.go").write_text("package a_test\n")
    (base / "pkg" / "testdata" / "x.go").write_text("package x\n")
    (base / "pkg" / "empty.go").write_text("  \n")
    (base / "pkg" / "bin.go").write_bytes(b"\xff\xfe")
    options = {"root": "src", "include": ["**/*.go"], "exclude": ["*_test.go", "*/testdata/*"]}
    assert list(recipes.source_files(tmp_path, options)) == [{"doc_id": "pkg/a.go", "text": "package a\n"}]


def test_brown_corpus_strips_tags_and_restores_quotes(tmp_path):
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "ca01").write_text("\tThe/at jury/nn said/vbd ``/`` fine/jj ''/'' ./.\n\n\tIt/pps ended/vbd ./.\n")
    (tmp_path / "package" / "README").write_text("not a sample")
    [document] = recipes.brown_corpus(tmp_path, {"root": "package"})
    assert document == {"doc_id": "ca01", "text": 'The jury said " fine ".\n\nIt ended.'}


def test_chitchat_first_speaker_is_the_user_and_turns_merge(tmp_path):
    conversations = {"c1": {"messages": [[{"sender": "ann", "text": "hi"}, {"sender": "ann", "text": "there"}],
                                         [{"sender": "bob", "text": "hello"}], [], [{"sender": "bob", "text": "again"}]]},
                     "c2": {"messages": [[{"sender": "ann", "text": "alone"}]]}}
    (tmp_path / "chat.json").write_text(json.dumps(conversations))
    [document] = recipes.chitchat_conversations(tmp_path, {"file": "chat.json"})
    assert json.loads(document["messages"]) == [{"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": "hello\nagain"}]
    assert document["text"] == "User: hi\nthere\nAssistant: hello\nagain"


def test_coqa_keeps_the_longest_history_of_each_story(tmp_path):
    rows = [{"doc": {"id": "s1_turn1", "story": "A cat.", "previous_qa": []}},
            {"doc": {"id": "s1_turn2", "story": "A cat.", "previous_qa": str([{"question": "What?", "answer": "A cat"}])}}]
    with gzip.open(tmp_path / "coqa.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    [document] = recipes.coqa_conversations(tmp_path, {"file": "coqa.jsonl.gz"})
    assert document["doc_id"] == "s1"
    assert json.loads(document["messages"]) == [{"role": "user", "content": "A cat.\n\nWhat?"}, {"role": "assistant", "content": "A cat"}]


def test_handbook_keeps_only_translated_paragraphs(tmp_path):
    for locale, paragraphs in {"en-US": ["Hello", "Debian"], "de-DE": ["Hallo <b>Welt</b>", "Debian"]}.items():
        (tmp_path / "h" / locale).mkdir(parents=True)
        body = "".join(f'<div class="para">{p}</div>' for p in paragraphs)
        (tmp_path / "h" / locale / "p.html").write_text(f"<html><body>{body}<div>skip</div></body></html>")
    options = {"root": "h", "reference_locale": "en-US", "locales": {"de": "de-DE"}}
    assert list(recipes.handbook_paragraphs(tmp_path, options)) == [{"doc_id": "de-DE/p.html", "text": "Hallo Welt", "language": "de"}]


def test_olmo_requests_one_document_per_distinct_doc(tmp_path):
    rows = [{"doc": {"id": 1, "q": "2+2?"}}, {"doc": {"id": 1, "q": "2+2?"}}, {"doc": {"id": 2, "q": "3+3?"}}]
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    options = {"files": ["*.jsonl.gz"], "id_fields": ["id"], "template": "Q: {q}"}
    assert list(recipes.olmo_requests(tmp_path, options)) == [{"doc_id": "1", "text": "Q: 2+2?"}, {"doc_id": "2", "text": "Q: 3+3?"}]


def test_local_text_files_give_one_document_per_non_blank_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n   \nsecond line\n")
    documents = list(recipes.local_files(tmp_path, {"data_files": str(tmp_path / "a.txt")}))
    assert [d["text"] for d in documents] == ["first line", "second line"]
    assert [d["doc_id"] for d in documents] == ["0", "3"]
