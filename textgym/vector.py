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

Groups (``group_size=G``, for GRPO and RLOO; see :class:`TextGenVectorEnv` for every detail): rows
``[k*G, (k+1)*G)`` form group ``k`` and always start their episodes together on one prompt. A row
whose episode has ended *waits* (ignores its action, keeps its final observation, reward 0.0, both
flags False, ``infos["waiting"]`` True) until its whole group has ended; then the group is reset
together, within the step of the last end (``"same_step"``) or at the step after it
(``"next_step"``). The rule for agents: under ``"same_step"`` a step is a transition of a row iff
``waiting`` is False for it; under ``"next_step"`` iff the row was neither done nor waiting at the
step before. ``G = 1`` (the default) is the env described above, unchanged, and only ``G = 1`` has
a single-env equivalent.

Infos follow Gymnasium's vector layout: each key holds an array over sub-envs and ``"_key"`` a
bool mask of the sub-envs it is given for, and a key appears only in the steps that have it.
Wherever an info gives ``"prompt"`` (at a reset or an autoreset for the rows that start an episode,
and at an episode's end: in the step's infos under ``"next_step"``, in ``infos["final_info"]``
under ``"same_step"``), it also gives, under the same mask, ``"prompt_index"`` (int64: the index of
that prompt in ``env.config.prompts``) and ``"group"`` (int64: ``row // group_size``, the row
itself when ``group_size=1``), so that any agent can gather the finished episodes of a group.
With ``text_infos=False`` no info holds ``"prompt"`` or ``"completion"`` (see
:class:`TextGenVectorEnv`). With ``stable_info=True`` every ``reset`` and ``step`` returns the
same keys, the same types and all-True masks, for libraries that preallocate buffers from the
first step (TorchRL, Tianshou): ``"prompt"`` and ``"completion"`` (object arrays of str: each
sub-env's current episode and its text so far), ``"prompt_index"`` and ``"group"`` (int64 arrays), ``"reward_components"``
(``"score"`` and ``"length_penalty"``, float64 arrays, 0.0 except where an episode ended in this
step) and, when ``group_size > 1``, ``"waiting"``. A row that holds an ended episode (until its
group is reset) reports that episode's prompt, completion and prompt index. Under ``"same_step"``
they describe the episodes the rows hold after the step, and ``"final_obs"``/``"final_info"``
(same layout without ``"waiting"``, ``""``, 0.0 and 0 where no episode ended, masked by
``"_final_obs"``/``"_final_info"``) are present at every step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from textgym.checks import describe, is_bool, is_integer, is_positive_int
from textgym.core import TextGenCore, resolve_device, to_device
from textgym.env import check_render_mode, check_seed, check_stable_info, check_text_infos, observation_space
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
    :param group_size: ``G`` >= 1, a divisor of ``num_envs``: run ``num_envs / G`` groups of ``G``
        episodes on one prompt each (see Groups). 1 (the default) makes every row its own group.
    :param text_infos: False leaves ``"prompt"`` and ``"completion"`` (and their masks) out of
        every info, ``final_info`` included; ``"prompt_index"``, ``"group"``,
        ``"reward_components"`` and ``"waiting"`` stay. With a token reward model
        (``textgym.TokenRewardModel``) ``step`` then decodes no text: the finished episodes are
        scored as ids on ``device``. Not with ``stable_info=True``.

    ``num_envs`` and ``max_new_tokens`` whose episode state cannot fit in a quarter of the
    device's memory are refused at construction (:func:`textgym.core.check_state_fits`).

    ## Groups
    Group-relative agents (GRPO, RLOO) compare ``G`` completions of the same prompt. Rows
    ``[k*G, (k+1)*G)`` form group ``k`` (``group_size`` and ``num_groups`` are attributes). A
    group's rows always start their episodes together, in the same step and on the same prompt,
    drawn once per group from group ``k``'s generator. A row whose episode has ended *waits*: its
    episode is over and it does not start a new one until every row of its group has ended; then
    the whole group is reset together onto a new prompt, as the autoreset mode says. With ``G = 1``
    a group is a row, no row ever waits, and the env is the plain vector env, step for step
    ``SyncVectorEnv``'s. With ``G > 1`` there is no single-env or ``SyncVectorEnv`` equivalent:
    ``gym.make`` and ``vectorization_mode="sync"`` do not take ``group_size``.

    A row *waits in a step* when it begins the step holding an ended episode while some row of
    its group is still running. In that step its action is ignored, its reward is 0.0 (no length
    penalty either), ``terminated`` and ``truncated`` are False, nothing is appended to its
    observation (which stays the final observation of its episode, except in the ``"same_step"``
    step that resets its group, below), and ``infos["waiting"]`` is True for it. A row is never
    waiting and done in the same step. ``infos["waiting"]`` is an (N,) bool array (NumPy, or with
    ``array_type="torch"`` a tensor on ``device``, like ``terminated``) with an all-True NumPy mask
    ``infos["_waiting"]``; when ``G > 1`` it is in the infos of every ``step`` and of every
    ``reset`` (all False there: ``reset`` takes no action); when ``G = 1`` it is absent.

    Step by step, for a row whose episode ends at step ``t``, in a group whose last episode ends
    at step ``T >= t``:

    - ``"same_step"``: at step ``t`` the row is ``terminated`` or ``truncated`` and has its
      ``final_obs`` and ``final_info``; unless ``t == T`` it is not reset, so the observation
      returned for it is that final observation. In steps ``t+1 .. T`` it waits. At step ``T``
      the group is reset within the step: the observation returned for every row of the group is
      the first of its new episode, and the step's infos give their ``"prompt"``,
      ``"prompt_index"`` and ``"group"``. Its action at step ``T+1`` is used. **A step is a
      transition of a row iff** ``waiting`` **is False for it in that step**; an agent trains on
      those and skips the rest (with ``G = 1``: every step).
    - ``"next_step"``: at step ``t`` the row is ``terminated`` or ``truncated`` (its final info is
      in the step's infos). In steps ``t+1 .. T`` it waits. Step ``T+1`` is the autoreset step of
      the whole group, as for one sub-env: every row of the group ignores its action and returns
      the first observation of its new episode, with reward 0.0, both flags False, ``waiting``
      False, and ``"prompt"``, ``"prompt_index"`` and ``"group"`` in the infos. **A row's action
      at step s is used iff the row was neither done nor waiting at step s-1**: mask step ``s``
      with ``terminated | truncated | waiting`` of step ``s-1`` (with ``G = 1``: the usual
      ``terminated | truncated``).

    In both modes a returned observation is the first of an episode iff nothing has been generated
    in it (``attention_mask[:, P] == 0``, ``P = prompt_window``), and an observation changes only
    by appending the row's own action or by a reset, so a per-row KV cache stays valid through a
    wait. Gymnasium's ``RecordEpisodeStatistics`` counts the steps a row waits into the length of
    its next episode (returns stay exact: a wait earns 0.0); an episode's generated length is
    ``attention_mask[P:].sum()`` of its final observation.

    ## Reset
    ``reset(seed=s)`` seeds group ``k``'s generator with ``s + k`` (sub-env ``i``'s with ``s + i``
    when ``G = 1``, as ``SyncVectorEnv``); a list of seeds has one entry per group
    (``num_envs / group_size``; ``None`` keeps that group's generator). ``options`` may hold:

    - ``"reset_mask"``: an (N,) bool NumPy array, the rows to reset (Gymnasium's option); with
      ``G > 1`` it must cover whole groups. Rows not reset keep their episode, or their wait.
    - ``"prompt_index"``: the prompt of the rows reset, instead of a draw from their generator
      (which is then not advanced): one integer for all of them, or one per row as a list, NumPy
      array or tensor of integers of shape ``(N,)`` (entries of rows not reset are ignored) or
      ``(number of rows reset,)``. Each is in ``[0, num_prompts)``, and every row of a group gets
      the same. With ``G = 1`` an integer does what ``options={"prompt_index": i}`` does on every
      sub-env of a ``SyncVectorEnv``.

    ``reset`` returns, for the rows reset, ``"prompt"``, ``"prompt_index"`` and ``"group"`` in
    its infos (every row's with ``stable_info``).

    :attr:`host_view` gives what the host knows of every row without reading the device (each
    row's generated length, prompt index and prompt length, and the last step's flags and waits):
    an agent on a GPU acts from it, and a step then reads the device once, and once more where
    episodes end.

    :meth:`get_state` and :meth:`set_state` save and restore the episodes in flight, waits
    included, for a checkpoint that resumes exactly.

    ```python
    venv = gym.make_vec("TextGen-v0", num_envs=8, group_size=4, autoreset_mode="same_step")
    obs, infos = venv.reset(seed=0)  # rows 0-3 share one prompt, rows 4-7 another
    obs, infos = venv.reset(options={"prompt_index": [2, 2, 2, 2, 5, 5, 5, 5]})
    ```
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
        group_size: int = 1,
        text_infos: bool = True,
    ):
        if not is_positive_int(num_envs):
            raise ValueError(f"num_envs must be an integer >= 1 (Python or NumPy), got {describe(num_envs)}")
        if not is_positive_int(group_size):
            raise ValueError(
                f"group_size must be an integer >= 1 (Python or NumPy), got {describe(group_size)}"
            )
        if num_envs % group_size:
            raise ValueError(
                f"num_envs={int(num_envs)} is not a multiple of group_size={int(group_size)}: rows "
                f"[k*group_size, (k+1)*group_size) form group k; use a num_envs divisible by {int(group_size)}"
            )
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
        self.group_size = int(group_size)
        self.num_groups = self.num_envs // self.group_size
        self.device = resolve_device(device)
        self.autoreset_mode = modes[mode]
        self.metadata = {**type(self).metadata, "autoreset_mode": self.autoreset_mode}
        self.array_type = array_type
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
        self._core = TextGenCore(self.config, self.num_envs, self.device, self.text_infos)
        self.single_observation_space = observation_space(self.config)
        self.single_action_space = spaces.Discrete(self.tokenizer.vocab_size)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        # One generator per group (per sub-env when group_size=1, as in SyncVectorEnv).
        self._rngs: list[np.random.Generator] | None = None
        self._group = np.arange(self.num_envs) // self.group_size  # (N,) group of each row
        # Host-side bookkeeping, (N,) bool: the step already brings the finished rows to the host,
        # so these cost no device synchronisation. ``_ended``: rows holding an ended episode (not
        # reset since); ``_autoreset``: next_step rows to reset at the start of the next step.
        self._ended = np.zeros(self.num_envs, dtype=bool)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        # Rows that must be reset before they are stepped: all before the first reset(), and all
        # after a reward model failed (the failed step may have ended any of them).
        self._needs_reset = np.ones(self.num_envs, dtype=bool)
        # The last step's flags and waits, as the host has them (see host_view).
        self._flags = (np.zeros(self.num_envs, dtype=bool), np.zeros(self.num_envs, dtype=bool))
        self._waiting = np.zeros(self.num_envs, dtype=bool)
        self._step_seconds = 0.0

    # ------------------------------------------------------------------------------------ reset
    def reset(
        self,
        *,
        seed: int | Sequence[int | None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        N, G, n_groups = self.num_envs, self.group_size, self.num_groups
        if seed is None:
            seeds: list[int | None] = [None] * n_groups
        elif is_integer(seed):
            first = check_seed(seed)
            assert first is not None
            seeds = [first + k for k in range(n_groups)]
            self._np_random, self._np_random_seed = seeding.np_random(first)
        elif isinstance(seed, Sequence | np.ndarray) and not isinstance(seed, str | bytes):
            seeds = [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]
            if len(seeds) != n_groups:
                expected = (
                    f"num_envs={N} entries"
                    if G == 1
                    else f"one entry per group, num_envs={N} / group_size={G} = {n_groups} entries"
                )
                raise ValueError(f"seed: a list of seeds must have {expected}, got {len(seeds)}")
        else:
            raise TypeError(
                f"seed must be None, an int or a list of {n_groups} ints/None (one per group), got "
                f"{describe(seed)}"
            )
        options = options or {}
        unknown = sorted(set(options) - {"reset_mask", "prompt_index"})
        if unknown:
            raise ValueError(
                f"unsupported reset options {unknown}; the vector env accepts 'reset_mask' and 'prompt_index'"
            )
        mask = np.ones(N, dtype=bool)
        if "reset_mask" in options:
            mask = options["reset_mask"]
            if not isinstance(mask, np.ndarray) or mask.shape != (N,) or mask.dtype != np.bool_:
                raise ValueError(
                    f"options['reset_mask'] must be a bool numpy array of shape ({N},), got {mask!r}"
                )
            by_group = mask.reshape(n_groups, G)  # (groups, G)
            partial = np.flatnonzero(by_group.any(1) & ~by_group.all(1))
            if partial.size:
                k = int(partial[0])
                raise ValueError(
                    f"options['reset_mask'] must reset whole groups of group_size={G} rows; group {k} "
                    f"(rows {k * G}..{k * G + G - 1}) is partly masked: {by_group[k].tolist()}"
                )
        rows = np.flatnonzero(mask)
        chosen = self._check_prompt_index(options.get("prompt_index"), rows)
        group_mask = mask[::G]  # (groups,): mask covers whole groups
        if self._rngs is None:
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        else:
            for k, s in enumerate(seeds):
                if s is not None and group_mask[k]:
                    self._rngs[k] = seeding.np_random(s)[0]
        prompt_index = self._reset_rows(rows, chosen)
        self._autoreset[mask] = False
        self._ended[mask] = False
        self._needs_reset[mask] = False
        # New arrays: the old ones may be a step's returned flags or waits.
        self._flags = (self._flags[0] & ~mask, self._flags[1] & ~mask)
        self._waiting = self._waiting & ~mask
        infos = self._stable_infos() if self.stable_info else self._prompt_infos(rows, prompt_index)
        if G > 1:
            self._add_waiting(infos, np.zeros(N, dtype=bool))
        return self._obs(), infos

    def _check_prompt_index(self, value: Any, rows: np.ndarray) -> np.ndarray | None:
        """``options["prompt_index"]`` as one int64 prompt index per row of ``rows`` (k,), or None."""
        if value is None:
            return None
        N, G, n = self.num_envs, self.group_size, self._core.num_prompts
        k = len(rows)
        shapes = (
            f"shape ({N},)" if k == N else f"shape ({N},) (entries of rows not reset are ignored) or ({k},)"
        )
        accepted = (
            f"accepted: one integer in [0, {n}) for every row reset, or integers in [0, {n}) of {shapes}, "
            "as a list, numpy array or tensor"
        )
        if is_integer(value):
            if not 0 <= value < n:
                raise ValueError(
                    f"options['prompt_index'] = {int(value)} is not a prompt index in [0, {n}) (the env has "
                    f"{n} prompts)"
                )
            return np.full(k, int(value), dtype=np.int64)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, list | tuple):
            bad = next((i for i, v in enumerate(value) if not is_integer(v)), None)
            if bad is not None:
                raise TypeError(
                    f"options['prompt_index'][{bad}] is {describe(value[bad])}, not an integer; {accepted}"
                )
            values = np.empty(len(value), dtype=object)  # Python ints, checked before any cast
            values[:] = [int(v) for v in value]
        else:
            values = np.asarray(value)
            if values.dtype.kind not in "iu":
                raise TypeError(
                    f"options['prompt_index'] must be integers, got {describe(value)}; {accepted}"
                )
        if values.ndim == 0:
            values = np.full(k, values[()])
        elif values.shape == (N,):
            values = values[rows]
        elif values.shape != (k,):
            raise ValueError(f"options['prompt_index'] has shape {values.shape}; {accepted}")
        # Range checked before any cast, so a huge unsigned index is reported as given.
        bad_rows = np.flatnonzero((values < 0) | (values >= n))
        if bad_rows.size:
            j = int(bad_rows[0])
            raise ValueError(
                f"options['prompt_index'] gives sub-env {int(rows[j])} the prompt index {int(values[j])}, "
                f"not in [0, {n}) (the env has {n} prompts)"
            )
        values = values.astype(np.int64)
        if G > 1:
            by_group = values.reshape(-1, G)  # (groups reset, G)
            split = np.flatnonzero((by_group != by_group[:, :1]).any(1))
            if split.size:
                j = int(split[0])
                g = int(rows[j * G]) // G
                raise ValueError(
                    f"options['prompt_index'] must give every row of a group the same prompt "
                    f"(group_size={G}); group {g} (rows {g * G}..{g * G + G - 1}) got {by_group[j].tolist()}"
                )
        return values

    def _reset_rows(self, rows: np.ndarray, prompt_index: np.ndarray | None = None) -> np.ndarray:
        """Start new episodes in ``rows`` (k,), sorted whole groups, on ``prompt_index`` (k,) or on
        one prompt per group drawn from the group's generator; returns the prompt indices (k,)."""
        assert self._rngs is not None
        if prompt_index is None:
            G = self.group_size
            drawn = self._core.sample_prompts([self._rngs[g] for g in self._group[rows[::G]].tolist()])
            prompt_index = np.repeat(np.asarray(drawn, dtype=np.int64), G)  # (k,)
        self._core.reset(rows, prompt_index)
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
        acts, out_of_range = self._check_actions(actions)
        if out_of_range is not None and self._autoreset.any():
            # next_step resets rows before it steps: a refused step must not have begun.
            self._refuse(actions, out_of_range)
            out_of_range = None
        N, G = self.num_envs, self.group_size
        infos: dict[str, Any] = {}
        # Rows that begin the step holding an ended episode ignore their action: next_step's
        # autoreset rows (reset now) and the rows waiting for the rest of their group.
        held = self._ended
        waiting = held & ~self._autoreset
        if self._autoreset.any():  # next_step only: same_step resets within the step
            rows = np.flatnonzero(self._autoreset)
            prompt_index = self._reset_rows(rows)
            if not self.stable_info:
                infos = self._prompt_infos(rows, prompt_index)
            self._autoreset = np.zeros(N, dtype=bool)
        active = ~held if held.any() else None

        try:
            result = self._core.step(acts, active, None if out_of_range is None else out_of_range.any())
        except Exception:
            self._needs_reset[:] = True
            raise
        if result is None:  # an action out of range: the core undid the step
            assert out_of_range is not None
            self._refuse(actions, out_of_range)
        finished = result.finished_rows
        self._waiting = waiting.copy()  # infos["waiting"] is the caller's
        ended = waiting | _mask(finished, N)  # (N,) rows holding an ended episode now
        # (N,) rows of the groups whose every episode has ended: reset now or at the next step
        complete = ended.reshape(-1, G).all(1).repeat(G) if G > 1 else ended

        if self.autoreset_mode is AutoresetMode.NEXT_STEP:
            self._ended, self._autoreset = ended, complete
            if self.stable_info:  # the rows that ended still hold their episode: its final values
                infos = self._stable_infos(*self._components(finished, result))
            else:
                _add(infos, self._final_infos(finished, result), finished, N)
        else:
            if finished.size or self.stable_info:
                infos["final_obs"] = self._obs(rows=result.finished)
                infos["final_info"] = self._final_infos(finished, result)
                infos["_final_obs"] = infos["_final_info"] = _mask(finished, N)
            # A group completes only in a step where one of its rows ends: none without `finished`.
            reset = np.flatnonzero(complete) if finished.size else finished
            prompt_index = self._reset_rows(reset) if reset.size else reset
            self._ended = ended & ~complete
            if self.stable_info:  # the rows that were reset hold new episodes now
                infos.update(self._stable_infos())
            else:
                _add(infos, self._prompt_infos(reset, prompt_index), reset, N)
        if G > 1:
            self._add_waiting(infos, waiting)

        rewards, terminated, truncated = result.reward, result.terminated, result.truncated
        self._flags = (result.terminated_host, result.truncated_host)
        if self.array_type == "numpy":
            terminated, truncated = (flags.copy() for flags in self._flags)  # the caller's to change
            rewards = rewards.cpu().numpy()
        obs = self._obs()
        self._step_seconds += time.perf_counter() - start
        return obs, rewards, terminated, truncated, infos

    def _check_actions(self, actions: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``actions`` as (N,) int64 on the device, and for a tensor the (N,) bool of its entries
        out of range, which the step reads with its flags (None: checked here, on the host)."""
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
        if isinstance(values, torch.Tensor):  # read with the step's flags: no read of its own
            return values.to(device=self.device, dtype=torch.long), out_of_range.to(self.device)
        self._refuse(values, out_of_range)
        return to_device(values.astype(np.int64, copy=False), self.device), None

    def _refuse(self, actions: Any, out_of_range: torch.Tensor | np.ndarray) -> None:
        """Raise the error of the first action flagged in ``out_of_range`` (N,), if any (a tensor
        or a NumPy array, as ``actions``)."""
        if out_of_range.any():
            i = int(out_of_range.nonzero()[0][0])
            raise ValueError(
                f"actions[{i}] = {int(actions[i])} (sub-env {i}) is not a token id in "
                f"[0, {self.tokenizer.vocab_size})"
            )

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

    def _prompt_infos(self, rows: np.ndarray, prompt_index: np.ndarray) -> dict[str, Any]:
        """The reset info of ``rows`` (k,) started on ``prompt_index`` (k,), masked over sub-envs."""
        infos: dict[str, Any] = {}
        if len(rows):
            N = self.num_envs
            prompts, index, group = (
                np.empty(N, dtype=object),
                np.zeros(N, dtype=np.int64),
                np.zeros_like(self._group),
            )
            index[rows], group[rows] = prompt_index, self._group[rows]
            m = _mask(rows, N)
            if self.text_infos:
                prompts[rows] = [self.config.prompts[i] for i in prompt_index.tolist()]
                infos.update({"prompt": prompts, "_prompt": m})
            infos.update({"prompt_index": index, "_prompt_index": m, "group": group, "_group": m})
        return infos

    def _components(self, rows: np.ndarray, result: Any) -> tuple[np.ndarray, np.ndarray]:
        """(N,) score and (N,) summed length penalty: the episodes' that ended in ``rows``, else 0."""
        score, penalty = np.zeros(self.num_envs), np.zeros(self.num_envs)
        score[rows] = result.scores
        penalty[rows] = 0.0 - self.config.length_penalty * result.lengths
        return score, penalty

    def _final_infos(self, rows: np.ndarray, result: Any) -> dict[str, Any]:
        """The info a single env gives at an episode's end, as masked arrays over sub-envs, with the
        episode's ``prompt_index`` and ``group``.

        With ``stable_info`` the keys are there even if no episode ended, with ``""``, 0.0 and 0
        (masked out) for sub-envs whose episode did not end."""
        N = self.num_envs
        if not rows.size and not self.stable_info:
            return {}
        prompts = completions = None
        if self.text_infos:
            fill = "" if self.stable_info else None
            prompts, completions = np.full(N, fill, dtype=object), np.full(N, fill, dtype=object)
            prompts[rows], completions[rows] = result.prompts, result.completions
        index, group = np.zeros(N, dtype=np.int64), np.zeros_like(self._group)
        index[rows], group[rows] = result.prompt_index, self._group[rows]
        return _info_arrays(
            prompts, completions, index, group, *self._components(rows, result), _mask(rows, N)
        )

    def _stable_infos(
        self, score: np.ndarray | None = None, penalty: np.ndarray | None = None
    ) -> dict[str, Any]:
        """Every sub-env's current episode: prompt, text so far, prompt index, group and
        ``score``/``penalty`` (0 if None)."""
        N = self.num_envs
        prompts, completions = np.empty(N, dtype=object), np.empty(N, dtype=object)
        prompts[:], completions[:] = self._core.texts()
        zeros = np.zeros(N)
        return _info_arrays(
            prompts,
            completions,
            self._core.prompt_index_host.copy(),
            self._group.copy(),
            zeros if score is None else score,
            zeros.copy() if penalty is None else penalty,
            np.ones(N, dtype=bool),
        )

    def _add_waiting(self, infos: dict[str, Any], waiting: np.ndarray) -> None:
        """``infos["waiting"]``: (N,) bool, as numpy or torch per ``array_type``; all-True mask."""
        infos["waiting"] = to_device(waiting, self.device) if self.array_type == "torch" else waiting
        infos["_waiting"] = np.ones(self.num_envs, dtype=bool)

    # ------------------------------------------------------------------------------ checkpoints
    def get_state(self) -> dict[str, Any]:
        """The episodes in flight, for a checkpoint: CPU tensors and plain dicts (``torch.save``
        and ``torch.load(weights_only=True)`` take it): every row's tokens, mask, generated length
        and prompt index, the rows that hold an ended episode or await a reset, and the state of
        every group's generator. :meth:`set_state` on an env of the same arguments continues
        exactly: the same actions then give the same observations, rewards, flags and infos."""
        core = self._core
        return {
            "num_envs": self.num_envs,
            "group_size": self.group_size,
            "tokens": core.tokens.to("cpu", copy=True),
            "mask": core.mask.to("cpu", copy=True),
            "gen_len": core.gen_len.to("cpu", copy=True),
            "prompt_index": core.prompt_index.to("cpu", copy=True),
            "ended": torch.from_numpy(self._ended.copy()),
            "autoreset": torch.from_numpy(self._autoreset.copy()),
            "needs_reset": torch.from_numpy(self._needs_reset.copy()),
            "rngs": None if self._rngs is None else [g.bit_generator.state for g in self._rngs],
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`get_state` returned (from an env with the same arguments)."""
        mine = (self.num_envs, self.group_size, self._core.seq_len)
        theirs = (state["num_envs"], state["group_size"], state["tokens"].shape[1])
        if theirs != mine:
            raise ValueError(
                "state is of an env with (num_envs, group_size, seq_len) = "
                f"{theirs}, this env has {mine}; restore it into an env made with the same arguments"
            )
        self._core.load(state["tokens"], state["mask"], state["gen_len"], state["prompt_index"])
        self._ended = state["ended"].numpy().copy()
        self._autoreset = state["autoreset"].numpy().copy()
        self._needs_reset = state["needs_reset"].numpy().copy()
        # No step since: host_view's last-step flags read as after a reset.
        self._flags = (np.zeros(self.num_envs, dtype=bool), np.zeros(self.num_envs, dtype=bool))
        self._waiting = np.zeros(self.num_envs, dtype=bool)
        if state["rngs"] is None:
            self._rngs = None
        else:
            self._rngs = []
            for saved in state["rngs"]:
                bits = getattr(np.random, saved["bit_generator"])()  # PCG64, as Gymnasium's seeding
                bits.state = saved
                self._rngs.append(np.random.Generator(bits))

    def action_masks(self) -> Any:
        """(num_envs, vocab_size) bool: the tokens each sub-env's agent may emit, as numpy or
        torch per ``array_type``. The mask comes from the ``allowed_tokens`` argument and is the same
        at every step."""
        mask = np.broadcast_to(self.config.action_mask, (self.num_envs, self.config.action_mask.size))
        if self.array_type == "torch":
            return torch.as_tensor(mask.copy(), device=self.device)
        return mask.copy()

    @property
    def host_view(self) -> HostView:
        """What the host knows of every row without reading the device (copies, (N,) NumPy
        arrays; see :class:`HostView`). An agent on a GPU drives its acting loop from it: which
        rows start an episode, how far each has got, which ended, with no device read of its own
        (the step reads the device once, and once more in a step where episodes end)."""
        core = self._core
        return HostView(
            core.gen_len_host.copy(),
            core.prompt_index_host.copy(),
            core.prompt_lengths[core.prompt_index_host],
            self._flags[0].copy(),
            self._flags[1].copy(),
            self._waiting.copy(),
        )

    @property
    def timings(self) -> dict[str, float]:
        """Seconds spent so far: in ``step`` in all, and within it decoding text and in the reward model."""
        return {"step": self._step_seconds, **self._core.timings}

    def render(self) -> tuple[str, ...] | None:
        if self.render_mode != "ansi":
            return None
        return tuple(" | ".join(self._core.text(i)) for i in range(self.num_envs))

    @property
    def num_prompts(self) -> int:
        """Number of prompts: a ``prompt_index`` is in ``[0, num_prompts)`` (``env.config.prompts``)."""
        return self._core.num_prompts

    @property
    def prompt_window(self) -> int:
        """``P``: generated token t is in observation column ``P + t``."""
        return self.config.max_prompt_tokens


class HostView(NamedTuple):
    """:attr:`TextGenVectorEnv.host_view`: the rows as the host knows them, (N,) NumPy arrays."""

    generated: np.ndarray  #: int64: tokens generated in the episode each row holds (0: it has just started)
    prompt_index: np.ndarray  #: int64: the prompt of the episode each row holds
    prompt_length: np.ndarray  #: int64: its prompt's tokens (``<bos>`` included)
    terminated: np.ndarray  #: bool: the last step's ``terminated`` (False after ``reset``)
    truncated: np.ndarray  #: bool: the last step's ``truncated`` (False after ``reset``)
    waiting: np.ndarray  #: bool: the last step's ``infos["waiting"]`` (all False when ``group_size=1``)


def _info_arrays(
    prompts: np.ndarray | None,
    completions: np.ndarray | None,
    prompt_index: np.ndarray,
    group: np.ndarray,
    score: np.ndarray,
    penalty: np.ndarray,
    m: np.ndarray,
) -> dict[str, Any]:
    """The single env's end-of-episode info, with the episode's prompt index and group, as
    Gymnasium vector arrays, each masked by ``m``; without ``"prompt"`` and ``"completion"``
    where they are None (``text_infos=False``)."""
    text = (
        {}
        if prompts is None
        else {"prompt": prompts, "_prompt": m, "completion": completions, "_completion": m}
    )
    return {
        **text,
        "prompt_index": prompt_index,
        "_prompt_index": m,
        "group": group,
        "_group": m,
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
