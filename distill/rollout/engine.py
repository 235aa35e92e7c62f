"""The vLLM offline engine, used through its public API only (`vllm.LLM`).

One live engine at a time: the export gate, eval and the next round's sampling all read the same
model, so they share one engine; training needs the accelerator (and, here, the cores), so the
engine is closed before it. vLLM may start its engine in a spawned process (engine.process), so
every entry point that reaches this module must sit under `if __name__ == "__main__":`.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipelines.audio_cache import AudioCache
from data_pipelines.items import Item
from distill.config import Config
from distill.core.files import read_json, sha256_file
from distill.core.processes import adopt_children
from distill.core.prompts import item_prompt
from distill.models.registry import family_of
from distill.rollout.config import EngineConfig

EXPORT_MANIFEST = "distill_export.json"
# Installed on every engine distill opens: bans tokens in one batched write (rollout/banned.py).
BANNED_TOKENS_PROCESSOR = "distill.rollout.banned:BannedTokens"


@dataclass
class Request:
    prompt: str
    audio: list[np.ndarray]  # one waveform per audio placeholder in the prompt (chunks of long audio)
    sample_rate: int
    seed: int
    # The answer must be one of these strings (vLLM structured outputs); None: free text.
    choices: tuple[str, ...] | None = None


def choice_max_tokens(choices: tuple[str, ...]) -> int:
    """Tokens enough for the longest choice and the end: the grammar lets the model spell a choice
    in any tokenization, one byte a token at worst."""
    return max(len(c.encode("utf-8")) for c in choices) + 1


@dataclass
class Completion:
    text: str
    num_tokens: int
    finish_reason: str
    # Tokens generated before the reasoning's closing tag (None: no such tag was generated).
    reasoning_tokens: int | None = None
    token_ids: tuple[int, ...] = ()
    # Each generated token's log-probability under the raw model (before temperature, top-p or
    # banned tokens: vLLM's default logprobs_mode), when asked for.
    logprobs: tuple[float, ...] = ()


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the model's safetensors files (names and bytes), the identity of a model."""
    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    for path in files:
        digest.update(path.name.encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def verified_weights_hash(model_dir: str | Path) -> str:
    """The weights hash, checked against the one the export recorded (when there is an export)."""
    actual = weights_hash(model_dir)
    manifest = Path(model_dir) / EXPORT_MANIFEST
    if manifest.exists():
        export = read_json(manifest)
        if export.get("gate") != "passed":
            raise RuntimeError(
                f"{model_dir}: the export gate has not passed (vLLM never loaded this model and "
                "generated); re-run the export stage"
            )
        recorded = export["weights_sha256"]
        if recorded != actual:
            raise RuntimeError(
                f"{model_dir}: weights changed since export (recorded {recorded[:12]}, found {actual[:12]}); "
                "re-run the export stage"
            )
    return actual


# CPU flags of native bf16 matrix instructions (x86 AVX512-BF16 / AMX, Arm BF16).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (Linux /proc/cpuinfo flags; elsewhere assume so)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.split(":")[0].strip() in ("flags", "Features")
        for flag in line.split(":", 1)[1].split()
    }
    return bool(flags & BF16_CPU_FLAGS)


def engine_dtype(dtype: str, cuda: bool, cpuinfo: str | None = None) -> str:
    """The dtype vLLM runs in. "auto" on a CPU without native bf16 means float32: vLLM's "auto"
    downcasts a float32 model to bf16 there too, and emulated bf16 matmuls made sampling 1.8x and
    teacher-forced scoring 3.7x slower than float32 on an AVX2-only CPU (docs/known-traps.md)."""
    if dtype != "auto" or cuda or cpu_has_bf16(cpuinfo):
        return dtype
    return "float32"


def engine_inline(process: str, cuda: bool) -> bool:
    """Whether vLLM's engine runs in this process (engine.process; "auto": on CPU only)."""
    return process == "inline" or process == "auto" and not cuda


