"""Judge client behaviour that a real vLLM server never shows: endpoints answering 200 with
something that is not a chat completion (proxies, other servers). A stand-in HTTP server on
localhost plays that endpoint; the real-server tests are in tests/test_judge.py."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from distill.filter.config import JudgeConfig
from distill.filter.judge import Judge

REPLIES = [
    b'{"choices": null}',
    b"[1]",
    b'{"choices": [{"message": null}]}',
    b"not json",
    b'{"choices": [{"message": {"content": "Score: 7"}}]}',
]


@pytest.fixture
def endpoint():
    replies = list(REPLIES)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # http.server names the method
            self.rfile.read(int(self.headers["Content-Length"]))
            body = replies.pop(0)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_replies_that_are_not_chat_completions_are_parse_errors(endpoint):
    judge = Judge(JudgeConfig(base_url=endpoint, model="m"))
    verdicts = [judge.score("q", "t", None, 16000) for _ in REPLIES]
    assert [v.reason for v in verdicts] == ["judge:parse_error"] * 4 + [None]
    assert verdicts[-1].score == 7.0 and all(v.attempts == 1 for v in verdicts)
    assert json.loads(json.dumps(verdicts[0].reply)) == '{"choices": null}'
