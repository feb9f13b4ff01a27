"""The custom Transformer as an SB3 features extractor (agents.extractor).

The reference for the features is the decoder itself (:class:`agents.policy.TransformerDecoder`)
with the same weights, read at each row's last real token; the reference for the size of the SB3
model is the custom agent's :class:`agents.policy.TransformerPolicy`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.policies import MultiInputActorCriticPolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import nn

from agents.extractor import (
    MaskableTransformerActorCriticPolicy,
    TransformerActorCriticPolicy,
    TransformerExtractor,
)
from agents.policy import PolicyConfig, TransformerDecoder, TransformerPolicy
from textgym.sb3 import make_sb3_vec_env
from textgym.vector import TextGenVectorEnv

EOS = 2
ALGOS = {
    "PPO": (PPO, TransformerActorCriticPolicy),
    "A2C": (A2C, TransformerActorCriticPolicy),
    "MaskablePPO": (MaskablePPO, MaskableTransformerActorCriticPolicy),
}


def env_observations(num: int = 16, steps: int = 3, seed: int = 0, **env_kwargs) -> dict[str, np.ndarray]:
    """Observations of a real batched env after 0..steps random non-<eos> tokens, stacked."""
    env = TextGenVectorEnv(num, autoreset_mode="same_step", array_type="numpy", **env_kwargs)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    batches = [obs]
    for _ in range(steps):
        obs = env.step(rng.integers(4, env.single_action_space.n, size=num))[0]
        batches.append(obs)
    env.close()
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def randomise(module: nn.Module, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Large random weights everywhere, so that reading the wrong column shows up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def last_real_columns(mask: np.ndarray) -> list[int]:
    """Each row's last column holding a real token, by hand."""
    return [max(j for j in range(len(row)) if row[j] == 1) for row in mask]


def as_tensors(obs: dict[str, np.ndarray], dtype: torch.dtype = torch.long) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(dtype) for k, v in obs.items()}


# --------------------------------------------------------------------------------- features
@pytest.mark.parametrize(
    ("task", "cfg"),
    [
        ("sentiment", {}),
        ("arithmetic", {"d_model": 32, "n_layers": 1, "n_heads": 2, "positional": "sinusoidal"}),
    ],
)
def test_features_equal_decoder_hidden_at_last_real_token(task, cfg):
    """Features == TransformerDecoder.hidden at each row's last real column, same weights, on
    observations from a real env: left-padded prompts of several lengths, 0-3 generated tokens."""
    torch.manual_seed(0)
    obs = env_observations(task=task)
    P = TextGenVectorEnv(1, task=task).prompt_window
    mask = obs["attention_mask"]
    assert len(np.unique(mask[:, :P].sum(1))) > 1, "prompts of different lengths"
    assert sorted(np.unique(mask[:, P:].sum(1))) == [0, 1, 2, 3]
    assert (mask[:, 0] == 0).any(), "some prompts are left-padded"

    space = TextGenVectorEnv(1, task=task).single_observation_space
    extractor = randomise(TransformerExtractor(space, **cfg))
    reference = TransformerDecoder(
        extractor.decoder.vocab_size, extractor.decoder.max_len, PolicyConfig(**cfg)
    )
    reference.load_state_dict(extractor.decoder.state_dict())
    reference.eval()

    with torch.no_grad():
        features = extractor(as_tensors(obs))
        t = as_tensors(obs)
        hidden = reference.hidden(t["input_ids"], t["attention_mask"])
    cols = last_real_columns(mask)
    expected = hidden[torch.arange(len(cols)), torch.tensor(cols)]
    assert features.shape == (len(cols), extractor.features_dim)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)

    # The same as running the decoder on the row's real tokens alone, without any padding.
    with torch.no_grad():
        for row in (0, 5, 17, 33, len(cols) - 1):
            real = torch.as_tensor(obs["input_ids"][row][mask[row] == 1]).unsqueeze(0)
            alone = reference.hidden(real, torch.ones_like(real))[0, -1]
            torch.testing.assert_close(features[row], alone, atol=1e-4, rtol=1e-4)

    # The test can tell columns apart: the last column is not the feature of unfinished rows.
    short = [i for i, c in enumerate(cols) if c != mask.shape[1] - 1]
    assert short
    assert (features[short] - hidden[short, -1]).abs().max() > 1e-2


