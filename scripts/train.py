"""Train an agent on TextGen-v0 and print what it generates.

    python scripts/train.py                                   # custom PPO, default task, 50k env steps: about 20 s on 2 CPU cores
    python scripts/train.py --agent ppo --task keyword --total-timesteps 100000 --device cuda
    python scripts/train.py --agent grpo --agent-config '{"group_size": 8, "n_epochs": 4, "num_minibatches": 4}'
    python scripts/train.py --agent grpo --agent-config '{"scale_rewards": false, "loss_aggregation": "constant"}'   # Dr. GRPO
    python scripts/train.py --agent rloo --task arithmetic --init-policy lm.pt --agent-config '{"beta": 0.05}'
    python scripts/train.py --agent sb3-ppo --env-kwargs '{"reward": {"name": "length", "target": 4}}'
    python scripts/train.py --agent sb3-maskable-ppo --env-kwargs '{"allowed_tokens": ["great", "good", "bad"]}'
    python scripts/train.py --agent sb3-a2c --hyperparams '{"n_steps": 16}' --extractor mlp
    python scripts/train.py --policy seq2seq                  # an encoder-decoder policy of about the same size
    python scripts/train.py --agent sb3-recurrent-ppo --task translate --total-timesteps 100000
    python scripts/train.py --task sentiment --policy-model path/to/causal_lm   # a local Hugging Face model
    python scripts/train.py --task sentiment --policy-model path/to/causal_lm --hf-config '{"dtype": "bfloat16", "lora_rank": 16}' --ppo-config '{"micro_batch_size": 8}'
    python scripts/train.py --resume runs/ppo_default_s0_<time>/checkpoint.pt
    python scripts/train.py --resume runs/ppo_default_s0_<time>/checkpoint.pt --total-timesteps 100000
    torchrun --standalone --nproc_per_node=2 scripts/train.py --agent ppo --num-envs 128   # 64 envs per process
    tensorboard --logdir runs

Each run writes into ``<logdir>/<agent>_<task>_s<seed>_<time>/``: ``config.json`` (every setting of
the run), TensorBoard events under Stable-Baselines3's tags (``rollout/ep_rew_mean``,
``train/approx_kl``, ...; x axis = env steps), and the model, written atomically: ``checkpoint.pt``
for the custom agents ``ppo``, ``grpo`` and ``rloo`` (model, optimizer, config, step, RNG and
environment state), ``model.zip`` for SB3 agents. Before training the script measures the random policy's mean episode reward and afterwards
the trained agent's greedy one, on the same evaluation episodes, and prints sample generations.
Every argument is checked before any work starts or any directory is made.

Training runs in whole rollouts (``n_steps`` x ``--num-envs`` env steps: 32 x 16 = 512 for ``ppo``
by default), so it stops at the first multiple at or past ``--total-timesteps``: 50,000 asked
trains 50,176. The summary says so.

``grpo`` and ``rloo`` (``agents.grpo``: GRPO, with the Dr. GRPO correction as an option, and RLOO)
sample ``group_size`` completions of every prompt (``--num-envs`` must be a multiple of it) and
judge each against the others of its prompt, without a critic. Their settings are
``--agent-config`` (``agents.grpo.GRPOConfig`` or ``RLOOConfig`` fields); a rollout runs one
episode per env row, until every group has ended (at most ``max_new_tokens`` x ``--num-envs`` env
steps), so it ends at the first rollout end at or past ``--total-timesteps``.

TensorBoard, beside the training curves (every agent): ``eval/mean_reward`` (the greedy evaluation
after training, at the last env step), ``eval/mean_reward_random`` (the random policy on the same
episodes, at step 0), text ``eval/samples`` (the evaluation's samples), ``run/config`` (config.json)
and ``config`` (the agent's hyperparameters; the custom PPO also logs training samples under
``samples``), and an HParams entry (agent, task, seed, env kwargs, num envs, total timesteps) with
``eval/mean_reward`` as its metric, in TensorBoard's HPARAMS tab.

On the default task the trained samples are often "best best best ...": the reward is a word
lexicon's sentiment and the policy found its highest-valence word. That is reward hacking, and
the script says so; ``scripts/pipeline.py`` shows the remedy (pretraining, then PPO with a KL
penalty to the pretrained policy).

``--policy seq2seq`` gives ``ppo``, ``grpo`` and ``rloo`` an encoder-decoder policy
(``agents.seq2seq``: the encoder reads the prompt, the decoder the completion, with cross-attention)
of about the decoder-only policy's parameter count: half the layers (at least one) in the
encoder, the rest in the decoder, the width chosen to match. Exact sizes go in the config instead,
e.g. ``--ppo-config '{"policy": {"architecture": "seq2seq", "d_model": 60, "n_layers": 1,
"encoder_layers": 1}}'``.

SB3 agents (``sb3-ppo``, ``sb3-a2c``, ``sb3-maskable-ppo``) use the custom agent's Transformer as
their features extractor and hyperparameters matched to ``PPOConfig``'s defaults (see
``agents.baselines``); ``--extractor mlp`` gives SB3's default MLP, ``--vec-env dummy`` trains on
SB3's ``DummyVecEnv`` of single envs instead of the batched env. ``sb3-recurrent-ppo``
(sb3-contrib's ``RecurrentPPO``, ``MlpLstmPolicy``) sees one new token per step instead of the
whole history: the prompt window (fixed through the episode), the last token emitted (the prompt's
last token at step 0) and the step number, embedded (``agents.recurrent``); its LSTM carries the
rest. ``--extractor`` does not apply to it.

``--policy-model DIR`` (the ``textgym[hf]`` extra) makes the ``ppo`` policy a Hugging Face causal LM
saved in ``DIR`` with a value head (``agents.hf.HFPolicy``); the env reads text with the model's
tokenizer from the same directory unless ``--env-kwargs`` names another ``tokenizer``. Nothing is
downloaded: ``DIR`` is a directory written by ``save_pretrained``. ``--hf-config`` (with
``--policy-model`` only) sets how that model is loaded and trained (``agents.hf.HFConfig``):
bfloat16 weights or autocast, LoRA adapters (the ``textgym[lm]`` extra, peft) with the KL reference
computed by the same model with its adapters off, and activation checkpointing. Memory in the update
is bounded with ``--ppo-config '{"micro_batch_size": N}'`` (N sequences per forward/backward pass,
gradients accumulated over the minibatch).

Threads: ``--threads`` defaults to 1 for the built-in policy and to torch's default (one per core)
with ``--policy-model``. On an idle 2-core CPU a second thread trains the built-in policy about
1.2x faster (5,700 against 4,700 env steps/s), but torch's threads spin-wait for cores that other
processes hold: beside one busy process per core the main job ran 3.9-5.6x slower with torch's
default, and 1.4x slower with one thread (``python scripts/benchmark.py busy``). One thread never
falls off that cliff; ``--threads 0`` takes torch's default on a machine of your own.

Distributed: launched by ``torchrun`` (``--standalone --nproc_per_node=K``, or ``--nnodes`` with a
rendezvous endpoint), ``ppo``, ``grpo`` and ``rloo`` train data-parallel (``agents.distributed``): each
process runs ``--num-envs / K`` of the envs (``--num-envs`` counts all processes together, so a
rollout holds as many env steps as in one process; it must be a multiple of K, for ``grpo`` and
``rloo`` of K x ``group_size``), on the CPU with gloo or on its own GPU with nccl, and the
gradients are summed across processes so that every process holds the same weights. Rank 0 alone
evaluates, prints, and writes config.json, TensorBoard and the checkpoint (with every process's env
and RNG state); ``--resume`` needs the same number of processes. Without torchrun nothing of this
runs.

Ctrl-C stops training, saves a checkpoint (``ppo``, ``grpo``, ``rloo``) or the model (SB3) and
flushes the logs.

Resuming: ``--resume CHECKPOINT`` continues a ``ppo``, ``grpo`` or ``rloo`` run where its checkpoint
left it, in the same run directory and TensorBoard run. The run's settings come from the checkpoint
and the ``config.json`` beside it: --agent, --task, --env-kwargs, --ppo-config, --agent-config,
--hyperparams, --extractor,
--vec-env, --init-policy, --policy-model, --hf-config, --policy, --num-envs, --seed and --logdir are refused
unless they repeat the run's own values. ``--total-timesteps N`` sets the run's new total: training
continues until N env steps in all (N below the steps already done is refused); without it, the run trains
to the total it was started with. --device, --threads, --eval-episodes, --checkpoint-interval and
--no-progress apply to the resumed session.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import textgym  # noqa: F401  (registers TextGen-v0)
from agents import distributed
from agents.baselines import (
    EXTRACTORS,
    SB3_AGENTS,
    VEC_ENVS,
    evaluate,
    greedy_policy,
    hyperparams_error,
    log_evaluation,
    make_sb3_model,
    repeated_word,
    sb3_hyperparameters,
)
from agents.grpo import GRPO, RLOO
from agents.hf import HFConfig
from agents.on_policy import OnPolicyAgent
from agents.ppo import PPO, PPOConfig
from agents.runtime import (
    HelpFormatter,
    add_threads_argument,
    default_threads,
    device_error,
    explicit_options,
    json_value,
    make_dir,
    output_dir_error,
    seed,
    set_threads,
)
from agents.seq2seq import seq2seq_config_like
from textgym.io import write_json
from textgym.nn import ARCHITECTURES
from textgym.tasks import TASKS, env_arguments_error, make_env_config

CUSTOM_AGENTS: dict[str, type[OnPolicyAgent]] = {"ppo": PPO, "grpo": GRPO, "rloo": RLOO}
SB3_NUM_ENVS = 64
"""The SB3 agents' --num-envs default: their settings match PPO's of 64 envs x 32 steps."""
GROUP_AGENTS = ("grpo", "rloo")
AGENTS = (*CUSTOM_AGENTS, *SB3_AGENTS)
# The options that make the run what it is: on --resume they come from its config.json.
RUN_OPTIONS = (
    "agent", "task", "env_kwargs", "ppo_config", "agent_config", "hyperparams", "extractor", "vec_env",
    "init_policy", "policy_model", "hf_config", "num_envs", "seed", "logdir", "policy",
)  # fmt: skip
NOT_SAVED = ("no_progress", "ppo", "group", "hf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--agent",
        choices=AGENTS,
        default="ppo",
        help="which agent to train (sb3-recurrent-ppo: an LSTM policy that sees the prompt, the last "
        "token and the step, one new token per step)",
    )
    parser.add_argument("--task", default="default", help=f"built-in task: default, {', '.join(TASKS)}")
    parser.add_argument(
        "--env-kwargs",
        type=json_value,
        default={},
        help="JSON object of further environment arguments, e.g. '{\"max_new_tokens\": 12}'",
    )
    parser.add_argument(
        "--ppo-config",
        type=json_value,
        default={},
        help="JSON object of PPOConfig fields for --agent ppo, e.g. '{\"n_steps\": 64}'",
    )
    parser.add_argument(
        "--agent-config",
        type=json_value,
        default={},
        help="JSON object of agents.grpo.GRPOConfig fields for --agent grpo, RLOOConfig fields for --agent "
        'rloo, e.g. \'{"group_size": 8, "beta": 0.04}\'',
    )
    parser.add_argument(
        "--hyperparams",
        type=json_value,
        default={},
        help="JSON object of SB3 constructor arguments for sb3-* agents, e.g. '{\"n_steps\": 16}' "
        "(over agents.baselines.DEFAULT_HYPERPARAMS)",
    )
    parser.add_argument(
        "--extractor",
        choices=EXTRACTORS,
        default="transformer",
        help="sb3-* agents but sb3-recurrent-ppo (always its LSTM): policy network",
    )
    parser.add_argument(
        "--vec-env", choices=VEC_ENVS, default="batched", help="sb3-* agents: batched env or DummyVecEnv"
    )
    parser.add_argument(
        "--init-policy",
        default=None,
        help="ppo, grpo, rloo: language-model checkpoint (scripts/pretrain.py) to start from; with kl_coef "
        "in --ppo-config (beta in --agent-config) it is also the frozen reference of the KL penalty "
        "(default: a random policy)",
    )
    parser.add_argument(
        "--policy-model",
        default=None,
        help="ppo, grpo, rloo: local directory of a Hugging Face causal LM to fine-tune as the policy (the hf "
        "extra); "
        "its tokenizer becomes the env's unless --env-kwargs gives one (default: the built-in Transformer)",
    )
    parser.add_argument(
        "--policy",
        choices=ARCHITECTURES,
        default=None,
        help="ppo, grpo, rloo: the built-in policy's architecture (PolicyConfig.architecture): decoder "
        "(decoder-only Transformer) or seq2seq (an encoder over the prompt, a decoder over the completion); "
        "seq2seq gets about the parameter count of the decoder-only policy that the config's policy fields "
        "give (agents.seq2seq.seq2seq_config_like) unless the config's policy already says seq2seq "
        "(default: the config's, decoder)",
    )
    parser.add_argument(
        "--hf-config",
        type=json_value,
        default={},
        help="ppo, grpo, rloo with --policy-model: JSON object of agents.hf.HFConfig fields, e.g. "
        '\'{"dtype": "bfloat16", "lora_rank": 16}\'; ' + hf_config_fields() + " (default: {}, all defaults)",
    )
    parser.add_argument(
        "--total-timesteps",
        type=int,
        default=None,
        help="env steps (tokens) to train for, rounded up to whole rollouts; with --resume, the run's "
        "new total (default: 50000; with --resume, the run's own total)",
    )
    parser.add_argument(
        "--num-envs",
        type=int,
        default=None,
        help="episodes in flight in the batched env; under torchrun, of all processes together (each runs "
        f"num-envs / WORLD_SIZE of them) (default: {PPO.default_num_envs} for ppo, chosen by a sweep; "
        f"{GRPO.default_num_envs} for grpo and rloo; {SB3_NUM_ENVS} for the SB3 agents; with --resume, "
        "the run's own)",
    )
    parser.add_argument(
        "--seed", type=seed, default=0, help="seed of the agent and the environment, 0 to 2**32-1"
    )
    parser.add_argument("--logdir", default="runs", help="parent directory of the run directory")
    parser.add_argument("--device", default="auto", help="torch device of the agent: auto, cpu, cuda, cuda:N")
    add_threads_argument(parser, policy_model_option=True)
    parser.add_argument(
        "--resume",
        default=None,
        help="checkpoint.pt of a ppo, grpo or rloo run to continue, with its own settings and as many "
        "processes as it had (see above; default: a new run)",
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=int,
        default=10,
        help="ppo, grpo, rloo: also save the checkpoint every this many updates (0: only at the end and on "
        "Ctrl-C)",
    )
    parser.add_argument("--eval-episodes", type=int, default=256, help="episodes of each evaluation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = explicit_options(parser, argv)
    for name in ("env_kwargs", "ppo_config", "agent_config", "hyperparams", "hf_config"):
        if not isinstance(getattr(args, name), dict):
            parser.error(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    for name in ("num_envs", "eval_episodes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.total_timesteps is not None and args.total_timesteps < 1:
        parser.error(f"--total-timesteps must be >= 1, got {args.total_timesteps}")
    if args.checkpoint_interval < 0:
        parser.error(
            f"--checkpoint-interval must be >= 0 (0: save only at the end), got {args.checkpoint_interval}"
        )
    if (problem := device_error(args.device)) is not None:
        parser.error(problem)
    if args.resume is not None:
        _take_settings_of_resumed_run(parser, args, given)
    else:
        if args.num_envs is None:
            args.num_envs = default_num_envs(args.agent)
        _check_new_run(parser, args)
    args.threads = default_threads(args.policy_model) if args.threads is None else args.threads
    return args


def _check_new_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.total_timesteps is None:
        args.total_timesteps = 50_000
    custom = args.agent in CUSTOM_AGENTS
    if args.policy_model is not None:
        if not custom or args.init_policy is not None:
            parser.error(
                "--policy-model applies to a new --agent ppo, grpo or rloo run without --init-policy only"
            )
        model_dir = Path(args.policy_model)
        if not model_dir.is_dir():
            parser.error(f"--policy-model: no directory at {args.policy_model!r} (nothing is downloaded)")
        if not (model_dir / "config.json").is_file():
            parser.error(
                f"--policy-model: {args.policy_model!r} holds no Hugging Face model (no config.json); give a "
                "directory written by save_pretrained"
            )
        if "tokenizer" not in args.env_kwargs:
            if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
                parser.error(
                    f"--policy-model: {args.policy_model!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                    "save the model's tokenizer there too, or name one with --env-kwargs '{\"tokenizer\": ...}'"
                )
            args.env_kwargs = {**args.env_kwargs, "tokenizer": args.policy_model}
    if (problem := env_arguments_error(args.task, args.env_kwargs)) is not None:
        parser.error(problem)
    if args.ppo_config and args.agent != "ppo":
        parser.error("--ppo-config applies to --agent ppo only")
    if args.agent_config and args.agent not in GROUP_AGENTS:
        parser.error(
            "--agent-config applies to --agent grpo and rloo only (--ppo-config for ppo, --hyperparams for sb3-*)"
        )
    if args.hf_config and args.policy_model is None:
        parser.error(
            "--hf-config sets up the Hugging Face policy (dtype, LoRA, checkpointing): give --policy-model too"
        )
    try:
        args.hf = HFConfig.from_dict(args.hf_config) if args.policy_model is not None else None
    except (TypeError, ValueError) as exc:
        parser.error(f"--hf-config: {exc}")
    if args.init_policy is not None and not custom:
        parser.error("--init-policy applies to a new --agent ppo, grpo or rloo run only")
    if args.init_policy is not None and not Path(args.init_policy).is_file():
        parser.error(f"--init-policy: no checkpoint file at {args.init_policy!r}")
    if custom and (args.hyperparams or args.extractor != "transformer" or args.vec_env != "batched"):
        parser.error("--hyperparams, --extractor and --vec-env apply to sb3-* agents only")
    if not custom and (problem := hyperparams_error(args.agent, args.hyperparams, args.num_envs)):
        parser.error(f"--hyperparams: {problem}")
    try:
        args.ppo = PPOConfig.from_dict(args.ppo_config)
    except (TypeError, ValueError) as exc:
        parser.error(f"--ppo-config: {exc}")
    args.group = None
    if args.agent in GROUP_AGENTS:
        try:
            args.group = CUSTOM_AGENTS[args.agent].config_class.from_dict(args.agent_config)
        except (TypeError, ValueError) as exc:
            parser.error(f"--agent-config: {exc}")
        if args.num_envs % args.group.group_size:
            parser.error(
                f"--num-envs {args.num_envs} is not a multiple of group_size {args.group.group_size} "
                "(--agent-config): every group of that many env rows shares one prompt"
            )
    if args.policy is not None:
        _apply_policy_option(parser, args)
    world = distributed.launched_world_size()
    if world > 1:
        if not custom:
            parser.error(f"--agent {args.agent} trains in one process; torchrun runs ppo, grpo and rloo")
        multiple = world * (args.group.group_size if args.group is not None else 1)
        if args.num_envs % multiple:
            shares = f"{world} x group_size {args.group.group_size}" if args.group is not None else str(world)
            parser.error(
                f"--num-envs {args.num_envs} counts the envs of all {world} processes (WORLD_SIZE) together and "
                f"must be a multiple of {shares} = {multiple}, so that each gets the same whole number of "
                f"{'groups' if args.group is not None else 'envs'}"
            )
    if (problem := output_dir_error(args.logdir, "--logdir")) is not None:
        parser.error(problem)


def _apply_policy_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Put ``--policy``'s architecture into the agent's config (``args.ppo`` or ``args.group``)."""
    if args.agent not in CUSTOM_AGENTS or args.policy_model is not None or args.init_policy is not None:
        parser.error(
            "--policy applies to a new --agent ppo, grpo or rloo run with the built-in policy (without "
            "--policy-model or --init-policy, which give decoder-only language models)"
        )
    config = args.ppo if args.agent == "ppo" else args.group
    policy, option = config.policy, "--ppo-config" if args.agent == "ppo" else "--agent-config"
    if policy.architecture == args.policy:
        return
    if policy.architecture != "decoder":
        parser.error(
            f"--policy {args.policy} contradicts {option}, whose policy has architecture {policy.architecture!r}"
        )
    env = make_env_config(args.task, **args.env_kwargs)
    policy = seq2seq_config_like(policy, env.tokenizer.vocab_size, env.seq_len, env.max_prompt_tokens)
    if args.agent == "ppo":
        args.ppo = dataclasses.replace(config, policy=policy)
    else:
        args.group = dataclasses.replace(config, policy=policy)


