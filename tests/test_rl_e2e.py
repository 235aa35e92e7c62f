"""The RL stage on the real engines: weights pushed into a live vLLM engine are what it scores
and samples with (within the export gate's tolerance of transformers), and a stale engine is
refused."""

import shutil

import numpy as np
import pytest
import torch

from distill.config import load_config
from distill.core.prompts import item_prompt
from distill.core.rundir import RunDir
from distill.data import audio_cache
from distill.export.stage import hf_completion_logprobs
from distill.grounding.scoring import ScoreJob, score
from distill.loop import init_run_dir
from distill.models.registry import family_of
from distill.models.tokens import load_tokenizer
from distill.rl.sync import StalePolicyError, check_policy, push_weights
from distill.rollout.engine import EngineCache, Request, generate

pytestmark = pytest.mark.e2e


def nll_steps(model, processor, family, job: ScoreJob, rate: int, steps: int = 3) -> None:
    """A few SGD steps on the trace's tokens, projector and decoder alike: an update large enough
    to move every log-probability of the trace."""
    audio = family.serving_audio(processor.feature_extractor, job.audio)
    enc = processor(text=[job.prompt + job.completion], audio=audio, sampling_rate=rate, return_tensors="pt")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        logits = model(**enc).logits[0, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits, enc["input_ids"][0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_pushed_weights_are_the_engines_policy(tmp_path, tiny_model):
    from transformers import AutoProcessor

    cfg = load_config(
        "configs/demo_cpu.yaml",
        [
            f"output_dir={tmp_path}",
            f"model.path={tiny_model}",
            "model.build_tiny=false",
            "data.synthetic.train_items=4",
            "data.synthetic.eval_items=2",
        ],
    )
    data = init_run_dir(cfg, RunDir(cfg.run_dir))
    item, rate = data.train[0], cfg.data.sample_rate
    family, tokenizer = family_of(tiny_model), load_tokenizer(str(tiny_model))
    real = audio_cache(cfg).chunks(item.audio, item.audio_sha256)
    prompt = item_prompt(tokenizer, item, cfg.data.system_prompt, len(real)) + cfg.sample.generation_prefix
    job = ScoreJob(prompt, "The tone sits near 900 Hz, so it is high.\n</think>\nhigh", real)
    greedy = [Request(prompt, real, rate, 0)]

    model = family.load_for_training(tiny_model, torch.float32, "sdpa")
    nll_steps(model, AutoProcessor.from_pretrained(tiny_model), family, job, rate)
    updated = tmp_path / "updated"
    shutil.copytree(tiny_model, updated, ignore=shutil.ignore_patterns("*.safetensors"))
    family.save(model, updated)
    reference = hf_completion_logprobs(updated, [job], rate)[0]
    tolerance = cfg.export.max_logprob_diff

    with EngineCache(cfg.engine, cfg.seed) as engines:
        llm = engines.get(tiny_model)
        # Scored and sampled before the update: the prefix, encoder and audio caches hold the old
        # weights' work.
        lp = score(llm, tokenizer, [job], rate)[0]
        generate(llm, greedy, 0.0, 1.0, 16)
        before = np.array(lp.reasoning + lp.answer)
        assert np.abs(before - reference).mean() > 20 * tolerance  # the update moved the trace
        with pytest.raises(StalePolicyError, match="step None"):
            check_policy(llm, 1)

        seconds = push_weights(llm, family.checkpoint_state_dict(model.state_dict()).items(), step=1)
        check_policy(llm, 1)
        lp = score(llm, tokenizer, [job], rate)[0]
        after = np.array(lp.reasoning + lp.answer)
        assert np.abs(after - reference).mean() <= tolerance, np.abs(after - reference).mean()
        assert seconds > 0
        with pytest.raises(StalePolicyError, match="holds policy step 1, the trainer is at step 2"):
            check_policy(llm, 2)
        pushed = generate(llm, greedy, 0.0, 1.0, 16, logprobs=True)[0]
    # What the engine samples after the push is what an engine started on the updated weights
    # samples: the same tokens with the same log-probabilities.
    with EngineCache(cfg.engine, cfg.seed) as engines:
        fresh = generate(engines.get(updated), greedy, 0.0, 1.0, 16, logprobs=True)[0]
    assert pushed.token_ids == fresh.token_ids and pushed.num_tokens == 16
    np.testing.assert_allclose(pushed.logprobs, fresh.logprobs, atol=1e-4)
