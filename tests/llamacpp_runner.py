"""Run a GGUF file in a real llama.cpp: per-token NLL of given token ids, and greedy decoding speed.

llama.cpp comes from the PyPI wheel ``xllamacpp`` (prebuilt CPU build of llama.cpp, installed in seconds), whose
extension module exports llama.cpp's C API (``llama_model_load_from_file``, ``llama_decode``,
``llama_get_logits_ith`` ...).  This module calls that API through ctypes: the model computes the logits of every
position of a window in one ``llama_decode`` (a batch whose every token asks for logits), and the NLL is
``logsumexp(logits_t) - logits_t[token_{t+1}]`` in float64.  Only the leading fields of ``llama_context_params``
are declared (``n_ctx, n_batch, n_ubatch, n_seq_max, n_rs_seq, n_outputs_max, n_outputs_max_per_seq, n_threads,
n_threads_batch``: llama.h of the pinned xllamacpp 2026.10.11549; a context whose defaults do not read as that layout
is refused); the rest of the struct is carried as opaque bytes from ``llama_context_default_params``.
"""

from __future__ import annotations

import ctypes
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

GGML_TYPE = {"f32": 0, "f16": 1}
OPAQUE = 1024  # bytes; larger than llama_context_params and llama_model_params of any llama.cpp so far


class ContextParams(ctypes.Structure):
    _fields_ = [("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
                ("n_seq_max", ctypes.c_uint32), ("n_rs_seq", ctypes.c_uint32), ("n_outputs_max", ctypes.c_uint32),
                ("n_outputs_max_per_seq", ctypes.c_uint32),
                ("n_threads", ctypes.c_int32), ("n_threads_batch", ctypes.c_int32), ("ctx_type", ctypes.c_int32),
                ("rope_scaling_type", ctypes.c_int32), ("pooling_type", ctypes.c_int32),
                ("attention_type", ctypes.c_int32), ("flash_attn_type", ctypes.c_int32),
                ("rope_and_yarn", ctypes.c_float * 7), ("defrag_thold", ctypes.c_float), ("cb_eval", ctypes.c_void_p),
                ("cb_eval_user_data", ctypes.c_void_p), ("type_k", ctypes.c_int32), ("type_v", ctypes.c_int32),
                ("rest", ctypes.c_uint8 * OPAQUE)]


class ModelParams(ctypes.Structure):
    _fields_ = [("opaque", ctypes.c_uint8 * OPAQUE)]


class Batch(ctypes.Structure):
    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)),
                ("embd", ctypes.POINTER(ctypes.c_float)), ("pos", ctypes.POINTER(ctypes.c_int32)),
                ("n_seq_id", ctypes.POINTER(ctypes.c_int32)), ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))),
                ("logits", ctypes.POINTER(ctypes.c_int8))]


LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_quiet = LOG_CALLBACK(lambda level, text, data: None)