def _not_thread_noise(record: logging.LogRecord) -> bool:
    return "torch.set_num_threads" not in record.getMessage()


def open_engine(model_dir: str | Path, cfg: EngineConfig, seed: int, audio_items: int = 1):
    import torch

    family_of(model_dir)  # its runtime first: vLLM inspects the model in a subprocess that needs the hooks
    from vllm import LLM

    cuda = torch.cuda.is_available()
    inline = engine_inline(cfg.process, cuda)
    if inline:
        # vLLM's CPU worker replaces torch.set_num_threads in its process with a warning, and its
        # renderer calls it around every request: inline, that is one warning per request here.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_not_thread_noise)

    # vLLM reads the switch when the engine starts; it is set only for that, so that the processes
    # this one starts (training, `vllm serve`) see the environment they were given.
    key, before = "VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ[key] = "0" if inline else "1"
    try:
        return LLM(
            model=str(model_dir),
            max_model_len=cfg.max_model_len,
            kv_cache_memory_bytes=cfg.kv_cache_memory_bytes,
            dtype=engine_dtype(cfg.dtype, cuda),
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            # Per-request seeds crash vLLM's CPU sampler when a prefill is chunked ("CPU Generator
            # does not use offset"), and a seed per sample is what makes shards reproducible.
            enable_chunked_prefill=cfg.enable_chunked_prefill,
            enable_prefix_caching=cfg.enable_prefix_caching,
            block_size=cfg.block_size,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            limit_mm_per_prompt={"audio": audio_items},
            seed=seed,
            logits_processors=[BANNED_TOKENS_PROCESSOR],
        )
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def engine_prompt(text: str, audio: list[np.ndarray], sample_rate: int) -> dict:
    """A vLLM prompt: the chat text with one waveform per audio placeholder, in order."""
    return {"prompt": text, "multi_modal_data": {"audio": [(a, sample_rate) for a in audio]}}


# Request ids of generate_batches, unique in this process (vLLM reports outputs under the ids given).
REQUEST_IDS = itertools.count()


def generate(
    llm,
    requests: list[Request],
    temperature: float,
    top_p: float,
    max_tokens: int,
    think_close_id: int | None = None,
    n: int = 1,
    banned: tuple[int, ...] | None = None,
    logprobs: bool = False,
) -> list[Completion]:
    """`n` completions per request, request by request; each request carries its own seed (vLLM
    gives its n samples seeds seed, seed+1, ...). With `think_close_id`, each completion counts
    the tokens generated before that token. n > 1 prepares each prompt and its audio once, which
    on CPU costs more than decoding a short answer. `banned` token ids are never generated. With
    `logprobs`, each completion carries its tokens' log-probabilities. A request with `choices`
    answers exactly one of them (and `max_tokens` does not cut it short)."""
    settings = Sampling(temperature, top_p, max_tokens, think_close_id, n, banned, logprobs)
    settings.check_engine(llm)
    detokenizer = settings.detokenizer(llm)
    outs = llm.generate(
        [engine_prompt(r.prompt, r.audio, r.sample_rate) for r in requests],
        [settings.params(r, detokenizer) for r in requests],
        use_tqdm=True,
    )
    return [c for out in outs for c in settings.completions(out, detokenizer)]