def test_float_observations_give_the_same_features():
    """SB3 hands the extractor float observations: same features as long ones, and as SB3's own
    preprocessing of the numpy observations gives; garbage under the padding changes nothing."""
    torch.manual_seed(0)
    obs = env_observations(num=8)
    space = TextGenVectorEnv(1).single_observation_space
    extractor = randomise(TransformerExtractor(space))
    with torch.no_grad():
        as_long = extractor(as_tensors(obs))
        as_float = extractor(as_tensors(obs, torch.float32))
        torch.testing.assert_close(as_float, as_long, atol=0, rtol=0)

        garbage = {k: v.copy() for k, v in obs.items()}
        pad = garbage["attention_mask"] == 0
        garbage["input_ids"][pad] = np.random.default_rng(0).integers(4, 100, size=pad.sum())
        torch.testing.assert_close(
            extractor(as_tensors(garbage, torch.float32)), as_long, atol=1e-5, rtol=1e-5
        )

    model = PPO(TransformerActorCriticPolicy, make_sb3_vec_env(2), n_steps=8, batch_size=16, device="cpu")
    policy = model.policy
    randomise(policy.features_extractor)
    obs_tensor, _ = policy.obs_to_tensor(obs)
    preprocessed = preprocess_obs(obs_tensor, policy.observation_space)
    assert preprocessed["input_ids"].dtype == torch.float32  # what SB3 hands the extractor
    with torch.no_grad():
        sb3 = policy.extract_features(obs_tensor)
        direct = policy.features_extractor(as_tensors(obs))
    torch.testing.assert_close(sb3, direct, atol=0, rtol=0)


# ---------------------------------------------------------------------------- construction
@pytest.mark.parametrize("task", ["sentiment", "arithmetic", "keyword"])
def test_sizes_are_read_from_the_observation_space(task):
    """Vocabulary size and sequence length come from the space; features_dim == d_model."""
    env = TextGenVectorEnv(1, task=task)
    extractor = TransformerExtractor(env.single_observation_space)
    decoder = extractor.decoder
    assert decoder.vocab_size == env.single_action_space.n
    assert decoder.max_len == env.single_observation_space["input_ids"].shape[0]
    assert decoder.tok_emb.num_embeddings == env.single_action_space.n
    assert decoder.pos_emb.num_embeddings == decoder.max_len
    assert extractor.features_dim == PolicyConfig().d_model == 64
    assert decoder.cfg == PolicyConfig()


def test_sizes_from_a_hand_made_space():
    box = spaces.Box(0, 49, shape=(12,), dtype=np.int64)
    space = spaces.Dict({"input_ids": box, "attention_mask": spaces.Box(0, 1, shape=(12,), dtype=np.int64)})
    extractor = TransformerExtractor(space, d_model=16, n_heads=2)
    assert extractor.decoder.vocab_size == 50
    assert extractor.decoder.max_len == 12
    assert extractor.features_dim == 16
    out = extractor({"input_ids": torch.full((3, 12), 49.0), "attention_mask": torch.ones(3, 12)})
    assert out.shape == (3, 16)


