"""Tests of token reward models (textgym.rewards.TokenRewardModel, TokenFunctionReward), the id path
of textgym.learned.LearnedReward, and the env option text_infos=False."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import textgym
from textgym import RewardModelError, TokenFunctionReward, TokenRewardModel, as_reward_model, make_env_config
from textgym.learned import LearnedReward, RewardNet, encode_pairs, pair_rows
from textgym.nn import PolicyConfig
from textgym.sb3 import SB3VecEnv
from textgym.tokenizers import EOS_ID, PAD_ID, UNK_ID

SENTIMENT = make_env_config("sentiment")  # word tokenizer, P = 9
TOK = SENTIMENT.tokenizer
WORDS = list(range(4, TOK.vocab_size))  # every id but the special ones


def count_eos_free_tokens(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Module level, so that envs using it pickle: completion length minus 0.1 x prompt length."""
    return completion_mask.sum(1).double() - 0.1 * prompt_mask.sum(1).double()


def save_tiny_reward(path, max_len: int, seed: int = 0):
    from agents.reward_model import save_reward_model

    torch.manual_seed(seed)
    net = RewardNet(TOK.vocab_size, max_len, PolicyConfig(d_model=16, n_layers=1, n_heads=2))
    # Random weights score every sequence differently; a larger head makes differences visible.
    torch.nn.init.normal_(net.head.weight, std=1.0)
    return save_reward_model(path, net, {"task": "sentiment", "tokenizer": None}, TOK), net.eval()


@pytest.fixture(scope="module")
def short_reward(tmp_path_factory):
    """A checkpoint whose max_len (12) is shorter than <bos> + prompt + 8 tokens + <eos>: rows are cut."""
    return save_tiny_reward(tmp_path_factory.mktemp("reward") / "short.pt", max_len=12)


@pytest.fixture(scope="module")
def long_reward(tmp_path_factory):
    return save_tiny_reward(tmp_path_factory.mktemp("reward") / "long.pt", max_len=64, seed=1)


@torch.no_grad()
def reference_scores(net: RewardNet, prompts, completions) -> np.ndarray:
    """The text path as training lays it out: encode_pairs, then the network, one row at a time."""
    out = []
    for p, c in zip(prompts, completions, strict=True):
        ids, mask = encode_pairs(TOK, [p], [c], net.decoder.max_len)
        out.append(float(net(ids, mask)[0]))
    return np.array(out)


def random_actions(rng: np.random.Generator, n: int, eos_prob: float = 0.15) -> np.ndarray:
    """Word ids, with <eos> at ``eos_prob``: episodes both terminate and reach max_new_tokens."""
    acts = rng.choice(WORDS, size=n)
    return np.where(rng.random(n) < eos_prob, EOS_ID, acts)


def run_vector(reward, steps: int = 40, seed: int = 0, **kwargs):
    """A seeded run of 6 sub-envs: every step's (obs, rewards, terminated, truncated, infos)."""
    venv = gym.make_vec("TextGen-v0", num_envs=6, reward=reward, **kwargs)
    rng = np.random.default_rng(seed)
    out = [venv.reset(seed=seed)]
    for _ in range(steps):
        out.append(venv.step(random_actions(rng, 6)))
    venv.close()
    return out


# ------------------------------------------------------------------------ ids laid out as text
@pytest.mark.parametrize("max_len", [3, 8, 12, 40])
def test_pair_rows_equals_encode_pairs(max_len):
    rng = np.random.default_rng(max_len)
    prompts = [SENTIMENT.prompts[i] for i in rng.integers(len(SENTIMENT.prompts), size=20)]
    completions = [
        TOK.decode_batch(np.array([rng.choice(WORDS, size=n)]))[0] for n in rng.integers(0, 15, size=20)
    ]
    completions[0] = ""  # an empty completion: only <eos> after the prompt
    ids = TokenFunctionReward(count_eos_free_tokens, tokenizer=TOK).encode(prompts, completions)
    got_ids, got_mask = pair_rows(*ids, max_len)
    want_ids, want_mask = encode_pairs(TOK, prompts, completions, max_len)
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_mask, want_mask)


