"""The export gate with the real engines, and `vllm serve` of an exported model on localhost."""

import json
import shlex
import shutil

import httpx
import pytest

from data_pipelines.synthetic import generate_split
from distill.config import load_config
from distill.core.files import read_json
from distill.core.rundir import RunDir
from distill.data import audio_cache
from distill.export import stage as export
from distill.export.model_card import serve_launcher
from distill.export.stage import ExportGateError, export_stage
from distill.models.config import TinyModelConfig
from distill.models.registry import build_tiny_model
from distill.openai_client import wav_base64
from distill.rollout.engine import EXPORT_MANIFEST, EngineCache, weights_hash
from distill.training.launch import free_port
from tests.serving import start_printed_server

pytestmark = pytest.mark.e2e


def trained_round(tmp_path, tiny_model):
    """A round whose trainer checkpoint is the tiny model, with the stats a round has by then."""
    cfg = load_config("configs/demo_cpu.yaml", [f"output_dir={tmp_path}", f"model.path={tiny_model}"])
    rd = RunDir(cfg.run_dir).round(1)
    shutil.copytree(
        tiny_model, rd.checkpoint, ignore=shutil.ignore_patterns("tokenizer*", "*processor*", "*.jinja")
    )
    rd.stats_dir.mkdir(parents=True)
    (rd.stats_dir / "train.json").write_text(
        json.dumps(
            {
                "model": str(tiny_model),
                "data": ["round_001/filtered.jsonl"],
                "steps": 3,
                "rows": 12,
                "final_loss": 1.5,
                "zero_stage": 2,
                "lora": False,
                "processes": 2,
                "mix": {"traces": {"rows": 12}, "total": 12},
            }
        )
    )
    items = generate_split(tmp_path / "items", "eval", ["pitch_level"], 4, 0, 1, 16000)
    return cfg, rd, items


def test_export_gate_passes_writes_a_card_and_refuses_disagreement(tmp_path, tiny_model, monkeypatch):
    cfg, rd, items = trained_round(tmp_path, tiny_model)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        stats = export_stage(cfg, rd, tiny_model, items, engines.get)
        manifest = read_json(rd.model_dir / EXPORT_MANIFEST)
        assert manifest["gate"] == "passed" and manifest["weights_sha256"] == weights_hash(rd.model_dir)
        # vLLM (bf16) and transformers (float32) agree on the probe answers' tokens.
        agreement = manifest["agreement"]
        assert agreement["tokens"] > 20 and agreement["mean_abs_diff"] < cfg.export.max_logprob_diff
        assert stats["serve"].startswith(
            shlex.join([*serve_launcher(), str(rd.model_dir), "--chat-template"])
        )
        for name in (
            "config.json",
            "generation_config.json",
            "chat_template.jinja",
            "tokenizer.json",
            "processor_config.json",
            "model.safetensors",
            "README.md",
        ):
            assert (rd.model_dir / name).exists(), name
        card = (rd.model_dir / "README.md").read_text()
        assert manifest["weights_sha256"] in card and stats["serve"] in card and "12 rows" in card
        assert "pipeline_tag: audio-text-to-text" in card

        # A model transformers reads differently from vLLM (here: other weights on the
        # transformers side) fails the gate with the size of the disagreement.
        other = build_tiny_model(tmp_path / "other", TinyModelConfig(seed=7))
        reference = export.hf_completion_logprobs
        monkeypatch.setattr(
            export, "hf_completion_logprobs", lambda _dir, jobs, sr: reference(other, jobs, sr)
        )
        with pytest.raises(ExportGateError, match="vLLM and transformers disagree"):
            export_stage(cfg, rd, tiny_model, items, engines.get)
    assert read_json(rd.model_dir / EXPORT_MANIFEST)["gate"] == "pending"  # no sampler takes it


def test_vllm_serve_of_an_exported_model_answers_a_chat_request_with_audio(tmp_path, tiny_model):
    """The serve command the export prints, run as written (plus a local port), answers a chat
    request with base64 WAV audio and the assistant turn pre-filled with the generation prefix."""
    cfg, rd, items = trained_round(tmp_path, tiny_model)
    with EngineCache(cfg.engine, cfg.seed) as engines:
        stats = export_stage(cfg, rd, tiny_model, items, engines.get)
    port = free_port()
    proc = start_printed_server(stats["serve"], port, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}/v1"
    try:
        audio = audio_cache(cfg).get(items[0].audio)
        body = {
            "model": str(rd.model_dir),
            "max_tokens": 24,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_audio",
                            "input_audio": {"data": wav_base64(audio, 16000), "format": "wav"},
                        },
                        {"type": "text", "text": items[0].question},
                    ],
                },
                {"role": "assistant", "content": cfg.sample.generation_prefix},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
            "skip_special_tokens": False,
        }
        reply = httpx.post(f"{url}/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        assert choice["message"]["content"] and reply.json()["usage"]["completion_tokens"] > 0
        assert reply.json()["usage"]["prompt_tokens"] > 20  # the audio's placeholder tokens reached the model
    finally:
        proc.terminate()
        proc.wait(timeout=60)
