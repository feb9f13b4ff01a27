"""What every agent of this package shares: :class:`OnPolicyAgent` (the env and the policy, the
KL reference, the training loop with its interrupt handling, checkpoints, logging, ``predict``
and ``generate``), which :class:`agents.ppo.PPO` and the group agents of :mod:`agents.grpo` (GRPO,
RLOO) build on; :func:`check_fields` and :class:`ConfigIO`, the validation and JSON round trip
of every config; :class:`TrainingDivergedError`; and the column spans of whole-sequence passes
(:func:`filled_span`, :func:`filled_columns`, :func:`forward_span`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from agents import distributed as dist
from agents.kl import KLController
from agents.policy import (
    PolicyConfig,
    TransformerPolicy,
    build_policy,
    last_real_column,
    sample_tokens,
)
from agents.seq2seq import Seq2SeqPolicy
from textgym.checks import is_positive_int, is_real
from textgym.core import check_bfloat16, resolve_device
from textgym.io import load_torch_file, save_torch
from textgym.vector import TextGenVectorEnv

if TYPE_CHECKING:
    from agents.hf import AdaptersDisabled, HFConfig, HFPolicy

# 3: policy_model (a Hugging Face policy's directory); 4: env_spec; 5: hf_config, and under LoRA
# "model" holds the trained weights only, with the frozen base model's base_digest
# 6: the env's episodes as TextGenVectorEnv.get_state() gives them
CHECKPOINT_SCHEMA = 7  # 7: world_size, and from a torchrun run every rank's training state ("ranks")
READABLE_SCHEMAS = (3, 4, 5, 6, 7)  # 3 lacks env_spec; 3 and 4 lack hf_config (None: a float32 model)
ENV_IDS = ("TextGen-v0", "textgym:TextGen-v0")


class TrainingDivergedError(RuntimeError):
    """The policy's logits, the loss or the gradient became NaN or infinite during training."""


def check_fields(
    config: Any,
    bools: Sequence[str] = (),
    positive_ints: Sequence[str] = (),
    optional_positive_ints: Sequence[str] = (),
    positive: Sequence[str] = (),
    unit_interval: Sequence[str] = (),
    non_negative: Sequence[str] = (),
    optional_positive: Sequence[str] = (),
) -> None:
    """Validate and normalise the fields of a frozen agent config (:class:`agents.ppo.PPOConfig`, the group
    agents' configs) in ``__post_init__``: each error names ``<Config>.<field>``, the value and
    what is accepted. NumPy numbers become plain ones (JSON, torch), and a ``policy`` field given
    as a mapping (from a checkpoint or ``config.json``) becomes a :class:`PolicyConfig`."""
    kind = type(config).__name__

    def put(name: str, value: Any) -> None:
        object.__setattr__(config, name, value)

    for name in bools:
        value = getattr(config, name)
        # Only real booleans: bool("false") is True, so a string would silently mean the opposite.
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{kind}.{name} must be true or false (a bool), got {value!r}")
        put(name, bool(value))
    for name in positive_ints:
        value = getattr(config, name)
        if not is_positive_int(value):
            raise ValueError(f"{kind}.{name} must be a positive integer, got {value!r}")
        put(name, int(value))
    for name in optional_positive_ints:
        value = getattr(config, name)
        if value is not None:
            if not is_positive_int(value):
                raise ValueError(f"{kind}.{name} must be None or a positive integer, got {value!r}")
            put(name, int(value))
    for name in positive:
        value = getattr(config, name)
        if not is_real(value) or not 0 < value < math.inf:
            raise ValueError(f"{kind}.{name} must be a positive number, got {value!r}")
    for name in unit_interval:
        value = getattr(config, name)
        if not is_real(value) or not 0 <= value <= 1:
            raise ValueError(f"{kind}.{name} must be in [0, 1], got {value!r}")
    for name in non_negative:
        value = getattr(config, name)
        if not is_real(value) or not 0 <= value < math.inf:
            raise ValueError(f"{kind}.{name} must be a finite number >= 0, got {value!r}")
    for name in optional_positive:
        value = getattr(config, name)
        if value is not None and (not is_real(value) or not 0 < value < math.inf):
            raise ValueError(f"{kind}.{name} must be None or a positive number, got {value!r}")
    for f in dataclasses.fields(config):  # numpy floats become plain floats (JSON, torch)
        value = getattr(config, f.name)
        if f.name not in bools and is_real(value) and not isinstance(value, int):
            put(f.name, float(value))
    if isinstance(config.policy, Mapping):  # from a checkpoint or config.json
        try:
            put("policy", PolicyConfig(**config.policy))
        except TypeError as exc:
            raise ValueError(f"{kind}.policy: {exc}") from None
    if not isinstance(config.policy, PolicyConfig):
        raise ValueError(
            f"{kind}.policy must be a PolicyConfig or a mapping of its fields, got {config.policy!r}"
        )


class ConfigIO:
    """``to_dict`` / ``from_dict`` of a frozen agent config: JSON-ready data, for ``config.json``
    and checkpoints, and back, refusing unknown fields by name."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**data)


def filled_span(mask: torch.Tensor) -> tuple[int, int]:
    """The first and last columns of ``mask`` (b, L) that hold a real token in any row (one host
    sync). The columns outside are padding in every row: positions count real tokens, attention
    is causal and skips padding, so a forward pass over ``[first, last]`` alone gives the same
    outputs there, for less work (prompts shorter than the window, sequences that end early)."""
    filled = mask.any(0).nonzero().squeeze(1)  # (k,)
    first, last = torch.stack([filled[0], filled[-1]]).tolist()
    return first, last


def filled_columns(mask: torch.Tensor) -> torch.Tensor:
    """(2, b): the first and the last column of each row of ``mask`` (b, L) that holds a real
    token, with no host sync. :func:`filled_span` of some rows is the least of their firsts and
    the greatest of their lasts, which the host can take once it has read these."""
    columns = torch.arange(mask.shape[1], device=mask.device)
    real = mask.bool()
    return torch.stack(
        [torch.where(real, columns, mask.shape[1]).amin(1), torch.where(real, columns, -1).amax(1)]
    )


def forward_span(model: Any, mask: torch.Tensor, filled: tuple[int, int] | None = None) -> tuple[int, int]:
    """The columns of a whole-sequence pass of ``model`` over ``mask`` (b, L): :func:`filled_span`,
    or ``filled`` where the caller has it from :func:`filled_columns` already (no host sync), but
    from column 0 for the encoder-decoder policy, which finds the prompt window by its place (its
    encoder reads columns ``[0, P)``) and ignores padding itself."""
    first, last = filled_span(mask) if filled is None else filled
    return (0 if isinstance(model, Seq2SeqPolicy) else first), last


def adam_implementation(device: torch.device) -> dict[str, bool]:
    """Adam's keyword for its fastest implementation on ``device``: ``fused=True`` (one kernel for
    every tensor; on the CPU since torch 2.4) where torch has it, else torch's default (on the
    CPU, a Python loop over the tensors, several times slower for the default policy's 32). The
    update is Adam's either way, to float rounding."""
    version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if device.type == "cuda" or (device.type == "cpu" and version >= (2, 4)):
        return {"fused": True}
    return {}