def _take_settings_of_resumed_run(
    parser: argparse.ArgumentParser, args: argparse.Namespace, given: set[str]
) -> None:
    """Fill ``args`` with the settings of the run being resumed (its config.json), refusing
    explicitly given options that would change them."""
    checkpoint = Path(args.resume)
    if not checkpoint.is_file():
        parser.error(f"--resume: no checkpoint file at {args.resume!r}")
    config_file = checkpoint.resolve().parent / "config.json"
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"--resume: cannot read the run's settings in {str(config_file)!r} ({exc})")
    if saved.get("agent") not in CUSTOM_AGENTS:
        parser.error(
            f"--resume continues {', '.join(CUSTOM_AGENTS)} runs only; {str(config_file)!r} is a "
            f"{saved.get('agent')!r} run"
        )
    saved_world, world = saved.get("world_size", 1), distributed.launched_world_size()
    if saved_world != world:
        parser.error(
            f"--resume: the run was trained by {saved_world} process(es) and this launch has {world}; each "
            f"process continues its own env shard, so resume it with {saved_world} "
            + (
                "(python scripts/train.py, without torchrun)"
                if saved_world == 1
                else "(torchrun: nnodes x nproc_per_node)"
            )
        )
    conflicts = []
    for name in sorted(given & set(RUN_OPTIONS)):
        value, theirs = getattr(args, name), saved.get(name)
        if name == "env_kwargs" and saved.get("policy_model") and isinstance(value, dict):
            value = {"tokenizer": saved["policy_model"], **value}  # as the new run added it
        if name == "logdir" and theirs is not None and Path(value).resolve() == Path(theirs).resolve():
            continue
        if value != theirs:
            conflicts.append(
                f"--{name.replace('_', '-')} {json.dumps(value)} (the run has {json.dumps(theirs)})"
            )
    if conflicts:
        parser.error(
            f"--resume continues the run with its own settings, from {str(config_file)!r}; these options "
            f"would change it: {'; '.join(conflicts)}. Drop them (only --total-timesteps, --device, --threads, "
            "--eval-episodes, --checkpoint-interval and --no-progress apply to a resumed run)"
        )
    for name in RUN_OPTIONS:
        setattr(args, name, saved.get(name, getattr(args, name)))
    args.ppo = args.group = args.hf = None