def available() -> str | None:
    """``None`` when llama.cpp can be loaded, else why not (one line)."""
    try:
        library()
    except (ImportError, OSError, AttributeError) as error:
        return f"llama.cpp is not installed (pip install xllamacpp): {error}"
    return None


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """llama.cpp's C API from the ``xllamacpp`` wheel, with argument and result types declared."""
    import xllamacpp.xllamacpp as extension

    lib = ctypes.CDLL(extension.__file__)
    p = ctypes.c_void_p
    signatures = {
        "llama_backend_init": (None, []),
        "llama_log_set": (None, [LOG_CALLBACK, p]),
        "llama_model_default_params": (ModelParams, []),
        "llama_context_default_params": (ContextParams, []),
        "llama_model_load_from_file": (p, [ctypes.c_char_p, ModelParams]),
        "llama_model_free": (None, [p]),
        "llama_init_from_model": (p, [p, ContextParams]),
        "llama_free": (None, [p]),
        "llama_model_get_vocab": (p, [p]),
        "llama_vocab_n_tokens": (ctypes.c_int32, [p]),
        "llama_model_n_layer": (ctypes.c_int32, [p]),
        "llama_batch_init": (Batch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]),
        "llama_batch_free": (None, [Batch]),
        "llama_decode": (ctypes.c_int32, [p, Batch]),
        "llama_get_logits_ith": (ctypes.POINTER(ctypes.c_float), [p, ctypes.c_int32]),
        "llama_model_desc": (ctypes.c_int32, [p, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (result, arguments) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    lib.llama_log_set(_quiet, None)
    lib.llama_backend_init()
    return lib


class LlamaCpp:
    """A GGUF model loaded in llama.cpp (CPU), ``threads`` threads, its KV cache in ``kv_type`` (``"f32"`` for
    parity; llama.cpp's default is ``"f16"``), flash attention off."""

    def __init__(self, path: Path, *, threads: int = 1, n_ctx: int = 512, kv_type: str = "f32"):
        self.lib = library()
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), self.lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))
        self.n_layer = self.lib.llama_model_n_layer(self.model)
        self.threads, self.n_ctx, self.kv_type = threads, n_ctx, kv_type

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def description(self) -> str:
        buffer = ctypes.create_string_buffer(256)
        self.lib.llama_model_desc(self.model, buffer, len(buffer))
        return buffer.value.decode()

    def _context(self):
        params = self.lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
        if (params.n_seq_max, params.n_outputs_max_per_seq, params.type_k, params.type_v) != (1, 1, 1, 1) \
                or params.n_threads <= 0:
            raise RuntimeError("llama_context_params of this llama.cpp has another layout than the one this module "
                               "declares (see the module docstring)")
        params.n_outputs_max = self.n_ctx
        params.type_k = params.type_v = GGML_TYPE[self.kv_type]
        params.flash_attn_type = 0  # disabled: the plain attention path, in the KV cache's type
        params.n_threads = params.n_threads_batch = self.threads
        context = self.lib.llama_init_from_model(self.model, params)
        if not context:
            raise RuntimeError("llama.cpp could not create a context")
        return context

    def _decode(self, context, tokens, start: int, every: bool) -> None:
        batch = self.lib.llama_batch_init(len(tokens), 0, 1)
        try:
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if every or i == len(tokens) - 1 else 0
            code = self.lib.llama_decode(context, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code}")
        finally:
            self.lib.llama_batch_free(batch)

    def _logits(self, context, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(context, i), shape=(self.n_vocab,)).astype(np.float64)

    def token_nll(self, ids) -> np.ndarray:
        """NLL of ``ids[1:]`` given their prefixes (one window, one forward pass), float64."""
        context = self._context()
        try:
            self._decode(context, ids, 0, every=True)
            nll = []
            for t in range(len(ids) - 1):
                logits = self._logits(context, t)
                top = logits.max()
                nll.append(top + np.log(np.exp(logits - top).sum()) - logits[ids[t + 1]])
            return np.array(nll)
        finally:
            self.lib.llama_free(context)

    def greedy_speed(self, prompt, new_tokens: int) -> dict:
        """Greedy decoding of ``new_tokens`` after ``prompt``: prompt and decode tokens per second, the tokens."""
        context = self._context()
        try:
            start = time.perf_counter()
            self._decode(context, prompt, 0, every=False)
            prefill = time.perf_counter() - start
            tokens = [int(self._logits(context, -1).argmax())]
            start = time.perf_counter()
            for step in range(new_tokens - 1):
                self._decode(context, tokens[-1:], len(prompt) + step, every=False)
                tokens.append(int(self._logits(context, -1).argmax()))
            decode = time.perf_counter() - start
            return {"prompt_tokens_per_s": len(prompt) / prefill, "decode_tokens_per_s": (new_tokens - 1) / decode,
                    "tokens": tokens}
        finally:
            self.lib.llama_free(context)
