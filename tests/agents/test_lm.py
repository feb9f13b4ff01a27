"""Pretraining the policy as a language model: the loss, its checkpoint, and PPO starting from it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.lm import (
    LM_SCHEMA,
    PretrainConfig,
    check_vocabulary,
    encode_texts,
    evaluate_lm,
    fit,
    lm_loss,
    load_lm,
    pretrain,
    sample_with_kl,
    save_lm,
)
from agents.policy import PolicyConfig, TransformerPolicy, last_real_column
from agents.ppo import PPO, PPOConfig
from textgym.tasks import get_task, make_env_config
from textgym.tokenizers import BOS_ID, EOS_ID, PAD_ID, WordTokenizer

TINY = PolicyConfig(d_model=16, n_layers=1, n_heads=2)
ENV = make_env_config("sentiment")  # word tokenizer, 131 tokens, observations of 17 tokens
TEXTS = get_task("sentiment").corpus[:400]
FAST = PretrainConfig(
    steps=60, batch_size=32, max_len=32, warmup_steps=5, eval_interval=30, learning_rate=1e-2
)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    policy, report = pretrain(TEXTS, ENV.tokenizer, FAST, TINY, device="cpu", seed=0)
    return policy, report


@pytest.fixture
def lm_path(tmp_path, trained):
    return save_lm(tmp_path / "lm.pt", trained[0], ENV.tokenizer, {"task": "sentiment"})


def observations(num: int = 8, steps: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """TextGen-v0 observations (left-padded prompts, then generated tokens) as torch tensors."""
    from textgym.vector import TextGenVectorEnv

    env = TextGenVectorEnv(num, task="sentiment", autoreset_mode="same_step", array_type="torch")
    obs, _ = env.reset(seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        obs = env.step(torch.randint(4, env.single_action_space.n, (num,), generator=gen))[0]
    return obs


# ------------------------------------------------------------------------------- pretraining
def test_pretraining_lowers_the_held_out_loss(trained, tmp_path):
    _, report = trained
    assert set(report) >= {
        "initial_val_loss",
        "initial_val_perplexity",
        "final_val_loss",
        "final_val_perplexity",
        "val_history",
        "train_texts",
        "val_texts",
        "texts_cut",
        "seconds",
    }
    assert report["train_texts"] + report["val_texts"] == len(TEXTS)
    assert report["val_texts"] == round(FAST.val_fraction * len(TEXTS))
    # A near-uniform initial policy: perplexity about the vocabulary size.
    V = ENV.tokenizer.vocab_size
    assert V / 2 < report["initial_val_perplexity"] < 2 * V
    assert report["initial_val_perplexity"] == pytest.approx(math.exp(report["initial_val_loss"]))
    assert report["final_val_perplexity"] == pytest.approx(math.exp(report["final_val_loss"]))
    # Clearly learned: at least 1.5 nats per token better on the held-out texts.
    assert report["final_val_loss"] < report["initial_val_loss"] - 1.5
    steps = [s for s, _ in report["val_history"]]
    assert steps == [0, 30, 60]
    assert report["val_history"][0][1] == report["initial_val_loss"]
    assert report["val_history"][-1][1] == report["final_val_loss"]


def test_pretraining_logs_to_tensorboard_and_is_deterministic(tmp_path):
    config = PretrainConfig(steps=10, batch_size=8, max_len=32, warmup_steps=2, eval_interval=5)
    a, report_a = pretrain(TEXTS[:60], ENV.tokenizer, config, TINY, "cpu", seed=3, tensorboard_log=tmp_path)
    b, report_b = pretrain(TEXTS[:60], ENV.tokenizer, config, TINY, "cpu", seed=3)
    assert report_a["val_history"] == report_b["val_history"]
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"pretrain/val_loss", "pretrain/val_perplexity", "pretrain/train_loss"} <= tags
    logged = [(e.step, e.value) for e in acc.Scalars("pretrain/val_loss")]
    assert [s for s, _ in logged] == [0, 5, 10]
    assert [v for _, v in logged] == pytest.approx([v for _, v in report_a["val_history"]], rel=1e-6)


def test_fit_evaluates_at_the_documented_steps_and_follows_the_schedule():
    """The loop pretraining and reward-model training share: evaluations at 0, every k steps and
    the last; ``lr_at(step)`` set before each step; seeded minibatches; the model left in eval mode."""
    x, y = torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), torch.arange(20.0)

    def run(seed: int) -> tuple[list, list, list, torch.nn.Module]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=123.0)
        lrs, batches = [], []

        def loss(rows: torch.Tensor) -> torch.Tensor:
            assert model.training
            lrs.append(optimizer.param_groups[0]["lr"])
            batches.append(rows.tolist())
            return ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean()

        @torch.no_grad()
        def evaluate(step: int) -> dict[str, float]:
            return {"val_loss": float(((model(x).squeeze(-1) - y) ** 2).mean()), "step": float(step)}

        history = fit(
            model,
            optimizer,
            loss,
            evaluate,
            n_train=20,
            steps=7,
            batch_size=4,
            eval_interval=3,
            max_grad_norm=1.0,
            lr_at=lambda step: 0.01 / (step + 1),
            seed=seed,
            prefix="test",
        )
        return history, lrs, batches, model

    history, lrs, batches, model = run(seed=1)
    assert [step for step, _ in history] == [0, 3, 6, 7]
    assert [metrics["step"] for _, metrics in history] == [0.0, 3.0, 6.0, 7.0]
    assert lrs == [0.01 / (step + 1) for step in range(7)]
    assert len(batches) == 7 and all(len(b) == 4 and min(b) >= 0 and max(b) < 20 for b in batches)
    assert not model.training
    assert run(seed=1)[2] == batches and run(seed=2)[2] != batches


def test_pretrain_refuses_too_few_texts():
    with pytest.raises(ValueError, match="at least 2 non-empty texts"):
        pretrain(["only one", "   ", ""], ENV.tokenizer, FAST, TINY, "cpu")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", 1.5),
        ("max_len", 2),
        ("warmup_steps", -1),
        ("learning_rate", 0.0),
        ("val_fraction", 1.0),
        ("weight_decay", -0.1),
        ("max_grad_norm", float("nan")),
    ],
)
def test_pretrain_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        PretrainConfig(**{field: value})


# ----------------------------------------------------------------------------------- the loss
def test_encode_texts_rows_and_cuts():
    tok = ENV.tokenizer
    texts = ["the food was great .", "the food was great . " * 10]
    ids, mask, cut = encode_texts(texts, tok, 12)
    first = [BOS_ID, *tok.encode(texts[0]), EOS_ID]
    assert ids[0, : len(first)].tolist() == first
    assert (ids[0, len(first) :] == PAD_ID).all() and mask[0].sum() == len(first)
    assert cut == 1 and mask[1].all() and ids[1, 0] == BOS_ID
    assert ids[1].tolist() == [BOS_ID, *tok.encode(texts[1])][:12]  # cut: no room for <eos>


def test_lm_loss_is_the_cross_entropy_of_the_real_targets(trained):
    policy = trained[0]
    texts = ["the food was great .", "review of the hotel : the view was", TEXTS[5], "bad"]
    ids, mask, _ = encode_texts(texts, ENV.tokenizer, 32)
    with torch.no_grad():
        loss = float(lm_loss(policy, ids, mask))
        logits = policy(ids, mask)[0].double()  # (B, L, V)
    total, count = 0.0, 0
    for i in range(len(texts)):
        n = int(mask[i].sum())  # <bos> text <eos>: n tokens, n - 1 predictions
        for j in range(n - 1):
            target = int(ids[i, j + 1])
            total += float(torch.logsumexp(logits[i, j], 0) - logits[i, j, target])
            count += 1
    assert count == int(mask[:, 1:].sum())
    assert loss == pytest.approx(total / count, rel=1e-5)
    # The token-weighted evaluation agrees, whatever the batch size.
    assert evaluate_lm(policy, ids, mask, batch_size=3) == pytest.approx(total / count, rel=1e-5)


def test_right_padded_training_rows_read_like_left_padded_observations(trained):
    """The module's claim: what pretraining sees (right padding) is what the env shows (left)."""
    policy = trained[0]
    row = [BOS_ID, *ENV.tokenizer.encode("review of the hotel : the view was")]
    right = torch.full((1, 17), PAD_ID)
    right[0, : len(row)] = torch.tensor(row)
    left = torch.full((1, 17), PAD_ID)
    left[0, 17 - len(row) :] = torch.tensor(row)
    with torch.no_grad():
        a = policy(right, (right != PAD_ID).long())[0][0, : len(row)]
        b = policy(left, (left != PAD_ID).long())[0][0, 17 - len(row) :]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_gives_identical_logits(trained, lm_path):
    policy = trained[0]
    assert not list(lm_path.parent.glob("*.tmp"))
    loaded = load_lm(lm_path, ENV.tokenizer)
    assert loaded.max_len == 32 and loaded.cfg == TINY and not loaded.training
    ids, mask, _ = encode_texts(TEXTS[:6], ENV.tokenizer, 32)
    with torch.no_grad():
        assert torch.equal(policy(ids, mask)[0], loaded(ids, mask)[0])
    ckpt = torch.load(lm_path, weights_only=True)
    assert ckpt["schema"] == LM_SCHEMA and ckpt["meta"] == {"task": "sentiment"}
    assert ckpt["vocabulary"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]