def generate_batches(
    llm, batches: Iterable[list[Request]], settings: Sampling
) -> Iterator[tuple[int, list[Completion]]]:
    """`generate` over a stream of batches on one engine run: yields (batch index, its completions)
    as each batch finishes. The next batch joins the engine while the ones before it still run,
    so the engine's batch stays full across batch boundaries instead of draining to a tail at the
    end of each; batches are taken from `batches` only as the engine has room (about two full
    engine batches of sequences waiting), so only those hold their prompts and audio."""
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.sampling_params import RequestOutputKind

    settings.check_engine(llm)
    engine = llm.llm_engine
    room = 2 * engine.vllm_config.scheduler_config.max_num_seqs
    detokenizer = settings.detokenizer(llm)
    source = enumerate(batches)
    waiting: dict[int, dict[str, object]] = {}  # batch index -> request id -> output (None: running)
    owner: dict[str, int] = {}
    exhausted = False
    bar = tqdm(desc="sample", unit="trace", total=0, mininterval=1.0)  # LLM.generate's bar, across batches
    try:
        while True:
            # Sequences, not requests: vLLM counts each of a request's n samples as its own request.
            while not exhausted and engine.get_num_unfinished_requests() < room:
                index, batch = next(source, (None, None))
                if batch is None:
                    exhausted = True
                elif not batch:
                    yield index, []
                else:
                    waiting[index] = {}
                    # Rendered as LLM.generate renders (the audio processed here, in this process).
                    rendered = llm.renderer.render_cmpl(
                        [
                            parse_model_prompt(
                                llm.model_config, engine_prompt(r.prompt, r.audio, r.sample_rate)
                            )
                            for r in batch
                        ],
                        llm.renderer.default_cmpl_tok_params,
                    )
                    for r, prompt in zip(batch, rendered, strict=True):
                        params = settings.params(r, detokenizer)
                        params.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
                        request_id = f"distill-{next(REQUEST_IDS)}"
                        engine.add_request(request_id, prompt, params)
                        waiting[index][request_id] = None
                        owner[request_id] = index
                    bar.total += len(batch) * settings.n
                    bar.refresh()
            if not engine.has_unfinished_requests():
                break
            for out in engine.step():
                if not out.finished:
                    continue
                index = owner.pop(out.request_id)
                waiting[index][out.request_id] = out
                bar.update(len(out.outputs))
                if all(o is not None for o in waiting[index].values()):
                    outs = waiting.pop(index).values()  # in the order the batch's requests were added
                    yield index, [c for o in outs for c in settings.completions(o, detokenizer)]
    finally:
        bar.close()
        # A caller that stops early (an error writing a shard) leaves nothing running in the engine
        # for the next generation to meet.
        if owner:
            engine.abort_request(list(owner))
    if waiting:
        raise RuntimeError(f"vLLM's engine stopped with batches {sorted(waiting)} unfinished")