def test_encode_lays_text_out_as_the_env_holds_it():
    model = TokenFunctionReward(count_eos_free_tokens, tokenizer=TOK)
    p_ids, p_mask, c_ids, c_mask = model.encode(["the food was", "it"], ["good", ""])
    p0, p1 = TOK.encode("the food was"), TOK.encode("it")
    assert p_ids.tolist() == [[TOK.bos_id, *p0], [PAD_ID, PAD_ID, TOK.bos_id, *p1]]
    assert p_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert c_ids.tolist() == [TOK.encode("good"), [PAD_ID]] and c_mask.tolist() == [[1], [0]]


# -------------------------------------------------------------------------- learned rewards
def test_learned_reward_text_score_equals_encode_pairs(short_reward, long_reward):
    rng = np.random.default_rng(3)
    prompts = [SENTIMENT.prompts[i] for i in rng.integers(len(SENTIMENT.prompts), size=9)]
    completions = [
        TOK.decode_batch(np.array([rng.choice(WORDS, size=n)]))[0] for n in rng.integers(0, 14, size=9)
    ]
    for path, net in (short_reward, long_reward):
        model = LearnedReward(path, batch_size=4)  # several batches
        got = model(prompts, completions)
        assert got.dtype == np.float64 and got.shape == (9,)
        np.testing.assert_allclose(got, reference_scores(net, prompts, completions), rtol=1e-5, atol=1e-6)
        assert np.ptp(got) > 1e-3  # the comparison can tell completions apart


@pytest.mark.parametrize("which", ["short_reward", "long_reward"])
def test_learned_reward_scores_ids_in_the_env_as_the_text_path(which, request):
    path, net = request.getfixturevalue(which)
    venv = gym.make_vec("TextGen-v0", num_envs=6, reward=str(path), max_new_tokens=8)
    assert venv.unwrapped._core.ids_reward  # the vocabulary is the checkpoint's: ids, no text
    rng = np.random.default_rng(1)
    venv.reset(seed=1)
    ends = {"terminated": 0, "truncated": 0}
    prompts, completions, scores, rewards = [], [], [], []
    for _ in range(60):
        _, reward, terminated, truncated, infos = venv.step(random_actions(rng, 6))
        for i in np.flatnonzero(terminated | truncated):
            ends["terminated" if terminated[i] else "truncated"] += 1
            prompts.append(infos["prompt"][i])
            completions.append(infos["completion"][i])
            scores.append(infos["reward_components"]["score"][i])
            rewards.append(reward[i])
    assert min(ends.values()) >= 3, ends  # both ends of an episode, several times
    # the word tokenizer spells these completions back with the ids the agent emitted
    want = reference_scores(net, prompts, completions)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rewards, scores)


def test_learned_reward_ids_skip_decoding(short_reward, monkeypatch):
    path, _ = short_reward
    decoded = run_vector(str(path), max_new_tokens=8)
    monkeypatch.setattr(type(TOK), "decode_batch", _refuse_decoding)
    silent = run_vector(str(path), max_new_tokens=8, text_infos=False)
    for (*a, a_info), (*b, b_info) in zip(decoded[1:], silent[1:], strict=True):
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
        assert "completion" not in b_info and "prompt" not in b_info
        if "reward_components" in a_info:
            np.testing.assert_array_equal(
                a_info["reward_components"]["score"], b_info["reward_components"]["score"]
            )


def test_learned_reward_of_another_vocabulary_scores_text(short_reward):
    path, net = short_reward
    # The keyword task has a word tokenizer of another corpus: its ids mean other words.
    env = gym.make("TextGen-v0", task="keyword", reward=str(path), max_new_tokens=6)
    assert not env.unwrapped._core.ids_reward
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    ktok = env.unwrapped.tokenizer
    info: dict = {}
    while "completion" not in info:
        _, _, _, _, info = env.step(int(rng.integers(4, ktok.vocab_size)))
    want = reference_scores(net, [info["prompt"]], [info["completion"]])
    assert info["reward_components"]["score"] == pytest.approx(float(want[0]), rel=1e-5, abs=1e-6)


def test_learned_reward_scores_the_ids_emitted_where_text_would_spell_others(long_reward):
    path, net = long_reward
    model = LearnedReward(path)
    prompt = SENTIMENT.prompt_ids[0]
    p_ids = torch.tensor([prompt])
    c_ids = torch.tensor([[TOK.encode("good")[0], UNK_ID, TOK.encode("food")[0]]])
    ones = torch.ones_like
    got = model.call_ids(p_ids, ones(p_ids), c_ids, ones(c_ids))
    row = torch.tensor([[*prompt, *c_ids[0].tolist(), EOS_ID]])
    with torch.no_grad():
        want = net(row, ones(row)).double()
    torch.testing.assert_close(got, want)
    text = TOK.decode_batch(c_ids.numpy())[0]
    assert TOK.encode(text) != c_ids[0].tolist()  # <unk> does not survive decoding, so ...
    assert float(model([SENTIMENT.prompts[0]], [text])[0]) != pytest.approx(float(got[0]))  # ... text differs