def test_load_lm_cuts_the_position_table(trained, lm_path):
    policy = trained[0]
    short = load_lm(lm_path, ENV.tokenizer, max_len=ENV.seq_len)
    assert short.max_len == ENV.seq_len == 17
    assert short.pos_emb.weight.shape == (17, TINY.d_model)
    assert torch.equal(short.pos_emb.weight, policy.pos_emb.weight[:17])
    obs = observations()
    with torch.no_grad():
        assert torch.equal(
            short(obs["input_ids"], obs["attention_mask"])[0],
            policy(obs["input_ids"], obs["attention_mask"])[0],
        )
    with pytest.raises(ValueError, match="max_len"):
        load_lm(lm_path, ENV.tokenizer, max_len=33)
    assert load_lm(lm_path, max_len=32).max_len == 32


def test_load_lm_refuses_another_vocabulary(lm_path):
    words = list(ENV.tokenizer.vocabulary[4:])
    words[2], words[3] = words[3], words[2]  # ids 6 and 7 swapped, same size
    swapped = WordTokenizer(words)
    assert swapped.vocab_size == ENV.tokenizer.vocab_size
    with pytest.raises(ValueError, match=r"id 6 is .* in the checkpoint but"):
        load_lm(lm_path, swapped)
    with pytest.raises(ValueError, match=r"131 tokens in the checkpoint, 16 in the environment"):
        load_lm(lm_path, make_env_config("arithmetic").tokenizer)
    check_vocabulary(list(ENV.tokenizer.vocabulary), ENV.tokenizer, "here")  # the same: no error


