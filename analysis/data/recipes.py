"""Extraction recipes: each turns one extracted source folder into documents.

A recipe is ``recipe(root, options) -> Iterator[dict]`` where ``root`` is the folder a source
was extracted to (:func:`analysis.data.fetching.fetch_source`) and ``options`` the manifest
source's ``options``; each document is ``{"doc_id", "text"}`` with optional ``language`` and
``messages`` (a conversation as JSON).  Manifests name a recipe of :data:`RECIPES`.
"""

from __future__ import annotations

import ast
import fnmatch
import glob
import gzip
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import datasets

from ..errors import InputError


def source_files(root: Path, options: dict) -> Iterator[dict]:
    """One document per file under ``options.root`` matching ``include`` and no ``exclude`` glob."""
    base = root / options["root"]
    seen = set()
    for pattern in options["include"]:
        for path in sorted(base.glob(pattern)):
            relative = path.relative_to(base).as_posix()
            if relative in seen or not path.is_file() or path.is_symlink():
                continue
            if any(fnmatch.fnmatch(relative,
                                   ex) or fnmatch.fnmatch("/" + relative, ex) for ex in options.get("exclude", [])):
                continue
            seen.add(relative)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                yield {"doc_id": relative, "text": text}


def _jsonl_gz(path: Path) -> Iterator[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def olmo_requests(root: Path, options: dict) -> Iterator[dict]:
    """One document per distinct ``doc`` of oe-eval request files, formatted with ``options.template``."""
    seen = set()
    for pattern in options["files"]:
        for path in sorted(glob.glob(str(root / pattern))):
            for request in _jsonl_gz(Path(path)):
                doc = request["doc"]
                doc_id = "/".join(str(doc[field]) for field in options["id_fields"])
                if doc_id not in seen:
                    seen.add(doc_id)
                    yield {"doc_id": doc_id, "text": options["template"].format(**doc)}


def plain_turns(messages: list[dict]) -> str:
    """A conversation as plain ``User: ...`` / ``Assistant: ...`` turns."""
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def _conversation(doc_id: str, messages: list[dict]) -> dict:
    return {"doc_id": doc_id, "text": plain_turns(messages), "messages": json.dumps(messages, ensure_ascii=False)}


def chitchat_conversations(root: Path, options: dict) -> Iterator[dict]:
    """One document per Chit-Chat conversation; the first speaker is ``user``, the other ``assistant``."""
    conversations = json.loads((root / options["file"]).read_text(encoding="utf-8"))
    for conversation_id, conversation in conversations.items():
        messages, speakers = [], {}
        for turn in conversation["messages"]:
            if not turn:
                continue
            speaker = speakers.setdefault(turn[0]["sender"], "user" if not speakers else "assistant")
            content = "\n".join(message["text"] for message in turn)
            if messages and messages[-1]["role"] == speaker:
                messages[-1]["content"] += "\n" + content
            else:
                messages.append({"role": speaker, "content": content})
        if len(messages) >= 2:
            yield _conversation(conversation_id, messages)


def coqa_conversations(root: Path, options: dict) -> Iterator[dict]:
    """One document per CoQA story: the story and first question open the conversation, answers alternate."""
    stories: dict[str, dict] = {}
    for request in _jsonl_gz(root / options["file"]):
        doc = request["doc"]
        story_id = doc["id"].rsplit("_turn", 1)[0]
        turns = ast.literal_eval(doc["previous_qa"]) if isinstance(doc["previous_qa"], str) else doc["previous_qa"]
        if len(turns) >= len(stories.get(story_id, {}).get("turns", [])):
            stories[story_id] = {"story": doc["story"], "turns": turns}
    for story_id, record in stories.items():
        messages = []
        for index, turn in enumerate(record["turns"]):
            question = f"{record['story']}\n\n{turn['question']}" if index == 0 else turn["question"]
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": turn["answer"]}]
        if messages:
            yield _conversation(story_id, messages)


class _ParagraphParser(HTMLParser):
    """Text of every ``<div class="para">`` (nested markup flattened)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._depth = 0
        self._parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag != "div":
            return
        if self._depth:
            self._depth += 1
        elif ("class", "para") in attrs:
            self._depth, self._parts = 1, []

    def handle_endtag(self, tag):
        if tag == "div" and self._depth:
            self._depth -= 1
            if not self._depth:
                self.paragraphs.append(re.sub(r"\s+", " ", "".join(self._parts)).strip())

    def handle_data(self, data):
        if self._depth:
            self._parts.append(data)


def _page_paragraphs(path: Path) -> list[str]:
    parser = _ParagraphParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return [p for p in parser.paragraphs if p]


def handbook_paragraphs(root: Path, options: dict) -> Iterator[dict]:
    """One document per translated page: its paragraphs, minus those identical to the reference locale's."""
    base = root / options["root"]
    reference = {
        p for page in sorted((base / options["reference_locale"]).glob("*.html")) for p in _page_paragraphs(page)}
    for language, locale in options["locales"].items():
        for page in sorted((base / locale).glob("*.html")):
            translated = [p for p in _page_paragraphs(page) if p not in reference]
            if translated:
                yield {"doc_id": f"{locale}/{page.name}", "text": "\n\n".join(translated), "language": language}


_BROWN_SPACE_BEFORE = re.compile(r" ([.,;:?!)'](?:\s|$))")


def brown_corpus(root: Path, options: dict) -> Iterator[dict]:
    """One document per Brown sample: ``word/tag`` tokens stripped to words, quotes restored, paragraphs kept."""
    base = root / options["root"]
    for path in sorted(base.glob("c[a-r][0-9][0-9]")):
        paragraphs = []
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            words = [token.rsplit("/", 1)[0] for token in block.split()]
            if words:
                sentence = " ".join(words).replace("``", '"').replace("''", '"')
                paragraphs.append(_BROWN_SPACE_BEFORE.sub(r"\1", sentence))
        yield {"doc_id": path.name, "text": "\n\n".join(paragraphs)}


def local_files(root: Path, options: dict) -> Iterator[dict]:
    """Documents from local JSONL, JSON, Parquet, CSV or text files (``options.data_files``, ``options.text_field``)."""
    files = options["data_files"]
    suffix = Path(files if isinstance(files, str) else files[0]).suffix.lstrip(".")
    kind = options.get("format") or {"jsonl": "json", "txt": "text"}.get(suffix, suffix)
    table = datasets.load_dataset(kind, data_files=files, split="train")
    field = options.get("text_field", "text")
    if field not in table.column_names:
        raise InputError(f"local files {files} have no column {field!r}; columns: {table.column_names}")
    for index, row in enumerate(table):
        if row[field] and row[field].strip():
            yield {"doc_id": str(row.get(options.get("id_field", ""), index)), "text": row[field],
                   "language": row.get(options.get("language_field", ""))}


def json_field_files(root: Path, options: dict) -> Iterator[dict]:
    """One document per JSON file under ``options.root`` matching ``include``: its ``options.field`` string,
    kept when at least ``options.min_chars`` long (default 1)."""
    base, field = root / options["root"], options["field"]
    for path in sorted(base.glob(options["include"])):
        text = json.loads(path.read_text(encoding="utf-8")).get(field) or ""
        if len(text.strip()) >= options.get("min_chars", 1):
            yield {"doc_id": path.relative_to(base).as_posix(), "text": text.strip()}


def arrow_field(root: Path, options: dict) -> Iterator[dict]:
    """One document per distinct non-empty ``options.field`` of the rows of the Arrow files ``options.files``
    (a saved ``datasets`` split), kept when at least ``options.min_chars`` long (default 1)."""
    seen = set()
    for pattern in options["files"]:
        for path in sorted(glob.glob(str(root / pattern))):
            for index, text in enumerate(datasets.Dataset.from_file(path)[options["field"]]):
                text = (text or "").strip()
                if len(text) >= options.get("min_chars", 1) and text not in seen:
                    seen.add(text)
                    yield {"doc_id": f"{Path(path).parent.name}/{index}", "text": text}


RECIPES = {
    "source_files": source_files,
    "olmo_requests": olmo_requests,
    "chitchat_conversations": chitchat_conversations,
    "coqa_conversations": coqa_conversations,
    "handbook_paragraphs": handbook_paragraphs,
    "brown_corpus": brown_corpus,
    "local_files": local_files,
    "json_field_files": json_field_files,
    "arrow_field": arrow_field,
}
