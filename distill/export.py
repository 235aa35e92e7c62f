"""The export stage: the trainer's checkpoint becomes a self-contained model directory that vLLM
serves, and vLLM must load it and generate before the round may go on (the gate).

The trainer already saves weights in the checkpoint layout vLLM loads (tiny_model.save_for_serving);
export adds the processor, tokenizer and chat template, records the weights hash, and proves it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from data_pipelines.items import Item
from distill.config import Config
from distill.data import audio_cache
from distill.io import atomic_write_json
from distill.prompting import load_tokenizer
from distill.rollout.engine import EXPORT_MANIFEST, generate, weights_hash
from distill.rollout.sample import item_request
from distill.rundir import RoundDir

GATE_PROBES = 4


class ExportGateError(RuntimeError):
    """The exported model did not load or generate in vLLM; the loop must not go on from it."""


def export_stage(cfg: Config, rd: RoundDir, processor_source: Path, probe_items: list[Item],
                 get_engine: Callable) -> dict:
    """Build rd.model_dir from rd.checkpoint and the processor files of `processor_source`."""
    from transformers import AutoProcessor

    start = time.time()
    if not rd.checkpoint.exists():
        raise FileNotFoundError(f"{rd.checkpoint}: no trainer checkpoint; run the train stage")
    tmp = rd.path / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(rd.model_dir, ignore_errors=True)  # a model left by a failed gate is not trusted
    tmp.mkdir(parents=True)
    for src in rd.checkpoint.iterdir():
        if src.suffix in (".safetensors", ".json") and src.name != "train_summary.json":
            shutil.copy2(src, tmp / src.name)
    AutoProcessor.from_pretrained(processor_source).save_pretrained(tmp)
    digest = weights_hash(tmp)
    manifest = {"weights_sha256": digest, "round": rd.index, "checkpoint": str(rd.checkpoint), "gate": "pending"}
    atomic_write_json(tmp / EXPORT_MANIFEST, manifest)
    tmp.rename(rd.model_dir)
    # The gate runs on the final path so its engine serves eval and the next round's sampling;
    # until it passes, the manifest says so and no sampler accepts the model.
    probes = gate(cfg, rd.model_dir, probe_items, get_engine)
    atomic_write_json(rd.model_dir / EXPORT_MANIFEST, {**manifest, "gate": "passed"})
    seconds = time.time() - start
    print(f"export: {rd.model_dir} (weights {digest[:12]}) loaded by vLLM and generated "
          f"{len(probes)} probe answers in {seconds:.1f}s")
    return {"model_dir": str(rd.model_dir), "weights_sha256": digest, "gate_probes": probes}


def gate(cfg: Config, model_dir: Path, probe_items: list[Item], get_engine: Callable) -> list[str]:
    """Load `model_dir` in vLLM and generate greedily for a few items; raise ExportGateError if not."""
    tokenizer = load_tokenizer(str(model_dir))
    cache = audio_cache(cfg)
    requests = [item_request(cfg, tokenizer, it, cache) for it in probe_items[:GATE_PROBES]]
    try:
        outs = generate(get_engine(model_dir), requests, 0.0, 1.0, cfg.eval.max_tokens)
    except Exception as exc:
        raise ExportGateError(f"{model_dir}: vLLM could not load or run the exported model: {exc}") from exc
    if not outs or all(o.num_tokens == 0 for o in outs):
        raise ExportGateError(f"{model_dir}: vLLM loaded the exported model but it generated nothing")
    return [o.text for o in outs]
