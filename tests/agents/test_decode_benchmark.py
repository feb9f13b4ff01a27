"""The plain transformers decode loop that the decode benchmark measures the KV cache against."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from agents.benchmark import decode_speed, hf_decode_loop  # noqa: E402


def test_hf_decode_loop_gives_generates_greedy_tokens():
    """The hand-written loop (left-padded prompts, grown mask, explicit positions, the cache fed
    back) decodes what ``generate`` decodes greedily, with no early end."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(3, 40, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding, as the env's prompt window
    ids[1, :2] = 0
    mask[2, :4] = 0
    ids[2, :4] = 0
    tokens = hf_decode_loop(model, ids, mask, 7)
    with torch.no_grad():
        expected = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=7, min_new_tokens=7, do_sample=False,
            pad_token_id=0, eos_token_id=2,
        )[:, 6:]  # fmt: skip
    assert tokens.shape == (3, 7)
    torch.testing.assert_close(tokens, expected)


def test_decode_speed_reports_both_paths_on_models_of_the_same_shape():
    report = decode_speed(batch=2, new_tokens=3, repeats=1, warmup=0)
    params = report["parameters"]
    # The same blocks; the built-in policy also has a value head, its own output layer (GPT-2 ties
    # it to the embedding) and position embeddings of the observation length.
    assert abs(params["textgym"] - params["hf_loop"]) < 0.1 * params["hf_loop"]
    assert (
        report["tokens_per_second"]["textgym"]["median"]
        > 0
        < report["tokens_per_second"]["hf_loop"]["median"]
    )