def test_the_vocabulary_check_is_the_environments():
    """One vocabulary check for language-model and reward-model checkpoints, in textgym.learned."""
    import agents.lm
    import textgym.learned

    assert agents.lm.check_vocabulary is textgym.learned.check_vocabulary
    assert agents.lm.vocabulary is textgym.learned.vocabulary


def test_load_lm_refuses_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no language-model checkpoint"):
        load_lm(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not a textgym language-model checkpoint"):
        load_lm(tmp_path / "notes.pt")
    torch.save({"schema": "something/else", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a textgym language-model checkpoint"):
        load_lm(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a textgym language-model checkpoint"):
        load_lm(tmp_path / "list.pt")


def test_save_lm_is_atomic(tmp_path, trained, monkeypatch):
    path = save_lm(tmp_path / "sub" / "lm.pt", trained[0], ENV.tokenizer)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_lm(path, TransformerPolicy(ENV.tokenizer.vocab_size, 32, TINY), ENV.tokenizer)
    monkeypatch.undo()
    assert path.read_bytes() == good
    load_lm(path, ENV.tokenizer)
    save_lm(path, trained[0], ENV.tokenizer)
    assert sorted(p.name for p in path.parent.iterdir()) == ["lm.pt"]


# ---------------------------------------------------------------------- PPO from a checkpoint
def test_ppo_starts_from_the_pretrained_weights(lm_path):
    config = PPOConfig(n_steps=8, kl_coef=0.05)  # default architecture: replaced by the checkpoint's
    assert config.policy != TINY
    model = PPO(
        "TextGen-v0",
        config,
        num_envs=4,
        env_kwargs={"task": "sentiment"},
        device="cpu",
        seed=1,
        init_policy=lm_path,
    )
    assert model.config.policy == TINY and model.init_policy == str(lm_path)
    assert model.config.kl_coef == 0.05 and model.config.n_steps == 8
    loaded = load_lm(lm_path, ENV.tokenizer, ENV.seq_len)
    obs = observations()
    rows = torch.arange(len(obs["input_ids"]))
    col = last_real_column(obs["attention_mask"])
    with torch.no_grad():
        expected = loaded(obs["input_ids"], obs["attention_mask"])[0][rows, col]
        got = model.policy(obs["input_ids"], obs["attention_mask"])[0][rows, col]
        ref = model.reference(obs["input_ids"], obs["attention_mask"])[0][rows, col]
    assert torch.equal(got, expected) and torch.equal(ref, expected)
    assert model.policy.training and not model.reference.training
    assert not any(p.requires_grad for p in model.reference.parameters())
    # The agent acts with the pretrained distribution: its greedy action is the LM's argmax.
    actions, _ = model.predict({k: v.numpy() for k, v in obs.items()}, deterministic=True)
    assert np.array_equal(actions, expected.argmax(-1).numpy())
    # Training moves the policy, never the frozen reference.
    model.learn(32)
    with torch.no_grad():
        assert torch.equal(model.reference(obs["input_ids"], obs["attention_mask"])[0][rows, col], expected)
        assert not torch.equal(model.policy(obs["input_ids"], obs["attention_mask"])[0][rows, col], expected)


def test_ppo_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    short = save_lm(
        tmp_path / "short.pt", TransformerPolicy(ENV.tokenizer.vocab_size, 10, TINY), ENV.tokenizer
    )
    with pytest.raises(ValueError, match="max_len"):
        PPO("TextGen-v0", PPOConfig(n_steps=8), num_envs=2, device="cpu", init_policy=short)
    good = save_lm(tmp_path / "lm.pt", TransformerPolicy(ENV.tokenizer.vocab_size, 32, TINY), ENV.tokenizer)
    with pytest.raises(ValueError, match="vocabulary differs"):
        PPO(
            "TextGen-v0",
            PPOConfig(n_steps=8),
            num_envs=2,
            env_kwargs={"task": "keyword"},
            device="cpu",
            init_policy=good,
        )
    with pytest.raises(FileNotFoundError):
        PPO("TextGen-v0", PPOConfig(n_steps=8), num_envs=2, device="cpu", init_policy=tmp_path / "nope.pt")


# --------------------------------------------------------------------------- sample_with_kl
def test_sample_with_kl_is_zero_against_itself_and_positive_otherwise(trained):
    policy = trained[0]
    env_kwargs = {"task": "sentiment"}
    same = sample_with_kl(policy, copy.deepcopy(policy), env_kwargs, episodes=8, num_envs=4, seed=5)
    assert same["kl_mean"] == 0.0
    assert same["episodes"] == 8 and math.isfinite(same["reward_mean"]) and same["reward_std"] >= 0
    assert 1 <= len(same["samples"]) <= 8
    prompt, completion, ret = same["samples"][0]
    assert prompt in ENV.prompts and isinstance(completion, str) and math.isfinite(ret)
    other = TransformerPolicy(ENV.tokenizer.vocab_size, 32, TINY)  # untrained: near uniform
    diff = sample_with_kl(policy, other, env_kwargs, episodes=8, num_envs=4, seed=5)
    assert diff["kl_mean"] > 0.1
    # Same seed and same sampling policy: the same episodes, whatever the reference.
    assert diff["reward_mean"] == same["reward_mean"] and diff["samples"] == same["samples"]
    # Modes are restored.
    policy.train()
    sample_with_kl(policy, other, env_kwargs, episodes=4, num_envs=4)
    assert policy.training and other.training
    policy.eval()


def test_sample_with_kl_matches_an_exact_computation_for_one_step():
    """With max_new_tokens=1 every episode is one step: its KL is one exact KL of two softmaxes."""
    torch.manual_seed(0)
    p = TransformerPolicy(ENV.tokenizer.vocab_size, 10, TINY)
    q = TransformerPolicy(ENV.tokenizer.vocab_size, 10, TINY)
    with torch.no_grad():
        p.policy_head.weight.mul_(300.0)  # far from uniform
    env_kwargs = {"task": "sentiment", "max_new_tokens": 1}
    stats = sample_with_kl(p, q, env_kwargs, episodes=4, num_envs=4, seed=7)
    from textgym.vector import TextGenVectorEnv

    env = TextGenVectorEnv(4, autoreset_mode="same_step", array_type="torch", **env_kwargs)
    obs, _ = env.reset(seed=7)
    rows, col = torch.arange(4), last_real_column(obs["attention_mask"])
    with torch.no_grad():
        logp = F.log_softmax(p(obs["input_ids"], obs["attention_mask"])[0][rows, col].double(), -1)
        logq = F.log_softmax(q(obs["input_ids"], obs["attention_mask"])[0][rows, col].double(), -1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    assert stats["episodes"] == 4
    assert stats["kl_mean"] == pytest.approx(float(exact.mean()), rel=1e-4)
