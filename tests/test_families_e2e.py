"""Each model family beyond Qwen2-Audio through the whole loop with the real engines: a cold start
trained with ZeRO-2 on 2 ranks and exported through the gate, one round (sample with vLLM,
ground, filter, SFT with LoRA under ZeRO-3 on 2 ranks, the merged export through the gate, eval)
that samples the cold start's weights, and grounding scores that a transformers teacher-forced
pass confirms. Qwen2-Audio runs the same loop in test_e2e.py."""

from dataclasses import replace

import numpy as np
import pytest

from distill.config import load_config
from distill.core.files import read_json
from distill.data import audio_cache
from distill.export.stage import hf_completion_logprobs
from distill.grounding.scoring import ScoreJob, score
from distill.models.registry import FAMILIES
from distill.models.tokens import load_tokenizer
from distill.rollout.engine import EngineCache, weights_hash
from tests.test_e2e import distill_run, finish, traces

pytestmark = pytest.mark.e2e

# The cold start trains everything (LoRA alone does not teach a random model the format in a few
# steps); round 1 trains LoRA adapters under ZeRO-3, which the export merges.
FAMILY_RUN = [
    "loop.rounds=1",
    "cold_start.train.zero_stage=2",
    "cold_start.train.num_processes=2",
    "train.zero_stage=3",
    "train.num_processes=2",
    "train.lora.enabled=true",
]


@pytest.mark.parametrize("family", [f.name for f in FAMILIES if f.name != "qwen2_audio"])
def test_a_family_runs_the_loop_and_its_engines_agree(tmp_path, family):
    log = finish(distill_run(tmp_path, f"model.tiny.family={family}", *FAMILY_RUN), timeout=900)
    run = tmp_path / "demo_cpu"
    cold, first = run / "round_000", run / "round_001"
    assert (
        read_json(run / "base_model" / "config.json")["model_type"]
        in next(f for f in FAMILIES if f.name == family).model_types
    )
    cold_export = read_json(cold / "model" / "distill_export.json")
    assert cold_export["gate"] == "passed"
    cold_summary = read_json(cold / "train" / "final" / "train_summary.json")
    assert (cold_summary["zero_stage"], cold_summary["processes"]) == (2, 2)
    summary = read_json(first / "train" / "final" / "train_summary.json")
    assert (summary["zero_stage"], summary["processes"], summary["lora"]) == (3, 2, True)
    # Round 1 sampled the cold start's weights.
    sampled = {t["lineage"]["model_sha256"] for t in traces(first)}
    assert sampled == {cold_export["weights_sha256"]} == {weights_hash(cold / "model")}
    # The LoRA-merged ZeRO-3 export: vLLM and transformers agree on it.
    assert read_json(first / "model" / "distill_export.json")["gate"] == "passed"
    assert read_json(first / "eval.json")["accuracy"] is not None
    assert "round 1 accuracy" in log

    # vLLM's teacher-forced scores (what grounding measures) are a real forward pass of the family.
    cfg = load_config(run / "config.yaml")
    trace = traces(first)[0]
    model = first / "model"
    audio = audio_cache(cfg).chunks(trace["audio"], trace["audio_sha256"])
    job = ScoreJob(
        trace["prompt"] + cfg.sample.generation_prefix,
        trace["completion"].removeprefix(cfg.sample.generation_prefix),
        audio,
    )
    # In float32: in bf16 (vLLM's "auto" on a CPU with native bf16) a token whose router scores
    # nearly tie picks other experts in an MoE model, and its log-probability moves by whole nats.
    with EngineCache(replace(cfg.engine, dtype="float32"), cfg.seed) as engines:
        by_vllm = score(engines.get(model), load_tokenizer(str(model)), [job], cfg.data.sample_rate)[0]
    by_hf = hf_completion_logprobs(model, [job], cfg.data.sample_rate)[0]
    assert len(by_hf) == len(by_vllm.reasoning) + len(by_vllm.answer) > 3
    np.testing.assert_allclose(np.array(by_vllm.reasoning + by_vllm.answer), by_hf, atol=1e-4)
