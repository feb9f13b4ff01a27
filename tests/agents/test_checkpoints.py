"""PPO checkpoints under faults: interrupts anywhere, failed and concurrent saves, damaged files,
checkpoints of another environment, divergence, and configurations from numpy or JSON."""

from __future__ import annotations

import json
import signal
import threading
import zipfile

import numpy as np
import pytest
import torch

from agents.ppo import CHECKPOINT_SCHEMA, PPO, PPOConfig, TrainingDivergedError
from textgym.io import atomic_write, check_zip_integrity

CFG = PPOConfig(n_steps=4, anneal_lr=False)
NUM_ENVS = 4
ROLLOUT = CFG.n_steps * NUM_ENVS


class CountingReward:
    """A deterministic reward function that can raise on its ``fail_at``-th call (1-based)."""

    def __init__(
        self, fail_at: int | None = None, error: BaseException | None = None, huge_after: int | None = None
    ):
        self.calls, self.fail_at, self.error, self.huge_after = 0, fail_at, error, huge_after

    def __call__(self, prompt: str, completion: str) -> float:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error or KeyboardInterrupt
        if self.huge_after is not None and self.calls > self.huge_after:
            return 1e39  # finite in float64, infinite in the float32 rollout buffer
        return len(completion.split()) / 4


def agent(reward: CountingReward, seed: int = 1, config: PPOConfig = CFG) -> PPO:
    env_kwargs = {"reward": reward, "max_new_tokens": 3}
    return PPO("TextGen-v0", config, num_envs=NUM_ENVS, env_kwargs=env_kwargs, device="cpu", seed=seed)


def load(path, reward: CountingReward) -> PPO:
    return PPO.load(path, env_kwargs={"reward": reward, "max_new_tokens": 3}, device="cpu")


