"""Data-parallel training under torchrun (agents/distributed.py), with 2 CPU processes on gloo.

One ``torchrun --standalone --nproc_per_node=2`` launch of tests/agents/distributed_worker.py runs
every scenario (a launch costs seconds of imports); the tests below check its results: identical
weights on both ranks, the two ranks' gradient on two halves of a batch against one process's on
the whole batch, an interrupt on one rank resumed on both, and which files were written. A second
launch has one rank fail; the helpers are checked in one process as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import textgym  # noqa: F401
from agents import GRPO, PPO, GRPOConfig, PPOConfig
from agents import distributed as dist

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")
ENV = {"max_new_tokens": 3}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port of its own) with this checkout first on the path."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    # The time-out only stops a hung launch; nothing here depends on wall-clock time.
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)


def one_process_reference(name: str, out: Path) -> dict:
    """One process collects a rollout on 8 envs, saves it with the initial weights for the ranks,
    and takes an SGD step (lr 1: the gradient) on all of it."""
    if name == "ppo":
        config = PPOConfig(n_steps=4, n_epochs=1, num_minibatches=1, max_grad_norm=1e9)
        model = PPO("TextGen-v0", config, num_envs=8, env_kwargs=ENV, device="cpu", seed=7)
    else:  # token-mean aggregation: the normaliser is the token count of both halves together
        config = GRPOConfig(group_size=2, beta=0.05, loss_aggregation="token", max_grad_norm=1e9)
        model = GRPO("TextGen-v0", config, num_envs=8, env_kwargs=ENV, device="cpu", seed=7)
    model._obs, _ = model.env.reset(seed=7)
    batch = model.collect_rollout()
    weights = {k: v.clone() for k, v in model.policy.state_dict().items()}
    torch.save(
        {"config": config, "num_envs": 8, "weights": weights, "batch": batch}, out / f"{name}_batch.pt"
    )
    model.optimizer = torch.optim.SGD(model._trainable, lr=1.0)
    before = torch.cat([p.detach().reshape(-1) for p in model.policy.parameters()])
    stats = model.update(*batch) if name == "ppo" else model.update(batch)
    after = torch.cat([p.detach().reshape(-1) for p in model.policy.parameters()])
    return {"gradient": before - after, "stats": stats}


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp")
    references = {name: one_process_reference(name, out) for name in ("ppo", "grpo")}
    done = torchrun(str(WORKER), str(out))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    ranks = [torch.load(out / "results" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"out": out, "ranks": ranks, "references": references, "log": done.stdout + done.stderr}


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_every_rank_holds_the_same_weights_after_updates(launch, agent):
    a, b = (rank["identical"][agent] for rank in launch["ranks"])
    assert a["n_updates"] == b["n_updates"] == 3
    assert torch.equal(a["weights"], b["weights"])
    # the adaptive KL coefficient moved, and alike: it is fed the KL of both ranks together
    assert a["kl_coef"] == b["kl_coef"] != 0.05
    assert a["num_timesteps"] == b["num_timesteps"]  # global: both ranks' env steps
    assert a["stats"] == b["stats"]  # logged metrics are global
    # each rank ran its own shard: different prompts
    assert not torch.equal(a["prompt_index"], b["prompt_index"])
    assert a["value_head_stepped"] == (agent == "ppo")  # GRPO has no critic


def test_ppo_counts_env_steps_of_every_rank(launch):
    ppo = launch["ranks"][0]["identical"]["ppo"]
    assert ppo["num_timesteps"] == 3 * 4 * 8  # 3 rollouts of n_steps 4 on 8 envs (4 per rank)


@pytest.mark.parametrize("agent", ["ppo", "grpo"])
def test_two_ranks_on_two_halves_give_the_gradient_of_one_process_on_the_whole(launch, agent):
    reference = launch["references"][agent]
    for rank in launch["ranks"]:
        mine = rank["gradients"][agent]
        torch.testing.assert_close(mine["gradient"], reference["gradient"], rtol=1e-4, atol=1e-6)
        assert reference["gradient"].abs().max() > 1e-4  # a real gradient, not zeros on both sides
        for tag in ("train/policy_gradient_loss", "train/entropy_loss", "train/approx_kl", "train/sequences"):
            assert mine["stats"][tag] == pytest.approx(reference["stats"][tag], rel=1e-4, abs=1e-7), tag
    if agent == "ppo":
        for tag in ("train/value_loss", "train/explained_variance"):
            assert launch["ranks"][0]["gradients"][agent]["stats"][tag] == pytest.approx(
                reference["stats"][tag], rel=1e-4
            ), tag


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_update_and_resumes_exactly(launch):
    for rank in launch["ranks"]:
        resume = rank["resume"]
        # rank 1 alone was interrupted after update 2; its Ctrl-C waited for the end of update 3
        assert resume["stopped_at"] == 3
        assert resume["loaded_at"] == 3 * 4 * 8
        assert resume["num_timesteps"] == 4 * 4 * 8
        assert torch.equal(resume["resumed"], resume["straight"])
    assert torch.equal(launch["ranks"][0]["resume"]["resumed"], launch["ranks"][1]["resume"]["resumed"])


def test_checkpoint_holds_every_ranks_state(launch):
    ckpt = torch.load(launch["out"] / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["num_envs"] == 8 and len(ckpt["ranks"]) == 2
    envs = [state["env_state"]["env"] for state in ckpt["ranks"]]
    assert all(env["num_envs"] == 4 for env in envs)
    assert envs[0]["rngs"] != envs[1]["rngs"]
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])


def test_only_rank_zero_writes(launch):
    run = launch["out"] / "run"
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    events = [p for p in files if p.parts[:2] == ("tb", "ppo_1")]
    assert files == [Path("checkpoint.pt"), *events]
    # TensorBoard names its files ...<host>.<pid>.<n>: the interrupted and the resumed session
    # each opened one, both in rank 0's process
    assert len(events) == 2
    assert {p.name.split(".")[-2] for p in events} == {str(launch["ranks"][0]["pid"])}


def test_a_torchrun_checkpoint_loads_in_one_process_as_rank_zeros_shard(launch):
    model = PPO.load(launch["out"] / "run" / "checkpoint.pt", device="cpu")
    assert model.num_envs == 4 and model.total_envs == 4
    assert model.num_timesteps == 3 * 4 * 8  # saved at the interrupt


def test_a_failing_rank_ends_every_rank_and_leaves_a_whole_checkpoint(tmp_path):
    done = torchrun(str(WORKER), str(tmp_path), "fail")
    assert done.returncode != 0
    assert "the reward model failed on rank 1" in done.stdout + done.stderr
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # the last update's, whole
    assert ckpt["world_size"] == 2 and ckpt["n_updates"] >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


@pytest.mark.slow
def test_ddp_benchmark_counts_the_env_steps_of_every_process():
    from agents.benchmark_ddp import ddp_speed, format_ddp_table

    report = ddp_speed(processes=2, num_envs=4, updates=1, rounds=1)
    runs = {(r["processes"], r["num_envs"]): r for r in report["runs"]}
    assert sorted(runs) == [(1, 4), (1, 8), (2, 8)]
    assert runs[(1, 4)]["env_steps"] == 32 * 4  # one update of n_steps 32
    assert runs[(2, 8)]["env_steps"] == runs[(1, 8)]["env_steps"] == 32 * 8  # both ranks counted
    assert runs[(2, 8)]["envs_per_process"] == 4
    assert all(r["env_steps_per_second"] > 0 and r["env_steps_per_cpu_second"] > 0 for r in runs.values())
    assert format_ddp_table(report).count("\n") == 4


# ------------------------------------------------------------------------------ one process
def test_without_torchrun_every_helper_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not dist.launched() and dist.launched_world_size() == 1
    assert dist.init("cpu") == torch.device("cpu") and not dist.is_initialized()
    assert (dist.world_size(), dist.rank(), dist.is_main()) == (1, 0, True)
    x = torch.tensor([1.0, 2.0, 4.0])
    n, mean, var = dist.mean_var(x)
    assert n == 3 and torch.equal(mean, x.mean()) and torch.equal(var, x.var())
    assert dist.global_mean([]) is None
    assert dist.global_mean([[1.0, 2.0], [3.0, 4.0]], width=2).tolist() == [2.0, 3.0]
    assert dist.env_seed(5, 8) == 5 and dist.gather_to_main("x") is None
    assert dist.local_envs(6, 4) == 6  # one process: the env itself names a bad multiple
