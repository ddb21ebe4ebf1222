"""The PyTorch backend of `memcli verify`: the same per-token statistics from the HF weights with the PEFT adapter,
in right-padded batches (`memcli.core.batching.plan_batches(..., padded=True)`, `memcli.training.forward`:
`collate`, `answer_logits`: the output layer runs only at the positions that predict answer tokens), reduced by the
same kernel (`memcli.core.scoring.score_logits`). It cross-checks the llama.cpp backend, and serves GPU users whose
llama.cpp build lacks GPU support.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from memcli.core import models
from memcli.core.batching import iter_groups, plan_batches
from memcli.core.errors import UserError
from memcli.core.models import pick_device
from memcli.core.scoring import default_threads, score_logits
from memcli.core.verdicts import Generated, ScoredBatch
from memcli.gguf.fingerprint import check_base
from memcli.llama.checks import check_vocabulary
from memcli.llama.sampler import GREEDY, Sampler
from memcli.training.forward import answer_logits, collate


class TorchBackend:
    name = "torch"

    def __init__(self, spec, peft_dir: str | Path | None = None, *, device: str = "auto", threads: int | None = None,
                 dtype: str = "float32", expect_base=None, sampler: Sampler = GREEDY):
        """expect_base: (fingerprint, model name) of the base the adapter was trained for
        (`memcli.commands.verify.sources.recorded_base`); another base is refused, as llama.cpp's path refuses it."""
        import torch

        check_base(expect_base, spec, peft_dir)
        self.sampler = sampler
        self.device = pick_device(device)
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        self.timings = {"load_s": 0.0, "pack_s": 0.0, "decode_s": 0.0, "score_s": 0.0, "decodes": 0}
        t0 = time.perf_counter()
        model, self.tokenizer = models.load_model(spec, dtype, self.device)
        self.spec, self.peft_dir, self.dtype = spec, Path(peft_dir) if peft_dir else None, dtype
        if self.peft_dir is not None:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, self.peft_dir)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"the adapter {self.peft_dir} does not fit the model {spec.name} ({first})") from None
        self.model = model.eval()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.n_ctx_train = int(getattr(model.config, "max_position_embeddings", 1 << 30))
        self.timings["load_s"] = time.perf_counter() - t0

    def open(self, examples=None, batch_tokens: int = 2048) -> None:
        """Check the examples given (a list) against the vocabulary and plan them; a streamed corpus (None) is
        checked and planned group by group in `score`."""
        self.plan = []
        if examples is not None:
            check_vocabulary(examples, self._vocab(), self.spec.name)
            self.plan = plan_batches([len(ex) for ex in examples], batch_tokens, padded=True)

    def _vocab(self) -> int:
        # every input id, the prompt's included: the embedding and the output layer must both cover them
        return min(self.model.get_input_embeddings().weight.shape[0],
                   self.model.get_output_embeddings().weight.shape[0])

    def score(self, examples, batch_tokens: int = 2048):
        """ScoredBatch per right-padded group, in corpus order; `examples` may be a stream."""
        import torch

        threads = self.threads or default_threads()
        vocab, plan = self._vocab(), []
        for start, group in iter_groups(examples, len, batch_tokens, padded=True):
            plan.append((start, start + len(group)))
            check_vocabulary(group, vocab, self.spec.name)
            t0 = time.perf_counter()
            batch = collate(group, self.pad_id, self.device)
            self.timings["pack_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = answer_logits(self.model, batch)[batch.mask]  # [answer tokens, V], entry order
                targets = batch.targets[batch.mask]
            if self.device != "cpu":
                torch.cuda.synchronize()
            self.timings["decode_s"] += time.perf_counter() - t0
            self.timings["decodes"] += 1
            t0 = time.perf_counter()
            if self.sampler.active:  # the runner's penalties, as llama.cpp computes them (float32)
                logits = logits.float().cpu().numpy()
                self.sampler.penalise(logits, group)
            stats = score_logits(logits, targets, threads=threads)
            self.timings["score_s"] += time.perf_counter() - t0
            lengths = np.array([len(ex.target_ids) for ex in group], dtype=np.int64)
            yield ScoredBatch(np.arange(start, start + len(group)), lengths, targets.cpu().numpy(), stats)
        self.plan = plan

    def generate(self, examples, indices: list[int]) -> list[Generated]:
        """Greedy decoding with transformers' `generate` (do_sample=False), one entry at a time, compared
        token by token with the target."""
        import torch

        threads = self.threads or default_threads()
        results = []
        for i in indices:
            ex = examples[i]
            prompt = torch.tensor([ex.prompt_ids], device=self.device)
            with torch.no_grad():
                out = self.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                          max_new_tokens=len(ex.target_ids), do_sample=False, num_beams=1,
                                          pad_token_id=self.tokenizer.eos_token_id, output_logits=True,
                                          return_dict_in_generate=True)
            tokens = out.sequences[0, len(ex.prompt_ids):].tolist()
            logits = torch.cat(out.logits).float().cpu().numpy()  # [steps, V], the raw logits of each step
            targets = np.asarray(ex.target_ids[: len(logits)], dtype=np.int64)
            margins = score_logits(logits[: len(targets)], targets, threads=threads).margin.tolist()
            divergence = next((t for t, (a, b) in enumerate(zip(tokens, ex.target_ids)) if a != b), None)
            if divergence is None and len(tokens) < len(ex.target_ids):
                divergence = len(tokens)  # generation stopped early (EOS)
            keep = tokens if divergence is None else tokens[: divergence + 1]
            results.append(Generated(i, keep, divergence, margins[: len(keep)]))
        return results

    def describe(self) -> dict:
        import torch

        return {"name": "torch", "torch": str(torch.__version__), "model": self.spec.name, "device": self.device,
                "dtype": self.dtype, "adapter": str(self.peft_dir) if self.peft_dir else None,
                "threads": torch.get_num_threads(), "batches": len(getattr(self, "plan", [])),
                "sampler": self.sampler.describe()}

    def close(self) -> None:
        self.model = None