@dataclass(frozen=True)
class Sampling:
    """What `generate` asks of every request but its prompt, audio and seed."""

    temperature: float
    top_p: float
    max_tokens: int
    think_close_id: int | None = None
    n: int = 1
    banned: tuple[int, ...] | None = None  # token ids never to generate (audio_token_ids)
    logprobs: bool = False

    def detokenizer(self, llm):
        """The `tokenizers.Tokenizer` that decodes the text here, or None where vLLM decodes it.
        vLLM detokenizes every log-probability's token on its own, and repairs the ones that end
        inside a UTF-8 character by decoding them again with their neighbours: sampling with
        log-probabilities took a third longer for that alone (docs/benchmarks.md, "Grounding"). So
        with log-probabilities vLLM does not detokenize, and the text is decoded here as vLLM would."""
        return getattr(llm.get_tokenizer(), "backend_tokenizer", None) if self.logprobs else None

    def check_engine(self, llm) -> None:
        """Refuse an engine that would ignore the ban: one opened without `open_engine`'s logits
        processor."""
        if self.banned and BANNED_TOKENS_PROCESSOR not in (
            llm.llm_engine.model_config.logits_processors or ()
        ):
            raise RuntimeError(
                f"this vLLM engine was opened without {BANNED_TOKENS_PROCESSOR}, so it cannot ban tokens; "
                "open it with distill.rollout.engine.open_engine"
            )

    def params(self, r: Request, detokenizer):
        """vLLM's SamplingParams of request `r`."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        from distill.rollout.banned import BANNED_KEY

        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=r.seed,
            max_tokens=self.max_tokens if r.choices is None else choice_max_tokens(r.choices),
            structured_outputs=None if r.choices is None else StructuredOutputsParams(choice=list(r.choices)),
            # A choice grammar admits no banned token (and the processor would cost a probe time).
            extra_args={BANNED_KEY: list(self.banned)} if self.banned and r.choices is None else None,
            skip_special_tokens=False,
            logprobs=0 if self.logprobs else None,
            # A few flat lists per request instead of one dict per token.
            flat_logprobs=self.logprobs,
            detokenize=detokenizer is None,
        )

    def completions(self, out, detokenizer) -> list[Completion]:
        """The n completions of one vLLM RequestOutput, in sample order."""
        result = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            ids = list(o.token_ids)
            close = self.think_close_id
            text = (
                o.text
                if detokenizer is None
                else stream_text(detokenizer, list(out.prompt_token_ids), ids, o.finish_reason == "stop")
            )
            result.append(
                Completion(
                    text=text,
                    num_tokens=len(ids),
                    finish_reason=str(o.finish_reason),
                    reasoning_tokens=ids.index(close) if close is not None and close in ids else None,
                    token_ids=tuple(ids),
                    logprobs=first_logprobs(o.logprobs) if self.logprobs else (),
                )
            )
        return result


def stream_text(tokenizer, prompt_ids: list[int], ids: list[int], stop_terminated: bool) -> str:
    """The text of generated `ids` as vLLM's incremental detokenizer gives it (its fast path, with
    special tokens kept): a `tokenizers` DecodeStream primed with the prompt, which holds back the
    bytes of a character not yet complete (so a trace ending inside one drops them), without the
    stop token that ended the generation. `tokenizer`: a `tokenizers.Tokenizer`."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(ids=prompt_ids, skip_special_tokens=False)
    pieces = []
    for token_id in ids[:-1] if stop_terminated else ids:
        # What vLLM does when a step fails: an id the stream cannot take is no text, and a token
        # that leaves the stream's prefix invalid UTF-8 starts the stream afresh.
        try:
            pieces.append(stream.step(tokenizer, token_id) or "")
        except (OverflowError, TypeError):
            continue
        except Exception as e:
            if not str(e).startswith("Invalid prefix encountered"):
                raise
            stream = DecodeStream(skip_special_tokens=False)
            pieces.append(stream.step(tokenizer, token_id) or "")
    return "".join(pieces)


def first_logprobs(flat) -> tuple[float, ...]:
    """The sampled token's log-probability at each position of vLLM's FlatLogprobs (the first
    entry of a position; top-k alternatives, if any, follow it)."""
    return tuple(flat.logprobs[i] for i in flat.start_indices)


class EngineCache:
    """Holds at most one live engine, keyed by model directory."""

    def __init__(self, cfg: EngineConfig, seed: int, audio_items: int = 1):
        self.cfg = cfg
        self.seed = seed
        self.audio_items = audio_items
        self.model_dir: str | None = None
        self.llm = None

    def get(self, model_dir: str | Path):
        key = str(Path(model_dir).resolve())
        if self.model_dir != key:
            self.close()
            self.llm = open_engine(key, self.cfg, self.seed, self.audio_items)
            self.model_dir = key
            adopt_children()  # a separate engine's processes, which the owner token cannot mark
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            # vLLM 0.32's LLM has no public shutdown; stop the engine process explicitly when the
            # client exposes it, else rely on garbage collection.
            core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if hasattr(core, "shutdown"):
                core.shutdown()
            self.llm = None
            self.model_dir = None
            gc.collect()

    def __enter__(self) -> EngineCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def item_request(cfg: Config, tokenizer, item: Item, cache: AudioCache, seed: int = 0) -> Request:
    """The engine request for one item: chat prompt (one audio placeholder per chunk) + generation
    prefix, with its audio from the run's cache."""
    audio = cache.chunks(item.audio, item.audio_sha256)
    prompt = item_prompt(tokenizer, item, cfg.data.system_prompt, len(audio)) + cfg.sample.generation_prefix
    return Request(prompt, audio, cfg.data.sample_rate, seed)
