"""Learned reward models: training from labels and preference pairs (agents.reward_model),
checkpoints and the env's use of them (textgym.learned), and the generated training data."""

from __future__ import annotations

import math
import random

import gymnasium as gym
import numpy as np
import pytest
import torch

import agents.reward_model
import textgym.learned  # and textgym, which registers TextGen-v0
from agents.lm import save_lm
from agents.policy import PolicyConfig, TransformerPolicy
from agents.ppo import PPO, PPOConfig
from agents.reward_model import RewardTrainConfig, check_examples, save_reward_model, train_reward_model
from textgym.learned import REWARD_SCHEMA, LearnedReward, RewardNet, encode_pairs, read_reward_checkpoint
from textgym.preferences import KINDS, reward_data
from textgym.rewards import arithmetic_answer, as_reward_model
from textgym.tasks import make_env_config
from textgym.tokenizers import BOS_ID, EOS_ID, PAD_ID
from textgym.vector import TextGenVectorEnv

TINY = PolicyConfig(d_model=16, n_layers=1, n_heads=2)
ENV = make_env_config("sentiment")
SPEC = {"task": "sentiment", "tokenizer": None}
FAST = RewardTrainConfig(
    steps=80, batch_size=32, max_len=24, val_fraction=0.2, eval_interval=40, learning_rate=3e-3
)
FILLER = [w for w in ENV.tokenizer.vocabulary[4:] if w.isalpha() and w not in ("good", "bad")]


def with_word(rng: random.Random, word: str) -> str:
    """2-6 random words with ``word`` somewhere among them."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def separable_labels(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        good = rng.random() < 0.5
        completion = with_word(rng, "good" if good else "bad")
        out.append({"prompt": rng.choice(ENV.prompts), "completion": completion, "score": float(good)})
    return out


def separable_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "prompt": rng.choice(ENV.prompts),
            "chosen": with_word(rng, "good"),
            "rejected": with_word(rng, "bad"),
        }
        for _ in range(n)
    ]


def validation_split(examples: list[dict], config: RewardTrainConfig, seed: int) -> list[dict]:
    """The held-out examples of train_reward_model (its documented split, re-done here)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(2, round(config.val_fraction * len(examples)))
    return [examples[i] for i in order[:n_val]]


def scores(net: RewardNet, prompts: list[str], completions: list[str], max_len: int) -> torch.Tensor:
    ids, mask = encode_pairs(ENV.tokenizer, prompts, completions, max_len)
    with torch.no_grad():
        return net(ids, mask)


@pytest.fixture(scope="module")
def trained_labels():
    torch.set_num_threads(1)
    examples = separable_labels(300)
    net, report = train_reward_model(examples, ENV.tokenizer, FAST, TINY, "cpu", seed=0)
    return examples, net, report


# ---------------------------------------------------------------------------------- training
def test_labels_on_separable_data_beat_chance(trained_labels):
    examples, net, report = trained_labels
    assert report["kind"] == "labels"
    assert report["train_examples"] + report["val_examples"] == len(examples)
    assert report["val_examples"] == 60
    assert abs(report["initial_val_accuracy"] - 0.5) < 0.2
    assert report["final_val_accuracy"] > 0.8
    assert report["final_val_loss"] < report["initial_val_loss"]
    assert [h[0] for h in report["history"]] == [0, 40, 80]
    # The held-out "good" completions score above the held-out "bad" ones.
    val = validation_split(examples, FAST, 0)
    s = scores(net, [e["prompt"] for e in val], [e["completion"] for e in val], FAST.max_len)
    good = s[torch.tensor([e["score"] == 1.0 for e in val])]
    bad = s[torch.tensor([e["score"] == 0.0 for e in val])]
    assert len(good) and len(bad) and good.mean() > bad.mean() + 0.5


def test_labels_loss_is_the_mean_squared_error(trained_labels):
    examples, net, report = trained_labels
    val = validation_split(examples, FAST, 0)
    s = scores(net, [e["prompt"] for e in val], [e["completion"] for e in val], FAST.max_len)
    mse = sum((float(x) - e["score"]) ** 2 for x, e in zip(s, val, strict=True)) / len(val)
    assert report["final_val_loss"] == pytest.approx(mse, rel=1e-4)


