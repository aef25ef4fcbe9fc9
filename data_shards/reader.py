"""Readers for the released MEL datasets (MIMIC format, with MMoE's ``desc`` when present).

Quirks handled (docs/data.md describes the format):
* split files named per dataset: ``WIKIMEL_{split}.json``, ``RichpediaMEL_{split}.json``,
  ``wiki_diverse_{split}.json`` (MIMIC) or ``WikiDiverse_{split}.json`` (MMoE re-release), and our
  synthetic benchmark's ``SyntheticMEL_{split}.json``; any other dataset in this format through
  ``resolve_layout`` (``--dataset auto``: the one ``<prefix>_{train,dev,test}.json`` family of the
  folder, named after the prefix; or ``--split-files 'NAME_{split}.json'``);
* ``qid2id.json`` is one line of JSON; ``kb_entity.json`` is a list to be sorted by ``id``;
* entity names and mention surface forms may be URL-quoted;
* ``imgPath`` is ``""`` (no image) or a path whose basename, with the extension replaced by
  ``.jpg``, lies in ``mention_image/`` (RichpediaMEL ships ``mention_images/``);
* ``answer: "nil"`` mentions are skipped and counted; entity text is ``desc`` (MMoE) or ``attr``.

:func:`read_dataset` is what every command that reads a dataset goes through (the converter reads
the same pieces: :func:`read_splits`, :func:`check_kb_ids`), so the converter, the audit and the
tokenizer accept and refuse the same files: fields of the right types, text that is valid UTF-8,
a KB whose QIDs are unique and agree with ``qid2id.json``, at least one mention to link per split
and mention ids unique within and across splits. Each refusal is one :class:`DatasetFormatError`
naming the file and the record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

SPLITS = ("train", "dev", "test")


class DatasetFormatError(ValueError):
    """The files do not follow the expected format; the message names file and record."""


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    split_files: tuple[str, ...]  # alternatives, each with a {split} placeholder
    mention_image_dirs: tuple[str, ...]  # alternatives, first existing one wins


LAYOUTS = {
    "wikimel": DatasetLayout("wikimel", ("WIKIMEL_{split}.json",), ("mention_image",)),
    "richpediamel": DatasetLayout("richpediamel", ("RichpediaMEL_{split}.json",), ("mention_images", "mention_image")),
    "wikidiverse": DatasetLayout("wikidiverse", ("wiki_diverse_{split}.json", "WikiDiverse_{split}.json"), ("mention_image",)),
    "synthetic": DatasetLayout("synthetic", ("SyntheticMEL_{split}.json",), ("mention_image",)),
}


# The released datasets whose published numbers the leaderboard lists (a dataset of another name never gets them).
REAL_DATASETS = ("wikimel", "richpediamel", "wikidiverse")
ANY_MENTION_IMAGE_DIRS = ("mention_image", "mention_images")


def layout(name: str | DatasetLayout) -> DatasetLayout:
    if isinstance(name, DatasetLayout):
        return name
    try:
        return LAYOUTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LAYOUTS)} (or auto)") from None


def split_families(root: Path) -> dict[str, list[str]]:
    """Every ``<prefix>_<split>.json`` family in ``root``: prefix -> the splits present."""
    families: dict[str, list[str]] = {}
    for path in sorted(Path(root).glob("*_*.json")):
        prefix, _, split = path.stem.rpartition("_")
        if split in SPLITS and prefix:
            families.setdefault(prefix, []).append(split)
    return {p: [sp for sp in SPLITS if sp in found] for p, found in families.items()}


def custom_layout(pattern: str, name: str | None = None) -> DatasetLayout:
    """A layout for split files named by ``pattern`` (with ``{split}``), named ``name`` or after the prefix.

    A pattern that is a known dataset's gets that dataset's name; a name that is one of the real datasets
    with another pattern is refused, so a renamed dataset cannot pass for WikiMEL on the leaderboard."""
    if "{split}" not in pattern or "/" in pattern:
        raise ValueError(f"--split-files {pattern!r} must be a file name holding {{split}}, e.g. 'MyData_{{split}}.json'")
    known = next((lay for lay in LAYOUTS.values() if pattern in lay.split_files), None)
    if known is not None and (name is None or name.lower() == known.name):
        return known
    name = name or pattern.split("{split}")[0].rstrip("_-. ") or "dataset"
    if name.lower() in LAYOUTS:
        raise ValueError(f"the dataset name {name!r} is taken by a known dataset whose split files are named "
                         f"{' or '.join(LAYOUTS[name.lower()].split_files)}: choose another --dataset-name")
    return DatasetLayout(name, (pattern,), ANY_MENTION_IMAGE_DIRS)


def detect_layout(root: Path, name: str | None = None) -> DatasetLayout:
    """The one family of ``<prefix>_{train,dev,test}.json`` files in ``root`` (``--dataset auto``)."""
    families = split_families(root)
    complete = [p for p, found in families.items() if len(found) == len(SPLITS)]
    listing = "; ".join(f"{p}_{{{','.join(found)}}}.json" for p, found in families.items()) or "none"
    if len(complete) != 1:
        what = "no" if not complete else f"{len(complete)}"
        raise DatasetFormatError(
            f"{root}: found {what} complete family of <prefix>_{{train,dev,test}}.json split files (families: {listing}); "
            "name one with --split-files 'PREFIX_{split}.json'")
    return custom_layout(f"{complete[0]}_{{split}}.json", name)


def resolve_layout(dataset: str, root: Path, split_files: str | None = None, name: str | None = None) -> DatasetLayout:
    """--dataset NAME | auto, --split-files PATTERN and --dataset-name, as the commands take them."""
    if split_files:
        return custom_layout(split_files, name)
    if dataset == "auto":
        return detect_layout(root, name)
    if name and name.lower() != dataset.lower():
        raise ValueError("--dataset-name renames only an auto-detected dataset or one given by --split-files")
    return layout(dataset)


@dataclass
class Entity:
    id: int
    qid: str
    name: str
    desc: str
    image_paths: list[Path]  # in kb_image/, in the order of image_list


@dataclass
class Mention:
    id: str
    sentence: str
    mention: str
    gold_name: str
    desc: str
    image_path: Path | None  # None when the record has no image
    answer: str  # gold QID
    gold_id: int
    record: int = -1  # position in the split file


@dataclass
class SplitRecords:
    split: str
    path: Path
    mentions: list[Mention]
    skipped_nil: int = 0
    skipped_unknown: int = 0
    unknown_examples: list[str] = field(default_factory=list)


def _position(path: Path, offset: int) -> str:
    """'line L column C' of a character offset (computed only on the error path)."""
    line, col = 1, 1
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        seen = 0
        for text_line in fh:
            if seen + len(text_line) > offset:
                col = offset - seen + 1
                break
            seen += len(text_line)
            line += 1
    return f"line {line} column {col}"


def iter_json_array(path: Path, chunk_chars: int = 1 << 20, errors: str = "strict") -> Iterator[tuple[int, Any]]:
    """Stream the elements of a JSON list file without loading the whole list.

    Yields (index, element). Malformed JSON raises DatasetFormatError with file, line and column; so
    does a byte that is not UTF-8, unless ``errors="surrogateescape"``: then it reaches the record's
    strings as a lone surrogate, for the record's reader to refuse by name (:func:`valid_text`).
    """
    try:
        yield from _iter_json_array(path, chunk_chars, errors)
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}: {err.reason}); "
                                 "save the file as UTF-8") from None


def _iter_json_array(path: Path, chunk_chars: int, errors: str) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors=errors) as fh:
        buf, base, eof = fh.read(chunk_chars), 0, False  # base: file offset of buf[0]

        def fail(pos: int, what: str) -> DatasetFormatError:
            return DatasetFormatError(f"{path}: malformed JSON at {_position(path, base + pos)} (char {base + pos}): {what}")

        def skip_ws(i: int) -> int:
            nonlocal buf, eof
            while True:
                while i < len(buf) and buf[i] in " \t\r\n":
                    i += 1
                if i < len(buf) or eof:
                    return i
                more = fh.read(chunk_chars)
                eof = not more
                buf += more

        pos = skip_ws(0)
        if pos >= len(buf) or buf[pos] != "[":
            raise fail(pos, "expected a JSON list '['")
        pos = skip_ws(pos + 1)
        if pos < len(buf) and buf[pos] == "]":
            return
        index = 0
        while True:
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and not eof:  # a number may continue in the next chunk
                        raise json.JSONDecodeError("truncated", buf, end)
                    break
                except json.JSONDecodeError as err:
                    if eof:
                        raise fail(err.pos, err.msg) from None
                    more = fh.read(chunk_chars)
                    eof = not more
                    buf += more
            yield index, obj
            index += 1
            pos = skip_ws(end)
            if pos >= len(buf):
                raise fail(pos, "unexpected end of file inside the list")
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                raise fail(pos, "expected ',' or ']' after a list element")
            pos = skip_ws(pos + 1)
            if pos > chunk_chars:  # drop what was consumed
                buf, base, pos = buf[pos:], base + pos, 0


def valid_text(value: str, path: Path, record: str, key: str) -> str:
    """``value`` if it is valid Unicode text. A lone surrogate (a ``\\udXXX`` escape in the JSON, or
    a byte that is not UTF-8, read with ``errors="surrogateescape"``) cannot be written as UTF-8 and
    breaks every tokenizer: DatasetFormatError naming file, record and field."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(err.object[err.start])
        what = f"the escape \\u{code:04x}" + (f", or the byte 0x{code - 0xDC00:02x} of the file, which is not UTF-8"
                                               if 0xDC80 <= code <= 0xDCFF else "")
        raise DatasetFormatError(f"{path}: {record}: field {key!r} holds text that is not valid Unicode (a lone surrogate: "
                                 f"{what}); fix the record") from None
    return value


