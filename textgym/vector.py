"""The vector face of TextGen-v0: N episodes stepped as one batch of tensor operations.

``gym.make_vec("TextGen-v0", num_envs=N, device=...)`` returns a :class:`TextGenVectorEnv`. It
behaves like ``gym.make_vec("TextGen-v0", num_envs=N, vectorization_mode="sync")`` with the same
keyword arguments: sub-env ``i`` is seeded with ``seed + i`` and draws its prompts from its own
generator, so the same seeds and actions give the same observations, rewards and flags.

Autoreset (Gymnasium 1.x, ``metadata["autoreset_mode"]``):

- ``"next_step"`` (default, as ``SyncVectorEnv``): the step after an episode ends, that sub-env
  ignores its action and returns the first observation of a new episode, with reward 0 and both
  flags False. An agent must not train on the transition from the last observation of an episode
  to that reset observation: mask it with the previous step's ``terminated | truncated``.
- ``"same_step"``: an ending sub-env is reset within the step; the returned observation is the new
  episode's first, and ``infos["final_obs"]`` / ``infos["final_info"]`` (masked by
  ``infos["_final_obs"]``) hold the last observation and info of the episode that ended. Every
  action is used; an agent bootstraps truncated episodes from ``final_obs``. Unlike
  ``SyncVectorEnv``'s object array of per-env dicts, ``final_obs`` is one dict of (N, L) arrays
  (zero rows for sub-envs that did not finish), so it stays a tensor on the device.

Infos follow Gymnasium's vector layout: each key holds an array over sub-envs and ``"_key"`` a
bool mask of the sub-envs it is given for, and a key appears only in the steps that have it.
With ``stable_info=True`` every ``reset`` and ``step`` returns the same keys, the same types and
all-True masks, for libraries that preallocate buffers from the first step (TorchRL, Tianshou):
``"prompt"`` and ``"completion"`` (object arrays of str: each sub-env's current episode and its
text so far) and ``"reward_components"`` (``"score"`` and ``"length_penalty"``, float64 arrays,
0.0 except where an episode ended in this step). Under ``"same_step"`` they describe the episodes
now running, and ``"final_obs"``/``"final_info"`` (same layout, ``""`` and 0.0 where no episode
ended, masked by ``"_final_obs"``/``"_final_info"``) are present at every step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from textgym.checks import describe, is_bool, is_integer, is_positive_int
from textgym.core import TextGenCore, resolve_device
from textgym.env import check_render_mode, check_seed, check_stable_info, observation_space
from textgym.rewards import RewardFn, RewardModel
from textgym.tasks import make_env_config
from textgym.tokenizers import Tokenizer

ARRAY_TYPES = ("numpy", "torch")


class TextGenVectorEnv(VectorEnv):
    """``num_envs`` TextGen-v0 episodes as one batch on the CPU or a GPU.

    Takes every keyword argument of :class:`~textgym.env.TextGenEnv`, and:

    :param num_envs: number of episodes in flight (>= 1).
    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``; the episode state lives there.
    :param autoreset_mode: ``"next_step"`` (default) or ``"same_step"`` (see the module docstring).
    :param array_type: ``"numpy"`` (the Gymnasium contract) or ``"torch"``: observations, rewards
        and flags as tensors on ``device``, so an agent on the GPU pays no copy.
    :param stable_info: the same info keys and types at every step (see the module docstring);
        it decodes every sub-env's completion so far at every step.

    ``num_envs`` and ``max_new_tokens`` whose episode state cannot fit in a quarter of the
    device's memory are refused at construction (:func:`textgym.core.check_state_fits`).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        task: str = "default",
        reward: RewardModel | RewardFn | str | Mapping[str, Any] | None = None,
        tokenizer: Tokenizer | str | None = None,
        prompts: Sequence[str] | str | os.PathLike[str] | None = None,
        max_new_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        length_penalty: float = 0.0,
        allowed_tokens: Sequence[str | int] | None = None,
        split: str | None = None,
        chat_template: bool = False,
        device: str | torch.device = "cpu",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        array_type: str = "numpy",
        render_mode: str | None = None,
        stable_info: bool = False,
    ):
        if not is_positive_int(num_envs):
            raise ValueError(f"num_envs must be an integer >= 1 (Python or NumPy), got {describe(num_envs)}")
        modes = {"next_step": AutoresetMode.NEXT_STEP, "same_step": AutoresetMode.SAME_STEP}
        modes.update({m.value: m for m in modes.values()})  # Gymnasium's spellings, "NextStep", ...
        mode = autoreset_mode.value if isinstance(autoreset_mode, AutoresetMode) else autoreset_mode
        if mode not in modes:
            raise ValueError(
                f"autoreset_mode must be 'next_step', 'same_step' or an AutoresetMode, got {autoreset_mode!r}"
            )
        if array_type not in ARRAY_TYPES:
            raise ValueError(f"array_type must be one of {', '.join(ARRAY_TYPES)}, got {array_type!r}")
        check_render_mode(render_mode, self.metadata["render_modes"])
        self.num_envs = int(num_envs)
        self.device = resolve_device(device)
        self.autoreset_mode = modes[mode]
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        self.array_type = array_type
        self.render_mode = render_mode
        self.stable_info = check_stable_info(stable_info)

        self.config = make_env_config(
            task,
            reward,
            tokenizer,
            prompts,
            max_new_tokens,
            max_prompt_tokens,
            length_penalty,
            allowed_tokens,
            split,
            chat_template,
        )
        self.tokenizer = self.config.tokenizer
        self._core = TextGenCore(self.config, self.num_envs, self.device)
        self.single_observation_space = observation_space(self.config)
        self.single_action_space = spaces.Discrete(self.tokenizer.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._rngs: list[np.random.Generator] | None = None  # one per sub-env, as in SyncVectorEnv
        self._autoreset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        # Rows that must be reset before they are stepped: all before the first reset(), and all
        # after a reward model failed (the failed step may have ended any of them).
        self._needs_reset = np.ones(self.num_envs, dtype=bool)
        self._step_seconds = 0.0

    # ------------------------------------------------------------------------------------ reset
    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        N = self.num_envs
        if seed is None:
            seeds: list[int | None] = [None] * N
        elif is_integer(seed):
            first = check_seed(seed)
            assert first is not None
            seeds = [first + i for i in range(N)]
            self._np_random, self._np_random_seed = seeding.np_random(first)
        elif isinstance(seed, Sequence | np.ndarray) and not isinstance(seed, str | bytes):
            seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
            if len(seeds) != N:
                raise ValueError(f"seed: a list of seeds must have num_envs={N} entries, got {len(seeds)}")
        else:
            raise TypeError(f"seed must be None, an int or a list of {N} ints/None, got {describe(seed)}")
        unknown = sorted(set(options or {}) - {"reset_mask"})
        if unknown:
            raise ValueError(f"unsupported reset options {unknown}; the vector env accepts only 'reset_mask'")
        mask = np.ones(N, dtype=bool)
        if options and "reset_mask" in options:
            mask = options["reset_mask"]
            if not isinstance(mask, np.ndarray) or mask.shape != (N,) or mask.dtype != np.bool_:
                raise ValueError(
                    f"options['reset_mask'] must be a bool numpy array of shape ({N},), got {mask!r}"
                )
        if self._rngs is None:
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        else:
            for i, s in enumerate(seeds):
                if s is not None and mask[i]:
                    self._rngs[i] = seeding.np_random(s)[0]
        rows = np.flatnonzero(mask)
        prompt_index = self._reset_rows(rows)
        self._autoreset[torch.from_numpy(mask).to(self.device)] = False
        self._needs_reset[mask] = False
        if self.stable_info:
            return self._obs(), self._stable_infos()
        return self._obs(), self._prompt_infos(rows, prompt_index)

    def _reset_rows(self, rows: np.ndarray) -> list[int]:
        assert self._rngs is not None
        prompt_index = self._core.sample_prompts([self._rngs[i] for i in rows.tolist()])
        self._core.reset(
            torch.as_tensor(rows, device=self.device),
            torch.tensor(prompt_index, dtype=torch.long).to(self.device),
        )
        return prompt_index

    # ------------------------------------------------------------------------------------- step
    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        if self._needs_reset.any():
            rows = np.flatnonzero(self._needs_reset)
            raise ResetNeeded(
                f"sub-envs {rows[:8].tolist()}{' ...' if len(rows) > 8 else ''} have not been reset since "
                "construction or since a reward model error; call reset() (all of them, or with a reset_mask)"
            )
        start = time.perf_counter()
        acts = self._check_actions(actions)
        N = self.num_envs
        infos: dict[str, Any] = {}
        active = None
        if self.autoreset_mode is AutoresetMode.NEXT_STEP and bool(self._autoreset.any()):
            rows = self._autoreset.nonzero().squeeze(1).cpu().numpy()
            prompt_index = self._reset_rows(rows)
            if not self.stable_info:
                infos = self._prompt_infos(rows, prompt_index)
            active = ~self._autoreset

        try:
            result = self._core.step(acts, active)
        except Exception:
            self._needs_reset[:] = True
            raise
        finished = result.finished.cpu().numpy()
        done = result.terminated | result.truncated

        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            self._autoreset = done
            if self.stable_info:  # the rows that ended still hold their episode: its final values
                infos = self._stable_infos(*self._components(finished, result))
            else:
                _add(infos, self._final_infos(finished, result), finished, N)
        elif finished.size or self.stable_info:
            final_obs = self._obs(rows=result.finished)
            infos["final_obs"] = final_obs
            infos["final_info"] = self._final_infos(finished, result)
            infos["_final_obs"] = infos["_final_info"] = _mask(finished, N)
            prompt_index = self._reset_rows(finished) if finished.size else []
            if self.stable_info:  # the rows that ended hold new episodes now
                infos.update(self._stable_infos())
            else:
                _add(infos, self._prompt_infos(finished, prompt_index), finished, N)

        rewards, terminated, truncated = result.reward, result.terminated, result.truncated
        if self.array_type == "numpy":
            rewards, terminated, truncated = (
                rewards.cpu().numpy(),
                terminated.cpu().numpy(),
                truncated.cpu().numpy(),
            )
        obs = self._obs()
        self._step_seconds += time.perf_counter() - start
        return obs, rewards, terminated, truncated, infos

    def _check_actions(self, actions: Any) -> torch.Tensor:
        N, V = self.num_envs, self.tokenizer.vocab_size
        accepted = (
            f"accepted: {N} integer token ids in [0, {V}), one per sub-env, as a numpy array, tensor or list"
        )
        if isinstance(actions, torch.Tensor):
            if actions.dtype.is_floating_point or actions.dtype == torch.bool or actions.is_complex():
                raise TypeError(
                    f"actions must be integer token ids, got a tensor of dtype {actions.dtype}; {accepted}"
                )
            values: torch.Tensor | np.ndarray = actions
        else:
            if isinstance(actions, list | tuple):
                # numpy turns [True, 5] into [1, 5]; the single env refuses a bool, so does this one.
                bad = next((i for i, a in enumerate(actions) if _is_boolean(a)), None)
                if bad is not None:
                    raise TypeError(
                        f"actions[{bad}] (sub-env {bad}) is {describe(actions[bad])}, a boolean, not a token "
                        f"id; {accepted}"
                    )
            values = np.asarray(actions)
            if values.dtype == object:  # e.g. a list mixing ints and other things
                flat = values.reshape(-1)
                bad = next((i for i, a in enumerate(flat) if not is_integer(a)), None)
                if bad is not None:
                    raise TypeError(
                        f"actions must be integer token ids (sub-env {bad}: {flat[bad]!r}); {accepted}"
                    )
                values = values.astype(np.int64)
            elif values.dtype.kind not in "iu":
                raise TypeError(
                    f"actions must be integer token ids, got an array of dtype {values.dtype}; {accepted}"
                )
        if tuple(values.shape) != (N,):
            raise ValueError(
                f"actions must have shape ({N},), one token id per sub-env, got {tuple(values.shape)}"
            )
        # Range checked before any cast, so a huge unsigned id is reported as given.
        out_of_range = (values < 0) | (values >= V)
        if bool(out_of_range.any()):
            i = int(out_of_range.nonzero()[0][0])
            raise ValueError(f"actions[{i}] = {int(values[i])} (sub-env {i}) is not a token id in [0, {V})")
        if isinstance(values, np.ndarray):
            values = torch.from_numpy(values.astype(np.int64, copy=False))
        return values.to(device=self.device, dtype=torch.long)

    # ------------------------------------------------------------------------------ observations
    def _obs(self, rows: torch.Tensor | None = None) -> dict[str, Any]:
        tokens, mask = self._core.tokens, self._core.mask
        if rows is not None:  # (k,) rows, placed in a full (N, L) array with zeros elsewhere
            tokens, mask = torch.zeros_like(tokens), torch.zeros_like(mask)
            tokens[rows], mask[rows] = self._core.tokens[rows], self._core.mask[rows]
        elif self.array_type == "torch" or self.device.type == "cpu":
            tokens, mask = tokens.clone(), mask.clone()  # the core keeps writing into its own
        if self.array_type == "numpy":
            return {"input_ids": tokens.cpu().numpy(), "attention_mask": mask.cpu().numpy()}
        return {"input_ids": tokens, "attention_mask": mask}

    def _prompt_infos(self, rows: np.ndarray, prompt_index: Sequence[int]) -> dict[str, Any]:
        infos: dict[str, Any] = {}
        if len(rows):
            prompts = np.empty(self.num_envs, dtype=object)
            prompts[rows] = [self.config.prompts[i] for i in prompt_index]
            infos["prompt"], infos["_prompt"] = prompts, _mask(rows, self.num_envs)
        return infos

    def _components(self, rows: np.ndarray, result: Any) -> tuple[np.ndarray, np.ndarray]:
        """(N,) score and (N,) summed length penalty: the episodes' that ended in ``rows``, else 0."""
        score, penalty = np.zeros(self.num_envs), np.zeros(self.num_envs)
        score[rows] = result.scores
        penalty[rows] = 0.0 - self.config.length_penalty * result.lengths
        return score, penalty

    def _final_infos(self, rows: np.ndarray, result: Any) -> dict[str, Any]:
        """The info a single env gives at an episode's end, as masked arrays over sub-envs.

        With ``stable_info`` the keys are there even if no episode ended, with ``""`` and 0.0
        (masked out) for sub-envs whose episode did not end."""
        N = self.num_envs
        if not rows.size and not self.stable_info:
            return {}
        fill = "" if self.stable_info else None
        prompts, completions = np.full(N, fill, dtype=object), np.full(N, fill, dtype=object)
        prompts[rows], completions[rows] = result.prompts, result.completions
        return _info_arrays(prompts, completions, *self._components(rows, result), _mask(rows, N))

    def _stable_infos(
        self, score: np.ndarray | None = None, penalty: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Every sub-env's current episode: prompt, text so far and ``score``/``penalty`` (0 if None)."""
        N = self.num_envs
        prompts, completions = np.empty(N, dtype=object), np.empty(N, dtype=object)
        prompts[:], completions[:] = self._core.texts()
        zeros = np.zeros(N)
        return _info_arrays(
            prompts,
            completions,
            zeros if score is None else score,
            zeros.copy() if penalty is None else penalty,
            np.ones(N, dtype=bool),
        )

    def action_masks(self) -> Any:
        """(num_envs, vocab_size) bool: the tokens each sub-env's agent may emit, as numpy or
        torch per ``array_type``. The mask comes from the ``allowed_tokens`` argument and is the same
        at every step."""
        mask = np.broadcast_to(self.config.action_mask, (self.num_envs, self.config.action_mask.size))
        if self.array_type == "torch":
            return torch.as_tensor(mask.copy(), device=self.device)
        return mask.copy()

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent so far: in ``step`` in all, and within it decoding text and in the reward model."""
        return {"step": self._step_seconds, **self._core.timings}

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        return tuple(" | ".join(self._core.text(i)) for i in range(self.num_envs))

    @property
    def prompt_window(self) -> int:
        """``P``: generated token t is in observation column ``P + t``."""
        return self.config.max_prompt_tokens


def _info_arrays(
    prompts: np.ndarray, completions: np.ndarray, score: np.ndarray, penalty: np.ndarray, m: np.ndarray
) -> dict[str, Any]:
    """The single env's end-of-episode info as Gymnasium vector arrays, each masked by ``m``."""
    return {
        "prompt": prompts,
        "_prompt": m,
        "completion": completions,
        "_completion": m,
        "reward_components": {
            "score": score,
            "_score": m,
            "length_penalty": penalty,
            "_length_penalty": m,
        },
        "_reward_components": m,
    }


def _is_boolean(value: Any) -> bool:
    """A bool, a numpy bool or a 0-d bool array or tensor."""
    dtype = getattr(value, "dtype", None)
    return is_bool(value) or dtype == np.bool_ or dtype == torch.bool


def _mask(rows: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[rows] = True
    return m


def _add(infos: dict[str, Any], new: dict[str, Any], rows: np.ndarray, n: int) -> None:
    """Merge masked info arrays ``new`` (entries of ``rows``) into ``infos`` in place."""
    for key, value in new.items():
        if key.startswith("_") or key not in infos:
            if key.startswith("_") and key in infos:
                infos[key] = infos[key] | value
            else:
                infos[key] = value
        elif isinstance(value, dict):
            _add(infos[key], value, rows, n)
        else:
            infos[key][rows] = value[rows]