def assert_same_weights(a: PPO, b: PPO) -> None:
    for (name, pa), (_, pb) in zip(a.policy.state_dict().items(), b.policy.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def uninterrupted(updates: int) -> PPO:
    model = agent(CountingReward())
    model.learn(ROLLOUT * updates)
    return model


# ------------------------------------------------------------------------------------ interrupts
@pytest.mark.parametrize(("fail_at", "updates_done"), [(3, 0), (17, 3), (30, 5)])
def test_interrupt_inside_the_reward_model_saves_a_resumable_checkpoint(tmp_path, fail_at, updates_done):
    """Ctrl-C while the env steps (here: inside the reward model, with rows at max_new_tokens that
    were never reset) saves the state at the end of the last update; resuming it is exact."""
    path = tmp_path / "ckpt.pt"
    model = agent(CountingReward(fail_at=fail_at))
    with pytest.raises(KeyboardInterrupt):
        model.learn(ROLLOUT * 6, checkpoint_path=path)
    assert model.num_timesteps == ROLLOUT * updates_done and model.n_updates == updates_done
    saved = torch.load(path, weights_only=True)
    assert saved["num_timesteps"] == model.num_timesteps
    assert int(saved["env_state"]["env"]["gen_len"].max()) < 3  # no row left at max_new_tokens

    # The interrupted object was rolled back too (RNG states included) and can go on in memory.
    model.env.config.reward.fn.fail_at = None  # FunctionReward keeps the callable as .fn
    model.learn(ROLLOUT * 6 - model.num_timesteps, reset_num_timesteps=False)

    resumed = load(path, CountingReward())
    resumed.learn(ROLLOUT * 6 - resumed.num_timesteps, reset_num_timesteps=False)
    reference = uninterrupted(6)
    assert resumed.num_timesteps == reference.num_timesteps and resumed.n_updates == reference.n_updates
    assert_same_weights(resumed, reference)
    assert_same_weights(model, reference)
    assert [e["r"] for e in resumed.ep_info_buffer] == [e["r"] for e in reference.ep_info_buffer]


def _send_sigint_on_step(model: PPO, which: set[int]) -> None:
    """Deliver a real SIGINT from inside the optimizer steps numbered in ``which`` (1-based)."""
    original, count = model.optimizer.step, [0]

    def step(*args, **kwargs):
        count[0] += 1
        if count[0] in which:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    model.optimizer.step = step


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_interrupt_during_an_update_finishes_it_and_resumes_exactly(tmp_path):
    path = tmp_path / "ckpt.pt"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    model = agent(CountingReward())
    steps_per_update = CFG.n_epochs * CFG.num_minibatches
    _send_sigint_on_step(model, {steps_per_update + 3})  # inside the second update
    with pytest.raises(KeyboardInterrupt):
        model.learn(ROLLOUT * 5, checkpoint_path=path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert model.n_updates == 2 and torch.load(path, weights_only=True)["n_updates"] == 2
    resumed = load(path, CountingReward())
    resumed.learn(ROLLOUT * 3, reset_num_timesteps=False)
    assert_same_weights(resumed, uninterrupted(5))


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals need the main thread"
)
def test_second_interrupt_during_an_update_keeps_the_last_checkpoint(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    model = agent(CountingReward())
    steps_per_update = CFG.n_epochs * CFG.num_minibatches
    model.learn(ROLLOUT, checkpoint_path=path)
    good = path.read_bytes()
    _send_sigint_on_step(model, {2, 5})
    with pytest.raises(KeyboardInterrupt):
        model.learn(ROLLOUT * 2, reset_num_timesteps=False, checkpoint_path=path)
    assert path.read_bytes() == good
    assert "nothing was saved" in capsys.readouterr().out
    assert steps_per_update > 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_interrupt_inside_a_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = agent(CountingReward())
    model.learn(ROLLOUT)
    model.save(path)
    good = path.read_bytes()
    model.learn(ROLLOUT, reset_num_timesteps=False)

    def interrupted_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_two_writers_of_one_path_both_succeed(tmp_path):
    path = tmp_path / "ckpt.pt"
    models = [agent(CountingReward(), seed=s) for s in (1, 2)]
    barrier, errors = threading.Barrier(2), []

    def writer(model: PPO) -> None:
        try:
            for _ in range(5):
                barrier.wait()
                model.save(path)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    loaded = load(path, CountingReward())
    assert loaded.seed in (1, 2)


def test_atomic_write_uses_a_unique_temporary_file(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.txt", lambda tmp: (seen.append(tmp), tmp.write_text("1")))
    atomic_write(tmp_path / "a.txt", lambda tmp: (seen.append(tmp), tmp.write_text("2")))
    assert seen[0] != seen[1] and all(p.parent == tmp_path and p.name.endswith(".tmp") for p in seen)
    assert (tmp_path / "a.txt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ---------------------------------------------------------------------------------- damaged files
def _flip_a_byte_in_the_largest_tensor(path) -> None:
    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # Local header: 30 bytes, then the name and the extra field (their lengths at offsets 26, 28).
    start = entry.header_offset
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    data[start + 30 + name_len + extra_len + entry.file_size // 2] ^= 0x7F
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_at_load(tmp_path):
    path = tmp_path / "ckpt.pt"
    agent(CountingReward()).save(path)
    _flip_a_byte_in_the_largest_tensor(path)
    with pytest.raises(ValueError, match=r"damaged: entry .* fails its CRC-32 check"):
        load(path, CountingReward())
    with pytest.raises(ValueError, match="damaged"):
        check_zip_integrity(path)


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    agent(CountingReward()).save(path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match=r"not a textgym PPO checkpoint|damaged"):
        load(path, CountingReward())


# ------------------------------------------------------------------------------ another env
@pytest.mark.parametrize(
    ("other", "named"),
    [
        ({"task": "arithmetic"}, r"vocab_size=131.*vocab_size=16"),
        ({"max_new_tokens": 5}, r"max_new_tokens=3.*max_new_tokens=5"),
    ],
)
def test_a_checkpoint_of_another_env_names_both_settings(tmp_path, other, named):
    path = tmp_path / "ckpt.pt"
    PPO("TextGen-v0", CFG, num_envs=2, env_kwargs={"max_new_tokens": 3}, device="cpu", seed=0).save(path)
    with pytest.raises(ValueError, match=named):
        PPO.load(path, env_kwargs={"max_new_tokens": 3} | other, device="cpu")


def as_schema_5_env_state(ckpt: dict) -> dict:
    """The env part of a checkpoint as schemas 3 to 5 wrote it: the core's tensors and JSON rngs."""
    state = ckpt["env_state"]
    env = state.pop("env")
    state.update({name: env[name] for name in ("tokens", "mask", "gen_len", "prompt_index")})
    state["rngs"] = json.dumps(env["rngs"])
    return ckpt


def test_schema_4_checkpoints_still_load(tmp_path):
    """Schema 5 added hf_config and base_digest (LoRA); a schema-4 file has neither."""
    path = tmp_path / "ckpt.pt"
    model = PPO("TextGen-v0", CFG, num_envs=2, env_kwargs={"max_new_tokens": 3}, device="cpu", seed=0)
    model.learn(8)
    ckpt = torch.load(model.save(path), weights_only=True)
    assert ckpt["hf_config"] is None and ckpt["base_digest"] is None
    del ckpt["hf_config"], ckpt["base_digest"]
    del ckpt["config"]["micro_batch_size"]
    ckpt["schema_version"] = 4
    torch.save(as_schema_5_env_state(ckpt), path)
    loaded = PPO.load(path, device="cpu")
    assert loaded.num_timesteps == 8 and loaded.config == CFG
    assert_same_weights(loaded, model)


def test_schema_3_checkpoints_still_load_and_name_the_mismatch(tmp_path):
    path = tmp_path / "ckpt.pt"
    model = PPO("TextGen-v0", CFG, num_envs=2, env_kwargs={"max_new_tokens": 3}, device="cpu", seed=0)
    model.learn(8)
    ckpt = torch.load(model.save(path), weights_only=True)
    del ckpt["env_spec"], ckpt["samples"], ckpt["hf_config"], ckpt["base_digest"], ckpt["world_size"]
    ckpt["schema_version"] = 3
    torch.save(as_schema_5_env_state(ckpt), path)
    assert PPO.load(path, device="cpu").num_timesteps == 8
    with pytest.raises(
        ValueError, match=r"does not fit this environment \(vocab_size=16.*weight shapes differ"
    ):
        PPO.load(path, env_kwargs={"task": "arithmetic", "max_new_tokens": 3}, device="cpu")
    assert CHECKPOINT_SCHEMA == 7


# ------------------------------------------------------------------------------------ divergence
def test_divergence_in_the_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    reward = CountingReward(huge_after=8)  # the first rollout's episodes are fine
    model = agent(reward)
    with pytest.raises(TrainingDivergedError, match=r"loss is not finite"):
        model.learn(ROLLOUT * 6, checkpoint_path=path, checkpoint_interval=1)
    saved = load(path, CountingReward())
    assert saved.n_updates >= 1
    assert all(torch.isfinite(p).all() for p in saved.policy.parameters())
    assert all(torch.isfinite(p).all() for p in model.policy.parameters())  # never stepped with NaN


def test_nan_weights_are_caught_before_sampling():
    model = agent(CountingReward())

    def poison(m: PPO) -> None:
        with torch.no_grad():
            next(m.policy.parameters()).fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"update 2\): the policy's logits contain NaN"):
        model.learn(ROLLOUT * 3, callback=poison)


# --------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("field", ["anneal_lr", "normalize_advantage", "bootstrap_truncated", "mask_actions"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_boolean_fields_refuse_everything_but_bools(field, value):
    with pytest.raises(ValueError, match=rf"PPOConfig.{field} must be true or false \(a bool\), got"):
        PPOConfig(**{field: value})


def test_json_false_turns_masking_off():
    assert PPOConfig.from_dict(json.loads('{"mask_actions": false}')).mask_actions is False
    assert PPOConfig(mask_actions=np.bool_(True)).mask_actions is True


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers():
    cfg = PPOConfig(
        n_steps=np.int64(8),
        n_epochs=np.int32(2),
        learning_rate=np.float32(1e-3),
        gamma=np.float64(0.9),
        kl_coef=np.int64(0),
        target_kl=np.float32(0.05),
    )
    assert type(cfg.n_steps) is int and type(cfg.n_epochs) is int
    assert type(cfg.learning_rate) is float and type(cfg.gamma) is float and type(cfg.target_kl) is float
    assert type(cfg.kl_coef) is float
    assert PPOConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        PPOConfig(n_steps=np.bool_(True))


def test_a_rollout_larger_than_memory_is_refused_up_front():
    with pytest.raises(ValueError, match=r"n_steps=1000000000000 x num_envs=2 .* GiB"):
        PPO("TextGen-v0", PPOConfig(n_steps=10**12), num_envs=2, device="cpu")


def test_learn_says_when_it_rounds_up_to_whole_rollouts(capsys):
    model = PPO("TextGen-v0", CFG, num_envs=NUM_ENVS, device="cpu", seed=0, verbose=1)
    model.learn(ROLLOUT + 1)
    assert model.num_timesteps == 2 * ROLLOUT
    out = capsys.readouterr().out
    assert (
        f"training to {2 * ROLLOUT:,} env steps: {ROLLOUT + 1:,} rounded up to whole rollouts of {ROLLOUT}"
        in out
    )


def test_an_older_checkpoint_with_an_unreset_row_resumes(tmp_path, capsys):
    """Before schema 6 an interrupt inside env.step could save a row at max_new_tokens that was
    never reset, and resuming it failed with an IndexError in the core: such rows now restart."""
    path = tmp_path / "ckpt.pt"
    model = agent(CountingReward())
    model.learn(ROLLOUT)
    core = model.env._core
    ckpt = as_schema_5_env_state(torch.load(model.save(path), weights_only=True))
    P, M = core.prompt_window, core.max_new_tokens
    state = ckpt["env_state"]
    state["tokens"][0, P:], state["mask"][0, P:], state["gen_len"][0] = 5, 1, M  # full, never reset
    ckpt["schema_version"] = 5
    torch.save(ckpt, path)
    loaded = load(path, CountingReward())
    assert "1 env rows held episodes that had ended" in capsys.readouterr().out
    assert int(loaded.env._core.gen_len[0]) == 0 and int(loaded.env._core.gen_len.max()) < M
    loaded.learn(ROLLOUT, reset_num_timesteps=False)
    assert loaded.num_timesteps == 2 * ROLLOUT