def _field(rec: Any, key: str, path: Path, index: int, types: type | tuple[type, ...] = str) -> Any:
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{path}: record {index} is a {type(rec).__name__}, expected an object")
    if key not in rec:
        raise DatasetFormatError(f"{path}: record {index} (id {rec.get('id')!r}) has no {key!r} field")
    value = rec[key]
    if not isinstance(value, types) or isinstance(value, bool):  # bool is an int to Python, never an id
        raise DatasetFormatError(f"{path}: record {index} (id {rec.get('id')!r}) field {key!r} has type {type(value).__name__}")
    if isinstance(value, str):
        valid_text(value, path, f"record {index} (id {rec.get('id')!r})", key)
    return value


def _optional_text(rec: dict, key: str, path: Path, record: str, default: str = "") -> str:
    """An optional text field: its value when it is a string (checked), else ``default``."""
    value = rec.get(key, default)
    return valid_text(value, path, record, key) if isinstance(value, str) else default


def _entity(rec: Any, index: int, path: Path, image_dir: Path) -> Entity:
    eid = _field(rec, "id", path, index, int)
    qid = _field(rec, "qid", path, index)
    record = f"entity id {eid} ({qid!r})"
    desc = _optional_text(rec, "desc", path, record, _optional_text(rec, "attr", path, record))
    images = rec.get("image_list") or []
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DatasetFormatError(f"{path}: record {index} (id {eid}) image_list must be a list of file names")
    for name in images:
        valid_text(name, path, record, "image_list")
    return Entity(
        id=eid,
        qid=qid,
        name=valid_text(unquote(_field(rec, "entity_name", path, index)), path, record, "entity_name"),
        desc=desc,
        image_paths=[image_dir / name for name in images],
    )


