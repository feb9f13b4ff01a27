"""``TextGen-v0``: token generation as a Gymnasium environment, one episode at a time."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded

from textgym.checks import describe, is_bool, is_integer
from textgym.core import TextGenCore
from textgym.rewards import RewardFn, RewardModel
from textgym.tasks import EnvConfig, make_env_config
from textgym.tokenizers import Tokenizer


def observation_space(config: EnvConfig) -> spaces.Dict:
    """The observation space of one episode of ``config`` (also each sub-space of the vector env)."""
    L, V = config.seq_len, config.tokenizer.vocab_size
    return spaces.Dict(
        {
            "input_ids": spaces.Box(0, V - 1, shape=(L,), dtype=np.int64),
            "attention_mask": spaces.Box(0, 1, shape=(L,), dtype=np.int64),
        }
    )


def check_stable_info(stable_info: Any) -> bool:
    if not is_bool(stable_info):
        raise TypeError(f"stable_info must be True or False, got {describe(stable_info)}")
    return bool(stable_info)


def check_text_infos(text_infos: Any, stable_info: bool) -> bool:
    if not is_bool(text_infos):
        raise TypeError(f"text_infos must be True or False, got {describe(text_infos)}")
    if stable_info and not text_infos:
        raise ValueError(
            "stable_info=True gives every step's 'prompt' and 'completion' text, which text_infos=False "
            "leaves out; use one or the other"
        )
    return bool(text_infos)


def check_seed(seed: Any, where: str = "seed") -> int | None:
    """``seed`` as a Python int (NumPy integers accepted, as Gymnasium's seeding is not) or None."""
    if seed is None:
        return None
    if not is_integer(seed):
        raise TypeError(f"{where} must be None or an integer >= 0 (Python or NumPy), got {describe(seed)}")
    if seed < 0:
        raise ValueError(f"{where} must be None or an integer >= 0, got {int(seed)}")
    return int(seed)


class RenderModeError(ValueError, TypeError):
    """A ``render_mode`` the environment does not offer.

    Also a ``TypeError`` because Stable-Baselines3's ``make_vec_env`` asks every env for
    ``render_mode="rgb_array"`` and falls back to no render mode only on ``TypeError``.
    """


def check_render_mode(render_mode: str | None, accepted: list[str]) -> None:
    if render_mode is not None and render_mode not in accepted:
        raise RenderModeError(f"render_mode must be None or one of {accepted}, got {render_mode!r}")


def check_action(action: Any, vocab_size: int, where: str = "action") -> int:
    """``action`` as a Python int, or a clear error naming what was wrong and what is accepted."""
    if isinstance(action, np.ndarray) and action.ndim == 0:
        action = action[()]
    if isinstance(action, bool | np.bool_) or not isinstance(action, int | np.integer):
        shape = f" of shape {action.shape}" if hasattr(action, "shape") else ""
        raise TypeError(
            f"{where} must be one integer token id in [0, {vocab_size}), got {type(action).__name__}"
            f"{shape}: {action!r}"
        )
    if not 0 <= action < vocab_size:
        raise ValueError(f"{where} must be a token id in [0, {vocab_size}), got {int(action)}")
    return int(action)


class TextGenEnv(gym.Env[dict[str, np.ndarray], int]):
    """Generate text one token per step; a reward model scores the finished completion.

    ## Description
    Each episode starts from a prompt drawn from the task's prompt set with the environment's
    seeded random generator. At every step the agent emits one token id, which is appended to the
    text. The episode ends when the agent emits ``<eos>`` or after ``max_new_tokens`` tokens; the
    reward model then scores the completion (the generated text, without the prompt), once.
    Transitions are deterministic: the next observation is the last one plus the action, which
    lets an agent keep a key/value cache across steps.

    ## Action Space
    ``Discrete(vocab_size)``: the next token id. Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>`` and
    ``<unk>``; emitting ``<eos>`` ends the episode. ``env.unwrapped.tokenizer`` maps ids to text.

    ## Observation Space
    ``Dict`` of two ``Box(shape=(P + M,), dtype=int64)`` arrays, where ``P = max_prompt_tokens``
    and ``M = max_new_tokens``:

    - ``input_ids``: the prompt, left-padded with ``<pad>`` (id 0) so that it ends at column
      ``P - 1`` and starts with ``<bos>``; then the generated tokens from column ``P`` on,
      right-padded with ``<pad>``.
    - ``attention_mask``: 1 on every real token (prompt and generated), 0 on padding.

    The t-th generated token (t = 0, 1, ...) is always in column ``P + t``.

    ## Rewards
    ``score + per-token terms``: the reward model's score of the completion is given at the last
    step, and ``-length_penalty`` at every step (0 by default). At the end of an episode ``info``
    holds ``"prompt"``, ``"completion"`` and ``"reward_components"``:
    ``{"score": ..., "length_penalty": ...}``, each summed over the episode.

    Other steps give an empty ``info`` and ``reset`` gives ``{"prompt": ...}``, as Gymnasium allows.
    With ``stable_info=True`` every ``reset`` and ``step`` gives the same keys with the same types,
    which libraries that preallocate their info buffers from the first step need (Tianshou,
    TorchRL): ``"prompt"`` (str), ``"completion"`` (str, the text generated so far) and
    ``"reward_components"`` (``{"score": float, "length_penalty": float}``, 0.0 before the last step
    and the values above at it).

    With ``text_infos=False`` no info holds text: ``reset`` gives ``{"prompt_index": i}`` (the
    index of the prompt in ``env.unwrapped.config.prompts``) and the last step
    ``{"prompt_index": i, "reward_components": {...}}``, without ``"prompt"`` and ``"completion"``.
    With a token reward model (``textgym.TokenRewardModel``, such as a learned one) the env then
    decodes no text at all in ``step``; a reward model of text still gets the text it scores.
    Observations, rewards and flags are the same either way.

    ## Starting State
    A prompt drawn uniformly from the task's prompts with ``self.np_random``; no token generated.
    ``reset(options={"prompt_index": i})`` starts from prompt ``i`` instead.

    ## Episode End
    - Termination: the agent emits ``<eos>`` (id 2).
    - Truncation: ``max_new_tokens`` tokens generated without ``<eos>``.

    ## Arguments
    ```python
    import gymnasium as gym
    import textgym

    env = gym.make("TextGen-v0")                                      # default task: sentiment
    env = gym.make("TextGen-v0", task="arithmetic")
    env = gym.make("TextGen-v0", reward=lambda prompt, completion: float("good" in completion),
                   max_new_tokens=16, render_mode="ansi")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    ```

    - ``task``: ``"default"``, ``"sentiment"``, ``"arithmetic"``, ``"keyword"`` or ``"reviews"`` (see
      ``textgym.tasks``).
    - ``reward``: overrides the task's reward model: a function ``(prompt, completion) -> float``,
      a ``textgym.RewardModel``, a built-in name, or ``{"name": ..., **arguments}``; a
      ``textgym.TokenRewardModel`` (a learned reward, ``textgym.TokenFunctionReward(fn)``) scores
      the token ids instead of text, and the env binds its tokenizer to it.
    - ``tokenizer``: a ``textgym.Tokenizer`` or ``"byte"``, ``"char"``, ``"word"`` (the latter two
      build their vocabulary from the task corpus and the prompts), or a local Hugging Face
      tokenizer (the ``hf`` extra): the path of a ``save_pretrained`` directory or a
      ``tokenizer.json``, or ``{"name": "hf", "path": ..., "eos_token": ...}``; see ``textgym.hf``.
    - ``prompts``: a list of strings, or the path of a text file with one prompt per line, a
      ``.json`` file holding a list of strings, or a ``.jsonl`` file (one JSON string or
      ``{"prompt": ...}`` per line), which can hold prompts of several lines.
    - ``max_new_tokens``: generation budget (task default if None).
    - ``max_prompt_tokens``: prompt window, ``<bos>`` included; None fits the longest prompt.
      Longer prompts are refused with an error, never cut.
    - ``length_penalty``: subtracted from the reward at every step.
    - ``allowed_tokens``: token strings or ids that, with ``<eos>``, make up the action mask
      returned by ``action_masks()``; None allows every token but ``<pad>``, ``<bos>`` and
      ``<unk>``. The mask is advice for agents that read it (sb3-contrib's MaskablePPO, the
      custom PPO with ``mask_actions=True``); the env itself accepts any token id.
    - ``split``: the task's prompts to draw from: ``"train"`` (80%), ``"test"`` (the 20% held
      out by a fixed seeded draw) or ``"all"``; None is the task's default (``"train"`` for
      ``reviews``, ``"all"`` for the others). Every split has the same tokenizer and observation
      space. With ``prompts=`` of your own, leave it None.
    - ``chat_template``: put each prompt in the Hugging Face tokenizer's chat template (a user
      message and the opening of the assistant's turn); needs a tokenizer that has one.
    - ``render_mode``: ``"ansi"`` returns the text so far, ``"human"`` prints it.
    - ``stable_info``: the same ``info`` keys and types at every step (see Rewards); it decodes
      the completion so far at every step.
    - ``text_infos``: False leaves the prompt and completion text out of ``info`` (see Rewards),
      so that a token reward model makes steps decode nothing; not with ``stable_info=True``.
      ``render()`` still decodes the text it shows.

    Integer arguments take Python or NumPy integers and ``length_penalty`` any real number; they
    are stored as plain ``int`` and ``float``.

    ## Version History
    - v0: initial version; ``text_infos`` added without a version bump (the default keeps every
      output as it was).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi", "human"], "render_fps": 4}

    def __init__(
        self,
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
        render_mode: str | None = None,
        stable_info: bool = False,
        text_infos: bool = True,
    ):
        check_render_mode(render_mode, self.metadata["render_modes"])
        self.render_mode = render_mode
        self.stable_info = check_stable_info(stable_info)
        self.text_infos = check_text_infos(text_infos, self.stable_info)
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
        self._core = TextGenCore(
            self.config, num_envs=1, device=torch.device("cpu"), text_infos=self.text_infos
        )
        self.action_space = spaces.Discrete(self.tokenizer.vocab_size)
        self.observation_space = observation_space(self.config)
        self._needs_reset = True
        self._ended = ""  # why the last episode ended, for the error of a step after its end

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=check_seed(seed))
        index = (options or {}).get("prompt_index")
        if index is None:
            (index,) = self._core.sample_prompts([self.np_random])
        elif (
            isinstance(index, bool)
            or not isinstance(index, int | np.integer)
            or not (0 <= index < self._core.num_prompts)
        ):
            raise ValueError(
                f"options['prompt_index'] must be an integer in [0, {self._core.num_prompts}), got {index!r}"
            )
        self._core.reset(np.zeros(1, dtype=np.int64), np.array([int(index)]))
        self._needs_reset, self._ended = False, ""
        if self.render_mode == "human":
            self.render()
        prompt = self.config.prompts[int(index)]
        if self.stable_info:
            return self._obs(), _info(prompt, "", 0.0, 0.0)
        if not self.text_infos:
            return self._obs(), {"prompt_index": int(index)}
        return self._obs(), {"prompt": prompt}

    def step(self, action: int) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            if self._ended:
                raise ResetNeeded(
                    f"step() called after the episode ended ({self._ended}); call reset() first"
                )
            raise ResetNeeded("step() called before reset(); call reset() first")
        token = check_action(action, self.tokenizer.vocab_size)
        # Marked ended before the step, so a failing reward model leaves the env needing a reset.
        self._needs_reset, self._ended = True, "the reward model failed"
        result = self._core.step(torch.tensor([token]))
        assert result is not None  # refused only where a ``refuse`` flag is given
        terminated, truncated = bool(result.terminated_host[0]), bool(result.truncated_host[0])
        info: dict[str, Any] = {}
        if terminated or truncated:
            self._ended = "terminated: <eos> emitted" if terminated else "truncated: max_new_tokens reached"
            score, penalty = (
                float(result.scores[0]),
                0.0 - self.config.length_penalty * int(result.lengths[0]),
            )
            if self.text_infos:
                assert result.prompts is not None and result.completions is not None
                info = _info(result.prompts[0], result.completions[0], score, penalty)
            else:
                components = {"score": score, "length_penalty": penalty}
                info = {"prompt_index": int(result.prompt_index[0]), "reward_components": components}
        else:
            self._needs_reset, self._ended = False, ""
            if self.stable_info:
                info = _info(*self._core.text(0), 0.0, 0.0)
        if self.render_mode == "human":
            self.render()
        return self._obs(), float(result.reward[0]), terminated, truncated, info

    def render(self) -> str | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' or 'human'")
            return None
        prompt, completion = self._core.text(0)
        text = f"{prompt} | {completion}"
        if self.render_mode == "ansi":
            return text
        print(text)
        return None

    def action_masks(self) -> np.ndarray:
        """(vocab_size,) bool: the tokens an agent may emit (the ``allowed_tokens`` argument)."""
        return self.config.action_mask.copy()

    def _obs(self) -> dict[str, np.ndarray]:
        return {
            "input_ids": self._core.tokens[0].numpy().copy(),
            "attention_mask": self._core.mask[0].numpy().copy(),
        }

    @property
    def prompt_window(self) -> int:
        """``P``: generated token t is in observation column ``P + t``."""
        return self.config.max_prompt_tokens


def _info(prompt: str, completion: str, score: float, length_penalty: float) -> dict[str, Any]:
    """The info of an episode's last step; with ``stable_info``, of every step (zeros before the last)."""
    return {
        "prompt": prompt,
        "completion": completion,
        "reward_components": {"score": score, "length_penalty": length_penalty},
    }
