"""The PPO agent: configuration, loss maths, learning, checkpoints, resuming, logging and predict."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.baselines import evaluate
from agents.buffer import compute_gae, segments
from agents.policy import PolicyConfig
from agents.ppo import CHECKPOINT_SCHEMA, PPO, PPOConfig
from textgym.vector import TextGenVectorEnv

SB3_TAGS = {
    "train/policy_gradient_loss",
    "train/value_loss",
    "train/entropy_loss",
    "train/approx_kl",
    "train/clip_fraction",
    "train/loss",
    "train/explained_variance",
    "train/learning_rate",
    "train/clip_range",
    "train/n_updates",
}


def small(config: PPOConfig | None = None, num_envs: int = 8, seed: int = 0, **kwargs) -> PPO:
    return PPO(
        "TextGen-v0", config or PPOConfig(n_steps=8), num_envs=num_envs, device="cpu", seed=seed, **kwargs
    )


def started(model: PPO, seed: int = 0) -> PPO:
    """Ready for collect_rollout() without learn(): the env is reset as learn() resets it."""
    model._obs = model.env.reset(seed=seed)[0]
    return model


def randomise_value_head(model: PPO, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.policy.value_head.weight.copy_(torch.randn(model.policy.value_head.weight.shape, generator=gen))


def observations(num: int = 24, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of TextGen-v0 observations at many stages of their episodes (numpy, as a user has)."""
    env = TextGenVectorEnv(num, autoreset_mode="same_step")
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(3):
        obs = env.step(rng.integers(4, env.single_action_space.n, size=num))[0]
        ids.append(obs["input_ids"])
        masks.append(obs["attention_mask"])
    return {"input_ids": np.concatenate(ids), "attention_mask": np.concatenate(masks)}


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_steps", 0),
        ("n_steps", 2.0),
        ("n_epochs", -1),
        ("num_minibatches", True),
        ("sample_interval", 0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("adam_eps", -1e-5),
        ("clip_range", 0),
        ("max_grad_norm", "1"),
        ("gamma", 1.5),
        ("gamma", -0.1),
        ("gae_lambda", 1.01),
        ("gae_lambda", None),
        ("ent_coef", -0.01),
        ("vf_coef", -1.0),
        ("clip_range_vf", 0.0),
        ("clip_range_vf", "0.2"),
        ("target_kl", -0.01),
        ("micro_batch_size", 0),
        ("micro_batch_size", 2.5),
        ("micro_batch_size", True),
        ("autocast", 1),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PPOConfig\.{field} must be"):
        PPOConfig(**{field: value})


def test_config_validates_the_nested_policy():
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        PPOConfig(policy={"d_model": 0})
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=64"):
        PPOConfig.from_dict({"policy": {"n_heads": 3}})


def test_config_rejects_nan_coefficients():
    with pytest.raises(ValueError, match="ent_coef"):
        PPOConfig(ent_coef=float("nan"))


def test_config_rejects_a_bad_policy():
    with pytest.raises((ValueError, TypeError), match="policy"):
        PPOConfig(policy=5)  # type: ignore[arg-type]


def test_config_edges_are_accepted():
    cfg = PPOConfig(gamma=1.0, gae_lambda=0.0, ent_coef=0.0, vf_coef=0, clip_range_vf=0.1, target_kl=0.02)
    assert cfg.gamma == 1.0 and cfg.gae_lambda == 0.0


def test_config_is_frozen():
    cfg = PPOConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_steps = 4  # type: ignore[misc]


def test_config_round_trip_through_json():
    cfg = PPOConfig(
        n_steps=8,
        learning_rate=3e-4,
        clip_range_vf=0.3,
        target_kl=0.05,
        anneal_lr=False,
        policy=PolicyConfig(d_model=32, n_layers=1, n_heads=2, positional="sinusoidal"),
    )
    data = cfg.to_dict()
    assert data["policy"] == {
        "d_model": 32,
        "n_layers": 1,
        "n_heads": 2,
        "mlp_ratio": 4,
        "positional": "sinusoidal",
        "architecture": "decoder",
        "encoder_layers": None,
    }
    back = PPOConfig.from_dict(json.loads(json.dumps(data)))
    assert back == cfg
    assert isinstance(back.policy, PolicyConfig)
    assert PPOConfig.from_dict({}) == PPOConfig()
    assert PPOConfig.from_dict({"n_steps": 4}).n_steps == 4


def test_pretrained_preset_takes_few_small_steps_and_keeps_the_kl_penalty():
    full, lora, no_kl = (
        PPOConfig.pretrained(),
        PPOConfig.pretrained(lora=True),
        PPOConfig.pretrained(kl=False),
    )
    default = PPOConfig()
    # a quarter of the default's optimizer steps per rollout, far smaller ones, no annealing
    assert full.n_epochs * full.num_minibatches * 4 == default.n_epochs * default.num_minibatches
    assert full.learning_rate <= default.learning_rate / 50 and not full.anneal_lr
    assert full.target_kl is not None and full.ent_coef == 0 and full.vf_coef < default.vf_coef
    assert lora.learning_rate == 50 * full.learning_rate  # LoRA's B starts at zero: larger steps
    assert full.kl_coef > 0 and full.kl_target == 3.0 and lora.kl_target == full.kl_target
    assert full.kl_horizon == 10 * full.n_steps * 16  # β moves 2% per rollout at most, 16 envs
    assert no_kl.kl_coef == 0 and no_kl.kl_target is None and no_kl.kl_horizon is None
    assert dataclasses.replace(no_kl, kl_coef=0, kl_target=None) == dataclasses.replace(
        full, kl_coef=0, kl_target=None, kl_horizon=None
    )
    assert PPOConfig.from_dict(json.loads(json.dumps(full.to_dict()))) == full


def test_pretrained_preset_overrides_are_validated():
    assert PPOConfig.pretrained(learning_rate=1e-5, n_steps=8).learning_rate == 1e-5
    with pytest.raises(ValueError, match="learning_rate"):
        PPOConfig.pretrained(learning_rate=-1.0)
    with pytest.raises(ValueError, match="kl_target needs kl_coef"):
        PPOConfig.pretrained(kl_coef=0.0)
    with pytest.raises(TypeError):
        PPOConfig.pretrained(no_such_field=1)


def test_config_from_dict_refuses_unknown_fields():
    with pytest.raises(
        ValueError, match=r"unknown PPOConfig fields \['bogus', 'n_step'\]; known: .*'n_steps'"
    ):
        PPOConfig.from_dict({"n_step": 8, "bogus": 1, "gamma": 0.9})


# ------------------------------------------------------------------------------- constructor
def test_constructor_errors():
    with pytest.raises(ValueError, match="env must be one of"):
        PPO("CartPole-v1", device="cpu")
    with pytest.raises(TypeError, match="env must be 'TextGen-v0' or a TextGenVectorEnv"):
        PPO(object(), device="cpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config must be a PPOConfig"):
        PPO(config={"n_steps": 8}, device="cpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="autoreset_mode='same_step', array_type='torch'"):
        PPO(TextGenVectorEnv(2, autoreset_mode="next_step", array_type="torch"), device="cpu")
    with pytest.raises(ValueError, match="autoreset_mode='same_step', array_type='torch'"):
        PPO(TextGenVectorEnv(2, autoreset_mode="same_step", array_type="numpy"), device="cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        PPO(num_envs=2, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            PPO(num_envs=2, device="cuda")


def test_constructor_accepts_a_ready_env():
    env = TextGenVectorEnv(3, task="keyword", autoreset_mode="same_step", array_type="torch")
    model = PPO(env, PPOConfig(n_steps=4), device="cpu", seed=0)
    assert model.num_envs == 3 and model.env is env
    assert model.policy.vocab_size == env.single_action_space.n
    assert model.policy.max_len == env.config.seq_len
    model.learn(12)
    assert model.num_timesteps == 12


def test_learn_refuses_bad_budgets():
    model = small()
    for bad in (0, -8, 1.5, True):
        with pytest.raises(ValueError, match="total_timesteps must be a positive integer"):
            model.learn(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- loss maths
def test_rollout_logprobs_and_values_match_a_full_forward():
    model = started(small(PPOConfig(n_steps=12)))
    randomise_value_head(model)
    rollout, last_values, last_dones = model.collect_rollout()
    T, N, L = rollout.input_ids.shape
    assert rollout.input_ids.shape == (12, 8, model.seq_len)
    assert model.num_timesteps == T * N
    with torch.no_grad():
        logits, values = model.policy(
            rollout.input_ids.reshape(T * N, L), rollout.attention_mask.reshape(T * N, L)
        )
    mask = rollout.attention_mask.reshape(T * N, L)
    last = torch.tensor([int(row.nonzero().max()) for row in mask])
    rows = torch.arange(T * N)
    logp = F.log_softmax(logits[rows, last], -1)[rows, rollout.actions.reshape(-1)]
    torch.testing.assert_close(rollout.logprobs.reshape(-1), logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.values.reshape(-1), values[rows, last], atol=1e-5, rtol=0)
    # The last values are those of the observations after the rollout.
    obs = model._obs
    with torch.no_grad():
        _, v = model.policy(obs["input_ids"], obs["attention_mask"])
    last_obs = torch.tensor([int(row.nonzero().max()) for row in obs["attention_mask"]])
    torch.testing.assert_close(last_values, v[torch.arange(N), last_obs], atol=1e-5, rtol=0)
    torch.testing.assert_close(last_dones, rollout.dones[-1])


def test_ratio_is_one_through_segments():
    """What update() computes on its first minibatch: one causal pass per segment."""
    model = started(small(PPOConfig(n_steps=16)))
    rollout, _, _ = model.collect_rollout()
    model.collect_rollout()  # a second rollout starts mid-episode: its segments too
    for r in (rollout, model.collect_rollout()[0]):
        seg = segments(r, model.prompt_window)
        with torch.no_grad():
            hidden = model.policy.hidden(seg.input_ids, seg.attention_mask)
            logits, values = model.policy.heads(hidden[seg.segment, seg.column])
        logp = F.log_softmax(logits, -1).gather(1, r.actions.reshape(-1, 1)).squeeze(1)
        torch.testing.assert_close(logp, r.logprobs.reshape(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(values, r.values.reshape(-1), atol=1e-5, rtol=0)


def test_single_minibatch_update_statistics():
    cfg = PPOConfig(n_steps=16, n_epochs=1, num_minibatches=1)
    model = started(small(cfg))
    randomise_value_head(model)
    rollout, last_values, last_dones = model.collect_rollout()
    # Entropy of each transition's action distribution, by a full forward pass.
    T, N, L = rollout.input_ids.shape
    mask = rollout.attention_mask.reshape(T * N, L)
    with torch.no_grad():
        logits, _ = model.policy(rollout.input_ids.reshape(T * N, L), mask)
    last = torch.tensor([int(row.nonzero().max()) for row in mask])
    entropy = torch.distributions.Categorical(logits=logits[torch.arange(T * N), last]).entropy()
    before = [p.detach().clone() for p in model.policy.parameters()]
    stats = model.update(rollout, last_values, last_dones)
    assert set(stats) >= SB3_TAGS
    assert stats["train/clip_fraction"] == 0.0
    assert 0 <= stats["train/approx_kl"] < 1e-6
    assert stats["train/epochs"] == 1
    assert stats["train/learning_rate"] == cfg.learning_rate
    assert stats["train/clip_range"] == cfg.clip_range
    assert stats["train/sequences"] == segments(rollout, model.prompt_window).input_ids.shape[0]
    # Ratio 1 and normalised advantages: the surrogate is -mean(adv_norm) = 0.
    assert abs(stats["train/policy_gradient_loss"]) < 1e-5
    _, returns = compute_gae(
        rollout.rewards.double(),
        rollout.values.double(),
        rollout.episode_starts,
        last_values.double(),
        last_dones,
        cfg.gamma,
        cfg.gae_lambda,
    )
    value_loss = float(((returns - rollout.values.double()) ** 2).mean())
    assert stats["train/value_loss"] == pytest.approx(value_loss, rel=1e-4)
    assert stats["train/entropy_loss"] == pytest.approx(-float(entropy.mean()), rel=1e-4)
    expected_loss = (
        stats["train/policy_gradient_loss"]
        + cfg.ent_coef * stats["train/entropy_loss"]
        + cfg.vf_coef * stats["train/value_loss"]
    )
    assert stats["train/loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-6)
    ev = 1 - float((returns - rollout.values.double()).var() / returns.var())
    assert stats["train/explained_variance"] == pytest.approx(ev, rel=1e-3, abs=1e-4)
    after = list(model.policy.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_several_epochs_move_the_policy_and_report_means():
    model = started(small(PPOConfig(n_steps=16, n_epochs=3, num_minibatches=2)))
    stats = model.update(*model.collect_rollout())
    assert stats["train/epochs"] == 3
    assert stats["train/approx_kl"] > 0  # later minibatches see a changed policy


def test_target_kl_stops_the_epochs_early():
    cfg = PPOConfig(n_steps=16, n_epochs=6, num_minibatches=4, learning_rate=1e-2, target_kl=1e-9)
    model = started(small(cfg))
    stats = model.update(*model.collect_rollout())
    assert stats["train/epochs"] == 1
    free = started(small(dataclasses.replace(cfg, target_kl=None)))
    assert free.update(*free.collect_rollout())["train/epochs"] == 6


@pytest.mark.parametrize("normalize", [True, False])
def test_micro_batches_give_the_minibatch_gradient(normalize):
    """Minibatches cut into micro-batches of 1 or 3 sequences pass the optimizer the gradient of
    the whole minibatch: advantages normalised and losses averaged over the minibatch, not per
    micro-batch (either would change this gradient)."""
    cfg = PPOConfig(
        n_steps=16,
        n_epochs=2,
        num_minibatches=3,
        max_grad_norm=1e9,  # compare the gradients themselves, not clipped ones
        clip_range_vf=0.2,
        normalize_advantage=normalize,
    )
    grads, stats, passes = {}, {}, {}
    for micro in (None, 1, 3):
        model = started(small(dataclasses.replace(cfg, micro_batch_size=micro)))
        randomise_value_head(model)
        rollout = model.collect_rollout()
        recorded: list[list[torch.Tensor]] = []
        step, hidden = model.optimizer.step, model.policy.hidden
        model.optimizer.step = lambda *a, r=recorded, s=step, m=model: (
            r.append([p.grad.clone() for p in m.policy.parameters()]),
            s(*a),
        )[1]
        calls = [0]
        model.policy.hidden = lambda *a, c=calls, h=hidden, **k: (c.__setitem__(0, c[0] + 1), h(*a, **k))[1]
        torch.manual_seed(3)  # the same minibatches
        stats[micro] = model.update(*rollout)
        grads[micro], passes[micro] = recorded, calls[0]
    sequences = stats[None]["train/sequences"]
    assert passes[None] == 6 and passes[1] == 2 * sequences and passes[3] > passes[None]
    for micro in (1, 3):
        assert len(grads[micro]) == len(grads[None]) == 6
        for got, full in zip(grads[micro], grads[None], strict=True):
            for g, f in zip(got, full, strict=True):
                # float rounding differs with the batch shapes (and Adam carries it on): relative to the scale
                torch.testing.assert_close(g, f, atol=1e-4 * float(f.abs().max()), rtol=1e-3)
        for key in (
            "train/policy_gradient_loss",
            "train/value_loss",
            "train/entropy_loss",
            "train/approx_kl",
        ):
            assert stats[micro][key] == pytest.approx(stats[None][key], rel=1e-4, abs=1e-7)


def test_truncated_episodes_are_bootstrapped_only_when_asked():
    """Same seed, same actions: with bootstrap_truncated the reward of a truncating step grows by
    gamma * V(final observation), computed here by a full forward pass."""
    runs = {}
    for flag in (False, True):
        model = started(small(PPOConfig(n_steps=10, bootstrap_truncated=flag)))
        randomise_value_head(model)
        runs[flag] = (model, model.collect_rollout()[0])
    (model, plain), (_, boot) = runs[False], runs[True]
    assert torch.equal(plain.actions, boot.actions)
    M, L = model.env.config.max_new_tokens, model.seq_len
    P = model.prompt_window
    generated = plain.attention_mask[..., P:].sum(-1)  # (T, N)
    truncating = (generated == M - 1) & (plain.actions != model.tokenizer.eos_id)
    assert truncating.any()
    assert torch.equal(plain.dones.bool() & truncating, truncating)
    t_idx, n_idx = truncating.nonzero(as_tuple=True)
    final_ids, final_mask = plain.input_ids[t_idx, n_idx].clone(), plain.attention_mask[t_idx, n_idx].clone()
    final_ids[:, L - 1], final_mask[:, L - 1] = plain.actions[t_idx, n_idx], 1
    with torch.no_grad():
        _, v = model.policy(final_ids, final_mask)
    expected = plain.rewards.clone()
    expected[t_idx, n_idx] += model.config.gamma * v[:, L - 1]
    torch.testing.assert_close(boot.rewards, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(boot.rewards, plain.rewards)


def test_bootstrapping_does_not_change_the_logged_episode_returns():
    returns = {}
    for flag in (False, True):
        model = started(small(PPOConfig(n_steps=10, bootstrap_truncated=flag)))
        randomise_value_head(model)
        model.collect_rollout()
        returns[flag] = [e["r"] for e in model.ep_info_buffer]
    assert len(returns[True]) == len(returns[False]) > 0
    assert returns[True] == pytest.approx(returns[False])


def test_learning_rate_annealing():
    model = small(PPOConfig(n_steps=8, learning_rate=1e-3))
    model.learn(8 * 8 * 4)
    assert model.last_stats["train/learning_rate"] == pytest.approx(1e-3 * (1 - 3 / 4))
    flat = small(PPOConfig(n_steps=8, learning_rate=1e-3, anneal_lr=False))
    flat.learn(8 * 8 * 2)
    assert flat.last_stats["train/learning_rate"] == 1e-3


def test_learn_counts_whole_rollouts():
    model = small(PPOConfig(n_steps=4), num_envs=4)
    model.learn(17)  # four steps of four envs per update: 16 is not enough
    assert model.num_timesteps == 32 and model.n_updates == 2
    model.learn(16, reset_num_timesteps=False)
    assert model.num_timesteps == 48 and model.n_updates == 3
    model.learn(16)
    assert model.num_timesteps == 16 and model.n_updates == 1


# ------------------------------------------------------------------------------------ learning
def beats_random(model: PPO, task: str, margin: float) -> tuple[float, float, float]:
    random_level = evaluate(None, {"task": task})["mean"]
    trained = model.last_stats["rollout/ep_rew_mean"]
    greedy = evaluate(lambda obs: model.predict(obs, deterministic=True)[0], {"task": task})["mean"]
    assert trained >= random_level + margin, (random_level, trained)
    assert greedy >= random_level + margin, (random_level, greedy)
    return random_level, trained, greedy


def test_short_training_beats_the_random_policy():
    model = PPO("TextGen-v0", PPOConfig(), num_envs=32, device="cpu", seed=0)
    model.learn(16_384)
    random_level, _, _ = beats_random(model, "default", 0.3)
    assert 0.15 < random_level < 0.3
    assert len(model.ep_info_buffer) == 100
    assert model.last_stats["rollout/ep_len_mean"] <= model.env.config.max_new_tokens


@pytest.mark.slow
@pytest.mark.parametrize(("task", "seed"), [("default", 1), ("keyword", 0), ("keyword", 1)])
def test_training_learns_the_task(task, seed):
    model = PPO("TextGen-v0", PPOConfig(), num_envs=32, env_kwargs={"task": task}, device="cpu", seed=seed)
    model.learn(65_536)
    _, trained, greedy = beats_random(model, task, 0.5)
    assert trained > 0.9 and greedy > 0.9


# --------------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(tmp_path):
    model = small(PPOConfig(n_steps=8, policy=PolicyConfig(d_model=32, positional="sinusoidal")))
    model.learn(8 * 8 * 2)
    path = model.save(tmp_path / "sub" / "ckpt.pt")
    assert path == tmp_path / "sub" / "ckpt.pt" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    loaded = PPO.load(path, device="cpu")
    assert loaded.config == model.config
    assert (loaded.num_timesteps, loaded.n_updates, loaded.num_envs, loaded.seed) == (128, 2, 8, 0)
    assert list(loaded.ep_info_buffer) == list(model.ep_info_buffer)
    for (name, a), (_, b) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    obs = observations()
    a, _ = model.predict(obs, deterministic=True)
    b, _ = loaded.predict(obs, deterministic=True)
    assert a.shape == (len(obs["input_ids"]),) and np.array_equal(a, b)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(loaded._obs[key], model._obs[key])


def test_save_is_atomic(tmp_path, monkeypatch):
    model = small()
    model.learn(64)
    path = model.save(tmp_path / "ckpt.pt")
    good = path.read_bytes()
    model.learn(64, reset_num_timesteps=False)

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert PPO.load(path, device="cpu").num_timesteps == 64
    model.save(path)
    assert PPO.load(path, device="cpu").num_timesteps == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_load_refuses_other_files(tmp_path):
    model = small()
    good = model.save(tmp_path / "good.pt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["schema_version"] = CHECKPOINT_SCHEMA + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(
        ValueError,
        match=rf"not a textgym PPO checkpoint of schema {CHECKPOINT_SCHEMA} \(got {CHECKPOINT_SCHEMA + 1}\)",
    ):
        PPO.load(tmp_path / "future.pt", device="cpu")
    torch.save({"model": {}}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"not a textgym PPO checkpoint .*got None"):
        PPO.load(tmp_path / "dict.pt", device="cpu")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a textgym PPO checkpoint"):
        PPO.load(tmp_path / "list.pt", device="cpu")
    with pytest.raises(FileNotFoundError, match="no PPO checkpoint at"):
        PPO.load(tmp_path / "missing.pt", device="cpu")


@pytest.mark.parametrize(
    "content", [b"hello", b"not a checkpoint\n" * 10, b""], ids=["short", "text", "empty"]
)
def test_load_refuses_a_text_file_with_value_error(tmp_path, content):
    path = tmp_path / "notes.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a textgym PPO checkpoint"):
        PPO.load(path, device="cpu")


def constant_reward(prompt: str, completion: str) -> float:
    return float(len(completion.split()) == 2)


def test_function_reward_needs_env_kwargs_again(tmp_path):
    env_kwargs = {"task": "default", "reward": constant_reward, "max_new_tokens": 4}
    model = small(PPOConfig(n_steps=4), num_envs=4, env_kwargs=env_kwargs)
    model.learn(32)
    path = model.save(tmp_path / "ckpt.pt")
    assert torch.load(path, weights_only=True)["env_kwargs"] is None
    with pytest.raises(ValueError, match=r"not JSON \(a reward function\?\); pass them again"):
        PPO.load(path, device="cpu")
    loaded = PPO.load(path, env_kwargs=env_kwargs, device="cpu")
    assert loaded.num_timesteps == 32 and loaded.seq_len == model.seq_len
    loaded.learn(16, reset_num_timesteps=False)
    assert loaded.num_timesteps == 48
    # JSON-able env_kwargs are stored and reused.
    json_kwargs = {"task": "keyword", "max_new_tokens": 5}
    other = small(PPOConfig(n_steps=4), num_envs=2, env_kwargs=json_kwargs)
    path2 = other.save(tmp_path / "json.pt")
    assert torch.load(path2, weights_only=True)["env_kwargs"] == json_kwargs
    again = PPO.load(path2, device="cpu")
    assert again.env.config.task == "keyword" and again.env.config.max_new_tokens == 5


@pytest.mark.parametrize("num_envs", [4, 8])
def test_resume_is_exactly_equivalent(tmp_path, num_envs):
    cfg = PPOConfig(anneal_lr=False, n_steps=8)
    steps = num_envs * 8
    a = small(cfg, num_envs=num_envs, seed=3)
    a.learn(steps * 4)
    b = small(cfg, num_envs=num_envs, seed=3)
    b.learn(steps * 2)
    path = b.save(tmp_path / "ckpt.pt")
    del b
    torch.manual_seed(12345)  # the global RNG state must come from the checkpoint, not from here
    np.random.seed(12345)
    c = PPO.load(path, device="cpu")
    c.learn(steps * 2, reset_num_timesteps=False)
    assert c.num_timesteps == a.num_timesteps == steps * 4
    assert c.n_updates == a.n_updates == 4
    for (name, pa), (_, pc) in zip(a.policy.state_dict().items(), c.policy.state_dict().items(), strict=True):
        assert torch.equal(pa, pc), name
    assert [e["r"] for e in a.ep_info_buffer] == [e["r"] for e in c.ep_info_buffer]
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(a._obs[key], c._obs[key])


def test_resume_without_the_checkpoint_diverges(tmp_path):
    """The equivalence above is not automatic: a fresh agent with the loaded weights only differs."""
    cfg = PPOConfig(anneal_lr=False, n_steps=8)
    a = small(cfg, seed=3)
    a.learn(8 * 8 * 4)
    b = small(cfg, seed=3)
    b.learn(8 * 8 * 2)
    b.learn(8 * 8 * 2)  # reset_num_timesteps=True: resets the env, a different trajectory
    assert any(
        not torch.equal(pa, pb) for pa, pb in zip(a.policy.parameters(), b.policy.parameters(), strict=True)
    )


# --------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_logging(tmp_path):
    model = small(PPOConfig(n_steps=8, sample_interval=2), tensorboard_log=tmp_path)
    model.learn(8 * 8 * 3)
    (run,) = tmp_path.iterdir()
    assert run.name == "ppo_1"
    assert list(run.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {
        "rollout/ep_rew_mean",
        "rollout/ep_len_mean",
        "train/approx_kl",
        "train/clip_fraction",
        "train/entropy_loss",
        "train/explained_variance",
        "train/value_loss",
        "train/policy_gradient_loss",
        "train/loss",
        "train/learning_rate",
        "time/fps",
        "time/rollout_seconds",
        "time/update_seconds",
        "time/time_elapsed",
    }
    assert expected <= scalars, expected - scalars
    for tag in expected:
        assert [e.step for e in acc.Scalars(tag)] == [64, 128, 192], tag
    # each iteration's rollout and update take part of the time since learn began
    elapsed = [e.value for e in acc.Scalars("time/time_elapsed")]
    rollouts, updates = acc.Scalars("time/rollout_seconds"), acc.Scalars("time/update_seconds")
    parts = [r.value + u.value for r, u in zip(rollouts, updates, strict=True)]
    assert all(p > 0 for p in parts) and elapsed == sorted(elapsed)
    assert all(p <= e - before for p, e, before in zip(parts, elapsed, [0.0, *elapsed[:-1]], strict=True))
    assert acc.Scalars("train/loss")[-1].value == pytest.approx(model.last_stats["train/loss"], rel=1e-5)
    texts = set(acc.Tags()["tensors"])
    assert {"config/text_summary", "samples/text_summary"} <= texts
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"n_steps": 8' in config_text and '"positional": "learned"' in config_text
    sample_steps = [e.step for e in acc.Tensors("samples/text_summary")]
    assert sample_steps == [64, 192]  # updates 1 and 3 with sample_interval=2
    samples = acc.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| prompt | completion | return |" in samples


def test_tensorboard_samples_every_update(tmp_path):
    model = small(PPOConfig(n_steps=8, sample_interval=1), tensorboard_log=tmp_path)
    model.learn(8 * 8 * 3)
    acc = EventAccumulator(str(tmp_path / "ppo_1"))
    acc.Reload()
    assert "samples/text_summary" in acc.Tags()["tensors"]
    assert [e.step for e in acc.Tensors("samples/text_summary")] == [64, 128, 192]


def test_tensorboard_runs_are_numbered_and_continued(tmp_path):
    model = small(tensorboard_log=tmp_path)
    model.learn(64)
    model.learn(64, reset_num_timesteps=False)  # continues ppo_1
    model.learn(64)  # a new run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ppo_1", "ppo_2"]
    acc = EventAccumulator(str(tmp_path / "ppo_1"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [64, 128]


def test_no_tensorboard_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small().learn(64)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- predict
def test_predict_single_and_batch():
    model = small()
    obs = observations()
    B = len(obs["input_ids"])
    batch, state = model.predict(obs, deterministic=True)
    assert state is None
    assert isinstance(batch, np.ndarray) and batch.shape == (B,)
    assert ((batch >= 0) & (batch < model.policy.vocab_size)).all()
    single, _ = model.predict({k: v[5] for k, v in obs.items()}, deterministic=True)
    assert np.ndim(single) == 0 and np.shape(single) == ()
    assert int(single) == int(batch[5])
    # Torch tensors and a state / episode_start (ignored) are accepted, as in SB3.
    tensors = {k: torch.as_tensor(v) for k, v in obs.items()}
    again, _ = model.predict(tensors, state=None, episode_start=np.ones(B, bool), deterministic=True)
    assert np.array_equal(again, batch)


def test_predict_single_returns_a_0d_array():
    model = small()
    obs = {k: v[0] for k, v in observations().items()}
    action, _ = model.predict(obs, deterministic=True)
    assert isinstance(action, np.ndarray) and action.shape == ()


def test_predict_deterministic_is_the_argmax_of_a_full_forward():
    model = small()
    randomise_value_head(model)
    with torch.no_grad():
        for p in model.policy.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    obs = observations()
    actions, _ = model.predict(obs, deterministic=True)
    ids, mask = torch.as_tensor(obs["input_ids"]), torch.as_tensor(obs["attention_mask"])
    with torch.no_grad():
        logits, _ = model.policy(ids, mask)
    last = torch.tensor([int(row.nonzero().max()) for row in mask])
    expected = logits[torch.arange(len(ids)), last].argmax(-1).numpy()
    assert np.array_equal(actions, expected)
    torch.manual_seed(0)
    sampled = np.stack([model.predict(obs)[0] for _ in range(5)])
    assert (sampled != expected).any()  # stochastic by default


def test_predict_refuses_wrong_shapes():
    model = small()
    obs = observations(4)
    L = model.seq_len
    bad = [
        {"input_ids": obs["input_ids"][:, :-1], "attention_mask": obs["attention_mask"][:, :-1]},
        {"input_ids": obs["input_ids"][0, :-1], "attention_mask": obs["attention_mask"][0, :-1]},
        {"input_ids": obs["input_ids"], "attention_mask": obs["attention_mask"][:2]},
        {"input_ids": obs["input_ids"][None], "attention_mask": obs["attention_mask"][None]},
        {"input_ids": obs["input_ids"][0], "attention_mask": obs["attention_mask"]},
    ]
    for case in bad:
        with pytest.raises(ValueError, match=rf"observation arrays must have shape \({L},\) or \(B, {L}\)"):
            model.predict(case)


def test_compile_decode_acts_through_the_compiled_step():
    """PPOConfig(compile_decode=True): the agent's cache compiles its decoding step, and the
    rollout's log-probs are those of the policy (the first update's ratio is 1)."""
    import warnings

    model = started(
        small(PPOConfig(n_steps=8, n_epochs=1, num_minibatches=1, compile_decode=True), num_envs=4)
    )
    assert model._cache._compiled is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        rollout = model.collect_rollout()
    assert model._cache._compiled is not None
    stats = model.update(*rollout)
    assert stats["train/clip_fraction"] == 0.0 and 0 <= stats["train/approx_kl"] < 1e-6


def test_compile_decode_is_refused_for_other_policies():
    with pytest.raises(ValueError, match="compile_decode applies to the built-in decoder-only policy"):
        small(PPOConfig(compile_decode=True, policy=PolicyConfig(architecture="seq2seq")))


def test_autocast_acts_and_updates_in_bfloat16_and_survives_a_checkpoint(tmp_path):
    """PPOConfig(autocast=True): the policy runs under bfloat16 autocast, its cache is bfloat16,
    the rollout's log-probs are those of the policy's own pass (near-zero approx-KL at the first
    update), the weights stay float32, and a checkpoint brings the setting back."""
    model = started(small(PPOConfig(n_steps=8, n_epochs=1, num_minibatches=1, autocast=True), num_envs=4))
    assert model.policy.autocast and model._cache.keys[0].dtype == torch.bfloat16
    rollout = model.collect_rollout()
    stats = model.update(*rollout)
    assert stats["train/clip_fraction"] == 0.0 and 0 <= stats["train/approx_kl"] < 1e-3
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.policy.parameters())
    model.learn(64)
    loaded = PPO.load(model.save(tmp_path / "model.pt"))
    assert loaded.config.autocast and loaded.policy.autocast
    assert loaded._cache.keys[0].dtype == torch.bfloat16


def test_autocast_is_refused_for_other_policies():
    with pytest.raises(ValueError, match="autocast applies to the built-in decoder-only policy only"):
        small(PPOConfig(autocast=True, policy=PolicyConfig(architecture="seq2seq")))
