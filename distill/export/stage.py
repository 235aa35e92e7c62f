"""The export stage: the trainer's checkpoint becomes a self-contained model directory that vLLM
serves, and vLLM must load it, generate, and agree with transformers before the round may go on
(the gate).

The trainer already saves weights in the checkpoint layout vLLM loads (the family's `save`);
export adds the processor, tokenizer and chat template, a model card, records the weights hash,
and proves it: the probe answers vLLM generates are scored by vLLM (teacher-forced) and by a
float32 transformers forward pass, and the two must give their tokens the same log-probabilities.
A weight vLLM maps differently from transformers, or a config one of them reads differently,
shows as a gap of whole nats.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_pipelines.items import Item
from distill.config import Config
from distill.core.files import atomic_write_json
from distill.core.rundir import RoundDir
from distill.core.stages import StageContext
from distill.data import audio_cache, max_audio_items
from distill.export.model_card import serve_command, write_model_card
from distill.grounding.scoring import ScoreJob, completion_tokens, score
from distill.models.registry import family_of
from distill.models.tokens import load_tokenizer
from distill.rollout.engine import EXPORT_MANIFEST, generate, item_request, weights_hash


class ExportGateError(RuntimeError):
    """The exported model did not load or generate in vLLM; the loop must not go on from it."""


def export_stage(
    cfg: Config, rd: RoundDir, processor_source: Path, probe_items: list[Item], get_engine: Callable
) -> dict:
    """Build rd.model_dir from rd.policy (the RL policy, else the SFT student) and the processor
    files of `processor_source`."""
    from transformers import AutoProcessor

    start = time.time()
    family_of(processor_source)  # the processor of a CPU install may need the family's import hooks
    checkpoint = rd.policy
    if not checkpoint.exists():
        raise FileNotFoundError(f"{checkpoint}: no trainer checkpoint; run the train stage")
    tmp = rd.path / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(rd.model_dir, ignore_errors=True)  # a model left by a failed gate is not trusted
    tmp.mkdir(parents=True)
    for src in checkpoint.iterdir():
        if src.suffix in (".safetensors", ".json") and src.name not in (
            "train_summary.json",
            "rl_summary.json",
        ):
            shutil.copy2(src, tmp / src.name)
    AutoProcessor.from_pretrained(processor_source).save_pretrained(tmp)
    digest = weights_hash(tmp)
    manifest = {
        "weights_sha256": digest,
        "round": rd.index,
        "checkpoint": str(checkpoint),
        "gate": "pending",
    }
    atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
    tmp.rename(rd.model_dir)
    # The gate runs on the final path so its engine serves eval and the next round's sampling;
    # until it passes, the manifest says so and no sampler accepts the model.
    probes, agreement = gate(cfg, rd.model_dir, probe_items, get_engine)
    audio_items = max_audio_items(cfg.data)
    manifest = {
        **manifest,
        "gate": "passed",
        "agreement": agreement,
        "serve": serve_command(cfg, rd.model_dir, audio_items),
    }
    write_model_card(cfg, rd, manifest, audio_items)
    atomic_write_json(rd.model_dir / EXPORT_MANIFEST, manifest)
    seconds = time.time() - start
    print(
        f"export: {rd.model_dir} (weights {digest[:12]}) loaded by vLLM, generated {len(probes)} "
        f"probe answers and agreed with transformers ({agreement['mean_abs_diff']} nats/token on "
        f"{agreement['tokens']} tokens) in {seconds:.1f}s\nserve it with: {manifest['serve']}"
    )
    return {
        "model_dir": str(rd.model_dir),
        "weights_sha256": digest,
        "gate_probes": probes,
        "agreement": agreement,
        "serve": manifest["serve"],
    }


def gate(
    cfg: Config, model_dir: Path, probe_items: list[Item], get_engine: Callable
) -> tuple[list[str], dict]:
    """Load `model_dir` in vLLM, generate greedily for a few items, and check that transformers
    gives the generated tokens the log-probabilities vLLM does; raise ExportGateError if not."""
    tokenizer = load_tokenizer(str(model_dir))
    cache = audio_cache(cfg)
    requests = [item_request(cfg, tokenizer, it, cache) for it in probe_items[: cfg.export.probes]]
    try:
        llm = get_engine(model_dir)
        outs = generate(llm, requests, 0.0, 1.0, cfg.eval.max_tokens)
    except Exception as exc:
        raise ExportGateError(f"{model_dir}: vLLM could not load or run the exported model: {exc}") from exc
    if not outs or all(o.num_tokens == 0 for o in outs):
        raise ExportGateError(f"{model_dir}: vLLM loaded the exported model but it generated nothing")
    # The two engines are compared on the generated tokens; a probe that generated only its end
    # token has none, so its reference answer is scored instead (agreement needs some tokens).
    items = probe_items[: cfg.export.probes]
    jobs = [
        ScoreJob(r.prompt, o.text or it.answer, r.audio)
        for r, o, it in zip(requests, outs, items, strict=True)
    ]
    by_vllm = score(llm, tokenizer, jobs, cfg.data.sample_rate)
    by_hf = hf_completion_logprobs(model_dir, jobs, cfg.data.sample_rate)
    diffs = np.concatenate(
        [np.abs(np.array(lp.reasoning + lp.answer) - hf) for lp, hf in zip(by_vllm, by_hf, strict=True)]
    )
    agreement = {
        "tokens": int(diffs.size),
        "mean_abs_diff": round(float(diffs.mean()), 5),
        "max_abs_diff": round(float(diffs.max()), 5),
    }
    if agreement["mean_abs_diff"] > cfg.export.max_logprob_diff:
        raise ExportGateError(
            f"{model_dir}: vLLM and transformers disagree on the exported model: the probe answers' "
            f"tokens differ by {agreement['mean_abs_diff']} nats on average "
            f"(max {agreement['max_abs_diff']}, allowed {cfg.export.max_logprob_diff}); "
            f"a weight or config is read differently by the two"
        )
    return [o.text for o in outs], agreement


def hf_completion_logprobs(model_dir: Path, jobs: list[ScoreJob], sample_rate: int) -> list[np.ndarray]:
    """Per-token log-probabilities of each job's completion after its prompt from a float32
    transformers forward pass of `model_dir` (the reference the gate holds vLLM to)."""
    import torch
    from transformers import AutoProcessor

    family = family_of(model_dir)
    model = family.reference_model(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    result = []
    for job in jobs:
        audio = family.serving_audio(processor.feature_extractor, job.audio) if job.audio else None
        enc = processor(
            text=[job.prompt + job.completion], audio=audio, sampling_rate=sample_rate, return_tensors="pt"
        )
        ids, _ = completion_tokens(processor.tokenizer, job.prompt, job.completion)
        with torch.no_grad():
            logits = model(**enc).logits[0].float()
        targets = enc["input_ids"][0, 1:]
        if targets[-len(ids) :].tolist() != ids:
            raise ExportGateError(f"{model_dir}: transformers tokenized a probe answer differently from vLLM")
        logprobs = torch.log_softmax(logits[:-1], -1)
        result.append(logprobs[-len(ids) :].gather(1, targets[-len(ids) :, None])[:, 0].numpy())
    return result


def run(ctx: StageContext) -> dict:
    """The export stage of the round (core/stages.py): the processor files come from the base model."""
    return export_stage(ctx.cfg, ctx.rd, Path(ctx.cfg.model.path), ctx.data.eval, ctx.engines.get)