def kb_path(root: Path) -> Path:
    path = Path(root) / "kb_entity.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a dataset folder in MIMIC format?")
    return path


class KBNotSorted(DatasetFormatError):
    pass


def iter_kb(root: Path) -> Iterator[Entity]:
    """Stream the KB in id order; raise KBNotSorted if the file is not sorted by dense ids."""
    path = kb_path(root)
    image_dir = Path(root) / "kb_image"
    for index, rec in iter_json_array(path, errors="surrogateescape"):
        ent = _entity(rec, index, path, image_dir)
        if ent.id != index:
            raise KBNotSorted(f"{path}: record {index} has id {ent.id}; the file is not sorted by dense ids")
        yield ent


def read_kb(root: Path) -> list[Entity]:
    """The whole KB sorted by id; ids must be exactly 0..N-1."""
    path = kb_path(root)
    image_dir = Path(root) / "kb_image"
    entities = sorted((_entity(rec, i, path, image_dir) for i, rec in iter_json_array(path, errors="surrogateescape")),
                      key=lambda e: e.id)
    for i, ent in enumerate(entities):
        if ent.id != i:
            problem = "duplicated" if i and entities[i - 1].id == ent.id else "missing"
            raise DatasetFormatError(f"{path}: entity ids must be dense 0..{len(entities) - 1}; id {i} is {problem}")
    return entities


