"""The LLM narrative provider against a fake OpenAI-compatible server on 127.0.0.1.

The fake server answers POST /v1/chat/completions according to its mode: a good answer built from the
prompt's own numbers, one that invents a metric, one that misstates a number, a timeout, or HTTP 500.
Each case runs through explanation_generate on a real pipeline run and checks what is stored and shown.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from detection.models import AnomalyResult
from explanations.llm import ChatClient, LLMConfig, LLMError, breaker_for, reset_breakers
from explanations.narrative import BuiltinWriter
from explanations.payload import ExplanationPayload
from explanations.services import explanation_generate
from tests.test_explanations_services import small_run  # noqa: F401  (module-scoped pipeline run)

pytestmark = pytest.mark.django_db

# "- wifi_rssi (Wi-Fi signal, 12-hour average): -95 dBm (typical: -59.3 +/- 3.67 for ..., z-score: -9.73)"
PROMPT_LINE = re.compile(r"^- (?P<metric>\w+) \((?P<label>[^,]+), [^)]*\): (?P<value>\S+)(?: (?P<unit>[^ (]+))? "
                         r"\(typical: (?P<typical>\S+) \+/- (?P<spread>\S+) for [^,]+, z-score: (?P<z>[^)]+)\)$",
                         re.MULTILINE)


class FakeLLM:
    """An OpenAI-compatible chat server in a thread. mode: good | invent | misstate | slow | error."""

    def __init__(self):
        self.mode = "good"
        self.requests: list[dict] = []
        self.delay = 2.0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if self.path != "/v1/chat/completions":
                    self._reply(404, {"error": {"message": "no such route"}})
                    return
                if fake.mode == "garbage":
                    self._reply(200, {"object": "chat.completion", "choices": []})
                    return
                if fake.mode == "error":
                    self._reply(500, {"error": {"message": "model crashed"}})
                    return
                if fake.mode == "slow":
                    time.sleep(fake.delay)
                self._reply(200, {"id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant",
                                                                       "content": fake.answer(body)}}],
                                  "usage": {"prompt_tokens": 200, "completion_tokens": 80}})

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        top = PROMPT_LINE.search(prompt).groupdict()
        unit = f" {top['unit']}" if top["unit"] else ""
        value = top["value"]
        if self.mode == "misstate":
            value = f"{float(value) * 1.5 + 17.25:.2f}"
        text = (f"The {top['label']} ({top['metric']}) read {value}{unit}, far from its typical {top['typical']} "
                f"+/- {top['spread']} (z-score {top['z']}). This usually means the device needs attention: check it "
                f"on site and compare it with its peers.")
        if self.mode == "invent":
            text += " GPS accuracy also collapsed, which points to a failing antenna."
        return text


@pytest.fixture
def fake_llm(settings):
    server = FakeLLM()
    server.thread.start()
    reset_breakers()
    settings.VIGIL_LLM = {"provider": "llm", "base_url": server.url, "model": "fake-7b", "api_key": "sk-test",
                          "timeout": 0.5, "max_retries": 1, "backoff": 0.01, "breaker_failures": 2,
                          "breaker_reset_seconds": 60}
    yield server
    server.server.shutdown()
    server.server.server_close()
    reset_breakers()


@pytest.fixture
def anomaly(small_run):  # noqa: F811
    return (AnomalyResult.objects.filter(run=small_run, label=-1).select_related("device", "run__fleet")
            .order_by("-anomaly_score").first())


def builtin_text(explanation) -> str:
    return BuiltinWriter().text(ExplanationPayload.from_dict(explanation.payload))


def test_a_good_answer_is_validated_and_shown_with_the_provider_named(fake_llm, anomaly):
    explanation = explanation_generate(anomaly=anomaly)  # VIGIL_LLM makes the LLM the default provider
    assert explanation.provider == "llm" and explanation.model == "fake-7b"
    assert explanation.verdict == "accepted", explanation.validation
    assert explanation.shown_text == explanation.text and explanation.shown_provider == "llm"
    assert explanation.shown_provider_label == "LLM (OpenAI-compatible API) · fake-7b"
    assert explanation.fallback_text == "" and explanation.error == ""
    request = fake_llm.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "fake-7b"
    assert explanation.prompt == request["body"]["messages"][-1]["content"]
    assert explanation.prompt.startswith("You are explaining an anomaly detected by Isolation Forest")
    assert f"Device {anomaly.device.external_id} at " in explanation.prompt or \
        f"Device {anomaly.device.external_id} (" in explanation.prompt
    assert explanation.latency_ms > 0


def test_an_answer_that_invents_a_metric_is_rejected_and_the_builtin_text_shown(fake_llm, anomaly):
    fake_llm.mode = "invent"
    explanation = explanation_generate(anomaly=anomaly, provider="llm")
    assert explanation.verdict == "rejected"
    assert any("names gps" in r for r in explanation.validation["reasons"]), explanation.validation
    assert "GPS accuracy" in explanation.text  # the rejected answer is kept for review
    assert explanation.shown_text == explanation.fallback_text == builtin_text(explanation)
    assert explanation.shown_provider == "builtin"


def test_an_answer_that_misstates_a_number_is_rejected(fake_llm, anomaly):
    fake_llm.mode = "misstate"
    explanation = explanation_generate(anomaly=anomaly, provider="llm")
    assert explanation.verdict == "rejected"
    assert any(r.startswith("states ") and "matches no number" in r for r in explanation.validation["reasons"])
    assert explanation.shown_text == builtin_text(explanation)


def test_a_timeout_falls_back_to_the_builtin_writer(fake_llm, anomaly):
    fake_llm.mode = "slow"
    started = time.perf_counter()
    explanation = explanation_generate(anomaly=anomaly, provider="llm")
    assert time.perf_counter() - started < 5  # 2 attempts x 0.5 s timeout, not the server's delay
    assert explanation.verdict == "failed" and "did not answer within 0.5 s" in explanation.error
    assert explanation.text == "" and explanation.shown_text == builtin_text(explanation)
    assert len(fake_llm.requests) == 2  # one retry


def test_a_500_falls_back_and_opens_the_breaker(fake_llm, anomaly, small_run):  # noqa: F811
    fake_llm.mode = "error"
    explanation = explanation_generate(anomaly=anomaly, provider="llm")
    assert explanation.verdict == "failed" and "HTTP 500" in explanation.error
    assert explanation.shown_text == builtin_text(explanation)
    assert len(fake_llm.requests) == 2
    assert breaker_for(LLMConfig(base_url=fake_llm.url, model="fake-7b")).state == "open"
    # while open, no call reaches the server: the next anomaly falls back at once
    other = AnomalyResult.objects.filter(run=small_run, label=-1).exclude(pk=anomaly.pk).first()
    fallback = explanation_generate(anomaly=other, provider="llm")
    assert fallback.verdict == "failed" and "circuit breaker" in fallback.error
    assert len(fake_llm.requests) == 2 and fallback.shown_text.startswith("Device ")


def test_client_does_not_retry_a_4xx_or_a_malformed_body(fake_llm):
    client = ChatClient(LLMConfig(base_url=fake_llm.url + "/missing", model="m", max_retries=3, backoff=0.01))
    with pytest.raises(LLMError) as error:
        client.chat([{"role": "user", "content": "hi"}])
    assert (error.value.kind, error.value.status, len(fake_llm.requests)) == ("http", 404, 1)
    fake_llm.mode = "garbage"
    client = ChatClient(LLMConfig(base_url=fake_llm.url, model="m2", max_retries=3, backoff=0.01))
    with pytest.raises(LLMError, match="without choices") as error:
        client.chat([{"role": "user", "content": "hi"}])
    assert error.value.kind == "bad_response" and len(fake_llm.requests) == 2


def test_client_reports_an_unreachable_server():
    client = ChatClient(LLMConfig(base_url="http://127.0.0.1:9/v1", model="m", max_retries=0, timeout=0.5))
    with pytest.raises(LLMError) as error:
        client.chat([{"role": "user", "content": "hi"}])
    assert error.value.kind in ("connection", "timeout")
    with pytest.raises(LLMError) as error:
        ChatClient(LLMConfig()).chat([])
    assert error.value.kind == "not_configured"