# --------------------------------------------------------------------- token function rewards
def test_token_function_reward_by_hand_in_env_and_on_text():
    model = TokenFunctionReward(count_eos_free_tokens)
    env = gym.make("TextGen-v0", reward=model, max_new_tokens=5)
    assert model.tokenizer is env.unwrapped.tokenizer  # bound by the env
    obs, _ = env.reset(seed=0)
    plen = int(obs["attention_mask"].sum())
    word = TOK.encode("good")[0]
    for _ in range(2):
        env.step(word)
    _, reward, terminated, _, info = env.step(EOS_ID)
    assert terminated and reward == pytest.approx(2 - 0.1 * plen)  # <eos> is not counted
    assert model([info["prompt"]], [info["completion"]])[0] == pytest.approx(2 - 0.1 * plen)
    env.reset(seed=0)
    for _ in range(5):
        _, reward, _, truncated, info = env.step(word)
    assert truncated and reward == pytest.approx(5 - 0.1 * plen)


def test_token_reward_env_pickles():
    venv = textgym.TextGenVectorEnv(
        num_envs=2, reward=TokenFunctionReward(count_eos_free_tokens), text_infos=False
    )
    copy = pickle.loads(pickle.dumps(venv))
    for env in (venv, copy):
        env.reset(seed=0)
    for _ in range(8):
        a = venv.step(np.array([5, EOS_ID]))
        b = copy.step(np.array([5, EOS_ID]))
        np.testing.assert_array_equal(a[1], b[1])
    assert copy.config.reward.tokenizer.vocab_size == TOK.vocab_size


def test_model_bound_to_one_vocabulary_refuses_another():
    arithmetic = make_env_config("arithmetic").tokenizer
    model = TokenFunctionReward(count_eos_free_tokens, tokenizer=arithmetic)
    with pytest.raises(ValueError, match=r"count_eos_free_tokens.*spells ids otherwise"):
        gym.make("TextGen-v0", reward=model)
    gym.make("TextGen-v0", task="arithmetic", reward=model)  # the same vocabulary is fine


def test_unbound_model_refuses_text():
    with pytest.raises(RewardModelError, match="no tokenizer to encode text"):
        TokenFunctionReward(count_eos_free_tokens)(["a"], ["b"])


def test_plain_function_of_ids_is_refused_with_advice():
    with pytest.raises(TypeError, match="TokenFunctionReward"):
        as_reward_model(count_eos_free_tokens)
    assert isinstance(as_reward_model(TokenFunctionReward(count_eos_free_tokens)), TokenRewardModel)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (
            lambda p, pm, c, cm: [1.0] * len(c),
            r"returned \[1.0\] \(list\); score_ids must return a float tensor of shape \(1,\)",
        ),
        (lambda p, pm, c, cm: torch.zeros(len(c) + 1), r"shape \(\d+,\) for \d+ completions"),
        (lambda p, pm, c, cm: torch.zeros(len(c), dtype=torch.bool), "dtype torch.bool"),
        (lambda p, pm, c, cm: torch.full((len(c),), float("nan")), r"returned nan for completion 0 \(ids"),
        (lambda p, pm, c, cm: 1 / 0, "raised ZeroDivisionError"),
    ],
)
def test_bad_scores_of_ids_are_reported(fn, match):
    env = gym.make("TextGen-v0", reward=TokenFunctionReward(fn, name="bad"))
    env.reset(seed=0)
    with pytest.raises(RewardModelError, match=f"'bad'.*{match}"):
        env.step(EOS_ID)


def test_integer_scores_of_ids_become_float64():
    model = TokenFunctionReward(lambda p, pm, c, cm: cm.sum(1), tokenizer=TOK)
    got = model(["the food was"], ["good good"])
    assert got.dtype == np.float64 and got.tolist() == [2.0]


