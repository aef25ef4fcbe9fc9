"""DME: candidate generation, the selectors (embedding, an LLM endpoint faked on localhost), the
cache, interruption, and the path into the shards (convert --desc-from)."""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict
from urllib.parse import unquote

from data_shards.convert import main as convert_main
from data_shards.dme import run as dme_run
from data_shards.dme.candidates import CandidateTable
from tests.support.dme import _load


def test_first_backend_end_to_end_into_the_shards(tiny_raw, tmp_path):
    out, shards = tmp_path / "dme", tmp_path / "shards"
    assert dme_run.main(["--dataset", "synthetic", "--root", str(tiny_raw), "--candidates", str(tiny_raw / "candidates.jsonl"),
                         "--backend", "first", "--out", str(out), "--quiet"]) == 0
    table = CandidateTable.load(tiny_raw / "candidates.jsonl")
    report = json.loads((out / "dme_report.json").read_text())
    assert report["backend"] == "first" and set(report["splits"]) == {"train", "dev", "test"}
    changed = 0
    for split in ("train", "dev", "test"):
        name = f"SyntheticMEL_{split}.json"
        before, after = _load(tiny_raw / name), _load(out / name)
        assert len(after) == len(before) and any(r["answer"] == "nil" for r in after)
        for b, a in zip(before, after, strict=True):
            assert list(a) == list(b)  # same fields, same order
            assert {k: v for k, v in a.items() if k != "desc"} == {k: v for k, v in b.items() if k != "desc"}
            cands = table.lookup(unquote(a["mentions"]))
            assert a["desc"] == (cands[0].description if cands else "")
            changed += a["desc"] != b["desc"]
        s = report["splits"][split]
        assert s["records"] == len(before) == s["with_candidates"] + s["no_candidates"]
    assert changed > 0  # "first" differs from the generator's simulated DME somewhere

    assert convert_main(["--dataset", "synthetic", "--root", str(tiny_raw), "--out", str(shards), "--desc-from", str(out),
                         "--image-size", "32", "--workers", "1"]) is None
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["source"]["desc_from"] == str(out.resolve()) and manifest["source"]["root"] == str(tiny_raw.resolve())
    assert manifest["images"]["dev"]["present"] > 0 and manifest["images"]["dev"]["missing"] == 0  # images from --root
    by_id = {r["id"]: r["desc"] for r in _load(out / "SyntheticMEL_dev.json")}
    with tarfile.open(shards / manifest["shards"]["dev"][0]["name"]) as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    assert metas and all(m["desc"] == by_id[m["id"]] for m in metas)


def test_a_rerun_against_a_fixed_server_asks_again_and_succeeds(tiny_raw, tmp_path, fake_llm, capsys):
    server = fake_llm(defaultdict(lambda: "I cannot tell."))
    args = ["--dataset", "synthetic", "--root", str(tiny_raw), "--backend", "llm", "--out", str(tmp_path / "dme"),
            "--splits", "dev", "--quiet", "--set", f"llm.base_url={server.base_url}", "llm.model=fake"]
    assert dme_run.main(args) == 3  # every query fell back: unparsable
    first = server.requests
    assert first > 0 and "fell back (unparsable" in capsys.readouterr().err
    server.replies.clear()  # the server is fixed: every mention now gets "1"
    server.replies.default_factory = lambda: "1"
    assert dme_run.main(args) == 0
    report = json.loads((tmp_path / "dme" / "dme_report.json").read_text())["splits"]["dev"]
    assert server.requests == 2 * first and report["asked"] == first and report["cached"] == 0
    assert report["selected"] == first and report["fallback_used"] == 0