def read_qid2id(root: Path) -> dict[str, int]:
    path = Path(root) / "qid2id.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        mapping = json.loads(text)
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not valid UTF-8 (byte 0x{err.object[err.start]:02x}: {err.reason}); "
                                 "save the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(mapping, dict):
        raise DatasetFormatError(f"{path}: expected one JSON object {{QID: row index}}")
    return mapping


def split_path(root: Path, lay: DatasetLayout, split: str) -> Path:
    candidates = [Path(root) / pattern.format(split=split) for pattern in lay.split_files]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no {split} split for {lay.name} in {root}: looked for {', '.join(c.name for c in candidates)}")


def mention_image_dir(root: Path, lay: DatasetLayout) -> Path:
    for name in lay.mention_image_dirs:
        if (Path(root) / name).is_dir():
            return Path(root) / name
    return Path(root) / lay.mention_image_dirs[0]  # absent: every image counts as missing


def mention_image_path(img_path: str, image_dir: Path) -> Path | None:
    """``""`` -> None; otherwise image_dir / <basename with extension .jpg>."""
    if not img_path:
        return None
    base = Path(img_path.replace("\\", "/")).name
    return image_dir / (Path(base).stem + ".jpg")


def read_split(
    root: Path, dataset: str | DatasetLayout, split: str, qid2id: dict[str, int], skip_unknown_answers: bool = False
) -> SplitRecords:
    """Mentions of one split. ``nil`` answers are skipped and counted; an answer QID missing from
    qid2id is an error naming the record, unless ``skip_unknown_answers`` (then counted). Two
    mentions with one id are an error naming both (:func:`check_mention_ids`)."""
    lay = layout(dataset)
    path = split_path(root, lay, split)
    image_dir = mention_image_dir(root, lay)
    out = SplitRecords(split, path, [])
    for index, rec in iter_json_array(path, errors="surrogateescape"):
        answer = _field(rec, "answer", path, index)
        if answer.lower() == "nil":
            out.skipped_nil += 1
            continue
        if answer not in qid2id:
            if not skip_unknown_answers:
                raise DatasetFormatError(
                    f"{path}: record {index} (id {rec.get('id')!r}) has answer {answer!r}, which is not in qid2id.json "
                    "(pass --skip-unknown-answers to skip and count such records)"
                )
            out.skipped_unknown += 1
            if len(out.unknown_examples) < 5:
                out.unknown_examples.append(f"{rec.get('id')!r}: {answer}")
            continue
        out.mentions.append(_mention(rec, index, path, image_dir, int(qid2id[answer])))
    check_mention_ids([out])
    return out


def _mention(rec: dict, index: int, path: Path, image_dir: Path, gold_id: int) -> Mention:
    record = f"record {index} (id {rec.get('id')!r})"
    return Mention(
        id=str(_field(rec, "id", path, index, (str, int))),
        sentence=_field(rec, "sentence", path, index),
        mention=valid_text(unquote(_field(rec, "mentions", path, index)), path, record, "mentions"),
        gold_name=valid_text(unquote(_optional_text(rec, "entities", path, record)), path, record, "entities"),
        desc=_optional_text(rec, "desc", path, record),
        image_path=mention_image_path(_field(rec, "imgPath", path, index), image_dir),
        answer=rec["answer"],
        gold_id=gold_id,
        record=index,
    )


def check_mention_ids(splits: Iterable[SplitRecords]) -> None:
    """Every mention id once, within and across ``splits``: per-mention results, slices and the audit's
    reports name mentions by id. DatasetFormatError naming the id and both places otherwise."""
    seen: dict[str, tuple[Path, int]] = {}
    for records in splits:
        for m in records.mentions:
            if m.id in seen:
                first, at = seen[m.id]
                raise DatasetFormatError(f"mention id {m.id!r} appears twice: {first} record {at} and {records.path} record "
                                         f"{m.record}; every mention needs its own id (rename or remove one)")
            seen[m.id] = (records.path, m.record)


