"""ChatClient (the OpenAI SDK under distill's retries) against a stand-in endpoint on localhost:
what goes out (fields, credentials) and which answers are retried. The real-server tests are
tests/test_judge.py and tests/test_server_rollout_e2e.py."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distill.filter.config import JudgeConfig
from distill.openai_client import ChatClient
from distill.rollout.config import ServerConfig

REPLY = b'{"choices": [{"index": 0, "message": {"content": "Score: 3"}, "finish_reason": "stop"}]}'


@pytest.fixture
def endpoint():
    state = {"status": [], "seen": []}  # status: the codes of the next POST answers (then 200)

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status: int, body: bytes):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # http.server names the methods
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["seen"].append((dict(self.headers), body))
            status = state["status"].pop(0) if state["status"] else 200
            self.answer(status, REPLY if status == 200 else b'{"error": {"message": "no"}}')

        def do_GET(self):
            state["seen"].append((dict(self.headers), None))
            self.answer(200, b'{"object": "list", "data": [{"id": "served", "object": "model"}]}')

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_port}/v1"
    yield state
    server.shutdown()


def test_requests_carry_vllm_fields_and_only_the_configured_key(endpoint, monkeypatch):
    # The SDK's own variables must not reach another endpoint.
    for name, value in [
        ("OPENAI_API_KEY", "sk-other"),
        ("OPENAI_ORG_ID", "org-other"),
        ("OPENAI_PROJECT_ID", "proj-other"),
        ("OPENAI_CUSTOM_HEADERS", "Authorization: Bearer x"),
    ]:
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("DISTILL_SERVER_API_KEY", raising=False)
    client = ChatClient(ServerConfig(base_url=endpoint["url"] + "/"))
    assert client.model == "served" and client.base_url == endpoint["url"]
    body = {
        "messages": [{"role": "user", "content": "q"}],
        "n": 2,
        "seed": 7,
        "max_tokens": 4,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "stop_token_ids": [3],
        "structured_outputs": {"regex": "Score: [0-9]"},
    }
    reply = client.chat(body)
    assert reply.reason is None and reply.attempts == 1 and reply.body == json.loads(REPLY)
    monkeypatch.setenv("DISTILL_JUDGE_API_KEY", "judge-key")
    ChatClient(JudgeConfig(base_url=endpoint["url"], model="m")).chat({"messages": []})
    (listed, _), (headers, sent), (keyed, to_judge) = endpoint["seen"]
    assert sent == {"model": "served", **body} and to_judge == {"model": "m", "messages": []}
    lower = [{k.lower(): v for k, v in h.items()} for h in (listed, headers, keyed)]
    assert all("openai-organization" not in h and "openai-project" not in h for h in lower)
    assert "authorization" not in lower[0] and "authorization" not in lower[1]
    assert lower[2]["authorization"] == "Bearer judge-key"


@pytest.mark.parametrize(
    "codes, reason, attempts, waits",
    [
        ([503, 429], None, 3, [0.5, 1.0]),  # 5xx and 429 are retried, then answered
        ([500, 500, 500], "http_500", 3, [0.5, 1.0]),
        ([400], "http_400", 1, []),  # a bad request stays bad
    ],
)
def test_what_is_retried(endpoint, codes, reason, attempts, waits):
    endpoint["status"] = list(codes)
    sleeps = []
    client = ChatClient(
        JudgeConfig(base_url=endpoint["url"], model="m", retries=2, backoff_s=0.5), sleeps.append
    )
    reply = client.chat({"messages": []})
    assert (reply.reason, reply.attempts, sleeps) == (reason, attempts, waits)
    assert (reply.body is None) == (reason is not None)
    if reason == "http_400":
        assert "no" in reply.text
    assert len(endpoint["seen"]) == attempts  # the SDK adds no retries of its own
