"""What a model export was trained on, recorded next to its weights and checked against the data a
command is given (``eval.evaluate``, ``eval.link``, ``train.negatives``).

``data_identity.json`` in the export folder holds
  tokenizer: vocab_size, vocab_sha256 (of the sorted token -> id table), special token ids;
  kb:        dataset, entities, kb_sha256 (of the KB shards' sha256 and the entity index's), and
             the manifest's own sha256 (for reference: it also covers the splits).
A different tokenizer is always an error (token ids would index the wrong embeddings). A different
KB is an error unless the caller allows it (``--allow-other-kb``), for a deliberate transfer.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from data_shards.folder import ShardFolder

IDENTITY_FILE = "data_identity.json"


class DataMismatch(ValueError):
    """The data given to a command is not the data the export was trained on."""


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def tokenizer_identity(tokenizer: Any) -> dict:
    vocab = tokenizer.get_vocab()
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return {"vocab_size": len(tokenizer), "vocab_sha256": _sha256_json(sorted(vocab.items())), "special_ids": special}


def kb_identity(shards: ShardFolder) -> dict:
    """The KB of a shards folder: dataset, entities, sha256 of its shards' and index's sha256, the manifest's."""
    manifest = shards.manifest
    kb = [[e["name"], e["sha256"]] for e in manifest["shards"]["kb"]]
    return {"dataset": shards.dataset, "entities": shards.counts["entities"],
            "kb_sha256": _sha256_json({"shards": kb, "index": manifest.get("entity_index_sha256")}),
            "manifest_sha256": shards.sha256}


def write_identity(folder: Path, tokenizer: Any | None, shards: ShardFolder | None) -> dict:
    """Write ``folder/data_identity.json``; a part that cannot be determined (no tokenizer, no converted
    folder: ``shards`` None) is recorded as null."""
    ident: dict = {"tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None, "kb": None}
    if shards is not None:
        ident["kb"] = kb_identity(shards)
    (Path(folder) / IDENTITY_FILE).write_text(json.dumps(ident, indent=1) + "\n")
    return ident


def read_identity(export: str | Path) -> dict | None:
    path = Path(export) / IDENTITY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_identity(export: str | Path, tokenizer: Any, shards: ShardFolder, allow_other_kb: bool = False) -> None:
    """Raise DataMismatch saying what differs between the export's training data and (tokenizer, shards)."""
    saved = read_identity(export)
    if saved is None:
        print(f"warning: {export} has no {IDENTITY_FILE} (an older export): cannot check that the tokenizer and the KB "
              "are the ones it was trained on", file=sys.stderr)
        return
    want, have = saved.get("tokenizer"), tokenizer_identity(tokenizer)
    if want is None:
        print(f"warning: {export} does not record its tokenizer: cannot check it", file=sys.stderr)
    elif want != have:
        diffs = [f"{k} {want.get(k)!r} vs {have.get(k)!r}" for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
        raise DataMismatch(f"the tokenizer for {shards} is not the one {export} was trained with ({'; '.join(diffs)}; export vs "
                           "data): token ids would select the wrong embeddings. Use the data the model was trained on, or "
                           "set data.tokenizer to the training tokenizer")
    want_kb = saved.get("kb")
    if want_kb is None:
        print(f"warning: {export} does not record its KB: cannot check it", file=sys.stderr)
        return
    have_kb = kb_identity(shards)
    if want_kb["kb_sha256"] != have_kb["kb_sha256"]:
        if allow_other_kb:
            print(f"warning: evaluating on another KB than the training one ({have_kb['dataset']}, {have_kb['entities']} "
                  f"entities vs {want_kb['dataset']}, {want_kb['entities']}), as allowed", file=sys.stderr)
            return
        raise DataMismatch(f"{shards} holds another KB than the one {export} was trained on: dataset {have_kb['dataset']!r} "
                           f"with {have_kb['entities']} entities (KB sha256 {have_kb['kb_sha256'][:12]}...) vs "
                           f"{want_kb['dataset']!r} with {want_kb['entities']} (KB sha256 {want_kb['kb_sha256'][:12]}...). "
                           "Pass --allow-other-kb to use it anyway")