def default_num_envs(agent: str) -> int:
    """``--num-envs`` when none is given: the custom agent's ``default_num_envs``, else
    :data:`SB3_NUM_ENVS`."""
    return CUSTOM_AGENTS[agent].default_num_envs if agent in CUSTOM_AGENTS else SB3_NUM_ENVS


def hf_config_fields() -> str:
    """HFConfig's fields and defaults, for --hf-config's help."""
    fields = ", ".join(f"{f.name} ({json.dumps(f.default)})" for f in dataclasses.fields(HFConfig))
    return f"fields (defaults): {fields}; lora_rank null trains every weight"


def run_dir_for(args: argparse.Namespace) -> Path:
    return Path(args.logdir) / f"{args.agent}_{args.task}_s{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"


def build_model(args: argparse.Namespace, env_kwargs: dict[str, Any], run_dir: Path) -> Any:
    """The new run's agent (nothing is written yet); SystemExit with the reason if it cannot be made."""
    try:
        if args.agent in CUSTOM_AGENTS:
            return CUSTOM_AGENTS[args.agent](
                "TextGen-v0",
                args.ppo if args.agent == "ppo" else args.group,
                args.num_envs,
                env_kwargs,
                args.device,
                args.seed,
                run_dir,
                verbose=1,
                init_policy=args.init_policy,
                policy_model=args.policy_model,
                hf_config=args.hf,
            )
        return make_sb3_model(
            args.agent,
            env_kwargs,
            args.num_envs,
            args.seed,
            args.device,
            str(run_dir),
            args.hyperparams,
            args.extractor,
            args.vec_env,
        )
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"error: {exc}") from None


