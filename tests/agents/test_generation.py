"""Text generation: greedy, sampling (temperature, top-k, top-p) and beam search, against full
forward passes done by hand."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agents.generation import Beams, beam_search, encode_prompts, filter_logits, generate
from agents.policy import KVCache, PolicyConfig, RecomputeCache, TransformerPolicy
from agents.ppo import PPO, PPOConfig
from textgym.vector import TextGenVectorEnv

NEG = float("-inf")


class Setup:
    """A task's tokenizer and layout, and a policy with random weights large enough that what it
    generates depends on the prompt (the freshly initialised policy is near uniform)."""

    def __init__(self, task: str, seed: int = 0, eos_bias: float = 0.0):
        env = TextGenVectorEnv(1, task=task)
        self.tok, self.P, self.M = env.tokenizer, env.prompt_window, env.config.max_new_tokens
        self.eos = self.tok.eos_id
        self.prompts = list(env.config.prompts)
        self.policy = TransformerPolicy(self.tok.vocab_size, self.P + self.M, PolicyConfig(d_model=32))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.policy.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.in_features))
                    m.bias.zero_()
                elif isinstance(m, nn.Embedding):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
            bias = self.policy.policy_head.bias
            # Never <pad>, <bos> or <unk>, so that decoded text encodes back to the same ids.
            for special in (self.tok.pad_id, self.tok.bos_id, self.tok.unk_id):
                bias[special] = -1e4
            bias[self.eos] = eos_bias  # how readily episodes end
        self.policy.eval()

    def gen(self, prompts, **kwargs):
        kwargs.setdefault("max_new_tokens", self.M)
        return generate(self.policy, self.tok, prompts, self.P, **kwargs)

    def layout(self, prompt: str, generated: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """One observation row (1, P + M), laid out by hand as TextGen-v0 does."""
        tokens = [self.tok.bos_id, *self.tok.encode(prompt)]
        ids = torch.zeros(1, self.P + self.M, dtype=torch.long)
        mask = torch.zeros_like(ids)
        ids[0, self.P - len(tokens) : self.P] = torch.tensor(tokens)
        mask[0, self.P - len(tokens) : self.P] = 1
        for t, token in enumerate(generated):
            ids[0, self.P + t], mask[0, self.P + t] = token, 1
        return ids, mask

    @torch.no_grad()
    def next_logprobs(self, prompt: str, generated: list[int]) -> torch.Tensor:
        """log p(. | prompt, generated) by a full forward pass: (V,)."""
        ids, mask = self.layout(prompt, generated)
        logits, _ = self.policy(ids, mask)
        return F.log_softmax(logits[0, self.P - 1 + len(generated)], -1)

    def greedy_by_hand(self, prompt: str, max_new_tokens: int | None = None) -> list[int]:
        out: list[int] = []
        for _ in range(max_new_tokens or self.M):
            token = int(self.next_logprobs(prompt, out).argmax())
            if token == self.eos:
                break
            out.append(token)
        return out

    def ids_of(self, text: str) -> list[int]:
        ids = self.tok.encode(text)
        assert self.tok.decode(ids) == text
        return ids

    def logprob(self, prompt: str, text: str, max_new_tokens: int | None = None) -> float:
        """Total log-probability of a completion; it ended with <eos> if shorter than the limit."""
        tokens = self.ids_of(text)
        total = sum(float(self.next_logprobs(prompt, tokens[:t])[tok]) for t, tok in enumerate(tokens))
        if len(tokens) < (max_new_tokens or self.M):
            total += float(self.next_logprobs(prompt, tokens)[self.eos])
        return total


@pytest.fixture(scope="module")
def default() -> Setup:
    return Setup("default", seed=2, eos_bias=2.0)


@pytest.fixture(scope="module")
def arithmetic() -> Setup:
    return Setup("arithmetic", seed=2, eos_bias=1.0)


def mixed_prompts(s: Setup) -> list[str]:
    """Prompts of several lengths (so several amounts of left padding), the empty one included."""
    by_len = sorted(set(s.prompts), key=lambda p: len(s.tok.encode(p)))
    return [by_len[0], by_len[-1], *s.prompts[:6], "the food was", ""]


# ------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("task", ["default", "arithmetic"])
def test_greedy_equals_argmax_of_full_forward(task, default, arithmetic):
    s = default if task == "default" else arithmetic
    prompts = mixed_prompts(s) if task == "default" else [*s.prompts[:8], "1+", ""]
    out = s.gen(prompts)
    assert len(out) == len(prompts) and all(isinstance(o, str) for o in out)
    expected = [s.tok.decode(s.greedy_by_hand(p)) for p in prompts]
    assert out == expected
    lengths = {len(s.greedy_by_hand(p)) for p in prompts}
    assert (
        len(lengths) > 2 and s.M in lengths
    )  # some stop at <eos>, at several lengths; some run to the limit


def test_greedy_respects_max_new_tokens(default):
    prompts = mixed_prompts(default)
    out = default.gen(prompts, max_new_tokens=2)
    assert out == [default.tok.decode(default.greedy_by_hand(p, 2)) for p in prompts]
    assert all(len(default.tok.encode(o)) <= 2 for o in out)


def test_generate_leaves_the_policy_mode_alone(default):
    default.policy.train()
    default.gen(["the food was"])
    assert default.policy.training
    default.policy.eval()
    default.gen(["the food was"])
    assert not default.policy.training


def test_ppo_generate(default):
    config = PPOConfig(policy=default.policy.cfg)
    model = PPO("TextGen-v0", config, num_envs=2, device="cpu", seed=0)
    assert (model.prompt_window, model.env.config.max_new_tokens) == (default.P, default.M)
    model.policy.load_state_dict(default.policy.state_dict())
    prompts = mixed_prompts(default)
    expected = [default.tok.decode(default.greedy_by_hand(p)) for p in prompts]
    assert model.generate(prompts) == expected
    assert model.generate(prompts, strategy="beam", num_beams=1) == expected
    with pytest.raises(ValueError, match="strategy"):
        model.generate(prompts, strategy="nope")


# ---------------------------------------------------------------------------------- sampling
def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(default):
    prompts = mixed_prompts(default)
    state = torch.get_rng_state()
    a = default.gen(prompts, strategy="sample", temperature=3.0, seed=1)
    b = default.gen(prompts, strategy="sample", temperature=3.0, seed=1)
    c = default.gen(prompts, strategy="sample", temperature=3.0, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b
    assert a != c
    assert a != default.gen(prompts)  # hot sampling is not greedy


def test_top_k_1_and_tiny_top_p_are_greedy(default):
    prompts = mixed_prompts(default)
    greedy = default.gen(prompts)
    assert default.gen(prompts, strategy="sample", top_k=1, temperature=5.0, seed=0) == greedy
    assert default.gen(prompts, strategy="sample", top_p=1e-6, temperature=5.0, seed=0) == greedy


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, None), (2.0, None, None), (1.0, 3, None), (1.0, None, 0.8), (0.5, 4, 0.79)],
)
def test_first_token_follows_the_filtered_distribution(arithmetic, temperature, top_k, top_p):
    """4000 one-token samples of one prompt against softmax(filter(logits / T)) by hand."""
    s, prompt, n = arithmetic, "3+4=", 4000
    kwargs = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    out = s.gen([prompt] * n, max_new_tokens=1, strategy="sample", seed=0, **kwargs)
    logp = s.next_logprobs(prompt, []) / temperature
    probs = logp.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep = set(range(len(probs)))
    if top_k is not None:
        keep = set(order[:top_k])
    if top_p is not None:  # the nucleus of what top-k left, renormalised
        left = sum(float(probs[i]) for i in keep)
        mass, nucleus = 0.0, set()
        for i in (i for i in order if i in keep):
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += float(probs[i]) / left
        keep = nucleus
    expected = torch.zeros_like(probs)
    expected[list(keep)] = probs[list(keep)]
    expected /= expected.sum()
    token_of = {s.tok.decode([i]): i for i in range(s.tok.vocab_size) if s.tok.decode([i])}
    counts = torch.zeros_like(probs)
    for text in out:
        counts[token_of[text] if text else s.eos] += 1
    freq = counts / n
    assert set(freq.nonzero().squeeze(1).tolist()) <= keep
    assert (freq - expected).abs().max() < 0.035, (freq, expected)


def test_filter_logits_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0], [0.5, -2.0, 4.0, 4.5, 1.0]])
    assert filter_logits(logits).equal(logits)
    assert filter_logits(logits, top_k=2).tolist() == [[NEG, 3.0, 2.0, NEG, NEG], [NEG, NEG, 4.0, 4.5, NEG]]
    assert filter_logits(logits, top_k=1).tolist() == [[NEG, 3.0, NEG, NEG, NEG], [NEG, NEG, NEG, 4.5, NEG]]
    assert filter_logits(logits, top_k=99).equal(logits)
    # Probabilities 0.5, 0.3, 0.15, 0.05 in a shuffled order.
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    lp = p.log()
    kept = lambda out: (out[0] > NEG).tolist()  # noqa: E731
    assert kept(filter_logits(lp, top_p=0.4)) == [False, True, False, False]
    assert kept(filter_logits(lp, top_p=0.6)) == [False, True, False, True]
    assert kept(filter_logits(lp, top_p=0.9)) == [True, True, False, True]
    assert kept(filter_logits(lp, top_p=0.97)) == [True, True, True, True]
    assert kept(filter_logits(lp, top_p=1.0)) == [True, True, True, True]
    out = filter_logits(lp, top_p=0.6)
    assert out[0, 1] == lp[0, 1] and out[0, 3] == lp[0, 3]  # kept logits are untouched
    # Both: top-k first, then the nucleus of what is left.
    assert kept(filter_logits(lp, top_k=3, top_p=0.97)) == [True, True, False, True]
    assert kept(filter_logits(lp, top_k=2, top_p=0.4)) == [False, True, False, False]


# ------------------------------------------------------------------------------------- beams
def test_beam_with_one_beam_is_greedy(default, arithmetic):
    for s in (default, arithmetic):
        prompts = mixed_prompts(s) if s is default else s.prompts[:10]
        assert s.gen(prompts, strategy="beam", num_beams=1) == s.gen(prompts)


def test_beam_search_scores_at_least_greedy(default):
    """Not a theorem (beam search can lose the greedy path), but it holds for this policy, and a
    beam search that mis-scored or mis-ranked its beams would break it."""
    prompts = mixed_prompts(default)
    beams = default.gen(prompts, strategy="beam", num_beams=4)
    greedy = default.gen(prompts)
    better = 0
    for prompt, b, g in zip(prompts, beams, greedy, strict=True):
        lb, lg = default.logprob(prompt, b), default.logprob(prompt, g)
        assert lb >= lg - 1e-4, (prompt, b, g, lb, lg)
        better += lb > lg + 1e-4
    assert better >= 1  # beam search found something greedy missed


def test_beam_search_with_enough_beams_is_exhaustive(arithmetic):
    """Two new tokens and as many beams as tokens: beam search must return the most likely
    completion of all (enumerated by hand: <eos> first, or any token then any token)."""
    s = arithmetic
    V = s.tok.vocab_size
    prompts = [*s.prompts[::57][:6], "7+"]
    out = s.gen(prompts, max_new_tokens=2, strategy="beam", num_beams=V)
    for prompt, text in zip(prompts, out, strict=True):
        first = s.next_logprobs(prompt, [])
        best, best_seq = -math.inf, None
        for a, b in itertools.product(range(V), range(V)):
            if a == s.eos:
                score, seq = float(first[a]), []
            else:
                score = float(first[a] + s.next_logprobs(prompt, [a])[b])
                seq = [a] if b == s.eos else [a, b]
            if score > best:
                best, best_seq = score, seq
        assert text == s.tok.decode(best_seq), prompt
        assert s.logprob(prompt, text, 2) == pytest.approx(best, abs=1e-4)
    greedy = s.gen(prompts, max_new_tokens=2)
    assert out != greedy  # the exhaustive optimum is not simply greedy's
    assert len({len(s.tok.encode(t)) for t in out}) >= 2  # finished early and ran to the limit


def beams_of(policy, s: Setup, prompts: list[str], num_beams: int) -> Beams:
    ids, mask = encode_prompts(s.tok, prompts, s.P, s.M, torch.device("cpu"))
    return beam_search(policy, ids, mask, s.P, s.M, s.eos, num_beams)


@pytest.mark.parametrize("task", ["default", "arithmetic"])
@pytest.mark.parametrize("num_beams", [3, 5])
def test_cached_beam_search_keeps_the_beams_of_recomputation(
    default, arithmetic, task, num_beams, monkeypatch
):
    """Beam search through the KV cache (rows reordered by beam origin each step) against the
    same search with every step recomputing whole sequences: the same beams, every one of them."""
    s = default if task == "default" else arithmetic
    prompts = mixed_prompts(s) if task == "default" else [*s.prompts[:6], "1+", ""]
    made: list[KVCache] = []
    make_cache = s.policy.make_cache
    monkeypatch.setattr(s.policy, "make_cache", lambda n, d: made.append(make_cache(n, d)) or made[-1])
    cached = beams_of(s.policy, s, prompts, num_beams)
    assert isinstance(made[0], KVCache) and made[0].keys[0].shape[0] == len(prompts) * num_beams
    monkeypatch.setattr(s.policy, "make_cache", lambda n, d: RecomputeCache(s.policy))
    recomputed = beams_of(s.policy, s, prompts, num_beams)
    assert torch.equal(cached.tokens, recomputed.tokens) and torch.equal(cached.mask, recomputed.mask)
    torch.testing.assert_close(cached.scores, recomputed.scores, atol=1e-5, rtol=1e-5)
    lengths = cached.mask[:, :, s.P :].sum(-1)
    assert len(set(lengths.flatten().tolist())) > 1  # beams finished at several lengths


def test_a_bfloat16_policy_generates_through_its_cache(default, monkeypatch):
    """RowCache.step allocates its outputs in the dtype the policy computes (it was float32)."""
    policy = copy.deepcopy(default.policy).to(torch.bfloat16)
    ids, mask = encode_prompts(default.tok, mixed_prompts(default), default.P, default.M, torch.device("cpu"))
    logits, values = policy.make_cache(len(ids), "cpu").step(ids, mask, default.P)
    assert logits.dtype == values.dtype == torch.bfloat16
    cached = beam_search(policy, ids, mask, default.P, default.M, default.eos, 3)
    monkeypatch.setattr(policy, "make_cache", lambda n, d: RecomputeCache(policy))
    recomputed = beam_search(policy, ids, mask, default.P, default.M, default.eos, 3)
    # bfloat16 rounds differently in the two ways of computing: near-ties may go either way
    assert (cached.tokens == recomputed.tokens).float().mean() > 0.9


def reference_beam_search(s: Setup, prompt: str, K: int, M: int) -> tuple[str, float]:
    """Textbook beam search over full forward passes: expand every running beam by every token,
    keep the K best totals; a beam that emits <eos> is finished and keeps its score."""
    beams: list[tuple[list[int], float, bool]] = [([], 0.0, False)]
    for _ in range(M):
        candidates = []
        for tokens, score, done in beams:
            if done:
                candidates.append((tokens, score, True))
                continue
            logp = s.next_logprobs(prompt, tokens)
            for v, lp in enumerate(logp.tolist()):
                candidates.append((tokens if v == s.eos else [*tokens, v], score + lp, v == s.eos))
        beams = sorted(candidates, key=lambda c: -c[1])[:K]
        if all(done for _, _, done in beams):
            break
    tokens, score, _ = max(beams, key=lambda b: b[1])
    return s.tok.decode(tokens), score


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_a_reference_implementation(default, num_beams):
    prompts = mixed_prompts(default)[:6]
    out = default.gen(prompts, strategy="beam", num_beams=num_beams)
    for prompt, text in zip(prompts, out, strict=True):
        ref_text, ref_score = reference_beam_search(default, prompt, num_beams, default.M)
        assert text == ref_text, prompt
        assert default.logprob(prompt, text) == pytest.approx(ref_score, abs=1e-4)


@pytest.mark.parametrize(
    "kwargs", [{}, {"strategy": "sample", "seed": 0}, {"strategy": "beam", "num_beams": 3}]
)
def test_generation_stops_at_eos(kwargs):
    s = Setup("default", seed=3)
    with torch.no_grad():
        s.policy.policy_head.bias[s.eos] = 1e4
    prompts = mixed_prompts(s)
    assert s.gen(prompts, **kwargs) == [""] * len(prompts)


@pytest.mark.parametrize(
    "kwargs", [{}, {"strategy": "sample", "seed": 0}, {"strategy": "beam", "num_beams": 3}]
)
def test_min_new_tokens_holds_eos_back(kwargs):
    """<eos> is the policy's first choice everywhere; min_new_tokens=3 makes it wait three tokens
    (as transformers' min_new_tokens), and the completion then ends at once."""
    s = Setup("default", seed=3)
    with torch.no_grad():
        s.policy.policy_head.bias[s.eos] = 1e4
    prompts = mixed_prompts(s)
    for text in s.gen(prompts, min_new_tokens=3, **kwargs):
        assert len(s.ids_of(text)) == 3
    out = s.gen(prompts, min_new_tokens=s.M + 5, **kwargs)  # never <eos>: the length limit ends them
    assert [len(s.ids_of(text)) for text in out] == [s.M] * len(prompts)


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "topk"}, "strategy must be one of greedy, sample, beam"),
        ({"strategy": "sample", "temperature": 0.0}, "temperature must be > 0"),
        ({"strategy": "sample", "temperature": -1.0}, "temperature must be > 0"),
        ({"strategy": "sample", "temperature": float("nan")}, "temperature must be > 0"),
        ({"strategy": "sample", "top_k": 0}, "top_k must be None or a positive integer"),
        ({"strategy": "sample", "top_k": 2.5}, "top_k must be None or a positive integer"),
        ({"strategy": "sample", "top_p": 0.0}, r"top_p must be None or in \(0, 1\]"),
        ({"strategy": "sample", "top_p": 1.5}, r"top_p must be None or in \(0, 1\]"),
        ({"strategy": "beam", "num_beams": 0}, "num_beams must be a positive integer"),
        ({"max_new_tokens": 99}, "exceeds the policy's"),
        ({"min_new_tokens": -1}, "min_new_tokens must be a non-negative integer"),
        ({"min_new_tokens": 1.5}, "min_new_tokens must be a non-negative integer"),
    ],
)
def test_bad_arguments(default, kwargs, match):
    with pytest.raises(ValueError, match=match):
        default.gen(["the food was"], **kwargs)


def test_bad_prompts(default):
    too_long = " ".join(["the"] * (default.P + 1))
    with pytest.raises(ValueError, match=r"prompt 1 .* tokens with <bos>; the policy's prompt window is"):
        default.gen(["the food was", too_long])
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
        default.gen([])
    with pytest.raises(ValueError, match="prompts must be a non-empty list of strings"):
        default.gen("the food was")
