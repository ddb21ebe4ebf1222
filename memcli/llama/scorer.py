"""The llama.cpp backend of `memcli verify`, on llama-cpp-python's low-level API (the C functions, no `Llama`).

One teacher-forced pass, the way llama.cpp's perplexity tool packs its work:
- many entries go into one `llama_batch` as separate sequences (distinct seq ids, positions restarting at 0),
  in corpus order, up to --batch-tokens tokens and llama.cpp's limit of parallel sequences;
- logits are requested only at the positions that predict an answer token (the prompt's last token and every
  answer token but the last), so the output layer runs on those rows alone;
- after `llama_decode`, the logits block [outputs, n_vocab] is read as one numpy view of llama.cpp's buffer
  (no copy, no per-row Python) and reduced by the native kernel (`memcli.core.scoring.score_logits`);
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
from dataclasses import replace
from pathlib import Path

import numpy as np

from memcli.core.batching import iter_groups, plan_batches
from memcli.core.errors import UserError
from memcli.core.scoring import TokenStats, default_threads, score_logits
from memcli.core.verdicts import Generated, ScoredBatch
from memcli.llama import library
from memcli.llama.checks import check_vocabulary
from memcli.llama.sampler import FLASH_ATTN, GREEDY, Sampler

GGML_TYPE = {"f32": 0, "f16": 1}
MIN_SHARED = 4  # shorter shared prefixes are decoded in every sequence
# An entry whose smallest margin in the packed pass is within +- this of 0 is scored again as served: the packed
# and the one-token-at-a-time logits differ by a few units at most on quantised weights, by little on float ones
# (measured on the default model: margins moved by up to 2.4 at Q4_K_M, 0.6 at Q8_0, 0.05 at F16; docs/deploy.md).
RECHECK_MARGIN = {"quantised": 4.0, "float": 0.5}
FLOAT_FTYPES = {0, 1, 32}  # llama_ftype: all F32, mostly F16, mostly BF16


class LlamaBackend:
    name = "llama"

    def __init__(self, base_gguf: str | os.PathLike, adapter_gguf: str | os.PathLike | None = None, *,
                 n_gpu_layers: int | None = None, threads: int | None = None, kv_type: str = "f16",
                 share_prefix: bool = True, sampler: Sampler = GREEDY, recheck_margin: float | None = None,
                 log=None):
        """`recheck_margin`: None picks RECHECK_MARGIN by the base's weights (general.file_type)."""
        L = self._L = library.lib()
        self.base, self.adapter = Path(base_gguf), Path(adapter_gguf) if adapter_gguf else None
        self.threads = threads or default_threads()
        self.n_gpu_layers = n_gpu_layers if n_gpu_layers is not None else (-1 if library.supports_gpu_offload() else 0)
        self.kv_type = kv_type
        self.share_prefix = share_prefix
        self.sampler = sampler  # the runner's penalties, applied to every answer row before the verdict
        self.ctx = None
        self.size = (0, 0, 0, 0)
        self.timings = {"load_s": 0.0, "pack_s": 0.0, "decode_s": 0.0, "score_s": 0.0, "decodes": 0,
                        "rechecked": 0, "recheck_changed": 0, "recheck_s": 0.0}
        self.model = self.ctx = self.lora = None
        self.adapter_on = True  # whether decodes apply the adapter (locality switches it off for the base)
        t0 = time.perf_counter()
        # probes once where AMX may trap
        params, self.load_path = library.model_params(self.base, self.n_gpu_layers, log)
        self.model = L.llama_model_load_from_file(str(self.base).encode(), params)
        if not self.model:
            raise UserError(f"llama.cpp cannot load the base model {self.base} ({library.last_error()})")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.model))
        if self.adapter is not None:
            self.lora = L.llama_adapter_lora_init(self.model, str(self.adapter).encode())
            if not self.lora:
                self.close()
                raise UserError(f"llama.cpp cannot load the adapter {self.adapter} on {self.base} "
                                f"({library.last_error()})")
        self.timings["load_s"] = time.perf_counter() - t0
        self.recheck_margin = recheck_margin if recheck_margin is not None else RECHECK_MARGIN[self._weights()]

    def _weights(self) -> str:
        """"float" when the base's file type is F32, F16 or BF16 (general.file_type), else "quantised"."""
        buf = ctypes.create_string_buffer(32)
        n = self._L.llama_model_meta_val_str(self.model, b"general.file_type", buf, len(buf))
        return "float" if n > 0 and buf.value.decode().strip().isdigit() and int(buf.value) in FLOAT_FTYPES \
            else "quantised"

    # --- context -----------------------------------------------------------------------------------------
    def open(self, examples=None, batch_tokens: int = 2048) -> None:
        """Create the context. Given the examples (a list), it is sized from them: the KV cache holds one batch
        (or the longest entry), n_seq_max is the most entries any batch packs, the logits buffer the most
        outputs of any decode. Without (a streamed corpus), `score` grows it as batches need."""
        self.batch_tokens = batch_tokens
        self.max_seqs = max(1, min(256, int(self._L.llama_max_parallel_sequences())))
        self.size = (0, 0, 0, 0)  # n_batch, n_ctx, n_seq, outputs of the context that exists
        self.plan = []
        if examples is None:
            self._free_ctx()
            return
        check_vocabulary(examples, self.n_vocab, str(self.base))  # every input id, the prompt's included
        lengths = np.array([len(ex) for ex in examples], dtype=np.int64)
        self.plan = plan_batches(lengths, batch_tokens, max_seqs=self.max_seqs)  # packed sequences
        self._ensure(*(self._needs(examples[s:e]) for s, e in self.plan))

    def _needs(self, group) -> tuple[int, int, int, int]:
        """(n_batch, n_ctx, n_seq, outputs) a group of entries needs."""
        tokens = sum(len(ex) for ex in group)
        n_batch = min(self.batch_tokens, tokens)
        outputs = min(n_batch, sum(len(ex.target_ids) for ex in group))
        return n_batch, max(n_batch, max(len(ex) for ex in group)), len(group), outputs

    def _ensure(self, *needs) -> None:
        """A context at least as large as every need (recreated, larger, when one is not met)."""
        want = tuple(max([have, *(n[k] for n in needs)]) for k, have in enumerate(self.size))
        if self.ctx and want == self.size:
            return
        L = self._L
        self._free_ctx()
        n_batch, n_ctx, n_seq, outputs = want
        n_ctx = -(-n_ctx // 256) * 256
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_outputs_max = params.n_outputs_max_per_seq = max(outputs, 1)
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = True  # one cache shared by the packed sequences: no per-sequence size to guess
        params.type_k = params.type_v = GGML_TYPE[self.kv_type]
        params.flash_attn_type = FLASH_ATTN[self.sampler.flash_attn]  # the runner's attention kernel
        params.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise UserError(f"llama.cpp cannot create a context of {n_ctx} tokens for {n_seq} sequences on "
                            f"{self.base} ({library.last_error()}); try a smaller --batch-tokens")
        self.size = want
        self.n_batch = n_batch
        self.n_ctx, self.n_seq_max = int(L.llama_n_ctx(self.ctx)), int(L.llama_n_seq_max(self.ctx))
        self.timings["contexts"] = self.timings.get("contexts", 0) + 1
        self._apply_adapter()
        self.memory = L.llama_get_memory(self.ctx)
        self._alloc_batch(self.n_batch)

    def _apply_adapter(self) -> None:
        L = self._L
        if self.lora is None or not self.ctx:
            return
        n = 1 if self.adapter_on else 0
        adapters = (L.llama_adapter_lora_p_ctypes * 1)(self.lora)
        scales = (ctypes.c_float * 1)(1.0)
        if L.llama_set_adapters_lora(self.ctx, adapters, n, scales) != 0:
            raise UserError(f"llama.cpp cannot apply the adapter {self.adapter} ({library.last_error()})")

    def use_adapter(self, on: bool) -> None:
        """Decode with the adapter (the default) or without it: the base model, from the same loaded weights."""
        self.adapter_on = bool(on)
        self._apply_adapter()

    def _free_ctx(self) -> None:
        if self.ctx:
            self._L.llama_free(self.ctx)
            self.ctx = None
        self.size = (0, 0, 0, 0)

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
            raise RuntimeError(f"llama_decode failed with code {rc} ({library.last_error()})")
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
        """ScoredBatch per group of entries, in corpus order. `examples` may be a stream (any iterable): groups
        are planned as it is pulled (`batching.iter_groups`), each checked against the vocabulary, the context
        grown where a group needs it. `open` must have been called with the same batch_tokens.

        Shared prefix (share_prefix): the entries of a group whose prompts begin with the same tokens (the chat
        template's system prompt) have that prefix decoded once, in the first sequence, and copied to the
        others in the KV cache (llama_memory_seq_cp, as llama.cpp's perplexity tool does for HellaSwag).

        Near ties: an entry whose smallest margin lies within +-`recheck_margin` of 0 is scored again as a runner
        decodes it (score_as_served), and that verdict stands."""
        plan = []
        for start, group in iter_groups(examples, len, batch_tokens, max_seqs=self.max_seqs):
            plan.append((start, start + len(group)))
            check_vocabulary(group, self.n_vocab, str(self.base))
            self._ensure(self._needs(group))
            yield self._recheck(start, group, self._score_group(start, group))
        self.plan = plan

    def _recheck(self, start: int, group, batch: ScoredBatch) -> ScoredBatch:
        """The batch with the entries whose smallest margin lies within +-recheck_margin scored as served."""
        if self.recheck_margin <= 0:
            return batch
        ends = np.cumsum(batch.lengths)
        margin = batch.stats.margin
        near = [i for i, (n, e) in enumerate(zip(batch.lengths, ends))  # far below 0: a failure in either shape
                if n and len(group[i].prompt_ids) and abs(margin[e - n:e].min()) < self.recheck_margin]
        if not near:
            return batch
        t0 = time.perf_counter()
        parts = [self._slice(batch.stats, e - n, e) for n, e in zip(batch.lengths, ends)]
        for i in near:
            again = self.score_as_served(start + i, group[i:i + 1]).stats
            target = batch.targets[ends[i] - batch.lengths[i]:ends[i]]
            self.timings["recheck_changed"] += bool((again.argmax == target).all()) != bool(
                (parts[i].argmax == target).all())  # exact (the greedy token is the target everywhere) changed
            parts[i] = again
        self.timings["rechecked"] += len(near)
        self.timings["recheck_s"] += time.perf_counter() - t0
        return replace(batch, stats=TokenStats.concat(parts))

    @staticmethod
    def _slice(stats: TokenStats, a: int, b: int) -> TokenStats:
        return TokenStats(**{k: v[a:b] for k, v in vars(stats).items()})

    def answer_logits(self, group) -> np.ndarray:
        """[answer tokens, V]: a float32 copy of the logits at the positions that predict the answer tokens of a
        group of entries (packed as `score` packs them), in entry order. `open` must have been called."""
        check_vocabulary(group, self.n_vocab, str(self.base))
        self._ensure(self._needs(group))
        parts = []
        self._score_group(0, group, reduce=lambda logits, targets: parts.append(logits.copy()))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _score_group(self, start: int, group, reduce=None) -> ScoredBatch | None:
        """Decode a group; its answer positions' logits go to the kernel (or to reduce(logits, targets), and
        then nothing is returned)."""
        t0 = time.perf_counter()
        shared = self._shared_prefix(group)
        if shared:
            saved = shared * (len(group) - 1)
            self.timings["shared_prefix_tokens"] = self.timings.get("shared_prefix_tokens", 0) + saved
        prompt = np.fromiter((len(ex.prompt_ids) for ex in group), np.int64, len(group))
        answer = np.fromiter((len(ex.target_ids) for ex in group), np.int64, len(group))
        total = prompt + answer - shared  # the tokens each sequence decodes itself
        total[0] += shared  # the first decodes the shared prefix too
        targets = np.fromiter(itertools.chain.from_iterable(ex.target_ids for ex in group), np.int64,
                              int(answer.sum()))
        tokens = np.fromiter(itertools.chain(group[0].input_ids, itertools.chain.from_iterable(
            ex.input_ids[shared:] for ex in group[1:])), np.int32, int(total.sum()))
        seq = np.repeat(np.arange(len(group), dtype=np.int32), total)
        starts = np.repeat(np.cumsum(total) - total, total)
        offset = np.full(len(group), shared, np.int64)
        offset[0] = 0
        pos = (np.arange(len(tokens)) - starts + np.repeat(offset, total)).astype(np.int32)
        first_out = np.repeat(prompt - 1, total)  # the prompt's last token predicts the first answer token
        out = (pos >= first_out) & (pos < first_out + np.repeat(answer, total))
        window = self.sampler.window_pairs(group) if self.sampler.active and reduce is None else None
        self.timings["pack_s"] += time.perf_counter() - t0

        parts = []
        done_targets = 0
        chunks = [(0, shared), (shared, len(tokens))] if shared else [(0, len(tokens))]
        for a, b in chunks:
            for c0 in range(a, b, self.n_batch):  # one chunk unless an entry exceeds --batch-tokens
                c1 = min(c0 + self.n_batch, b)
                t0 = time.perf_counter()
                n = c1 - c0
                self._tok[:n] = tokens[c0:c1]
                self._pos[:n] = pos[c0:c1]
                self._seq[:n] = seq[c0:c1]
                self._out[:n] = out[c0:c1]
                n_out = int(out[c0:c1].sum())
                self.timings["pack_s"] += time.perf_counter() - t0
                logits = self._decode(n, n_out)
                if n_out and reduce is not None:
                    reduce(logits, targets[done_targets: done_targets + n_out])
                    done_targets += n_out
                elif n_out:
                    t0 = time.perf_counter()
                    if window is not None:
                        rows, toks, counts = self.sampler.counts(*window, done_targets, n_out, logits.shape[1])
                        self.sampler.apply(logits, rows, toks, counts)
                    parts.append(score_logits(logits, targets[done_targets: done_targets + n_out],
                                              threads=self.threads))
                    done_targets += n_out
                    self.timings["score_s"] += time.perf_counter() - t0
            if shared and a == 0:  # the prefix is in sequence 0's cells: share them with the others
                for s in range(1, len(group)):
                    self._L.llama_memory_seq_cp(self.memory, 0, s, 0, shared)
        self.clear()
        if reduce is not None:
            return None
        stats = parts[0] if len(parts) == 1 else TokenStats.concat(parts)
        return ScoredBatch(np.arange(start, start + len(group)), answer, targets, stats)

    def score_as_served(self, start: int, group) -> ScoredBatch:
        """The teacher-forced statistics of a group as a runner computes them for one request: each entry alone, its
        prompt in one decode, then its answer one token per decode. llama.cpp's kernels depend on how many tokens a
        decode holds (on quantised weights the logits of a packed batch and of one token at a time differ by up to
        a few units), so this is the shape whose argmax a server's greedy answer follows."""
        self._ensure(*(self._needs([ex]) for ex in group))
        parts, targets = [], []
        for ex in group:
            prompt, answer = list(ex.prompt_ids), list(ex.target_ids)
            if not prompt or not answer:
                raise ValueError("score_as_served needs a prompt and an answer")  # _recheck passes no other
            rows = [self._feed([(0, 0, prompt)])]  # the prompt's last token predicts the first answer token
            rows += [self._feed([(0, len(prompt) + t, [tok])]) for t, tok in enumerate(answer[:-1])]
            self.clear()
            logits = np.concatenate(rows)
            self.sampler.penalise(logits, [ex])
            parts.append(score_logits(logits, np.asarray(answer, np.int64), threads=self.threads))
            targets += answer
        lengths = np.array([len(ex.target_ids) for ex in group], np.int64)
        return ScoredBatch(np.arange(start, start + len(group)), lengths, np.asarray(targets, np.int64),
                           TokenStats.concat(parts))

    def _shared_prefix(self, group) -> int:
        """Tokens every prompt of the group begins with, short of each prompt's last token (which must be
        decoded in its own sequence: its logits predict the first answer token); 0 when not worth sharing."""
        if not self.share_prefix or len(group) < 2:
            return 0
        first = group[0].prompt_ids
        n = min(len(ex.prompt_ids) for ex in group) - 1
        for ex in group[1:]:
            other = ex.prompt_ids
            if other[:n] != first[:n]:
                n = next(i for i in range(n) if other[i] != first[i])
            if n < MIN_SHARED:
                return 0
        return n

    # --- real greedy generation --------------------------------------------------------------------------
    def generate(self, examples, indices: list[int]) -> list[Generated]:
        """Greedy decoding of the chosen entries from their prompts, with the adapter, token by token (top-1 of the
        logits after the sampler's penalties; np.argmax takes the lowest id on a tie), each stopped at its first
        divergence from the target. One entry at a time, as a runner answers one request: its prompt in one
        decode, then one token per decode (llama.cpp's kernels depend on how many tokens a decode holds)."""
        return [r for i in indices for r in self._generate_group([examples[i]], [i])]

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
            if self.sampler.active:  # the runner's window: the same tokens as teacher forcing's while they match
                so_far = [replace(group[j], target_ids=group[j].target_ids[: len(generated[j]) + 1])
                          for j in active]
                pairs = self.sampler.window_pairs(so_far)
                last = np.cumsum([len(ex.target_ids) for ex in so_far]) - 1  # each sequence's current position
                keep = np.isin(pairs[0], last)
                block_rows = np.searchsorted(last, pairs[0][keep])  # the row of `rows` each sequence decodes into
                r, t, c = self.sampler.counts(block_rows, pairs[1][keep], 0, len(active), rows.shape[1])
                self.sampler.apply(rows, r, t, c)
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
                "gpu_offload": library.supports_gpu_offload(), **self.load_path.describe(), "threads": self.threads,
                "kv_type": self.kv_type, "share_prefix": self.share_prefix, "sampler": self.sampler.describe(),
                "recheck_margin": self.recheck_margin,
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