def test_policy_config_fields_pass_through():
    space = TextGenVectorEnv(1).single_observation_space
    extractor = TransformerExtractor(
        space, d_model=32, n_layers=1, n_heads=2, mlp_ratio=2, positional="sinusoidal"
    )
    assert extractor.decoder.cfg == PolicyConfig(
        d_model=32, n_layers=1, n_heads=2, mlp_ratio=2, positional="sinusoidal"
    )
    assert extractor.features_dim == 32
    assert len(extractor.decoder.blocks) == 1
    assert extractor.decoder.blocks[0].n_heads == 2
    assert extractor.decoder.blocks[0].mlp[0].out_features == 64
    assert not hasattr(extractor.decoder, "pos_emb")
    # Through SB3's policy_kwargs, as shortcuts for features_extractor_kwargs.
    model = PPO(
        TransformerActorCriticPolicy,
        make_sb3_vec_env(2),
        n_steps=8,
        batch_size=16,
        device="cpu",
        policy_kwargs={"d_model": 32, "n_layers": 1},
    )
    assert model.policy.features_extractor.decoder.cfg == PolicyConfig(d_model=32, n_layers=1)
    assert model.policy.features_dim == 32
    assert model.policy.action_net.in_features == 32


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"hidden_size": 32}, TypeError, r"unknown TransformerExtractor argument\(s\) \['hidden_size'\]"),
        ({"d_model": 32, "dropout": 0.1}, TypeError, r"\['dropout'\]"),
        ({"d_model": 10, "n_heads": 4}, ValueError, "n_heads=4 must divide d_model=10"),
        ({"positional": "rope"}, ValueError, "positional must be"),
    ],
)
def test_bad_policy_arguments(kwargs, exc, match):
    space = TextGenVectorEnv(1).single_observation_space
    with pytest.raises(exc, match=match):
        TransformerExtractor(space, **kwargs)


def test_policy_fields_with_another_extractor_are_refused():
    from stable_baselines3.common.torch_layers import CombinedExtractor

    with pytest.raises(TypeError, match=r"\['d_model'\] apply to the TransformerExtractor only"):
        PPO(
            TransformerActorCriticPolicy,
            make_sb3_vec_env(2),
            n_steps=8,
            batch_size=16,
            device="cpu",
            policy_kwargs={"features_extractor_class": CombinedExtractor, "d_model": 32},
        )


@pytest.mark.parametrize(
    "space",
    [
        spaces.Box(0, 10, shape=(8,), dtype=np.int64),
        spaces.Dict({"input_ids": spaces.Box(0, 10, shape=(8,), dtype=np.int64)}),
        spaces.Dict(
            {
                "input_ids": spaces.Box(0, 10, shape=(8,), dtype=np.int64),
                "mask": spaces.Box(0, 1, shape=(8,), dtype=np.int64),
            }
        ),
        spaces.Dict(
            {
                "input_ids": spaces.Box(0, 10, shape=(8,), dtype=np.int64),
                "attention_mask": spaces.Box(0, 1, shape=(8,), dtype=np.int64),
                "extra": spaces.Discrete(3),
            }
        ),
    ],
    ids=["Box", "no-mask", "wrong-key", "extra-key"],
)
def test_wrong_observation_space_refused(space):
    with pytest.raises(ValueError, match="Dict of input_ids and attention_mask"):
        TransformerExtractor(space)