# ------------------------------------------------------------------------------ text_infos
def _refuse_decoding(self, ids, lengths=None):
    raise AssertionError("decode_batch called")


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reward", [None, TokenFunctionReward(count_eos_free_tokens)], ids=["text", "ids"])
@pytest.mark.parametrize("autoreset_mode", ["next_step", "same_step"])
def test_vector_text_infos_false_changes_only_the_text(reward, autoreset_mode):
    kwargs = {"max_new_tokens": 6, "autoreset_mode": autoreset_mode}
    with_text = run_vector(reward, **kwargs)
    without = run_vector(reward, text_infos=False, **kwargs)
    ended = 0
    for (*a, a_info), (*b, b_info) in zip(with_text, without, strict=True):
        for x, y in zip(a, b, strict=True):  # obs, rewards, terminated, truncated
            _assert_same(x, y)
        for info_a, info_b in (
            (a_info, b_info),
            (a_info.get("final_info", {}), b_info.get("final_info", {})),
        ):
            text_keys = {"prompt", "_prompt", "completion", "_completion"}
            assert not text_keys & info_b.keys()
            assert info_b.keys() == info_a.keys() - text_keys
            for key in info_b.keys() - {"reward_components", "final_info"}:  # final_info: the next pass
                _assert_same(info_a[key], info_b[key])
            if "reward_components" in info_b:
                ended += 1
                _assert_same(info_a["reward_components"], info_b["reward_components"])
    assert ended >= 5


@pytest.mark.parametrize("reward", [None, TokenFunctionReward(count_eos_free_tokens)], ids=["text", "ids"])
def test_single_env_text_infos_false(reward):
    envs = [
        gym.make("TextGen-v0", reward=reward, max_new_tokens=4, text_infos=flag) for flag in (True, False)
    ]
    rng = np.random.default_rng(0)
    (obs_a, info_a), (obs_b, info_b) = (env.reset(seed=3) for env in envs)
    _assert_same(obs_a, obs_b)
    assert info_b == {"prompt_index": SENTIMENT.prompts.index(info_a["prompt"])}
    ends = 0
    for action in random_actions(rng, 40):
        a, b = (env.step(int(action)) for env in envs)
        for x, y in zip(a[:4], b[:4], strict=True):
            _assert_same(x, y)
        if a[2] or a[3]:
            ends += 1
            assert b[4] == {"prompt_index": SENTIMENT.prompts.index(a[4]["prompt"]), **_components(a[4])}
            for env in envs:
                env.reset()
        else:
            assert b[4] == a[4] == {}
    assert ends >= 5


def _components(info):
    return {"reward_components": info["reward_components"]}


def test_token_reward_with_text_infos_false_never_decodes(monkeypatch):
    monkeypatch.setattr(type(TOK), "decode_batch", _refuse_decoding)
    run_vector(TokenFunctionReward(count_eos_free_tokens), text_infos=False)
    env = gym.make("TextGen-v0", reward=TokenFunctionReward(count_eos_free_tokens), text_infos=False)
    env.reset(seed=0)
    env.step(EOS_ID)
    with pytest.raises(AssertionError, match="decode_batch called"):  # a text reward needs the text
        run_vector(None, text_infos=False)


def test_check_env_passes_with_text_infos_false():
    check_env(
        gym.make("TextGen-v0", text_infos=False, reward=TokenFunctionReward(count_eos_free_tokens)).unwrapped
    )
    check_env(gym.make("TextGen-v0", text_infos=False).unwrapped)


def test_text_infos_is_checked():
    with pytest.raises(ValueError, match=r"stable_info=True.*text_infos=False"):
        gym.make("TextGen-v0", stable_info=True, text_infos=False)
    with pytest.raises(ValueError, match=r"stable_info=True.*text_infos=False"):
        gym.make_vec("TextGen-v0", num_envs=2, stable_info=True, text_infos=False)
    with pytest.raises(TypeError, match="text_infos must be True or False, got"):
        gym.make("TextGen-v0", text_infos="no")


def test_sb3_adapter_without_text():
    venv = SB3VecEnv(
        textgym.TextGenVectorEnv(num_envs=2, max_new_tokens=3, text_infos=False, autoreset_mode="same_step")
    )
    venv.reset()
    assert [set(i) for i in venv.reset_infos] == [{"prompt_index"}] * 2
    for _ in range(3):
        venv.step_async(np.array([5, 5]))
        _, _, dones, infos = venv.step_wait()
    assert dones.all() and "completion" not in infos[0] and "reward_components" in infos[0]
