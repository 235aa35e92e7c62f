"""Sampling from a real `vllm serve` of the tiny model on localhost (sample.backend=server),
including a server that goes away mid-shard."""

import threading
import time

import pytest

from distill.config import load_config
from distill.core.files import read_jsonl
from distill.core.rundir import RunDir
from distill.loop import init_run_dir
from distill.rollout.engine import EngineCache
from distill.rollout.sample import sample_stage
from distill.rollout.server import ServerSamplingError, partial_path
from distill.training.launch import free_port
from tests.serving import start_server

pytestmark = pytest.mark.e2e


def serve(model, port, log_path):
    return start_server(model, port, log_path, "--served-model-name", "teacher", "--max-model-len", "1024")


def test_server_sampling_resumes_a_shard_after_the_server_goes_away(tmp_path, tiny_model):
    port = free_port()
    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            f"model.path={tiny_model}",
            "data.synthetic.train_items=12",
            "data.synthetic.eval_items=4",
            "sample.n=2",
            "sample.max_tokens=32",
            "sample.num_shards=2",
            "sample.backend=server",
            f"sample.server.base_url=http://127.0.0.1:{port}/v1",
            "sample.server.concurrency=1",
            "sample.server.retries=1",
            "sample.server.backoff_s=0.2",
            "sample.server.timeout_s=30",
            "grounding.enabled=false",
        ],
    )
    data = init_run_dir(cfg, RunDir(cfg.run_dir))
    rd = RunDir(cfg.run_dir).round(1)
    first = serve(tiny_model, port, tmp_path / "a.log")
    partial = partial_path(rd.shard_path(1, 2))

    def kill_mid_shard():  # once shard 1 has two items in, the server goes away
        while first.poll() is None:
            if partial.exists() and len(partial.read_text().splitlines()) >= 2:
                first.kill()
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_mid_shard, daemon=True)
    watcher.start()
    with EngineCache(cfg.engine, cfg.seed) as engines, pytest.raises(ServerSamplingError, match="re-running"):
        sample_stage(cfg, data.train, tiny_model, rd, engines.get)
    first.wait()
    watcher.join()
    assert rd.shard_path(0, 2).exists() and not rd.shard_path(1, 2).exists()
    saved = len(list(read_jsonl(partial)))
    assert 2 <= saved < 6

    second = serve(tiny_model, port, tmp_path / "b.log")
    try:
        with EngineCache(cfg.engine, cfg.seed) as engines:
            stats = sample_stage(cfg, data.train, tiny_model, rd, engines.get)
    finally:
        second.terminate()
        second.wait(timeout=60)
    # The second server was asked only for the items the partial shard lacked.
    asked = (tmp_path / "b.log").read_text().count("POST /v1/chat/completions")
    assert asked == 6 - saved and stats["shards_skipped"] == 1 and not partial.exists()
    rows = [r for i in range(2) for r in read_jsonl(rd.shard_path(i, 2))]
    assert len(rows) == 12 * 2 and len({r["trace_id"] for r in rows}) == 24
    assert all(r["completion"].startswith("<think>\n") and r["num_tokens"] > 0 for r in rows)
    assert {r["lineage"]["model_sha256"] for r in rows} == {f"server:http://127.0.0.1:{port}/v1#teacher"}
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    # The two choices of one request are different samples.
    by_item = {}
    for r in rows:
        by_item.setdefault(r["item_id"], set()).add(r["completion"])
    assert sum(len(v) == 2 for v in by_item.values()) >= 6
