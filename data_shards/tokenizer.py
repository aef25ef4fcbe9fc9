"""Word-level tokenizers for from-scratch runs (no pretrained CLIP, hence no CLIP tokenizer).

    python -m data_shards.tokenizer --root DIR --out DIR/tokenizer [--dataset auto | --split-files 'NAME_{split}.json']
                                    [--min-freq 2] [--max-words 50000] [--skip-unknown-answers]

The dataset is read through the converter's reader and checks (``reader.read_dataset``): a dataset the
converter refuses is refused here with the same message. The vocabulary is every word of the KB (entity
names and descriptions) and of the train split's mentions to link (sentences, mentions, descriptions; nil
records are never trained on, so never counted), lower-cased and split on whitespace with punctuation
isolated, the most frequent first (ties alphabetical), keeping words seen at least ``--min-freq`` times, at most ``--max-words``.
Dev and test text is never read into it (their share of unknown words is reported instead). The folder is
a ``PreTrainedTokenizerFast`` (``AutoTokenizer.from_pretrained`` loads it): pad 0, unk 1, ``[SEP]`` 2 (an
ordinary token, the separator of the mention and entity texts), the words, then bos and eos as the last
two ids (CLIP's order); every text is ``bos ... eos``. Put it at ``DIR/tokenizer`` and the converter copies
it next to the shards, where training and evaluation find it (or point ``data.tokenizer`` at it).
``--out`` must be new, empty, or a tokenizer folder this command wrote before (``reader.OWNER_FILE``).
The synthetic benchmark writes its tokenizer with the same writer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from core.cli import disk_full_line
from data_shards import reader
from data_shards.reader import DatasetLayout

SPECIALS = {"pad": "<|pad|>", "unk": "[UNK]", "bos": "<|startoftext|>", "eos": "<|endoftext|>"}
SEPARATOR = "[SEP]"


def _normalizer_and_pre_tokenizer():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                             pre_tokenizers.Punctuation("isolated")])


def write_word_tokenizer(out_dir: Path, words: list[str]) -> int:
    """A word-level tokenizer: pad 0, unk 1, [SEP] 2, ``words`` in order, then bos and eos as the last two
    ids (CLIP's order). Returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, processors
    from tokenizers.models import WordLevel

    reserved = {*SPECIALS.values(), SEPARATOR}
    ordered = [SPECIALS["pad"], SPECIALS["unk"], SEPARATOR, *(w for w in words if w not in reserved),
               SPECIALS["bos"], SPECIALS["eos"]]
    vocab = {w: i for i, w in enumerate(ordered)}
    if len(vocab) != len(ordered):
        raise ValueError("the word list holds duplicates")
    tok = Tokenizer(WordLevel(vocab, unk_token=SPECIALS["unk"]))
    tok.normalizer, tok.pre_tokenizer = _normalizer_and_pre_tokenizer()
    tok.add_special_tokens([AddedToken(SPECIALS[k], special=True, normalized=False) for k in ("pad", "unk", "bos", "eos")])
    tok.add_tokens([AddedToken(SEPARATOR, special=False, normalized=False)])  # one ordinary token, kept whole
    bos, eos = SPECIALS["bos"], SPECIALS["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {bos} $B:1 {eos}:1",
        special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": SPECIALS["pad"],
              "unk_token": SPECIALS["unk"], "model_max_length": 77, "padding_side": "right",
              "clean_up_tokenization_spaces": False}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {k + "_token": v for k, v in SPECIALS.items()}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return len(ordered)


class WordCounter:
    """Counts words exactly as the tokenizer will split them."""

    def __init__(self) -> None:
        self.norm, self.pre = _normalizer_and_pre_tokenizer()
        self.counts: Counter[str] = Counter()

    def words(self, text: str) -> list[str]:
        parts = text.split(SEPARATOR)  # the separator is one token, never split
        return [w for part in parts for w, _ in self.pre.pre_tokenize_str(self.norm.normalize_str(part))]

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            if text:
                self.counts.update(self.words(text))


COMMAND = "data_shards.tokenizer"  # marks the folders it writes (reader.claim_output_folder)


def _split_texts(records: reader.SplitRecords) -> Iterable[str]:
    for m in records.mentions:
        yield from (m.sentence, m.mention, m.desc)


def dataset_vocabulary(data: reader.Dataset, min_freq: int = 1, max_words: int = 0) -> tuple[list[str], Counter]:
    """Words of the KB and the train split, most frequent first (ties alphabetical), with their counts."""
    counter = WordCounter()
    for ent in data.entities:
        counter.add([ent.name, ent.desc])
    counter.add(_split_texts(data.splits["train"]))
    words = sorted((w for w, n in counter.counts.items() if n >= min_freq), key=lambda w: (-counter.counts[w], w))
    if max_words > 0:
        words = words[:max_words]
    return words, counter.counts


def unknown_share(records: reader.SplitRecords, vocab: set[str]) -> float:
    """Share of a split's words (running text) that the vocabulary lacks."""
    counter = WordCounter()
    counter.add(_split_texts(records))
    total = sum(counter.counts.values())
    return sum(n for w, n in counter.counts.items() if w not in vocab) / total if total else 0.0


def build(root: Path, lay: DatasetLayout, out: Path, min_freq: int = 1, max_words: int = 0,
          skip_unknown_answers: bool = False) -> dict:
    """Read and check the dataset, then write the tokenizer into ``out`` (refused before anything is written
    when ``out`` is a non-empty folder this command did not create)."""
    reader.check_output_folder(out, COMMAND)
    data = reader.read_dataset(root, lay, reader.SPLITS, skip_unknown_answers)
    words, counts = dataset_vocabulary(data, min_freq, max_words)
    reader.claim_output_folder(out, COMMAND)
    size = write_word_tokenizer(out, words)
    vocab = set(words)
    report = {"dataset": lay.name, "vocab_size": size, "words": len(words), "distinct_words_seen": len(counts),
              "min_freq": min_freq, "max_words": max_words,
              "unknown_share": {sp: unknown_share(data.splits[sp], vocab) for sp in ("dev", "test")}}
    (Path(out) / "build.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Build a word-level tokenizer from a MIMIC-format dataset's KB and train split.")
    p.add_argument("--root", required=True, type=Path, help="dataset folder")
    p.add_argument("--out", required=True, type=Path, help="tokenizer folder to write (e.g. ROOT/tokenizer)")
    p.add_argument("--dataset", default="auto", help="a known dataset or auto")
    p.add_argument("--split-files", default=None, metavar="PATTERN")
    p.add_argument("--dataset-name", default=None)
    p.add_argument("--min-freq", type=int, default=1, help="keep words seen at least this often")
    p.add_argument("--max-words", type=int, default=0, help="keep at most this many words (0: all)")
    p.add_argument("--skip-unknown-answers", action="store_true",
                   help="skip mentions whose answer qid2id.json lacks instead of refusing the dataset (as the converter)")
    a = p.parse_args(argv)
    try:
        lay = reader.resolve_layout(a.dataset, a.root, a.split_files, a.dataset_name)
        report = build(a.root, lay, a.out, a.min_freq, a.max_words, a.skip_unknown_answers)
    except (reader.DatasetFormatError, FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
    except Exception as err:  # noqa: BLE001 (a full disk, whichever library hit it; anything else is re-raised)
        line = disk_full_line(err, a.out)
        if line is None:
            raise
        sys.exit(line)
    unk = ", ".join(f"{sp} {v:.1%}" for sp, v in report["unknown_share"].items())
    print(f"wrote {a.out}: {report['vocab_size']} tokens ({report['words']} of {report['distinct_words_seen']} words of the "
          f"KB and train split); unknown words in {unk}")


if __name__ == "__main__":
    main()