def test_preference_pairs_on_separable_data_beat_chance():
    pairs = separable_pairs(200)
    net, report = train_reward_model(pairs, ENV.tokenizer, FAST, TINY, "cpu", seed=0)
    assert report["kind"] == "pairs" and report["val_examples"] == 40
    assert abs(report["initial_val_accuracy"] - 0.5) < 0.2
    assert report["final_val_accuracy"] > 0.8
    assert report["final_val_loss"] < report["initial_val_loss"] < math.log(2) + 0.05
    # The accuracy is the share of held-out pairs ordered as the data order them.
    val = validation_split(pairs, FAST, 0)
    prompts = [p["prompt"] for p in val]
    chosen = scores(net, prompts, [p["chosen"] for p in val], FAST.max_len)
    rejected = scores(net, prompts, [p["rejected"] for p in val], FAST.max_len)
    assert report["final_val_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    # Bradley–Terry: -log σ(r_c - r_r), by hand.
    by_hand = [
        -math.log(1 / (1 + math.exp(-(float(c) - float(r))))) for c, r in zip(chosen, rejected, strict=True)
    ]
    assert report["final_val_loss"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-4)


def test_generated_pairs_train_above_chance():
    pairs = reward_data("sentiment", 300, "pairs", seed=0)
    config = RewardTrainConfig(
        steps=100, batch_size=32, max_len=24, val_fraction=0.2, eval_interval=50, learning_rate=3e-3
    )
    _, report = train_reward_model(pairs, ENV.tokenizer, config, TINY, "cpu", seed=0)
    assert report["final_val_accuracy"] > max(0.6, report["initial_val_accuracy"])


def test_training_is_deterministic_and_validates():
    pairs = separable_pairs(40)
    config = RewardTrainConfig(steps=5, batch_size=8, max_len=24)
    a, ra = train_reward_model(pairs, ENV.tokenizer, config, TINY, "cpu", seed=1)
    b, rb = train_reward_model(pairs, ENV.tokenizer, config, TINY, "cpu", seed=1)
    assert ra["history"] == rb["history"]
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(ValueError, match="too few"):
        train_reward_model(pairs[:3], ENV.tokenizer, config, TINY, "cpu")
    for field, value in [("steps", 0), ("learning_rate", -1.0), ("val_fraction", 0.0), ("weight_decay", -1)]:
        with pytest.raises(ValueError, match=field):
            RewardTrainConfig(**{field: value})


# -------------------------------------------------------------------------------- encoding
def test_encode_pairs_right_pads_short_rows():
    tok = ENV.tokenizer
    ids, mask = encode_pairs(tok, ["the food was"], ["great ."], 12)
    row = [BOS_ID, *tok.encode("the food was"), *tok.encode("great ."), EOS_ID]
    assert ids[0, : len(row)].tolist() == row
    assert (ids[0, len(row) :] == PAD_ID).all() and mask[0].tolist() == [1] * len(row) + [0] * (12 - len(row))


def test_encode_pairs_cuts_a_long_prompt_from_the_left():
    tok = ENV.tokenizer
    prompt = "review of the hotel : the view was great and the staff was rude but the food was"
    completion = "perfect ."
    p, c = tok.encode(prompt), tok.encode(completion)
    assert len(p) + len(c) + 2 > 10
    ids, mask = encode_pairs(tok, [prompt], [completion], 10)
    keep = 10 - 1 - (len(c) + 1)
    assert ids[0].tolist() == [BOS_ID, *p[-keep:], *c, EOS_ID]
    assert mask[0].all()
    # A completion longer than the row keeps its end and <eos> after <bos>.
    long = "great " * 20
    ids, _ = encode_pairs(tok, [prompt], [long], 8)
    assert ids[0].tolist() == [BOS_ID, *tok.encode(long)[-6:], EOS_ID]


def test_scores_read_the_last_real_token_whatever_the_padding():
    torch.manual_seed(0)
    net = RewardNet(ENV.tokenizer.vocab_size, 16, TINY).eval()
    ids, mask = encode_pairs(ENV.tokenizer, ["the food was"], ["great ."], 16)
    n = int(mask.sum())
    left = torch.full_like(ids, PAD_ID)
    left[0, 16 - n :] = ids[0, :n]
    with torch.no_grad():
        assert float(net(ids, mask)) == pytest.approx(float(net(left, (left != PAD_ID).long())), abs=1e-5)


# ----------------------------------------------------------------------------- check_examples
def test_check_examples_names_the_bad_example():
    label = {"prompt": "p", "completion": "c", "score": 1.0}
    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert check_examples([label, label]) == "labels"
    assert check_examples([pair]) == "pairs"
    with pytest.raises(ValueError, match="no examples"):
        check_examples([])
    with pytest.raises(ValueError, match=r"example 2 is not like example 0 \(labels"):
        check_examples([label, label, pair])
    with pytest.raises(ValueError, match=r"example 1 is not like example 0 \(pairs"):
        check_examples([pair, {"prompt": "p", "chosen": "a"}])
    with pytest.raises(ValueError, match="example 0 is"):
        check_examples([{"prompt": "p", "completion": "c"}, label])
    with pytest.raises(ValueError, match="example 0 is"):
        check_examples(["not a dict"])
    with pytest.raises(ValueError, match="example 1: prompt and completions must be strings"):
        check_examples([label, {"prompt": "p", "completion": 3, "score": 1.0}])
    with pytest.raises(ValueError, match="example 1: prompt and completions must be strings"):
        check_examples([pair, {"prompt": None, "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="example 2: score must be a finite number"):
        check_examples([label, label, {**label, "score": float("nan")}])
    with pytest.raises(ValueError, match="example 1: score must be a finite number"):
        check_examples([label, {**label, "score": float("inf")}])
    with pytest.raises(ValueError, match="example 1: score must be a finite number"):
        check_examples([label, {**label, "score": "1.0"}])
    with pytest.raises(ValueError, match="example 0: score"):
        check_examples([{**label, "score": True}])


# ------------------------------------------------------------------------ checkpoints and env
@pytest.fixture
def reward_path(tmp_path, trained_labels):
    _, net, report = trained_labels
    return save_reward_model(
        tmp_path / "reward.pt", net, SPEC, ENV.tokenizer, {"accuracy": report["final_val_accuracy"]}
    )


def test_learned_reward_scores_as_the_net(trained_labels, reward_path):
    _, net, report = trained_labels
    assert not list(reward_path.parent.glob("*.tmp"))
    rng = random.Random(5)
    prompts = [rng.choice(ENV.prompts) for _ in range(7)]
    completions = [with_word(rng, rng.choice(["good", "bad"])) for _ in range(7)]
    model = LearnedReward(reward_path, batch_size=3)  # several batches
    got = model(prompts, completions)
    assert got.shape == (7,) and got.dtype == np.float64
    np.testing.assert_allclose(
        got, scores(net, prompts, completions, FAST.max_len).numpy(), rtol=1e-5, atol=1e-6
    )
    assert model.meta == {"accuracy": report["final_val_accuracy"]}
    assert model.name == "learned(reward.pt)" and "reward.pt" in repr(model)
    assert model([], []).shape == (0,)
    ckpt = torch.load(reward_path, weights_only=True)
    assert ckpt["schema"] == REWARD_SCHEMA and ckpt["tokenizer_spec"] == SPEC


def test_as_reward_model_takes_a_path_or_a_mapping(reward_path):
    by_path = as_reward_model(str(reward_path))
    by_name = as_reward_model({"name": "learned", "path": str(reward_path), "batch_size": 2})
    assert isinstance(by_path, LearnedReward) and isinstance(by_name, LearnedReward)
    assert by_name.batch_size == 2
    prompts, completions = list(ENV.prompts[:3]), ["good food", "bad", ""]
    np.testing.assert_allclose(by_path(prompts, completions), by_name(prompts, completions), rtol=1e-5)


@pytest.mark.parametrize("as_mapping", [False, True])
def test_env_delivers_the_learned_score_at_the_episode_end(reward_path, as_mapping):
    reward = {"name": "learned", "path": str(reward_path)} if as_mapping else str(reward_path)
    env = gym.make("TextGen-v0", task="sentiment", reward=reward, max_new_tokens=4)
    teacher = LearnedReward(reward_path)
    good = ENV.tokenizer.token_to_id("good")
    for seed in range(2):
        env.reset(seed=seed)
        rewards, done = [], False
        while not done:
            _, r, terminated, truncated, info = env.step(good)
            rewards.append(r)
            done = terminated or truncated
        assert truncated and len(rewards) == 4 and rewards[:-1] == [0.0, 0.0, 0.0]
        assert info["completion"] == "good good good good"
        expected = float(teacher([info["prompt"]], [info["completion"]])[0])
        assert rewards[-1] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert info["reward_components"]["score"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    env.close()


def test_vector_env_and_ppo_take_a_learned_reward(reward_path):
    venv = TextGenVectorEnv(4, task="sentiment", reward=str(reward_path), autoreset_mode="same_step")
    venv.reset(seed=0)
    eos = np.full(4, EOS_ID)
    _, rewards, terminated, _, infos = venv.step(eos)
    assert terminated.all()
    expected = LearnedReward(reward_path)(list(infos["final_info"]["prompt"]), [""] * 4)
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)
    model = PPO(
        "TextGen-v0",
        PPOConfig(n_steps=8, policy=TINY),
        num_envs=4,
        device="cpu",
        seed=0,
        env_kwargs={"task": "sentiment", "reward": str(reward_path)},
    )
    model.learn(32)
    assert len(model.ep_info_buffer) > 0
    assert all(math.isfinite(e["r"]) for e in model.ep_info_buffer)


def test_bad_reward_checkpoints_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reward-model checkpoint"):
        gym.make("TextGen-v0", reward=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError):
        as_reward_model({"name": "learned", "path": str(tmp_path / "missing.pt")})
    (tmp_path / "notes.pt").write_text("hello\n")
    with pytest.raises(ValueError, match="not a textgym reward-model checkpoint"):
        gym.make("TextGen-v0", reward=str(tmp_path / "notes.pt"))
    # A language-model checkpoint is a .pt file too, but not a reward model.
    save_lm(tmp_path / "lm.pt", TransformerPolicy(ENV.tokenizer.vocab_size, 17, TINY), ENV.tokenizer)
    with pytest.raises(ValueError, match="not a textgym reward-model checkpoint"):
        LearnedReward(tmp_path / "lm.pt")
    # A checkpoint whose vocabulary is not its task's tokenizer.
    arithmetic = make_env_config("arithmetic").tokenizer
    net = RewardNet(arithmetic.vocab_size, 16, TINY)
    save_reward_model(tmp_path / "mixed.pt", net, SPEC, arithmetic)
    with pytest.raises(ValueError, match="vocabulary differs"):
        LearnedReward(tmp_path / "mixed.pt")


def test_the_agents_re_export_what_moved_to_textgym():
    """Training stays in agents.reward_model; what loading needs moved to textgym.learned."""
    for name in ("LearnedReward", "RewardNet", "encode_pairs", "REWARD_SCHEMA"):
        assert getattr(agents.reward_model, name) is getattr(textgym.learned, name), name


def test_checkpoints_keep_their_layout(tmp_path):
    """The keys and state_dict names that checkpoints written before the move hold, so they still load."""
    cfg = PolicyConfig(d_model=16, n_layers=1, n_heads=2)
    net = RewardNet(ENV.tokenizer.vocab_size, 16, cfg)
    block = [f"{m}.{p}" for m in ("ln1", "qkv", "proj", "ln2", "mlp.0", "mlp.2") for p in ("weight", "bias")]
    assert sorted(net.state_dict()) == sorted(
        [
            "decoder.tok_emb.weight",
            "decoder.pos_emb.weight",
            *(f"decoder.blocks.0.{name}" for name in block),
            "decoder.ln_f.weight",
            "decoder.ln_f.bias",
            "head.weight",
            "head.bias",
        ]
    )
    path = save_reward_model(tmp_path / "reward.pt", net, SPEC, ENV.tokenizer, {"note": 1})
    ckpt = read_reward_checkpoint(path)
    assert set(ckpt) == {
        "schema",
        "policy_config",
        "vocab_size",
        "max_len",
        "tokenizer_spec",
        "vocabulary",
        "state_dict",
        "meta",
    }
    assert ckpt["policy_config"] == {
        "d_model": 16,
        "n_layers": 1,
        "n_heads": 2,
        "mlp_ratio": 4,
        "positional": "learned",
        "architecture": "decoder",
        "encoder_layers": None,
    }
    assert ckpt["schema"] == "textgym-reward/1" and ckpt["meta"] == {"note": 1}
    assert ckpt["vocabulary"] == list(ENV.tokenizer.vocabulary)


def test_training_logs_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = RewardTrainConfig(steps=20, batch_size=16, max_len=24, val_fraction=0.2, eval_interval=10)
    _, report = train_reward_model(
        separable_pairs(60), ENV.tokenizer, config, TINY, "cpu", seed=0, tensorboard_log=tmp_path
    )
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    names = ("train_loss", "learning_rate", "val_loss", "val_accuracy")
    assert {f"reward_model/{name}" for name in names} <= set(acc.Tags()["scalars"])
    logged = [(e.step, e.value) for e in acc.Scalars("reward_model/val_accuracy")]
    assert logged == [(s, pytest.approx(a)) for s, _, a in report["history"]]
    assert [s for s, _ in logged] == [0, 10, 20]


def test_save_reward_model_is_atomic(tmp_path, monkeypatch):
    net = RewardNet(ENV.tokenizer.vocab_size, 16, TINY)
    path = save_reward_model(tmp_path / "reward.pt", net, SPEC, ENV.tokenizer)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_reward_model(path, net, SPEC, ENV.tokenizer)
    monkeypatch.undo()
    assert path.read_bytes() == good
    LearnedReward(path)


# ------------------------------------------------------------------------------- reward_data
@pytest.mark.parametrize("task", ["sentiment", "keyword"])
def test_reward_data_pairs_are_ordered_by_the_task_reward(task):
    config = make_env_config(task)
    pairs = reward_data(task, 200, "pairs", seed=0)
    assert 0 < len(pairs) <= 200
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    assert all(p["prompt"] in config.prompts for p in pairs)
    prompts = [p["prompt"] for p in pairs]
    chosen = config.reward(prompts, [p["chosen"] for p in pairs])
    rejected = config.reward(prompts, [p["rejected"] for p in pairs])
    assert (chosen > rejected).all()


def test_reward_data_labels_are_the_task_scores():
    labels = reward_data("sentiment", 150, "labels", seed=1)
    assert len(labels) == 150 and all(set(e) == {"prompt", "completion", "score"} for e in labels)
    expected = ENV.reward([e["prompt"] for e in labels], [e["completion"] for e in labels])
    assert [e["score"] for e in labels] == expected.tolist()
    assert len({e["score"] for e in labels}) > 2  # not a constant
    assert check_examples(labels) == "labels" and check_examples(reward_data("sentiment", 20)) == "pairs"


def test_reward_data_is_deterministic_and_checks_its_kind():
    assert KINDS == ("pairs", "labels")
    assert reward_data("sentiment", 50, "pairs", seed=3) == reward_data("sentiment", 50, "pairs", seed=3)
    assert reward_data("sentiment", 50, "labels", seed=3) == reward_data("sentiment", 50, "labels", seed=3)
    assert reward_data("sentiment", 50, "labels", seed=3) != reward_data("sentiment", 50, "labels", seed=4)
    with pytest.raises(ValueError, match="kind must be one of pairs, labels"):
        reward_data("sentiment", 10, "triples")


def test_reward_data_arithmetic_has_correct_answers():
    labels = reward_data("arithmetic", 90, "labels", seed=0)
    right = [e for e in labels if e["completion"] == arithmetic_answer(e["prompt"])]
    assert len(right) > 10 and all(e["score"] == 1.0 for e in right)
    assert all(e["score"] == 0.0 for e in labels if e not in right)
    assert len(right) < len(labels)
    pairs = reward_data("arithmetic", 60, "pairs", seed=0)
    assert pairs and all(p["chosen"] == arithmetic_answer(p["prompt"]) for p in pairs)
    assert all(p["rejected"] != p["chosen"] for p in pairs)