def read_splits(root: Path, dataset: str | DatasetLayout, splits: Iterable[str], qid2id: dict[str, int],
                skip_unknown_answers: bool = False) -> dict[str, SplitRecords]:
    """:func:`read_split` of each of ``splits``, each with at least one mention to link, mention ids
    unique across them."""
    out = {sp: read_split(root, dataset, sp, qid2id, skip_unknown_answers) for sp in splits}
    for sp, r in out.items():
        if not r.mentions:
            raise DatasetFormatError(f"the {sp} split ({r.path}) has no mention to link ({r.skipped_nil} nil and "
                                     f"{r.skipped_unknown} unknown answers skipped): nothing to train or evaluate on")
    check_mention_ids(out.values())
    return out


def check_kb_ids(entities: Iterable[Entity], qid2id: dict[str, int], kb_file: Path) -> Iterator[Entity]:
    """Pass the entities through, checking that QIDs are unique and that qid2id maps each to its row."""
    row_of: dict[str, int] = {}
    n = 0
    for ent in entities:
        n += 1
        if ent.qid in row_of:
            raise DatasetFormatError(f"{kb_file}: QID {ent.qid!r} appears twice, at entity ids {row_of[ent.qid]} and {ent.id}: "
                                     "every KB entity needs its own QID")
        row_of[ent.qid] = ent.id
        mapped = qid2id.get(ent.qid)
        if isinstance(mapped, str) and mapped.isdigit():
            mapped = int(mapped)
        if mapped is None:
            raise DatasetFormatError(f"{kb_file}: entity id {ent.id} has QID {ent.qid!r}, which qid2id.json does not map")
        if mapped != ent.id:
            raise DatasetFormatError(f"qid2id.json maps {ent.qid!r} to row {mapped!r}, but {kb_file.name} has it at entity id "
                                     f"{ent.id}: the two files disagree (mentions would get the wrong gold entity)")
        yield ent
    if n != len(qid2id):
        extra = sorted(set(qid2id) - set(row_of))[:5]
        raise DatasetFormatError(f"qid2id.json maps {len(qid2id)} QIDs but {kb_file.name} has {n} entities "
                                 f"(QIDs without an entity, e.g. {extra})")


@dataclass
class Dataset:
    """A dataset read and checked as the converter reads it."""

    layout: DatasetLayout
    qid2id: dict[str, int]
    entities: list[Entity]  # in id order
    splits: dict[str, SplitRecords]


def read_dataset(root: Path, dataset: str | DatasetLayout, splits: Iterable[str] = SPLITS, skip_unknown_answers: bool = False,
                 split_root: Path | None = None) -> Dataset:
    """qid2id, the KB and ``splits`` (from ``split_root``, default ``root``) through the converter's checks
    (module docstring), in the converter's order: every split before the KB."""
    lay = layout(dataset)
    qid2id = read_qid2id(root)
    records = read_splits(split_root or root, lay, splits, qid2id, skip_unknown_answers)
    entities = list(check_kb_ids(read_kb(root), qid2id, kb_path(root)))
    return Dataset(lay, qid2id, entities, records)


# ---- output folders of the dataset commands ----------------------------------------------------

OWNER_FILE = ".written-by.json"  # marks a folder one of the dataset commands created


def written_by(folder: Path) -> str | None:
    """The command that created ``folder`` (its OWNER_FILE), or None."""
    try:
        return json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_folder(out: Path, command: str) -> bool:
    """Whether ``out`` may become the output folder of ``command``: absent or empty (False), or created
    by ``command`` earlier (True: its old contents are the command's to replace). Any other non-empty
    folder (a dataset folder, someone's files) is refused: FileExistsError saying what to do."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder: choose a new or empty folder")
    reused = out.is_dir() and any(out.iterdir())
    if reused and written_by(out) != command:
        raise FileExistsError(f"{out} is not empty and was not created by {command}: choose a new or empty folder "
                              "(nothing was written)")
    return reused


def claim_output_folder(out: Path, command: str) -> bool:
    """:func:`check_output_folder`, then create ``out`` and mark it as ``command``'s (OWNER_FILE)."""
    reused = check_output_folder(out, command)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / OWNER_FILE).write_text(json.dumps({"command": command}) + "\n", encoding="utf-8")
    return reused