def load_for_resume(args: argparse.Namespace, run_dir: Path) -> tuple[OnPolicyAgent, int]:
    """The checkpoint's agent and the run's total target (``--total-timesteps`` or its own)."""
    try:
        model = CUSTOM_AGENTS[args.agent].load(args.resume, device=args.device, tensorboard_log=run_dir)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise SystemExit(f"error: --resume: {exc}") from None
    target = model._target_timesteps if args.total_timesteps is None else args.total_timesteps
    # The run's own total may lie below the steps done (whole rollouts overshoot it): nothing to train.
    if target < model.num_timesteps and target != model._target_timesteps:
        raise SystemExit(
            f"error: --total-timesteps {target:,} is below the {model.num_timesteps:,} env steps the run has "
            "already done; give a total at or above it (it counts from the start of the run)"
        )
    return model, target


def rollout_size(model: Any) -> int | None:
    """Env steps per rollout: training stops at the first multiple of it at or past the target;
    None where rollouts vary (grpo, rloo: until every group has ended)."""
    if isinstance(model, OnPolicyAgent):
        return model._rollout_size()
    return model.n_steps * model.n_envs


def tensorboard_dir(model: Any, run_dir: Path) -> Path:
    if isinstance(model, OnPolicyAgent):
        return Path(model._tb_dir) if model._tb_dir is not None else run_dir / f"{model.algorithm}_1"
    return Path(model.logger.get_dir())


