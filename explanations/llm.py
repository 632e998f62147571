"""A client for OpenAI-compatible chat completion APIs, with timeouts, bounded retries and a circuit breaker.

Django-free, standard library only (urllib.request). It speaks ``POST {base_url}/chat/completions`` with
``{"model", "messages", "temperature", "max_tokens"}`` and reads ``choices[0].message.content``, which
OpenAI, Ollama (``http://127.0.0.1:11434/v1``), vLLM (``http://host:8000/v1``) and the llama.cpp server
(``http://host:8080/v1``) all serve.

Failure policy: a timeout, a connection error, HTTP 429 or any 5xx is retried up to ``max_retries``
times, waiting ``backoff * 2**attempt`` seconds (plus up to 10 % jitter) in between; other 4xx answers
and malformed bodies are not retried. Every failed attempt counts against the circuit breaker (Nygard,
"Release It!", 2007): after ``breaker_failures`` consecutive failures it opens and calls fail at once
with LLMError("breaker_open") for ``breaker_reset_seconds``; then one trial call is let through
(half-open), and its success closes the breaker again. Breakers are shared per (base_url, model) within
a process, so one dead server is not hammered by every request.
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable


class LLMError(Exception):
    """A chat call failed. kind: "timeout", "connection", "http", "bad_response", "breaker_open" or
    "not_configured"; status: the HTTP status for kind "http"."""

    def __init__(self, kind: str, message: str, *, status: int | None = None):
        self.kind = kind
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class LLMConfig:
    """base_url: up to and including the API version (``https://api.openai.com/v1``); model: the model
    name the server knows; api_key: sent as a bearer token when set; timeout: seconds per attempt."""

    base_url: str = ""
    model: str = ""
    api_key: str = ""
    timeout: float = 20.0
    max_retries: int = 2
    backoff: float = 0.5
    breaker_failures: int = 3
    breaker_reset_seconds: float = 60.0
    temperature: float = 0.2
    max_tokens: int = 400

    @classmethod
    def from_mapping(cls, values: dict) -> "LLMConfig":
        known = {k: values[k] for k in cls.__dataclass_fields__ if k in values and values[k] is not None}
        return cls(**known)

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self.model)


@dataclass
class ChatAnswer:
    text: str
    attempts: int
    latency_ms: float
    usage: dict = field(default_factory=dict)


class CircuitBreaker:
    """Closed -> open after `failures` consecutive failures -> half-open after `reset_seconds` -> closed
    on the first success (open again on a failure). Thread-safe; `clock` is injectable for tests."""

    def __init__(self, failures: int = 3, reset_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.failures = max(1, failures)
        self.reset_seconds = reset_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._count = 0
        self._opened_at: float | None = None

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self.clock() - self._opened_at >= self.reset_seconds else "open"

    def allow(self) -> bool:
        with self._lock:
            return self._state() != "open"

    def record_success(self) -> None:
        with self._lock:
            self._count = 0
            self._opened_at = None

    def record_failure(self) -> None:
        with self._lock:
            half_open = self._state() == "half_open"
            self._count += 1
            if half_open or self._count >= self.failures:
                self._opened_at = self.clock()


_BREAKERS: dict[tuple[str, str], CircuitBreaker] = {}
_BREAKERS_LOCK = threading.Lock()


def breaker_for(config: LLMConfig) -> CircuitBreaker:
    """The process-wide breaker of (base_url, model)."""
    key = (config.base_url.rstrip("/"), config.model)
    with _BREAKERS_LOCK:
        if key not in _BREAKERS:
            _BREAKERS[key] = CircuitBreaker(config.breaker_failures, config.breaker_reset_seconds)
        return _BREAKERS[key]


def reset_breakers() -> None:
    """Forget every breaker (tests; a configuration change)."""
    with _BREAKERS_LOCK:
        _BREAKERS.clear()


class ChatClient:
    """One OpenAI-compatible endpoint. chat() returns the answer or raises LLMError."""

    def __init__(self, config: LLMConfig, *, breaker: CircuitBreaker | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self.breaker = breaker or breaker_for(config)
        self.sleep = sleep

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def chat(self, messages: list[dict]) -> ChatAnswer:
        """Send `messages` ([{"role", "content"}]); raises LLMError after the retries, or at once when the
        breaker is open or the client is not configured."""
        if not self.config.configured:
            raise LLMError("not_configured", "no LLM base URL and model are configured")
        started = time.perf_counter()
        body = json.dumps({"model": self.config.model, "messages": messages, "stream": False,
                           "temperature": self.config.temperature, "max_tokens": self.config.max_tokens}).encode()
        last: LLMError | None = None
        for attempt in range(self.config.max_retries + 1):
            if not self.breaker.allow():
                raise LLMError("breaker_open", f"the circuit breaker for {self.config.base_url} is open after "
                                               f"repeated failures" + (f" (last: {last})" if last else ""))
            try:
                text, usage = self._post(body)
            except LLMError as exc:
                self.breaker.record_failure()
                last = exc
                if not _retryable(exc) or attempt == self.config.max_retries:
                    break
                delay = self.config.backoff * 2 ** attempt
                self.sleep(delay + random.uniform(0, delay / 10))
                continue
            self.breaker.record_success()
            return ChatAnswer(text, attempt + 1, (time.perf_counter() - started) * 1000, usage)
        assert last is not None
        raise last

    def _post(self, body: bytes) -> tuple[str, dict]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            raise LLMError("http", f"{self.url} answered HTTP {exc.code}: {detail}", status=exc.code) from None
        except (TimeoutError, socket.timeout):
            raise LLMError("timeout", f"{self.url} did not answer within {self.config.timeout:g} s") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise LLMError("timeout", f"{self.url} did not answer within {self.config.timeout:g} s") from None
            raise LLMError("connection", f"cannot reach {self.url}: {exc.reason}") from None
        except (ConnectionError, OSError) as exc:
            raise LLMError("connection", f"cannot reach {self.url}: {exc}") from None
        try:
            data = json.loads(raw)
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMError("bad_response", f"{self.url} answered without choices[0].message.content") from None
        if not isinstance(text, str) or not text.strip():
            raise LLMError("bad_response", f"{self.url} answered with an empty message")
        return text.strip(), data.get("usage") or {}


def _retryable(exc: LLMError) -> bool:
    return exc.kind in ("timeout", "connection") or (exc.kind == "http" and (exc.status == 429 or
                                                                             (exc.status or 0) >= 500))