class OnPolicyAgent:
    """What every agent of this package shares (:class:`agents.ppo.PPO`, :class:`agents.grpo.GRPO`,
    :class:`agents.grpo.RLOO`); API modelled on Stable-Baselines3.

    The env (batched, same-step autoreset, tensors on the agent's device), the policy (the built-in
    Transformer, a language-model checkpoint or a Hugging Face model) acting through its KV cache,
    the frozen KL reference, Adam, the training loop of :meth:`learn` with its interrupt handling,
    checkpoints (:meth:`save`, :meth:`load`), TensorBoard logging, :meth:`predict` and
    :meth:`generate`. A subclass names its ``algorithm`` and ``config_class`` and gives a rollout
    (:meth:`_collect`) and an update on it (:meth:`_train`); see the hooks below.

    :param env: ``"TextGen-v0"``, or a :class:`~textgym.vector.TextGenVectorEnv` made with
        ``autoreset_mode="same_step", array_type="torch"`` on the agent's device.
    :param config: hyperparameters (an instance of the subclass's ``config_class``).
    :param num_envs: episodes in flight (when ``env`` is an id); under ``torchrun``, of all processes
        together: each runs ``num_envs / world_size`` of them (:mod:`agents.distributed`). None:
        the agent's ``default_num_envs``.
    :param env_kwargs: keyword arguments of the environment (task, reward, ...).
    :param device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
    :param seed: seeds torch, the policy's initial weights and the environment (under ``torchrun``,
        each rank's env shard and torch stream from the seed and the rank).
    :param tensorboard_log: directory of TensorBoard runs; None disables logging.
    :param verbose: 0 silent, 1 prints the config at the start of ``learn``.
    :param init_policy: a language-model checkpoint (``scripts/pretrain.py``, :func:`agents.lm.save_lm`)
        to start from; its architecture replaces ``config.policy`` and its vocabulary must be the
        env's. With a KL penalty (``config.kl_coef``), a frozen copy of the initial policy is the
        reference.
    :param policy_model: a local directory holding a Hugging Face causal LM (the ``hf`` extra):
        the policy is that model with a value head (:class:`agents.hf.HFPolicy`) instead of the
        built-in Transformer, and ``config.policy`` is unused. The env's tokenizer must be the
        model's; left out of ``env_kwargs``, it is read from the same directory.
    :param hf_config: how the Hugging Face policy is loaded and trained (:class:`agents.hf.HFConfig`
        or a mapping of its fields): bfloat16, autocast, LoRA adapters, activation checkpointing.
        Only with ``policy_model``; stored in checkpoints. Under LoRA the KL reference is the
        policy's own model with its adapters switched off, not a copy.
    """

    algorithm: ClassVar[str]
    """The agent's name in checkpoints, ``config.json`` and TensorBoard run names: "ppo", ..."""
    config_class: ClassVar[type]
    """The frozen dataclass of its hyperparameters."""
    reference_decodes: ClassVar[bool] = True
    """The reference acts beside the policy through a KV cache of its own (PPO: its per-token KL
    enters the rewards as they are collected); False: the subclass scores the reference otherwise."""
    default_num_envs: ClassVar[int] = 64
    """``num_envs`` when none is given (GRPO and RLOO: 8 groups of 8 completions)."""
    kl_control_tag: ClassVar[str] = "train/kl_ref"
    """The statistic of :meth:`_kl_stats` that the adaptive KL coefficient steers towards its target."""

    def __init__(
        self,
        env: str | TextGenVectorEnv = "TextGen-v0",
        config: Any = None,
        num_envs: int | None = None,
        env_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        seed: int | None = None,
        tensorboard_log: str | os.PathLike[str] | None = None,
        verbose: int = 0,
        init_policy: str | os.PathLike[str] | None = None,
        policy_model: str | os.PathLike[str] | None = None,
        hf_config: HFConfig | Mapping[str, Any] | None = None,
    ):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.device = resolve_device(device)
        self.seed, self.verbose = seed, verbose
        self.tensorboard_log = None if tensorboard_log is None else Path(tensorboard_log)
        self.env_kwargs = dict(env_kwargs or {})
        if policy_model is not None and init_policy is not None:
            raise ValueError(
                "give init_policy (a textgym language model) or policy_model (a Hugging Face model), not both"
            )
        if hf_config is not None and policy_model is None:
            raise ValueError(
                "hf_config sets up a Hugging Face policy (dtype, LoRA, checkpointing): give policy_model too"
            )
        self.hf_config: HFConfig | None = None
        if policy_model is not None:
            from agents.hf import HFConfig

            if hf_config is None or isinstance(hf_config, HFConfig):
                self.hf_config = hf_config or HFConfig()
            elif isinstance(hf_config, Mapping):
                self.hf_config = HFConfig.from_dict(hf_config)
            else:
                raise TypeError(
                    f"hf_config must be an HFConfig or a mapping of its fields, got {hf_config!r}"
                )
            self.hf_config.check_device(self.device)
        if policy_model is not None and not Path(policy_model).is_dir():
            raise FileNotFoundError(
                f"policy_model: no directory at {str(policy_model)!r}; give a local directory written by "
                "save_pretrained (nothing is downloaded)"
            )
        if policy_model is not None and isinstance(env, str):
            self.env_kwargs.setdefault("tokenizer", str(policy_model))
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(env, str):
            if env not in ENV_IDS:
                raise ValueError(f"env must be one of {ENV_IDS} or a TextGenVectorEnv, got {env!r}")
            env = TextGenVectorEnv(
                dist.local_envs(
                    self.default_num_envs if num_envs is None else num_envs,
                    self._env_options().get("group_size", 1),
                ),
                device=self.device,
                autoreset_mode="same_step",
                array_type="torch",
                **self._env_options(),
                **self.env_kwargs,
            )
        elif not isinstance(env, TextGenVectorEnv):
            raise TypeError(f"env must be 'TextGen-v0' or a TextGenVectorEnv, got {type(env).__name__}")
        if env.autoreset_mode.value != "SameStep" or env.array_type != "torch" or env.device != self.device:
            raise ValueError(
                f"{type(self).__name__} needs TextGenVectorEnv(autoreset_mode='same_step', array_type='torch') "
                f"on the agent's device {self.device}, got {env.autoreset_mode.value}, {env.array_type}, "
                f"{env.device}"
            )
        self._check_env(env)
        self.env = env
        self.num_envs = env.num_envs  # this process's envs
        self.total_envs = env.num_envs * dist.world_size()  # all processes' envs
        self.prompt_window = env.prompt_window
        self.seq_len = env.config.seq_len
        self.tokenizer = env.tokenizer
        self.init_policy = None if init_policy is None else str(init_policy)
        self.policy_model = None if policy_model is None else str(policy_model)
        self.policy: TransformerPolicy | Seq2SeqPolicy | HFPolicy
        if self.config.policy.architecture != "decoder" and (policy_model or init_policy) is not None:
            raise ValueError(
                f"config.policy.architecture={self.config.policy.architecture!r} builds a new built-in policy; "
                "init_policy and policy_model give decoder-only language models: leave architecture 'decoder'"
            )
        if policy_model is not None:
            from agents.hf import HFPolicy

            self.policy = HFPolicy.from_pretrained(
                policy_model, self.tokenizer, self.seq_len, options=self.hf_config
            )
            self.policy.to(self.device).train()
        elif init_policy is not None:
            from agents.lm import load_lm

            self.policy = load_lm(init_policy, self.tokenizer, self.seq_len, self.device).train()
            self.config = dataclasses.replace(self.config, policy=self.policy.cfg)
        else:
            self.policy = build_policy(
                env.single_action_space.n, self.seq_len, self.prompt_window, self.config.policy
            ).to(self.device)
        if self._compiles_decode():
            self._require_built_in_policy("compile_decode", "leave it False")
        if self.config.autocast:
            self._require_built_in_policy(
                f"{type(self.config).__name__}.autocast",
                "use HFConfig(autocast=True)" if policy_model is not None else "leave it False",
            )
            check_bfloat16(self.device, f"{type(self.config).__name__}.autocast")
            self.policy.autocast = True  # before the caches are made: theirs are bfloat16 then
        # Under torchrun every rank starts from rank 0's weights, then samples with its own stream.
        dist.broadcast_parameters(p for p in self.policy.parameters() if p.requires_grad)
        dist.seed_rank(seed)
        cfg = self.config
        self.kl = KLController(*self._kl_settings())
        self.reference: TransformerPolicy | Seq2SeqPolicy | HFPolicy | AdaptersDisabled | None = None
        if self.kl.value > 0:
            if self._lora:
                self.reference = self.policy.adapters_disabled()  # the base weights, shared
            else:
                self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
            if self.reference_decodes:
                self._ref_cache = self.reference.make_cache(self.num_envs, self.device)
        self._action_mask = (
            torch.tensor(np.array(env.config.action_mask), device=self.device) if cfg.mask_actions else None
        )
        # Under LoRA the adapters and the value head only; every weight otherwise.
        self._trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            self._trainable,
            lr=self.config.learning_rate,
            eps=self.config.adam_eps,
            **adam_implementation(self.device),
        )
        self._base_digest: str | None = None  # of the frozen base model under LoRA, computed once
        self.num_timesteps = 0
        self.n_updates = 0
        self.ep_info_buffer: deque[dict[str, float]] = deque(maxlen=100)  # as SB3: the last 100
        self._target_timesteps = 0
        self._obs: dict[str, torch.Tensor] | None = None
        self._episode_return = torch.zeros(self.num_envs, dtype=torch.float64, device=self.device)
        self._episode_length = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._episode_kl = torch.zeros(self.num_envs, 2, dtype=torch.float64, device=self.device)
        self._rollout_kl: list[tuple[float, float]] = []  # (exact, sampled) KL of episodes ended
        self._samples: deque[tuple[str, str, float]] = deque(maxlen=8)
        # Episodes ended in this rollout, kept on the device until _log_episodes: (rows, values, texts)
        self._ended_episodes: list[tuple[np.ndarray, torch.Tensor, Any]] = []
        self._logits_nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        if self._compiles_decode():  # the built-in policy's cache (checked above)
            self._cache = self.policy.make_cache(self.num_envs, self.device, compile=True)
        else:
            self._cache = self.policy.make_cache(self.num_envs, self.device)
        self._writer: Any = None
        self._tb_dir: Path | None = None

    def _require_built_in_policy(self, option: str, instead: str) -> None:
        """Refuse ``option``, which only the built-in decoder-only policy has, for any other policy."""
        if not isinstance(self.policy, TransformerPolicy):
            raise ValueError(
                f"{option} applies to the built-in decoder-only policy only, not to "
                f"{type(self.policy).__name__}; {instead}"
            )

    @property
    def _lora(self) -> bool:
        """Whether the policy is a Hugging Face model trained through LoRA adapters."""
        return self.policy_model is not None and self.policy.lora

    # ------------------------------------------------------------------------- subclass hooks
    def _env_options(self) -> dict[str, Any]:
        """Arguments of the env this agent makes for itself, beside ``env_kwargs``."""
        return {}

    def _check_env(self, env: TextGenVectorEnv) -> None:
        """Refuse an env (made or given) that this algorithm cannot train on."""

    def _kl_settings(self) -> tuple[float, float | None, int | None]:
        """β's start, target and horizon (:class:`agents.kl.KLController`); a start > 0 makes the
        frozen reference policy."""
        raise NotImplementedError

    def _compiles_decode(self) -> bool:
        """Whether the policy's KV cache compiles its decoding step (PPO's ``compile_decode``)."""
        return False

    def _rollout_size(self) -> int | None:
        """Env steps of every rollout (``learn`` stops at the first multiple past its target), or
        None where it varies."""
        return None

    def _collect(self) -> Any:
        """One rollout, the policy acting through its KV cache; counts ``num_timesteps`` step by
        step and adds finished episodes to ``ep_info_buffer``."""
        raise NotImplementedError

    def _train(self, batch: Any) -> dict[str, float]:
        """The update on the rollout :meth:`_collect` returned; its metrics under TensorBoard tags."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ learn
    def learn(
        self,
        total_timesteps: int,
        progress_bar: bool = False,
        reset_num_timesteps: bool = True,
        tb_log_name: str | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        checkpoint_interval: int = 0,
        callback: Callable[[Any], bool | None] | None = None,
    ) -> Any:
        """Train for ``total_timesteps`` env steps (counted from 0, or added to the current count
        with ``reset_num_timesteps=False``, which also continues the TensorBoard run). Training
        runs in whole rollouts (PPO: ``n_steps * num_envs`` env steps), so it stops at the end of
        the first rollout at or past the target. Returns the agent.

        :param tb_log_name: TensorBoard run name prefix (default: the ``algorithm``, e.g. "ppo").

        :param progress_bar: show a tqdm bar of env steps.
        :param checkpoint_path: where :meth:`save` writes; on Ctrl-C a checkpoint is written there
            and the logs are flushed before ``KeyboardInterrupt`` propagates (see below).
        :param checkpoint_interval: also save every this many updates (0: only at the end of
            ``learn`` and on Ctrl-C).
        :param callback: called with the model after every update (``num_timesteps`` and
            ``last_stats`` are current); returning ``False`` stops training.

        **Interrupts.** What Ctrl-C saves is always the state at the end of an update, so that
        resuming from it (:meth:`load`, then ``learn(..., reset_num_timesteps=False)``) gives
        exactly the weights of an uninterrupted run:

        - during a rollout (the policy acting, the env stepping, the reward model scoring), the
          agent is rolled back to the start of that rollout (env, counters, RNG states; the
          weights have not changed since) and that state is saved;
        - during an update, in the main thread, the update is finished first and then saved
          (a second Ctrl-C stops at once and saves nothing, keeping the last checkpoint);
        - a save that fails leaves the previous checkpoint in place;
        - under ``torchrun`` (:mod:`agents.distributed`) a Ctrl-C is held until the end of the
          update on every rank (the ranks cannot roll back apart), then all ranks agree to stop
          after that same update and rank 0 saves it; a second Ctrl-C stops at once, saving nothing.

        :raises TrainingDivergedError: when the policy's logits, the loss or the gradient norm
            becomes NaN or infinite; the weights are left as they were before the failing
            optimizer step and nothing is saved, so the last checkpoint stays the last good one.
        """
        if not is_positive_int(total_timesteps):
            raise ValueError(f"total_timesteps must be a positive integer, got {total_timesteps!r}")
        cfg = self.config
        if reset_num_timesteps or self._obs is None:
            if reset_num_timesteps:
                self.num_timesteps, self.n_updates = 0, 0
                self.ep_info_buffer.clear()
            obs, _ = self.env.reset(seed=dist.env_seed(self.seed, self.env.num_groups))
            self._obs = obs
            self._episode_return.zero_()
            self._episode_length.zero_()
            self._episode_kl.zero_()
        self._target_timesteps = (0 if reset_num_timesteps else self.num_timesteps) + int(total_timesteps)
        rollout_size = self._rollout_size()
        planned = self._target_timesteps
        if rollout_size is not None:
            planned = self.num_timesteps + rollout_size * math.ceil(
                max(self._target_timesteps - self.num_timesteps, 0) / rollout_size
            )
        self._open_writer(tb_log_name or self.algorithm, new_run=reset_num_timesteps)
        if self.verbose and dist.is_main():
            print(f"{type(cfg).__name__}: {json.dumps(cfg.to_dict())}")
            if self.hf_config is not None:
                print(f"HFConfig: {json.dumps(self.hf_config.to_dict())}")
            if rollout_size is not None and planned != self._target_timesteps:
                print(
                    f"training to {planned:,} env steps: {self._target_timesteps:,} rounded up to whole "
                    f"rollouts of {rollout_size:,} (n_steps {rollout_size // self.total_envs} x num_envs "
                    f"{self.total_envs})"
                )
        start_steps, start_time = self.num_timesteps, time.perf_counter()
        bar = None
        if progress_bar and dist.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(total=planned, initial=self.num_timesteps, unit="step", dynamic_ncols=True)
        phase, consistent = "between", None
        # Under torchrun a Ctrl-C is held over whole iterations (a rank cannot roll back alone);
        # the ranks agree after each update whether any was interrupted, then stop together.
        distributed, agreed = dist.world_size() > 1, False
        held_signals = contextlib.ExitStack()
        held: list[bool] = held_signals.enter_context(_interrupt_after_block()) if distributed else []
        try:
            while self.num_timesteps < self._target_timesteps:
                # The weights and the optimizer change only inside the update below, so this
                # snapshot plus the current weights is a consistent checkpoint until then.
                consistent, phase = self._training_state(copy_tensors=True), "rollout"
                if cfg.anneal_lr:
                    frac = 1.0 - self.num_timesteps / self._target_timesteps
                    for group in self.optimizer.param_groups:
                        group["lr"] = frac * cfg.learning_rate
                rollout_start, started = self.num_timesteps, time.perf_counter()
                batch = self._collect()
                self.num_timesteps = rollout_start + dist.sum_int(self.num_timesteps - rollout_start)
                collected = time.perf_counter()
                with _interrupt_after_block() as interrupted:
                    phase = "update"
                    stats = self._train(batch)
                    if self.reference is not None:
                        stats.update(self._kl_stats())
                        self.kl.update(stats[self.kl_control_tag], self.num_timesteps - rollout_start)
                    self.n_updates += 1
                    phase, consistent = "between", None
                updated = time.perf_counter()
                agreed = dist.any_rank(bool(interrupted) or bool(held))
                stats["time/rollout_seconds"] = collected - started
                stats["time/update_seconds"] = updated - collected
                stats["time/time_elapsed"] = updated - start_time
                fps = (self.num_timesteps - start_steps) / (updated - start_time)
                self._log(stats, fps)
                if bar is not None:
                    bar.update(self.num_timesteps - bar.n)
                    if "rollout/ep_rew_mean" in self.last_stats:
                        bar.set_postfix(ep_rew_mean=f"{self.last_stats['rollout/ep_rew_mean']:.3f}")
                if agreed:
                    raise KeyboardInterrupt
                if (
                    checkpoint_path is not None
                    and checkpoint_interval
                    and self.n_updates % checkpoint_interval == 0
                ):
                    self.save(checkpoint_path)
                if callback is not None and callback(self) is False:
                    break
        except KeyboardInterrupt:
            if distributed and not agreed:
                print(f"\nrank {dist.rank()}: interrupted again, stopped at once; nothing was saved")
                raise
            if phase == "rollout" and consistent is not None:
                self._set_training_state(consistent)  # back to the end of the last update
            if phase == "update":
                print(
                    f"\ninterrupted inside update {self.n_updates + 1}: the weights are half-updated, so "
                    "nothing was saved"
                    + (f"; {Path(checkpoint_path)} is the last checkpoint" if checkpoint_path else "")
                )
            elif checkpoint_path is not None:
                self.save(checkpoint_path)
            raise
        finally:
            held_signals.close()
            if bar is not None:
                bar.close()
            if self._writer is not None:
                self._writer.flush()
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        return self

    def _diverged(self, what: str) -> None:
        raise TrainingDivergedError(
            f"training diverged at env step {self.num_timesteps:,} (update {self.n_updates + 1}): {what}. "
            "The weights were not stepped with it and nothing was saved, so the last checkpoint is the "
            "last good one; lower learning_rate or check the reward model's scale."
        )

    def _divergence_flag(self, enabled: bool = True) -> torch.Tensor | None:
        """A flag on the device (a 0-d tensor) that :meth:`_step` raises at the first minibatch
        whose loss or gradient norm is not finite, and with which the fused Adam skips that step
        and every later one of the update, as with ``torch.amp.GradScaler``'s ``found_inf`` (the
        weights, the moments and the step counts stay as they were): the weights remain those of
        the last good step with no host sync per minibatch, and the update raises
        :class:`TrainingDivergedError` when it reads its statistics at the end. None where Adam is
        not fused or not ``enabled``: the update then checks each minibatch before its step."""
        if not (enabled and self.optimizer.defaults.get("fused")):
            return None
        return torch.zeros((), device=self.device)  # float32 as GradScaler's found_inf; 1.0 skips

    def _step(self, finite: torch.Tensor, skipped: torch.Tensor | None) -> None:
        """The optimizer step, skipped from the first minibatch that was not ``finite`` on
        (:meth:`_divergence_flag`)."""
        if skipped is None:
            self.optimizer.step()
            return
        torch.maximum(skipped, (~finite).float(), out=skipped)
        self.optimizer.found_inf = skipped  # type: ignore[attr-defined]  # read by the fused kernel
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]

    def _in_place_gradients(self) -> contextlib.AbstractContextManager[Any]:
        """For the update's forward pass, whose loss reads the LM head: the policy's
        ``in_place_gradients`` where it has one (:class:`agents.hf.HFPolicy`)."""
        in_place = getattr(self.policy, "in_place_gradients", None)
        return contextlib.nullcontext() if in_place is None else in_place()

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (..., V) with the tokens outside the env's action mask made impossible."""
        if self._action_mask is None:
            return logits
        return logits.masked_fill(~self._action_mask, torch.finfo(logits.dtype).min)

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row from the masked ``logits`` (N, V): the actions (N,), the
        log-probabilities of every token (N, V) and of the actions (N,). ``log_softmax``, as for the
        reference and in the update: identical numbers when π == π_ref.

        Logits that are not finite set :attr:`_logits_nonfinite` on the device, read by
        :meth:`_check_logits` at the end of the rollout (no read per step); the rows' actions are
        then meaningless but valid token ids."""
        masked = self._masked(logits)
        self._logits_nonfinite |= ~torch.isfinite(masked).all()
        log_probs = F.log_softmax(masked, dim=-1)  # (N, V)
        action = sample_tokens(log_probs.exp())  # (N,); see sample_tokens for why not Categorical
        # NaN probabilities draw the id V: kept in range, so the rollout runs on to _check_logits.
        action.clamp_(max=log_probs.shape[-1] - 1)
        return action, log_probs, log_probs.gather(1, action.unsqueeze(1)).squeeze(1)

    def _check_logits(self) -> None:
        """Raise :class:`TrainingDivergedError` if any logits sampled since the last check were not
        finite (one read of the device)."""
        nonfinite = bool(self._logits_nonfinite)
        self._logits_nonfinite.zero_()
        if nonfinite:
            self._diverged("the policy's logits contain NaN or infinity")

    def _reference_log_probs(self, ref_logits: torch.Tensor) -> torch.Tensor:
        """The reference's log-probabilities (N, V), under the same action mask as the policy's."""
        return F.log_softmax(self._masked(ref_logits), dim=-1)

    def _kl_stats(self) -> dict[str, float]:
        """KL to the reference over the episodes that ended in the last rollout (nats per episode;
        on every rank together, so the adaptive coefficient moves alike on all)."""
        means = dist.global_mean(self._rollout_kl, width=2)
        if means is None:
            return {
                "train/kl_ref": float("nan"),
                "train/kl_ref_sampled": float("nan"),
                "train/kl_coef": self.kl.value,
            }
        exact, sampled = means
        return {
            "train/kl_ref": float(exact),
            "train/kl_ref_sampled": float(sampled),
            "train/kl_coef": self.kl.value,
        }

    def _track_episodes(
        self,
        reward: torch.Tensor,
        done: torch.Tensor,
        ended: np.ndarray,
        infos: dict[str, Any],
        live: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> None:
        """Add a step's rewards to the episodes in flight and keep those that ended for
        :meth:`_log_episodes`: ``done`` (N,) bool on the device and ``ended`` (k,), its rows as the
        host knows them (the env's :attr:`~textgym.vector.TextGenVectorEnv.host_view`). ``live``
        (N,) bool: only those rows' steps count (the group agents' transitions); None: every
        row's. ``kl`` (N, 2): each row's episode KL so far (exact, sampled), kept with the return
        and reset with it. Reads nothing from the device: the returns of the episodes that ended
        are kept on it until :meth:`_log_episodes`."""
        if live is None:
            self._episode_return += reward
            self._episode_length += 1
        else:
            self._episode_return += torch.where(live, reward, 0.0)
            self._episode_length += live.long()
        if not ended.size:
            return
        parts = [self._episode_return.unsqueeze(1), self._episode_length.double().unsqueeze(1)]
        if kl is not None:
            parts.append(kl)
        final = infos["final_info"]
        texts = (final["prompt"][ended], final["completion"][ended]) if "completion" in final else None
        self._ended_episodes.append((ended, torch.cat(parts, 1), texts))  # (N, 2 or 4): a copy
        self._episode_return.masked_fill_(done, 0.0)
        self._episode_length.masked_fill_(done, 0)
        if kl is not None:
            kl.masked_fill_(done.unsqueeze(1), 0.0)

    def _log_episodes(self) -> None:
        """Move the episodes :meth:`_track_episodes` kept into ``ep_info_buffer``, the samples and
        the rollout's KL, in the order they ended: one read of the device."""
        if not self._ended_episodes:
            return
        values = torch.stack([kept for _, kept, _ in self._ended_episodes]).cpu().numpy()  # (steps, N, c)
        for (rows, _, texts), step in zip(self._ended_episodes, values, strict=True):
            for j, i in enumerate(rows.tolist()):
                r, n = float(step[i, 0]), int(step[i, 1])
                self.ep_info_buffer.append({"r": r, "l": n})
                if texts is not None:  # absent with text_infos=False
                    self._samples.append((texts[0][j], texts[1][j], r))
                if step.shape[1] > 2:
                    self._rollout_kl.append((float(step[i, 2]), float(step[i, 3])))
        self._ended_episodes = []

    # ---------------------------------------------------------------------------------- logging
    def _open_writer(self, tb_log_name: str, new_run: bool) -> None:
        if self.tensorboard_log is None or not dist.is_main():  # rank 0 alone writes
            return
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None or new_run:
            if self._writer is not None:
                self._writer.close()
            if self._tb_dir is None or new_run:
                # As SB3: <tensorboard_log>/<name>_<k>, k one more than the largest present.
                taken = [
                    int(p.name.rsplit("_", 1)[1])
                    for p in self.tensorboard_log.glob(f"{tb_log_name}_*")
                    if p.name.rsplit("_", 1)[1].isdigit()
                ]
                self._tb_dir = self.tensorboard_log / f"{tb_log_name}_{max(taken, default=0) + 1}"
            self._writer = SummaryWriter(str(self._tb_dir))
            self._writer.add_text(
                "config", f"```\n{json.dumps(self.config.to_dict(), indent=2)}\n```", self.num_timesteps
            )
            if self.hf_config is not None:
                self._writer.add_text(
                    "hf_config",
                    f"```\n{json.dumps(self.hf_config.to_dict(), indent=2)}\n```",
                    self.num_timesteps,
                )

    def _log(self, stats: dict[str, float], fps: float) -> None:
        self.last_stats = {**stats, "time/fps": fps}
        # over the last 100 episodes of each rank, all ranks together
        means = dist.global_mean([[e["r"], e["l"]] for e in self.ep_info_buffer], width=2)
        if means is not None:
            self.last_stats["rollout/ep_rew_mean"] = float(means[0])
            self.last_stats["rollout/ep_len_mean"] = float(means[1])
        if self._writer is None:
            return
        for tag, value in self.last_stats.items():
            self._writer.add_scalar(tag, value, self.num_timesteps)
        if (self.n_updates - 1) % self.config.sample_interval == 0 and self._samples:
            rows = "\n".join(f"| {p} | {c} | {r:.3f} |" for p, c, r in self._samples)
            self._writer.add_text(
                "samples", f"| prompt | completion | return |\n|---|---|---|\n{rows}", self.num_timesteps
            )

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(
        self,
        observation: Mapping[str, Any],
        state: Any = None,
        episode_start: Any = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, None]:
        """Actions for one observation (dict of (L,) arrays) or a batch (dict of (B, L) arrays).

        Same signature as Stable-Baselines3; ``state`` and ``episode_start`` are accepted and
        unused (the policy reads the whole text from the observation). Returns ``(actions, None)``.
        """
        ids, mask = (_as_tensor(observation[key], self.device) for key in ("input_ids", "attention_mask"))
        single = ids.ndim == 1
        if single:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        if ids.ndim != 2 or ids.shape[1] != self.seq_len or mask.shape != ids.shape:
            raise ValueError(
                f"observation arrays must have shape ({self.seq_len},) or (B, {self.seq_len}), "
                f"got input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)}"
            )
        self.policy.eval()
        hidden = self.policy.hidden(ids.long(), mask.long())
        rows = torch.arange(len(ids), device=self.device)
        logits, _ = self.policy.heads(hidden[rows, last_real_column(mask)])
        logits = self._masked(logits)
        actions = logits.argmax(-1) if deterministic else sample_tokens(logits.softmax(-1))
        out = actions.cpu().numpy()
        return (out.reshape(()) if single else out), None

    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[str]:
        """Completions of ``prompts``: see :func:`agents.generation.generate` for the options
        (greedy, sampling with temperature / top-k / top-p, beam search)."""
        from agents.generation import generate

        return generate(
            self.policy, self.tokenizer, prompts, self.prompt_window, self.env.config.max_new_tokens, **kwargs
        )

    # ---------------------------------------------------------------------------- checkpoints
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a checkpoint atomically (a unique temporary file, flushed to disk, then a rename):
        a save that fails or is interrupted leaves the previous file at ``path`` as it was.

        Under ``torchrun`` every rank must call it: rank 0 gathers each rank's training state (its
        env episodes, counters and RNG states) into ``"ranks"`` and writes the file; every rank
        returns once it is written."""
        state = self._training_state(copy_tensors=False)
        ranks = dist.gather_to_main(state)
        written = Path(path)
        if dist.is_main():
            checkpoint = self._checkpoint(state)
            if ranks is not None:
                checkpoint["ranks"] = ranks
            written = save_torch(path, checkpoint)
        dist.barrier()
        return written

    def _checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of the current weights and optimizer with ``state`` (:meth:`_training_state`)."""
        return {
            "schema_version": CHECKPOINT_SCHEMA,
            "agent": self.algorithm,  # absent before the group agents: "ppo"
            "config": self.config.to_dict(),
            "env_kwargs": _jsonable_or_none(self.env_kwargs),
            "env_spec": self._env_spec(),
            "num_envs": self.total_envs,  # of all ranks together
            "world_size": dist.world_size(),
            "seed": self.seed,
            "model": self._policy_state(),
            "optimizer": self.optimizer.state_dict(),
            "init_policy": self.init_policy,
            "policy_model": self.policy_model,
            "hf_config": None if self.hf_config is None else self.hf_config.to_dict(),
            "base_digest": self._frozen_digest(),
            # under LoRA the reference is the policy's own base weights: nothing of its own to save
            "reference": self.reference.state_dict() if isinstance(self.reference, torch.nn.Module) else None,
            "tb_dir": None if self._tb_dir is None else str(self._tb_dir.resolve()),
            **state,
        }

    def _policy_state(self) -> dict[str, torch.Tensor]:
        """The policy's weights for a checkpoint: all of them, or under LoRA the trained ones
        (adapters and value head; the frozen base model is read again from ``policy_model``)."""
        if self.policy_model is not None:
            return self.policy.checkpoint_state()
        return self.policy.state_dict()

    def _frozen_digest(self) -> str | None:
        """SHA-256 of the frozen base model under LoRA (it never changes, so it is hashed once)."""
        if self._lora and self._base_digest is None:
            self._base_digest = self.policy.frozen_digest()
        return self._base_digest

    def _env_spec(self) -> dict[str, Any]:
        """The settings of the env that the policy's shapes depend on, to name them on a mismatch."""
        cfg = self.env.config
        return {
            "task": cfg.task,
            "vocab_size": int(self.env.single_action_space.n),
            "max_prompt_tokens": int(self.prompt_window),
            "max_new_tokens": int(cfg.max_new_tokens),
        }

    def _training_state(self, copy_tensors: bool) -> dict[str, Any]:
        """What changes while training, apart from the weights and the optimizer: counters, the
        KL coefficient, the global RNG states and the env's episodes in flight. ``copy_tensors``
        makes it a snapshot that later steps cannot alter."""

        def host(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", copy=copy_tensors)

        return {
            "num_timesteps": self.num_timesteps,
            "n_updates": self.n_updates,
            "target_timesteps": self._target_timesteps,
            "ep_info_buffer": [dict(e) for e in self.ep_info_buffer],
            "samples": [list(x) for x in self._samples],
            "kl_coef": self.kl.value,
            "kl_pending_steps": self.kl.pending_steps,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": json.dumps(_numpy_state()),
                "python": json.dumps(random.getstate(), default=list),
            },
            "env_state": None
            if self._obs is None
            else {
                "env": self.env.get_state(),
                "episode_return": host(self._episode_return),
                "episode_length": host(self._episode_length),
                "episode_kl": host(self._episode_kl),
            },
        }

    def _set_training_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`_training_state`."""
        self.num_timesteps, self.n_updates = state["num_timesteps"], state["n_updates"]
        self._target_timesteps = state["target_timesteps"]
        self.ep_info_buffer.clear()
        self.ep_info_buffer.extend(state["ep_info_buffer"])
        self._ended_episodes = []
        self._samples.clear()
        self._samples.extend(tuple(x) for x in state.get("samples", []))
        self.kl.value = state["kl_coef"]
        self.kl.pending_steps = state.get("kl_pending_steps", 0)  # absent from schema 3 and 4
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        name, keys, pos, has_gauss, gauss = json.loads(rng["numpy"])
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
        py_state = json.loads(rng["python"])
        random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
        if state["env_state"] is not None:
            self._restore_env(state["env_state"])

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        env_kwargs: Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        tensorboard_log: str | os.PathLike[str] | None = None,
    ) -> Any:
        """An agent from its checkpoint, ready to ``predict``, ``generate`` or continue to ``learn``
        (``PPO.load`` a PPO checkpoint, ``GRPO.load`` a GRPO one, ...).

        :param env_kwargs: the environment's keyword arguments; needed when the checkpoint could
            not store them (a reward given as a Python function). The env they make must have the
            vocabulary, prompt window and ``max_new_tokens`` the checkpoint was trained with.

        The file is checked for damage first (every zip entry's CRC-32, see
        :func:`textgym.io.check_zip_integrity`). Loading restores the global torch, NumPy and
        Python RNG states saved in the checkpoint, so that a resumed run continues exactly as
        the uninterrupted one would have. Under ``torchrun`` every rank loads the file (on a
        filesystem they share) and takes its own training state from it; the run must have as many
        processes as the one that saved it. In one process, a checkpoint of a ``torchrun`` run
        gives an agent on rank 0's env shard (for ``predict``, ``generate`` or evaluation).
        """
        path = Path(path)
        ckpt = load_torch_file(path, f"{cls.__name__} checkpoint")
        version = ckpt.get("schema_version") if isinstance(ckpt, dict) else None
        if version not in READABLE_SCHEMAS:
            raise ValueError(
                f"{str(path)!r} is not a textgym {cls.__name__} checkpoint of schema {CHECKPOINT_SCHEMA} "
                f"(got {version!r})"
            )
        saved_agent = ckpt.get("agent", "ppo")
        if saved_agent != cls.algorithm:
            raise ValueError(
                f"{str(path)!r} is a checkpoint of the {saved_agent!r} agent, not of {cls.algorithm!r}: load it "
                f"with {saved_agent.upper()}.load (from agents)"
            )
        saved_world, world = ckpt.get("world_size", 1), dist.world_size()
        if world > 1 and saved_world != world:
            raise ValueError(
                f"{str(path)!r} was saved by a run of {saved_world} process(es), and this one has {world}: "
                f"resume it with as many (torchrun --nproc_per_node=... so that nnodes x nproc_per_node = "
                f"{saved_world}); each process continues its own env shard"
            )
        if env_kwargs is None:
            if ckpt["env_kwargs"] is None:
                raise ValueError(
                    f"{str(path)!r} was saved with environment arguments that are not JSON (a reward "
                    f"function?); pass them again: {cls.__name__}.load(path, env_kwargs={{...}})"
                )
            env_kwargs = ckpt["env_kwargs"]
        model = cls(
            config=cls.config_class.from_dict(ckpt["config"]),
            # In one process, a torchrun checkpoint gives rank 0's shard: its envs, episodes and RNGs.
            num_envs=ckpt["num_envs"] // saved_world * world,
            env_kwargs=env_kwargs,
            device=device,
            seed=ckpt["seed"],
            tensorboard_log=tensorboard_log,
            policy_model=ckpt["policy_model"],
            hf_config=ckpt.get("hf_config"),
        )
        model._check_env_matches(ckpt, path)
        saved_digest = ckpt.get("base_digest")
        if saved_digest is not None and saved_digest != model._frozen_digest():
            raise ValueError(
                f"{str(path)!r} holds LoRA adapters trained on another base model than the one now in "
                f"{ckpt['policy_model']!r} (its frozen weights differ): put the original model back there"
            )
        if model.policy_model is not None:
            model.policy.load_checkpoint_state(ckpt["model"])
        else:
            model.policy.load_state_dict(ckpt["model"])
        model.init_policy = ckpt["init_policy"]
        if isinstance(model.reference, torch.nn.Module):
            model.reference.load_state_dict(ckpt["reference"])
        model.optimizer.load_state_dict(ckpt["optimizer"])
        model._set_training_state(ckpt["ranks"][dist.rank()] if world > 1 else ckpt)
        if ckpt["tb_dir"] is not None and tensorboard_log is not None:
            model._tb_dir = Path(ckpt["tb_dir"])
        return model

    def _check_env_matches(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """Refuse an env whose shapes differ from the checkpoint's, naming both settings."""
        mine = self._env_spec()
        saved = ckpt.get("env_spec")
        if saved is not None:
            differ = [k for k in ("vocab_size", "max_prompt_tokens", "max_new_tokens") if saved[k] != mine[k]]
            if differ:
                raise ValueError(
                    f"{str(path)!r} was trained on task {saved['task']!r} with "
                    + ", ".join(f"{k}={saved[k]}" for k in differ)
                    + f"; the env made from these env_kwargs (task {mine['task']!r}) has "
                    + ", ".join(f"{k}={mine[k]}" for k in differ)
                    + ". Load it with the environment arguments it was trained with."
                )
        expected = self.policy.state_dict()
        shapes = {
            k: (tuple(v.shape), tuple(expected[k].shape))
            for k, v in ckpt["model"].items()
            if k in expected and tuple(v.shape) != tuple(expected[k].shape)
        }
        if shapes:  # a schema-3 checkpoint has no env_spec: name the tensors instead
            first = next(iter(shapes.items()))
            raise ValueError(
                f"{str(path)!r} does not fit this environment (vocab_size={mine['vocab_size']}, "
                f"max_prompt_tokens={mine['max_prompt_tokens']}, max_new_tokens={mine['max_new_tokens']}): "
                f"{len(shapes)} weight shapes differ, e.g. {first[0]} is {first[1][0]} in the checkpoint "
                f"and {first[1][1]} here. Load it with the environment arguments it was trained with."
            )

    def _restore_env(self, state: Mapping[str, Any]) -> None:
        env, core, dev = self.env, self.env._core, self.device
        if "env" in state:
            env.set_state(state["env"])
        else:  # schema 3 to 5: the core's tensors and one generator per row
            if env._rngs is None:
                env.reset(seed=0)  # allocates the per-env generators, then every piece is overwritten
            core.load(state["tokens"], state["mask"], state["gen_len"], state["prompt_index"])
            for gen, saved in zip(env._rngs or [], json.loads(state["rngs"]), strict=True):
                gen.bit_generator.state = saved
            env._ended[:] = False
            env._autoreset[:] = False
            env._needs_reset[:] = False
        self._episode_return.copy_(state["episode_return"].to(dev))
        self._episode_length.copy_(state["episode_length"].to(dev))
        self._episode_kl.copy_(state["episode_kl"].to(dev))
        if "env" not in state:  # schema 6 saves ended rows as ended (a group's rows wait)
            self._reset_ended_rows()
        self._obs = {"input_ids": core.tokens.clone(), "attention_mask": core.mask.clone()}

    def _reset_ended_rows(self) -> None:
        """Start new episodes in rows that hold an ended one. Only checkpoints written by versions
        before 0.2 on an interrupt inside ``env.step`` have such rows (a row at ``max_new_tokens``
        or after ``<eos>`` that was never reset); resuming them is then not exact, but possible."""
        core, P = self.env._core, self.prompt_window
        last = core.tokens.gather(1, (P + core.gen_len - 1).clamp(min=P).unsqueeze(1)).squeeze(1)
        ended = (core.gen_len >= core.max_new_tokens) | ((core.gen_len > 0) & (last == core.eos_id))
        if not bool(ended.any()):
            return
        print(
            f"checkpoint: {int(ended.sum())} env rows held episodes that had ended without a reset "
            "(saved by an interrupted step of an older version); they start new episodes"
        )
        self.env.reset(options={"reset_mask": ended.cpu().numpy()})
        for acc in (self._episode_return, self._episode_length, self._episode_kl):
            acc[ended] = 0


@contextlib.contextmanager
def _interrupt_after_block() -> Iterator[list[bool]]:
    """Hold a Ctrl-C back until the block has run (the list it yields is then ``[True]``), so a
    half-done update is never what gets saved; a second Ctrl-C raises at once.

    Only in the main thread and while SIGINT has Python's default handler; elsewhere the block
    runs unprotected and the list stays empty."""
    interrupted: list[bool] = []
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield interrupted
        return

    def hold(signum: int, frame: Any) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\ninterrupt: finishing this update, then saving (Ctrl-C again to stop without saving it)")

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _as_tensor(value: Any, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return torch.as_tensor(np.asarray(value), device=device)


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _jsonable_or_none(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None
