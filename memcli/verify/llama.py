"""The llama.cpp backend of `memcli verify`, on llama-cpp-python's low-level API (the C functions, no `Llama`).

One teacher-forced pass, the way llama.cpp's perplexity tool packs its work:
- many entries go into one `llama_batch` as separate sequences (distinct seq ids, positions restarting at 0),
  in corpus order, up to --batch-tokens tokens and llama.cpp's limit of parallel sequences;
- logits are requested only at the positions that predict an answer token (the prompt's last token and every
  answer token but the last), so the output layer runs on those rows alone;
- after `llama_decode`, the logits block [outputs, n_vocab] is read as one numpy view of llama.cpp's buffer
  (no copy, no per-row Python) and reduced by the native kernel (`memcli.scoring.score_logits`);
- the KV cache is cleared between batches. An entry longer than --batch-tokens is decoded alone, in chunks
  that continue its sequence in the cache.
The batch arrays are numpy arrays owned here and filled with vectorised operations; the `llama_batch` struct
just points at them.

`generate` runs real greedy decoding (token by token, the top-1 of the logits, lowest id on ties) for chosen
entries, several sequences at a time, stopping each at its first divergence from the target.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import time
from pathlib import Path

import numpy as np

from .. import llamacpp
from ..errors import UserError
from ..forward import plan_batches
from ..scoring import TokenStats, default_threads, score_logits
from .checks import check_vocabulary
from .verdicts import Generated, ScoredBatch

GGML_TYPE = {"f32": 0, "f16": 1}


class LlamaBackend:
    name = "llama"

    def __init__(self, base_gguf: str | os.PathLike, adapter_gguf: str | os.PathLike | None = None, *,
                 n_gpu_layers: int | None = None, threads: int | None = None, kv_type: str = "f16", log=None):
        L = self._L = llamacpp.lib()
        self.base, self.adapter = Path(base_gguf), Path(adapter_gguf) if adapter_gguf else None
        self.threads = threads or default_threads()
        self.n_gpu_layers = n_gpu_layers if n_gpu_layers is not None else (-1 if llamacpp.supports_gpu_offload() else 0)
        self.kv_type = kv_type
        self.timings = {"load_s": 0.0, "pack_s": 0.0, "decode_s": 0.0, "score_s": 0.0, "decodes": 0}
        self.model = self.ctx = self.lora = None
        t0 = time.perf_counter()
        params, self.load_path = llamacpp.model_params(self.base, self.n_gpu_layers, log)  # probes once where AMX may trap
        self.model = L.llama_model_load_from_file(str(self.base).encode(), params)
        if not self.model:
            raise UserError(f"llama.cpp cannot load the base model {self.base} ({llamacpp.last_error()})")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.model))
        if self.adapter is not None:
            self.lora = L.llama_adapter_lora_init(self.model, str(self.adapter).encode())
            if not self.lora:
                self.close()
                raise UserError(f"llama.cpp cannot load the adapter {self.adapter} on {self.base} ({llamacpp.last_error()})")
        self.timings["load_s"] = time.perf_counter() - t0

    # --- context -----------------------------------------------------------------------------------------
    def open(self, examples, batch_tokens: int = 2048) -> None:
        """Create the context, sized from the corpus: the KV cache holds one batch (or the longest entry),
        n_seq_max is the most entries any batch packs, the logits buffer the most outputs of any decode."""
        L = self._L
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        check_vocabulary(examples, self.n_vocab, str(self.base))  # every input id, the prompt's included
        lengths = np.array([len(ex) for ex in examples], dtype=np.int64)
        self.max_seqs = max(1, min(256, int(L.llama_max_parallel_sequences())))
        self.plan = plan_batches(lengths, batch_tokens, max_seqs=self.max_seqs)  # packed sequences
        n_seq = max(e - s for s, e in self.plan)
        longest = int(lengths.max())
        self.n_batch = min(batch_tokens, max(int(lengths[s:e].sum()) for s, e in self.plan))
        outputs = max(min(self.n_batch, sum(len(examples[i].target_ids) for i in range(s, e))) for s, e in self.plan)
        n_ctx = max(self.n_batch, longest)
        n_ctx = -(-n_ctx // 256) * 256
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = n_seq
        params.n_outputs_max = params.n_outputs_max_per_seq = max(outputs, 1)
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True  # one cache shared by the packed sequences: no per-sequence size to guess
        params.type_k = params.type_v = GGML_TYPE[self.kv_type]
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise UserError(f"llama.cpp cannot create a context of {n_ctx} tokens for {n_seq} sequences on "
                            f"{self.base} ({llamacpp.last_error()}); try a smaller --batch-tokens")
        self.n_ctx, self.n_seq_max = int(L.llama_n_ctx(self.ctx)), int(L.llama_n_seq_max(self.ctx))
        if self.lora is not None:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.lora)
            scales = (ctypes.c_float * 1)(1.0)
            if L.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
                raise UserError(f"llama.cpp cannot apply the adapter {self.adapter} ({llamacpp.last_error()})")
        self.memory = L.llama_get_memory(self.ctx)
        self._alloc_batch(self.n_batch)

    def _alloc_batch(self, capacity: int) -> None:
        """A llama_batch whose arrays are numpy arrays owned here (filled with vectorised operations)."""
        L = self._L
        self._tok = np.zeros(capacity, np.int32)
        self._pos = np.zeros(capacity, np.int32)
        self._n_seq_id = np.ones(capacity, np.int32)
        self._seq = np.zeros(capacity, np.int32)
        self._seq_ptrs = (self._seq.ctypes.data + self._seq.itemsize * np.arange(capacity)).astype(np.uintp)
        self._out = np.zeros(capacity, np.int8)
        b = self._batch = L.llama_batch()
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(L.llama_token))
        b.embd = None
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(L.llama_pos))
        b.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = self._seq_ptrs.ctypes.data_as(ctypes.POINTER(ctypes.POINTER(L.llama_seq_id)))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def _decode(self, n: int, n_out: int) -> np.ndarray | None:
        """Decode the first n tokens of the batch arrays; the logits of the n_out flagged ones, as a view."""
        L = self._L
        self._batch.n_tokens = n
        t0 = time.perf_counter()
        rc = L.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({llamacpp.last_error()})")
        logits = None
        if n_out:
            ptr = L.llama_get_logits(self.ctx)
            logits = np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))
        self.timings["decode_s"] += time.perf_counter() - t0
        self.timings["decodes"] += 1
        return logits

    def clear(self) -> None:
        self._L.llama_memory_clear(self.memory, False)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's own tokenisation of a text with this model's vocabulary."""
        L = self._L
        data = text.encode("utf-8")
        size = len(data) + 16
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            size = -n
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, size, add_special, parse_special)
        return list(buf[:n])

    # --- the teacher-forced pass -------------------------------------------------------------------------
    def score(self, examples, batch_tokens: int = 2048):
        """ScoredBatch per group of entries, in corpus order. `open` must have been called with the same
        examples and batch_tokens."""
        for start, end in self.plan:
            group = examples[start:end]
            t0 = time.perf_counter()
            prompt = np.fromiter((len(ex.prompt_ids) for ex in group), np.int64, len(group))
            answer = np.fromiter((len(ex.target_ids) for ex in group), np.int64, len(group))
            total = prompt + answer
            targets = np.fromiter(itertools.chain.from_iterable(ex.target_ids for ex in group), np.int64,
                                  int(answer.sum()))
            tokens = np.fromiter(itertools.chain.from_iterable(ex.input_ids for ex in group), np.int32,
                                 int(total.sum()))
            seq = np.repeat(np.arange(len(group), dtype=np.int32), total)
            starts = np.repeat(np.cumsum(total) - total, total)
            pos = (np.arange(len(tokens)) - starts).astype(np.int32)
            first_out = np.repeat(prompt - 1, total)  # the prompt's last token predicts the first answer token
            out = (pos >= first_out) & (pos < first_out + np.repeat(answer, total))
            self.timings["pack_s"] += time.perf_counter() - t0

            parts = []
            done_targets = 0
            for c0 in range(0, len(tokens), self.n_batch):  # one chunk unless an entry exceeds --batch-tokens
                c1 = min(c0 + self.n_batch, len(tokens))
                t0 = time.perf_counter()
                n = c1 - c0
                self._tok[:n] = tokens[c0:c1]
                self._pos[:n] = pos[c0:c1]
                self._seq[:n] = seq[c0:c1]
                self._out[:n] = out[c0:c1]
                n_out = int(out[c0:c1].sum())
                self.timings["pack_s"] += time.perf_counter() - t0
                logits = self._decode(n, n_out)
                if n_out:
                    t0 = time.perf_counter()
                    parts.append(score_logits(logits, targets[done_targets: done_targets + n_out],
                                              threads=self.threads))
                    done_targets += n_out
                    self.timings["score_s"] += time.perf_counter() - t0
            self.clear()
            stats = parts[0] if len(parts) == 1 else TokenStats.concat(parts)
            yield ScoredBatch(np.arange(start, end), answer, targets, stats)

    # --- real greedy generation --------------------------------------------------------------------------
    def generate(self, examples, indices: list[int]) -> list[Generated]:
        """Greedy decoding of the chosen entries from their prompts, with the adapter, token by token (top-1
        of the logits; np.argmax takes the lowest id on a tie), each stopped at its first divergence from the
        target. Sequences run side by side, as many as the context holds."""
        results = []
        lengths = np.array([len(examples[i]) for i in indices], dtype=np.int64)
        for s, e in plan_batches(lengths, self.n_batch, max_seqs=self.n_seq_max):
            results.extend(self._generate_group([examples[i] for i in indices[s:e]], indices[s:e]))
        return results

    def _generate_group(self, group, indices) -> list[Generated]:
        k = len(group)
        generated: list[list[int]] = [[] for _ in range(k)]
        margins: list[list[float]] = [[] for _ in range(k)]
        divergence: list[int | None] = [None] * k
        # The prompts, packed; the logits of each prompt's last token only.
        prompt_tokens = [list(ex.prompt_ids) for ex in group]
        rows = self._feed([(j, 0, toks) for j, toks in enumerate(prompt_tokens)])
        active = list(range(k))
        while active:
            next_ids = rows.argmax(axis=1)  # top-1; the first (lowest) id on a tie
            targets = np.array([group[j].target_ids[len(generated[j])] for j in active], dtype=np.int64)
            step_margin = score_logits(rows, targets, threads=self.threads).margin  # target - best other
            feed = []
            for j, tok, m in zip(active, next_ids.tolist(), step_margin.tolist()):
                t = len(generated[j])
                generated[j].append(tok)
                margins[j].append(m)
                target = group[j].target_ids
                if tok != target[t]:
                    divergence[j] = t
                elif t + 1 < len(target):
                    feed.append((j, len(group[j].prompt_ids) + t, [tok]))
            active = [j for j, _, _ in feed]
            if feed:
                rows = self._feed(feed)
        self.clear()
        return [Generated(i, generated[j], divergence[j], margins[j]) for j, i in enumerate(indices)]

    def _feed(self, items: list[tuple[int, int, list[int]]]) -> np.ndarray:
        """Decode (seq, first position, tokens) items; a copy of the logits of each item's last token."""
        rows = []
        queue = [(seq, p0 + off, tok, off == len(toks) - 1) for seq, p0, toks in items for off, tok in enumerate(toks)]
        for c0 in range(0, len(queue), self.n_batch):
            chunk = queue[c0: c0 + self.n_batch]
            n = len(chunk)
            self._seq[:n] = [c[0] for c in chunk]
            self._pos[:n] = [c[1] for c in chunk]
            self._tok[:n] = [c[2] for c in chunk]
            self._out[:n] = [c[3] for c in chunk]
            n_out = int(self._out[:n].sum())
            logits = self._decode(n, n_out)
            if n_out:
                rows.append(logits.copy())
        return np.concatenate(rows) if len(rows) > 1 else rows[0]

    # --- bookkeeping -------------------------------------------------------------------------------------
    def describe(self) -> dict:
        import llama_cpp

        return {"name": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "base": str(self.base),
                "adapter": str(self.adapter) if self.adapter else None, "n_gpu_layers": self.n_gpu_layers,
                "gpu_offload": llamacpp.supports_gpu_offload(), **self.load_path.describe(), "threads": self.threads,
                "kv_type": self.kv_type,
                "n_ctx": getattr(self, "n_ctx", None), "n_seq_max": getattr(self, "n_seq_max", None),
                "n_batch": getattr(self, "n_batch", None), "n_vocab": self.n_vocab, "n_ctx_train": self.n_ctx_train,
                "batches": len(getattr(self, "plan", []))}

    def close(self) -> None:
        L = self._L
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        if self.lora:
            L.llama_adapter_lora_free(self.lora)
            self.lora = None
        if self.model:
            L.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
