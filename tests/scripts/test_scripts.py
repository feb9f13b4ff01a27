"""The command-line scripts run end to end with tiny budgets (as subprocesses, as a user runs them)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from script_runs import ENV, ROOT, run, run_script


def benchmark_with_empty_cache(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``scripts/benchmark.py *args`` with an empty model cache under ``tmp_path`` (so SmolLM2 is
    not on disk), checked to exit 0."""
    return run_script("benchmark", *args, env={**ENV, "TEXTGYM_CACHE": str(tmp_path / "cache")})


@pytest.mark.parametrize(
    "script",
    [
        f"scripts/{name}.py"
        for name in ("train", "compare", "pipeline", "pretrain", "train_reward", "benchmark")
    ],
)
def test_help(script):
    out = run(script, "--help").stdout
    assert "usage:" in out and "--" in out


@pytest.mark.parametrize("agent", ["sb3-ppo", "sb3-a2c", "sb3-recurrent-ppo"])
def test_train_writes_a_run(tmp_path, agent):
    out = run(
        "scripts/train.py",
        "--agent",
        agent,
        "--total-timesteps",
        "512",
        "--num-envs",
        "16",
        "--eval-episodes",
        "32",
        "--logdir",
        str(tmp_path),
        "--no-progress",
        "--device",
        "cpu",
    ).stdout
    assert "random policy: mean episode reward" in out and "sample generations" in out
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["agent"] == agent and config["total_timesteps"] == 512
    assert (run_dir / "model.zip").is_file()
    assert not list(run_dir.glob("*.tmp*"))
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_train_refuses_bad_arguments(tmp_path):
    proc = run("scripts/train.py", "--total-timesteps", "0", "--logdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "--total-timesteps must be >= 1" in proc.stderr
    proc = run("scripts/train.py", "--env-kwargs", "[1]", "--logdir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "JSON object" in proc.stderr
    proc = run("scripts/train.py", "--agent", "nope", check=False)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_benchmark_env_reports_every_face(tmp_path):
    out_file = tmp_path / "env.json"
    out = run(
        "scripts/benchmark.py",
        "env",
        "--sizes",
        "4",
        "--seconds",
        "0.2",
        "--async-max",
        "0",
        "--out",
        str(out_file),
    ).stdout
    report = json.loads(out_file.read_text())
    faces = {(r["face"], r["num_envs"]) for r in report["results"]}
    assert faces == {("single", 1), ("sync", 4), ("batched", 4)}
    assert all(r["env_steps_per_second"] > 0 for r in report["results"])
    assert report["ratios"]["4"]["batched_over_sync"] > 0
    assert "| batched | 4 |" in out


def test_benchmark_rollout_and_train(tmp_path):
    run(
        "scripts/benchmark.py",
        "rollout",
        "--num-envs",
        "4",
        "--max-new-tokens",
        "8",
        "--episodes",
        "1",
        "--out",
        str(tmp_path / "rollout.json"),
    )
    rollout = json.loads((tmp_path / "rollout.json").read_text())
    assert rollout["kv_cache"] > 0 and rollout["recompute"] > 0
    assert rollout["speedup"] == pytest.approx(rollout["kv_cache"] / rollout["recompute"])
    run(
        "scripts/benchmark.py",
        "train",
        "--total-timesteps",
        "512",
        "--num-envs",
        "8",
        "--out",
        str(tmp_path / "train.json"),
    )
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["env_steps"] >= 512 and 0 < train["rollout_share"] + train["update_share"] <= 1
    run(
        "scripts/benchmark.py", "train", "--total-timesteps", "128", "--num-envs", "4", "--ppo-config",
        '{"n_steps": 16, "n_epochs": 1}', "--out", str(tmp_path / "train16.json"),
    )  # fmt: skip
    train16 = json.loads((tmp_path / "train16.json").read_text())
    assert train16["config"]["n_steps"] == 16 and train16["config"]["n_epochs"] == 1
    assert train16["env_steps"] == 128  # two rollouts of 16 steps x 4 envs
    for bad, named in (('{"n_step": 16}', "n_step"), ("[16]", "JSON object"), ('{"n_steps": 0}', "n_steps")):
        proc = run("scripts/benchmark.py", "train", "--ppo-config", bad, check=False)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr


def test_benchmark_reward_ids_scores_alike_by_every_path(tmp_path):
    """benchmark.py reward-ids: the learned reward scored as text, as ids and as ids without text
    gives the same rewards for the same actions; the ratios are to the text path."""
    out_file = tmp_path / "reward_ids.json"
    proc = run(
        "scripts/benchmark.py", "reward-ids", "--num-envs", "4", "--max-new-tokens", "3", "--steps", "6",
        "--repeats", "2", "--warmup", "0", "--out", str(out_file),
    )  # fmt: skip
    report = json.loads(out_file.read_text())
    speeds, totals = report["env_steps_per_second"], report["reward_totals"]
    assert set(speeds) == set(totals) == {"text", "ids", "ids_no_text"}
    assert all(len(s["runs"]) == 2 for s in speeds.values())
    assert totals["ids"] == pytest.approx(totals["text"], abs=1e-5)
    assert totals["ids_no_text"] == pytest.approx(totals["text"], abs=1e-5)
    assert report["ratio"]["ids"] == pytest.approx(speeds["ids"]["median"] / speeds["text"]["median"])
    assert "| ids_no_text |" in proc.stdout
    bad = run("scripts/benchmark.py", "reward-ids", "--steps", "0", check=False)
    assert bad.returncode == 2 and "--steps" in bad.stderr


def test_benchmark_shared_prompts_times_both_updates(tmp_path):
    """benchmark.py shared-prompts: a GRPO update with shared prompt passes and with whole passes,
    from the same weights; the speedup is the ratio of the medians."""
    out_file = tmp_path / "shared.json"
    proc = run(
        "scripts/benchmark.py", "shared-prompts", "--task", "arithmetic2", "--policy", '{"d_model": 32}',
        "--num-envs", "8", "--group-size", "4", "--repeats", "2", "--out", str(out_file),
    )  # fmt: skip
    report = json.loads(out_file.read_text())
    times = report["update_seconds"]
    assert all(len(times[name]["runs"]) == 2 for name in ("shared", "whole"))
    assert report["speedup"] == pytest.approx(times["whole"]["median"] / times["shared"]["median"])
    assert report["settings"]["policy"]["d_model"] == 32 and "shared prompts" in proc.stdout
    for bad, named in [('{"d_model": 0}', "d_model"), ("[1]", "--policy"), ('{"nope": 1}', "nope")]:
        proc = run("scripts/benchmark.py", "shared-prompts", "--policy", bad, check=False)
        assert proc.returncode == 2 and named in proc.stderr
    proc = run("scripts/benchmark.py", "shared-prompts", "--num-envs", "6", "--group-size", "4", check=False)
    assert proc.returncode == 2 and "multiple of --group-size" in proc.stderr


def test_benchmark_decode_reports_both_paths(tmp_path):
    """benchmark.py decode: the built-in policy's KV cache and the plain transformers loop decode
    the same rows; the ratio is the ratio of the medians."""
    out_file = tmp_path / "decode.json"
    proc = run(
        "scripts/benchmark.py", "decode", "--batch", "3", "--new-tokens", "5", "--repeats", "2",
        "--warmup", "1", "--compile", "--out", str(out_file),
    )  # fmt: skip
    report = json.loads(out_file.read_text())
    speeds = report["tokens_per_second"]
    assert set(speeds) == {"textgym", "hf_loop", "textgym_compiled"}
    assert all(len(s["runs"]) == 2 for s in speeds.values())
    assert report["ratio"] == pytest.approx(speeds["textgym"]["median"] / speeds["hf_loop"]["median"])
    compiled = speeds["textgym_compiled"]["median"] / speeds["hf_loop"]["median"]
    assert report["ratio_compiled"] == pytest.approx(compiled)
    assert "| textgym_compiled |" in proc.stdout and "RuntimeWarning" not in proc.stderr
    assert report["settings"]["batch"] == 3 and report["settings"]["new_tokens"] == 5
    assert "| textgym |" in proc.stdout and "| hf_loop |" in proc.stdout
    bad = run("scripts/benchmark.py", "decode", "--batch", "0", check=False)
    assert bad.returncode == 2 and "--batch" in bad.stderr


def test_benchmark_busy_reports_idle_and_busy_speeds(tmp_path):
    """benchmark.py busy: the main job's env steps/s idle and beside busy processes, per thread
    setting, each in a fresh process; the spinning processes end with the measurement."""
    out_file = tmp_path / "busy.json"
    out = run(
        "scripts/benchmark.py", "busy", "--thread-settings", "1", "--updates", "1", "--num-envs", "4",
        "--busy-processes", "1", "--timeout", "900", "--out", str(out_file),
    ).stdout  # fmt: skip
    report = json.loads(out_file.read_text())
    (row,) = report["runs"]
    assert report["busy_processes"] == 1 and report["settings"]["updates"] == 1
    assert row["threads_setting"] == 1 and row["threads"] == 1 and row["env_steps"] == 32 * 4
    assert row["idle_env_steps_per_second"] > 0 and row["busy_env_steps_per_second"] > 0
    assert row["slowdown"] == pytest.approx(
        row["idle_env_steps_per_second"] / row["busy_env_steps_per_second"]
    )
    assert "slowdown" in out


def test_benchmark_generate_falls_back_to_a_tiny_model(tmp_path):
    """benchmark.py generate: transformers' generate, the project's generation and PPO's acting
    loop on one model, same prompts and batch. Without SmolLM2 on disk (an empty cache here) it
    measures a tiny GPT-2 built offline; a folder that holds no model is refused."""
    pytest.importorskip("transformers")
    out_file = tmp_path / "generate.json"
    args = ["--batch", "2", "--new-tokens", "3", "--repeats", "2", "--warmup", "0", "--out", str(out_file)]
    proc = benchmark_with_empty_cache(tmp_path, "generate", *args)
    report = json.loads(out_file.read_text())
    assert report["model"].startswith("tiny GPT-2 built offline (smollm2-135m is not at")
    assert report["settings"]["batch"] == 2 and report["settings"]["new_tokens"] == 3
    speeds = report["tokens_per_second"]
    assert set(speeds) == {"hf_generate", "textgym_generate", "hf_sample", "ppo_acting"}
    for name, speed in speeds.items():
        assert len(speed["runs"]) == 2 and speed["min"] <= speed["median"] <= speed["max"]
        assert report["ratio_to_hf_generate"][name] == pytest.approx(
            speed["median"] / speeds["hf_generate"]["median"]
        )
    assert 0 <= report["same_tokens"] <= 1
    assert "| transformers `generate` |" in proc.stdout and "vs generate" in proc.stdout
    proc = run(
        "scripts/benchmark.py", "generate", "--model", str(tmp_path), "--out", str(out_file), check=False
    )
    assert proc.returncode == 2 and "neither a folder written by save_pretrained" in proc.stderr


def test_benchmark_gpu_measures_each_device_against_the_first(tmp_path):
    """benchmark.py gpu: the env alone, PPO training and a causal LM on each device, with ratios
    to the first. CI has no GPU: on the CPU alone (named twice, measured once) every row holds
    its figure and a ratio of 1."""
    pytest.importorskip("transformers")
    out_file = tmp_path / "gpu.json"
    args = ["--devices", "cpu", "cpu", "--env-sizes", "32", "--train-envs", "8", "--train-updates", "1"]
    args += ["--train-configs", "{}", '{"autocast": true}']
    args += ["--model", "tiny", "--lm-batch", "2", "--lm-new-tokens", "3", "--lm-dtypes", "float32"]
    proc = run(
        "scripts/benchmark.py", "gpu", *args, "--repeats", "1", "--seconds", "0.1", "--out", str(out_file)
    )
    report = json.loads(out_file.read_text())
    assert report["devices"] == {"cpu": "cpu"}
    kinds = [(row["kind"], row["setting"]) for row in report["rows"]]
    assert kinds == [
        ("env", "N=32"),
        ("train", "PPO, 8 envs"),
        ("train", "PPO, 8 envs, autocast=True"),
        ("lm", "PPO acting, float32, batch 2"),
        ("lm", "generate, sampled, float32, batch 2"),
        ("lm", "generate, float32, batch 2"),
    ]
    for row in report["rows"]:
        assert set(row["per_device"]) == {"cpu"} and row["per_device"]["cpu"] > 0
        assert row["ratio"] == {"cpu": 1.0}
    assert "| env: N=32 | env steps/s |" in proc.stdout


def test_benchmark_memory_falls_back_to_a_tiny_model(tmp_path):
    """benchmark.py memory: peak memory and seconds per PPO iteration, each configuration in a
    fresh process. Without SmolLM2 on disk it measures a tiny GPT-2 built offline; LoRA trains
    only the adapters and the value head."""
    pytest.importorskip("peft")
    pytest.importorskip("vaderSentiment")
    out_file = tmp_path / "memory.json"
    args = ["--configs", "float32", "lora", "--num-envs", "2", "--n-steps", "4", "--max-new-tokens", "4",
            "--warmup", "0", "--out", str(out_file)]  # fmt: skip
    proc = benchmark_with_empty_cache(tmp_path, "memory", *args)
    report = json.loads(out_file.read_text())
    assert report["model"].startswith("tiny GPT-2 built offline (smollm2-135m is not at")
    assert list(report["configs"]) == ["float32", "lora"]
    full, lora = report["configs"]["float32"], report["configs"]["lora"]
    for row in (full, lora):
        assert row["peak_rss_mib"] >= row["rss_after_load_mib"] > 50  # torch alone is more
        assert row["seconds_per_iteration"] > 0 and row["cuda_peak_mib"] is None
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] / 4
    assert "| lora |" in proc.stdout and "peak RSS" in proc.stdout
    proc = run("scripts/benchmark.py", "memory", "--configs", "nope", "--out", str(out_file), check=False)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


# ------------------------------------------------------------------- train.py: SB3 options
TINY_SB3 = (
    "--total-timesteps", "64", "--num-envs", "4", "--eval-episodes", "4", "--no-progress",
    "--device", "cpu", "--hyperparams", '{"n_steps": 16, "batch_size": 32}',
)  # fmt: skip
ALLOWED = ["great", "good"]


def sample_completions(stdout: str) -> list[str]:
    """The completions of train.py's "sample generations" lines (``prompt | completion  -> reward``)."""
    lines = stdout.split("sample generations", 1)[1].splitlines()[1:]
    samples = [line.split(" | ", 1)[1].rsplit("  -> ", 1)[0] for line in lines if " | " in line]
    assert samples, stdout
    return samples


@pytest.fixture(scope="module")
def maskable_run(tmp_path_factory) -> tuple[Path, str]:
    """train.py --agent sb3-maskable-ppo restricted to ALLOWED tokens: (run directory, stdout)."""
    logdir = tmp_path_factory.mktemp("maskable")
    out = run(
        "scripts/train.py", "--agent", "sb3-maskable-ppo", "--env-kwargs",
        json.dumps({"allowed_tokens": ALLOWED}), "--logdir", str(logdir), *TINY_SB3,
    ).stdout  # fmt: skip
    (run_dir,) = logdir.iterdir()
    return run_dir, out


def test_train_sb3_maskable_ppo_writes_model(maskable_run):
    """MaskablePPO trains on the batched env with its action masks and saves a loadable model.zip."""
    from sb3_contrib import MaskablePPO

    run_dir, out = maskable_run
    assert run_dir.name.startswith("sb3-maskable-ppo_default_s0_")
    assert "trained sb3-maskable-ppo: 64 env steps" in out
    config = json.loads((run_dir / "config.json").read_text())
    assert config["agent"] == "sb3-maskable-ppo" and config["env_kwargs"] == {"allowed_tokens": ALLOWED}
    assert config["hyperparams"] == {"n_steps": 16, "batch_size": 32}
    model = MaskablePPO.load(run_dir / "model.zip", device="cpu")
    assert model.num_timesteps == 64 and model.n_steps == 16 and model.batch_size == 32
    assert not list(run_dir.glob("*.tmp*"))
    assert list(run_dir.rglob("events.out.tfevents.*"))


def test_train_sb3_maskable_ppo_samples_respect_allowed_tokens(maskable_run):
    """The greedy samples of a MaskablePPO trained with allowed_tokens use only those tokens (its
    evaluation once called predict without the action mask, emitting any token, even <unk>)."""
    _, out = maskable_run
    for completion in sample_completions(out):
        assert set(completion.split()) <= set(ALLOWED), completion


@pytest.mark.parametrize(
    ("option", "value", "policy_extractor"),
    [("--vec-env", "dummy", "TransformerExtractor"), ("--extractor", "mlp", "CombinedExtractor")],
)
def test_train_sb3_ppo_vec_env_and_extractor(tmp_path, option, value, policy_extractor):
    """--vec-env dummy (DummyVecEnv of single envs) and --extractor mlp (SB3's MultiInputPolicy)
    train, are recorded in config.json and give the saved model's features extractor."""
    from stable_baselines3 import PPO as SB3PPO

    out = run(
        "scripts/train.py", "--agent", "sb3-ppo", option, value, "--logdir", str(tmp_path), *TINY_SB3
    ).stdout  # fmt: skip
    assert "trained sb3-ppo: 64 env steps" in out and "sample generations" in out
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config[option[2:].replace("-", "_")] == value
    model = SB3PPO.load(run_dir / "model.zip", device="cpu")
    assert model.num_timesteps == 64
    assert type(model.policy.features_extractor).__name__ == policy_extractor


def test_train_sb3_bad_hyperparameter_is_named(tmp_path):
    """An SB3 constructor argument that does not exist: non-zero exit, an error naming it."""
    proc = run(
        "scripts/train.py", "--agent", "sb3-ppo", "--logdir", str(tmp_path), *TINY_SB3[:-2],
        "--hyperparams", '{"n_steps": 16, "batch_size": 32, "n_stepz": 3}', check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "n_stepz" in proc.stderr and "bad hyperparameters" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("model.zip"))


def test_train_refuses_sb3_options_for_ppo(tmp_path):
    """--hyperparams, --extractor and --vec-env are refused with --agent ppo (exit 2)."""
    for option in (["--hyperparams", '{"n_steps": 16}'], ["--extractor", "mlp"], ["--vec-env", "dummy"]):
        proc = run("scripts/train.py", "--agent", "ppo", *option, "--logdir", str(tmp_path), check=False)
        assert proc.returncode == 2, option
        assert "apply to sb3-* agents only" in proc.stderr and option[0] in proc.stderr
    proc = run("scripts/train.py", "--agent", "sb3-ppo", "--ppo-config", '{"n_steps": 8}', check=False)
    assert proc.returncode == 2 and "--ppo-config applies to --agent ppo only" in proc.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_train_refuses_unknown_allowed_token(tmp_path):
    """An allowed_tokens entry outside the vocabulary is a usage error naming allowed_tokens and
    the token, before any run directory is made."""
    proc = run(
        "scripts/train.py", "--agent", "sb3-maskable-ppo", "--env-kwargs",
        '{"allowed_tokens": ["zzz-not-a-token"]}', "--logdir", str(tmp_path / "runs"), check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "allowed_tokens" in proc.stderr and "zzz-not-a-token" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_train_docstring_env_kwargs_examples_are_valid():
    """Every --env-kwargs of the usage examples in train.py's docstring is accepted for its task
    (an allowed_tokens example once named a word outside the default task's vocabulary)."""
    import shlex

    from textgym.tasks import env_arguments_error

    examples = [
        shlex.split(line.strip())
        for line in (ROOT / "scripts" / "train.py").read_text().split('"""')[1].splitlines()
        if line.strip().startswith("python scripts/train.py") and "--env-kwargs" in line
    ]
    assert len(examples) >= 2
    for argv in examples:
        task = argv[argv.index("--task") + 1] if "--task" in argv else "default"
        env_kwargs = json.loads(argv[argv.index("--env-kwargs") + 1])
        assert env_arguments_error(task, env_kwargs) is None, argv