def interrupted_message(model: Any, run_dir: Path) -> str:
    """What Ctrl-C left behind, and how to continue."""
    checkpoint = run_dir / "checkpoint.pt"
    if not isinstance(model, OnPolicyAgent):
        return f"\ninterrupted: saved {run_dir / 'model.zip'}; logs flushed"
    if not checkpoint.is_file():
        return "\ninterrupted before any checkpoint was saved; logs flushed"
    command = f"scripts/train.py --resume {checkpoint}"
    world = distributed.world_size()
    how = f"torchrun with {world} processes in all, as now: {command}" if world > 1 else f"python {command}"
    return f"\ninterrupted: {checkpoint} is the run's last checkpoint; logs flushed. Continue with {how}"


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:  # outside training (evaluation, set-up): nothing to save
        print("\ninterrupted")
        return 130
    finally:
        distributed.close()


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if distributed.launched():  # this process's device, in the process group of a torchrun launch
        args.device = str(distributed.init(args.device))
    main_rank = distributed.is_main()  # rank 0 alone evaluates, prints and writes files
    env_kwargs = {"task": args.task, **args.env_kwargs}
    if args.resume:
        run_dir = Path(args.resume).resolve().parent
        model, target = load_for_resume(args, run_dir)
        if args.total_timesteps is not None and main_rank:  # the run's new total
            saved = json.loads((run_dir / "config.json").read_text())
            write_json(run_dir / "config.json", saved | {"total_timesteps": target})
        args.total_timesteps = target
        remaining, start = max(target - model.num_timesteps, 0), model.num_timesteps
        if main_rank and remaining:
            print(f"resuming at {model.num_timesteps} env steps; {remaining} to go")
        elif main_rank:
            print(
                f"the run has done {model.num_timesteps:,} env steps, its total {target:,} included: nothing "
                "to train (a larger --total-timesteps continues it); evaluating"
            )
    else:
        run_dir = Path(distributed.broadcast_object(str(run_dir_for(args))))  # rank 0's clock names it
        model = build_model(args, env_kwargs, run_dir)
        settings = {k: v for k, v in vars(args).items() if k not in NOT_SAVED} | {
            "run_dir": str(run_dir),
            "world_size": distributed.world_size(),
        }
        if isinstance(model, OnPolicyAgent):
            # every config field, defaults included (an --init-policy's architecture replaces
            # --ppo-config's), so the file alone describes the run
            key = "ppo_config_resolved" if args.agent == "ppo" else "agent_config_resolved"
            settings[key] = model.config.to_dict()
            if model.hf_config is not None:
                settings["hf_config_resolved"] = model.hf_config.to_dict()
        if main_rank:
            make_dir(run_dir, "--logdir")
            write_json(run_dir / "config.json", settings)
        remaining, start = args.total_timesteps, 0
    if main_rank:
        print("run:", json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SAVED}, default=repr))
        random_level = evaluate(None, env_kwargs, args.eval_episodes, args.num_envs)
        print(f"random policy: mean episode reward {random_level['mean']:.3f} ± {random_level['std']:.3f}")
    began = time.perf_counter()
    try:
        if isinstance(model, OnPolicyAgent):
            if remaining:
                model.learn(
                    remaining,
                    progress_bar=not args.no_progress,
                    reset_num_timesteps=not args.resume,
                    checkpoint_path=run_dir / "checkpoint.pt",
                    checkpoint_interval=args.checkpoint_interval,
                )
        else:
            try:
                model.learn(remaining, tb_log_name="tb", log_interval=1, progress_bar=not args.no_progress)
            finally:  # also on Ctrl-C: keep what was learned
                tmp = run_dir / "model.tmp.zip"
                model.save(tmp)
                os.replace(tmp, run_dir / "model.zip")
    except KeyboardInterrupt:
        if main_rank:
            print(interrupted_message(model, run_dir))
        return 130
    seconds = time.perf_counter() - began
    if not main_rank:
        return 0

    trained = evaluate(greedy_policy(model), env_kwargs, args.eval_episodes, args.num_envs)
    steps, trained_now = model.num_timesteps, model.num_timesteps - start
    size = rollout_size(model)
    rounded = ""
    if steps != args.total_timesteps:
        rounded = (
            f" ({args.total_timesteps:,} asked, rounded up to whole rollouts of {size:,})"
            if size is not None
            else f" ({args.total_timesteps:,} asked; a rollout ends when every group has ended)"
        )
    if not trained_now:
        session = ", none in this session"
    else:
        session = "" if trained_now == steps else f"; {trained_now:,} in this session"
        session += f" in {seconds:.1f} s ({trained_now / seconds:,.0f} env steps/s, evaluation excluded)"
    print(f"\ntrained {args.agent}: {steps:,} env steps{rounded}{session}")
    print(
        f"mean episode reward (greedy): random {random_level['mean']:.3f} -> trained {trained['mean']:.3f} "
        f"± {trained['std']:.3f} ({trained['episodes']} episodes)"
    )
    print("\nsample generations (prompt | completion  -> reward):")
    for prompt, completion, reward in trained["samples"]:
        print(f"  {prompt} | {completion}  -> {reward:.3f}")
    word = repeated_word(trained["samples"])
    # The lexicon score is in (-1, 1): above 0.8, nearly every word is one of the highest valence.
    if word is not None and trained["reward_name"] == "sentiment" and trained["mean"] >= 0.8:
        print(
            f"\nnote: the samples repeat {word!r}: this is reward hacking of the lexicon reward. The reward is "
            "the mean sentiment of the completion's words in a word list, so the policy found a word of the "
            "highest valence and repeats it: a near-maximal reward, and no review. The remedy, as in RLHF: "
            "start from a policy that writes text and keep it near that policy. python scripts/pipeline.py "
            "pretrains the policy on the task's corpus, then trains PPO with a KL penalty to the pretrained "
            "policy (and without it, to compare)."
        )

    run_config = json.loads((run_dir / "config.json").read_text())
    hparams = {k: args.__dict__[k] for k in ("agent", "task", "seed", "num_envs", "total_timesteps")}
    hparams["env_kwargs"] = args.env_kwargs
    hparams["overrides"] = {"ppo": args.ppo_config, "grpo": args.agent_config, "rloo": args.agent_config}.get(
        args.agent, args.hyperparams
    )
    agent_config = (
        None if isinstance(model, OnPolicyAgent) else sb3_hyperparameters(args.agent, args.hyperparams)
    )
    log_evaluation(
        tensorboard_dir(model, run_dir), steps, random_level, trained, run_config, hparams, agent_config
    )
    print(f"\nrun directory: {run_dir}   (tensorboard --logdir {args.logdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
