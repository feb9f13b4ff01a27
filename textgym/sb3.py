"""The batched environment as a Stable-Baselines3 ``VecEnv``.

SB3 cannot consume a Gymnasium ``VectorEnv``: it expects its own ``VecEnv`` API, where a step
resets finished sub-envs at once, puts the last observation of an episode in
``infos[i]["terminal_observation"]`` and flags truncation with ``infos[i]["TimeLimit.truncated"]``.
:class:`SB3VecEnv` gives SB3 agents exactly that over one :class:`~textgym.vector.TextGenVectorEnv`
(same-step autoreset, numpy arrays), so they train on the fast batched env::

    from stable_baselines3 import PPO
    from textgym.sb3 import make_sb3_vec_env

    venv = make_sb3_vec_env(num_envs=64, task="sentiment")   # wrapped in VecMonitor
    PPO("MultiInputPolicy", venv).learn(10_000)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.vec_env import VecEnv, VecMonitor
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from textgym.vector import TextGenVectorEnv


class SB3VecEnv(VecEnv):
    """A :class:`~textgym.vector.TextGenVectorEnv` seen through Stable-Baselines3's ``VecEnv`` API.

    :param venv: a vector env with ``autoreset_mode="same_step"``, ``array_type="numpy"`` and
        ``group_size=1``: SB3's algorithms train on every step, and a row waiting for its group
        makes steps that are not transitions.
    :param bootstrap_truncated: report an episode cut at ``max_new_tokens`` as
        ``TimeLimit.truncated=True``, so SB3 adds the discounted value of its last observation to
        the final reward. TextGen-v0 scores the completion when it truncates, so that return is
        already complete; ``False`` makes SB3 treat the cut like a termination, which is what the
        custom PPO does by default (``PPOConfig.bootstrap_truncated=False``).

    The info of a sub-env whose episode ended holds, besides ``terminal_observation`` and
    ``TimeLimit.truncated``, the vector env's end-of-episode info: ``prompt``, ``completion``,
    ``reward_components``, ``prompt_index`` and ``group`` (the sub-env's index), so that episodes
    on the same prompt can be gathered; ``prompt`` and ``completion`` are left out, and reset infos
    hold ``prompt_index`` instead of ``prompt``, when the vector env has ``text_infos=False``.
    ``env_method("action_masks")`` returns one mask row per sub-env, as sb3-contrib's MaskablePPO
    expects.
    """

    def __init__(self, venv: TextGenVectorEnv, bootstrap_truncated: bool = True):
        if not isinstance(venv, TextGenVectorEnv):
            raise TypeError(f"venv must be a TextGenVectorEnv, got {type(venv).__name__}")
        if venv.autoreset_mode is not AutoresetMode.SAME_STEP or venv.array_type != "numpy":
            raise ValueError(
                "SB3VecEnv needs TextGenVectorEnv(autoreset_mode='same_step', array_type='numpy'), got "
                f"autoreset_mode={venv.autoreset_mode.value!r}, array_type={venv.array_type!r}"
            )
        if venv.group_size != 1:
            raise ValueError(
                f"SB3VecEnv needs TextGenVectorEnv(group_size=1), got group_size={venv.group_size}: SB3's "
                "algorithms train on every step, and a row waiting for its group makes steps that are not "
                "transitions"
            )
        self.venv = venv
        self.bootstrap_truncated = bool(bootstrap_truncated)
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> dict[str, np.ndarray]:
        if any(self._options):
            raise ValueError(f"SB3VecEnv takes no reset options, got {self._options}")
        seeds = None if all(s is None for s in self._seeds) else list(self._seeds)
        obs, infos = self.venv.reset(seed=seeds)
        self.reset_infos = [self._reset_info(infos, i) for i in range(self.num_envs)]
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async(actions)")
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        out: list[dict[str, Any]] = [{"TimeLimit.truncated": False} for _ in range(self.num_envs)]
        for i in np.flatnonzero(dones).tolist():
            final, comps = infos["final_info"], infos["final_info"]["reward_components"]
            out[i] = {
                "TimeLimit.truncated": self.bootstrap_truncated and bool(truncated[i] and not terminated[i]),
                "terminal_observation": {k: v[i] for k, v in infos["final_obs"].items()},
                **{key: final[key][i] for key in ("prompt", "completion") if key in final},  # text_infos
                "prompt_index": int(final["prompt_index"][i]),
                "group": int(final["group"][i]),
                "reward_components": {
                    "score": comps["score"][i],
                    "length_penalty": comps["length_penalty"][i],
                },
            }
            self.reset_infos[i] = self._reset_info(infos, i)
        return obs, rewards.astype(np.float32), dones, out

    @staticmethod
    def _reset_info(infos: dict[str, Any], i: int) -> dict[str, Any]:
        """Sub-env ``i``'s reset info: its prompt, or its prompt index with ``text_infos=False``."""
        if "prompt" in infos:
            return {"prompt": infos["prompt"][i]}
        return {"prompt_index": int(infos["prompt_index"][i])}

    def close(self) -> None:
        self.venv.close()

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    # Every sub-env shares one configuration, so per-env attributes are the vector env's own.
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = None if attr_name == "render_mode" else getattr(self.venv, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(f"SB3VecEnv sub-envs share one configuration; cannot set {attr_name!r} per env")

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        if method_name == "action_masks":  # batched: one row per sub-env
            return [result[i] for i in self._indices(indices)]
        # One call on the shared vector env, its result reported for each index asked about.
        return [result for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]


def make_sb3_vec_env(
    num_envs: int, monitor: bool = True, bootstrap_truncated: bool = True, **env_kwargs: Any
) -> VecEnv:
    """An :class:`SB3VecEnv` over ``TextGenVectorEnv(num_envs, **env_kwargs)``.

    :param bootstrap_truncated: see :class:`SB3VecEnv`.
    :param monitor: wrap it in SB3's ``VecMonitor``, which records the episode returns and lengths
        behind ``rollout/ep_rew_mean`` and ``rollout/ep_len_mean``.
    """
    venv = TextGenVectorEnv(num_envs, autoreset_mode="same_step", array_type="numpy", **env_kwargs)
    adapter = SB3VecEnv(venv, bootstrap_truncated)
    return VecMonitor(adapter) if monitor else adapter
