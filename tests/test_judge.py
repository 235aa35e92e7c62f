"""The LLM judge against a real `vllm serve` (OpenAI-compatible API) of the tiny model on localhost.

A tiny random model's judgement is worthless; what these tests prove is the wiring (audio and
trace reach the server, a score comes back and decides), timeouts, retries with backoff, errors
that are not retried, and replies without a score.
"""

import numpy as np
import pytest

from data_pipelines.audio import write_wav
from distill.config import load_config
from distill.core.files import atomic_write_jsonl, read_jsonl
from distill.core.rundir import RunDir
from distill.filter.config import JudgeConfig
from distill.filter.judge import Judge, judge_result
from distill.filter.stage import filter_stage
from distill.training.launch import free_port
from tests.serving import start_server

# One `vllm serve` for the module: its tests run in one test process (scripts/dev.sh: --dist loadgroup).
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("judge_server")]
TRACE = "<think>\nThe tone holds near 900 Hz, above the 500 Hz boundary, so it is high.\n</think>\nhigh"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = free_port()
    proc = start_server(
        tiny_model,
        port,
        tmp_path_factory.mktemp("serve") / "serve.log",
        "--served-model-name",
        "judge",
        "--max-model-len",
        "2048",
        "--limit-mm-per-prompt",
        '{"audio": 2}',
    )
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=60)


def tone(seconds=1.0, hz=900.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_a_scored_reply_decides(server):
    cfg = JudgeConfig(base_url=server, score_regex="Score: [0-9]", min_score=0.0)
    judge = Judge(cfg)
    assert judge.model == "judge"  # looked up from /models
    verdict = judge.score("Is the tone high or low?", TRACE, tone(40.0), 16000)  # two audio parts of <= 25 s
    assert verdict.reason is None and verdict.attempts == 1 and 0 <= verdict.score <= 9
    assert judge_result(verdict, cfg) is None
    assert judge_result(verdict, JudgeConfig(min_score=10.0)) == "judge:low_score"


def test_a_reply_without_a_score_is_a_parse_error(server):
    verdict = Judge(JudgeConfig(base_url=server, model="judge")).score("Q?", TRACE, tone(), 16000)
    assert verdict.score is None and verdict.reason == "judge:parse_error" and verdict.reply
    assert judge_result(verdict, JudgeConfig(on_error="reject")) == "judge:parse_error"
    assert judge_result(verdict, JudgeConfig(on_error="keep")) is None


def test_timeouts_are_retried_with_backoff(server):
    waits = []
    cfg = JudgeConfig(base_url=server, model="judge", timeout_s=0.001, retries=2, backoff_s=0.5)
    verdict = Judge(cfg, sleep=waits.append).score("Q?", TRACE, tone(), 16000)
    assert (verdict.reason, verdict.attempts) == ("judge:timeout", 3) and waits == [0.5, 1.0]


def test_client_errors_are_not_retried_and_a_gone_server_is(server):
    waits = []
    verdict = Judge(JudgeConfig(base_url=server, model="no-such-model"), sleep=waits.append).score(
        "Q?", TRACE, None, 16000
    )
    assert verdict.reason == "judge:http_404" and verdict.attempts == 1 and waits == []
    gone = f"http://127.0.0.1:{free_port()}/v1"
    verdict = Judge(
        JudgeConfig(base_url=gone, model="judge", retries=1, backoff_s=0.1), sleep=waits.append
    ).score("Q?", TRACE, None, 16000)
    assert (verdict.reason, verdict.attempts) == ("judge:error", 2) and waits == [0.1]
    with pytest.raises(RuntimeError, match="cannot list the models"):
        Judge(JudgeConfig(base_url=gone))


def test_filter_stage_with_the_judge(server, tmp_path, tiny_model):
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            "sample.num_shards=1",
            "filter.judge.enabled=true",
            "grounding.enabled=false",
            f"filter.judge.base_url={server}",
            "filter.judge.score_regex='Score: [0-9]'",
            "filter.judge.min_score=0",
            "filter.reward_weights={correct: 0.5, format: 0.0, judge: 0.5}",
        ],
    )  # merged: format set to 0
    write_wav(tmp_path / "a.wav", tone(), 16000)
    rows = [
        {
            "trace_id": f"a#{j}",
            "item_id": "a",
            "sample_index": j,
            "audio": str(tmp_path / "a.wav"),
            "question": "Is the tone high or low?",
            "prompt": "p",
            "completion": text,
            "finish_reason": "stop",
            "reference": "high",
            "choices": ["high", "low"],
            "lineage": {},
        }
        for j, text in enumerate([TRACE, TRACE.replace("high", "low")])
    ]
    rd = RunDir(cfg.run_dir).round(1)
    atomic_write_jsonl(rd.shard_path(0, 1), rows)
    stats = filter_stage(cfg, rd, tiny_model)
    (kept,) = read_jsonl(rd.filtered)
    assert kept["checks"]["judge"] == "pass" and 0 <= kept["judge_score"] <= 9 and kept["reward"] == 1.0
    (rejected,) = read_jsonl(rd.rejected)
    assert "judge" not in rejected["checks"]  # only traces that passed every rule check are judged
    assert stats["judged"] == 1 and stats["judge_outcomes"] == {"scored": 1}