# ------------------------------------------------------------------------ initialisation
def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def assert_decoder_init(extractor: TransformerExtractor) -> None:
    """Normal(0, 0.02) Linear and Embedding weights, zero biases, unit LayerNorms; not SB3's
    orthogonal init with gain sqrt(2)."""
    assert linears(extractor)
    for lin in linears(extractor):
        w = lin.weight.detach()
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
        assert w.mean().abs().item() < 0.002
        assert torch.all(lin.bias == 0)
        if w.shape[0] == w.shape[1]:  # orthogonal with gain sqrt(2): W @ W.T == 2 I
            gram = w @ w.T
            assert (gram - 2 * torch.eye(w.shape[0])).abs().max().item() > 1.5
    for emb in (m for m in extractor.modules() if isinstance(m, nn.Embedding)):
        assert emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    norms = [m for m in extractor.modules() if isinstance(m, nn.LayerNorm)]
    assert norms
    for ln in norms:
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_ortho_init_keeps_the_decoder_init(algo):
    """With SB3's default ortho_init=True: the extractor keeps the decoder's own initialisation,
    is shared by actor and critic, and the heads keep SB3's orthogonal init (gain 0.01 and 1)."""
    cls, policy_cls = ALGOS[algo]
    torch.manual_seed(0)
    hyper = {"n_steps": 8} if algo == "A2C" else {"n_steps": 8, "batch_size": 16}
    model = cls(policy_cls, make_sb3_vec_env(2), device="cpu", seed=0, **hyper)
    policy = model.policy
    assert policy.ortho_init is True
    extractor = policy.features_extractor
    assert isinstance(extractor, TransformerExtractor)
    assert policy.pi_features_extractor is extractor
    assert policy.vf_features_extractor is extractor
    assert_decoder_init(extractor)

    # The heads: SB3's orthogonal init; linear heads on the features (net_arch=[]).
    assert linears(policy.mlp_extractor) == []
    action_w = policy.action_net.weight.detach()
    assert action_w.shape == (model.action_space.n, 64)
    torch.testing.assert_close(torch.linalg.svdvals(action_w), torch.full((64,), 0.01), atol=1e-5, rtol=1e-3)
    assert torch.all(policy.action_net.bias == 0)
    assert policy.value_net.weight.norm().item() == pytest.approx(1.0, rel=1e-4)
    # The optimiser trains the extractor's (restored) parameters.
    params = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in params for p in extractor.parameters())


def test_plain_sb3_policy_would_reinitialise_the_extractor():
    """The control: without the restoring policy, SB3 makes the extractor's square Linear weights
    orthogonal with gain sqrt(2) (W @ W.T == 2 I), which assert_decoder_init rejects."""
    torch.manual_seed(0)
    model = PPO(
        MultiInputActorCriticPolicy,
        make_sb3_vec_env(2),
        n_steps=8,
        batch_size=16,
        device="cpu",
        policy_kwargs={"features_extractor_class": TransformerExtractor, "net_arch": []},
    )
    extractor = model.policy.features_extractor
    proj = extractor.decoder.blocks[0].proj.weight.detach()
    torch.testing.assert_close(proj @ proj.T, 2 * torch.eye(64), atol=1e-4, rtol=0)
    with pytest.raises(AssertionError):
        assert_decoder_init(extractor)


@pytest.mark.parametrize("algo", ["PPO", "MaskablePPO"])
def test_unshared_extractors_both_keep_the_decoder_init(algo):
    cls, policy_cls = ALGOS[algo]
    model = cls(
        policy_cls,
        make_sb3_vec_env(2),
        n_steps=8,
        batch_size=16,
        device="cpu",
        policy_kwargs={"share_features_extractor": False, "d_model": 32},
    )
    pi, vf = model.policy.pi_features_extractor, model.policy.vf_features_extractor
    assert pi is not vf
    assert isinstance(pi, TransformerExtractor) and isinstance(vf, TransformerExtractor)
    assert_decoder_init(pi)
    assert_decoder_init(vf)


# ------------------------------------------------------------------ same model as the custom PPO
def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize(
    ("task", "cfg"),
    [
        ("sentiment", {}),
        ("arithmetic", {"d_model": 32, "n_layers": 1, "n_heads": 2, "positional": "sinusoidal"}),
    ],
)
def test_parameter_count_equals_the_custom_policy(algo, task, cfg):
    cls, policy_cls = ALGOS[algo]
    venv = make_sb3_vec_env(2, task=task)
    hyper = {"n_steps": 8} if algo == "A2C" else {"n_steps": 8, "batch_size": 16}
    model = cls(policy_cls, venv, device="cpu", policy_kwargs=dict(cfg), **hyper)  # SB3 adds to it
    policy = model.policy
    ids_space = venv.observation_space["input_ids"]
    custom = TransformerPolicy(venv.action_space.n, ids_space.shape[0], PolicyConfig(**cfg))
    sb3 = n_params(policy.features_extractor) + n_params(policy.action_net) + n_params(policy.value_net)
    assert sb3 == n_params(custom)
    assert n_params(policy) == n_params(custom)  # nothing else: the mlp_extractor is empty
    # Same architecture: the decoder's tensors have the custom policy's names and shapes.
    custom_shapes = {k: v.shape for k, v in custom.state_dict().items()}
    for name, tensor in policy.features_extractor.decoder.state_dict().items():
        assert custom_shapes[name] == tensor.shape


def test_sb3_policy_computes_what_the_custom_policy_computes():
    """SB3's distribution and values equal TransformerPolicy's at the last real token, once the
    custom policy has the SB3 model's weights (decoder, action_net -> policy_head, value_net)."""
    torch.manual_seed(0)
    venv = make_sb3_vec_env(2)
    model = PPO(TransformerActorCriticPolicy, venv, n_steps=8, batch_size=16, device="cpu")
    policy = model.policy
    randomise(policy, std=0.2)
    custom = TransformerPolicy(venv.action_space.n, venv.observation_space["input_ids"].shape[0])
    custom.load_state_dict(
        {
            **policy.features_extractor.decoder.state_dict(),
            "policy_head.weight": policy.action_net.weight,
            "policy_head.bias": policy.action_net.bias,
            "value_head.weight": policy.value_net.weight,
            "value_head.bias": policy.value_net.bias,
        }
    )
    custom.eval()
    obs = env_observations(num=8)
    obs_tensor, _ = policy.obs_to_tensor(obs)
    t = as_tensors(obs)
    with torch.no_grad():
        logits, values = custom(t["input_ids"], t["attention_mask"])
        rows = torch.arange(len(logits))
        cols = torch.tensor(last_real_columns(obs["attention_mask"]))
        dist = policy.get_distribution(obs_tensor).distribution
        torch.testing.assert_close(
            dist.logits, torch.log_softmax(logits[rows, cols], -1), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            policy.predict_values(obs_tensor)[:, 0], values[rows, cols], atol=1e-4, rtol=1e-4
        )
    greedy, _ = model.predict(obs, deterministic=True)
    np.testing.assert_array_equal(greedy, logits[rows, cols].argmax(-1).numpy())


# ----------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("algo", list(ALGOS))
def test_predict_single_and_batched(algo):
    cls, policy_cls = ALGOS[algo]
    N = 4
    venv = make_sb3_vec_env(N)
    hyper = {"n_steps": 4} if algo == "A2C" else {"n_steps": 4, "batch_size": 16}
    model = cls(policy_cls, venv, device="cpu", seed=0, policy_kwargs={"d_model": 32, "n_layers": 1}, **hyper)
    randomise(model.policy, std=0.2)
    obs = venv.reset()
    for _ in range(2):
        obs = venv.step(np.full(N, 7))[0]
    V = venv.action_space.n

    batched, _ = model.predict(obs, deterministic=True)
    assert batched.shape == (N,)
    assert np.issubdtype(batched.dtype, np.integer)
    assert ((batched >= 0) & (batched < V)).all()
    for i in range(N):
        single, _ = model.predict({k: v[i] for k, v in obs.items()}, deterministic=True)
        assert np.shape(single) == ()
        assert int(single) == int(batched[i])
    sampled, _ = model.predict(obs, deterministic=False)
    assert sampled.shape == (N,)
    assert ((sampled >= 0) & (sampled < V)).all()
    if algo == "MaskablePPO":
        masks = np.zeros((N, V), dtype=bool)
        masks[:, [EOS, 11]] = True
        for _ in range(5):
            masked, _ = model.predict(obs, action_masks=masks)
            assert set(masked.tolist()) <= {EOS, 11}
        single, _ = model.predict(
            {k: v[0] for k, v in obs.items()}, action_masks=masks[0], deterministic=True
        )
        assert int(single) in (EOS, 11)
