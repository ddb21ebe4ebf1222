"""The decoding settings a runner applies at temperature 0, and their effect on the logits (docs/deploy.md, serving).

At temperature 0 every runner memcli knows picks the argmax (the lowest token id on a tie) of the logits after
its penalties, which llama.cpp's penalties sampler computes (src/llama-sampler.cpp, `llama_sampler_penalties_apply`)
for every token t with count c > 0 in the window of the last `repeat_last_n` tokens, in float32:

    l' = (l <= 0 ? l * repeat_penalty : l / repeat_penalty) - c * frequency_penalty - presence_penalty

The window is what the runner has accepted into its sampler before the position: llama.cpp's server (and ollama,
which runs it) accepts the whole prompt, then each generated token; llama-cpp-python builds a fresh sampler per
request and accepts only the generated tokens. Under teacher forcing the window at every answer position is
therefore known from the tokens before it, and one pass still decides what the runner answers.

A runner also decides whether llama.cpp computes attention with its flash-attention kernel (`flash_attn`: auto,
llama.cpp's own default, which enables it where the device supports it; on; off): the two kernels round
differently, and on a near tie that changes the answer, so the scorer uses the runner's setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from memcli.core.errors import UserError


@dataclass(frozen=True)
class Sampler:
    """One runner's decoding at temperature 0. `prompt_in_window`: the prompt's tokens are counted too."""

    name: str = "greedy"
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    prompt_in_window: bool = True
    flash_attn: str = "auto"  # auto | on | off (FLASH_ATTN)

    @property
    def active(self) -> bool:
        """Whether it moves any logit (llama.cpp's own test: a window of 0, or all three at their neutral value)."""
        return self.repeat_last_n > 0 and not (self.repeat_penalty == 1.0 and self.frequency_penalty == 0.0
                                               and self.presence_penalty == 0.0)

    def describe(self) -> dict:
        return dataclasses.asdict(self)

    def window_pairs(self, examples) -> tuple[np.ndarray, np.ndarray]:
        """(row, token), one pair per token occurrence in the window of each answer position of `examples`, rows
        numbered over the examples' answer positions in order (as a scorer's batch holds them)."""
        rows, tokens, row0 = [], [], 0
        n = self.repeat_last_n
        for ex in examples:
            answer = len(ex.target_ids)
            seq = np.asarray(ex.input_ids if self.prompt_in_window else ex.target_ids, np.int64)
            first = len(ex.prompt_ids) if self.prompt_in_window else 0  # where answer position 0 stands in seq
            ends = first + np.arange(answer)  # the window of position j is seq[end - n: end]
            idx = ends[:, None] - n + np.arange(n)[None, :]
            ok = idx >= 0
            r = np.broadcast_to(np.arange(row0, row0 + answer)[:, None], idx.shape)
            rows.append(r[ok])
            tokens.append(seq[idx[ok]])
            row0 += answer
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows), np.concatenate(tokens)

    def counts(self, rows: np.ndarray, tokens: np.ndarray, first_row: int, n_rows: int, n_vocab: int):
        """(row within the block, token, count) of the distinct tokens in each window of rows first_row ..
        first_row + n_rows."""
        keep = (rows >= first_row) & (rows < first_row + n_rows)
        keys, counts = np.unique((rows[keep] - first_row) * n_vocab + tokens[keep], return_counts=True)
        return keys // n_vocab, keys % n_vocab, counts

    def apply(self, logits: np.ndarray, block_rows: np.ndarray, block_tokens: np.ndarray,
              counts: np.ndarray) -> None:
        """llama.cpp's penalty arithmetic, in place, on a float32 block of logits rows [n, V]."""
        if not self.active or not len(block_rows):
            return
        f32 = np.float32
        cur = logits[block_rows, block_tokens]
        out = np.where(cur <= 0, cur * f32(self.repeat_penalty), cur / f32(self.repeat_penalty)).astype(f32)
        out -= counts.astype(f32) * f32(self.frequency_penalty) + (counts > 0).astype(f32) * f32(self.presence_penalty)
        logits[block_rows, block_tokens] = out


    def penalise(self, logits: np.ndarray, examples) -> None:
        """`apply` to a block holding every answer row of `examples`, in order."""
        if self.active:
            self.apply(logits, *self.counts(*self.window_pairs(examples), 0, len(logits), logits.shape[1]))


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama.cpp's enum llama_flash_attn_type

GREEDY = Sampler()

# Each runner's default request at temperature 0 (sources and versions: docs/deploy.md, "Serving").
PRESETS = {
    "greedy": Sampler(),
    "llama-cpp-python": Sampler("llama-cpp-python", repeat_penalty=1.1, repeat_last_n=64, prompt_in_window=False,
                                flash_attn="off"),
    "llama-server": Sampler("llama-server", repeat_penalty=1.0, repeat_last_n=64),
    "ollama": Sampler("ollama", repeat_penalty=1.1, repeat_last_n=64, flash_attn="off"),
    "lm-studio": Sampler("lm-studio", repeat_penalty=1.1, repeat_last_n=64, flash_attn="off"),
}


def sampler_from_options(name: str | None = "greedy", *, repeat_penalty: float | None = None,
                         repeat_last_n: int | None = None, frequency_penalty: float | None = None,
                         presence_penalty: float | None = None, flash_attn: str | None = None) -> Sampler:
    """The preset `name` with any penalty (or flash-attention setting) given on the command line in place of its
    own; a bad value is a UserError naming the option."""
    name = name or "greedy"
    if name not in PRESETS:
        raise UserError(f"--sampler must be one of {', '.join(PRESETS)}, got '{name}'")
    s = PRESETS[name]
    given = {k: v for k, v in (("repeat_penalty", repeat_penalty), ("repeat_last_n", repeat_last_n),
                               ("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty),
                               ("flash_attn", flash_attn))
             if v is not None}
    checks = [
        (repeat_penalty is None or (np.isfinite(repeat_penalty) and repeat_penalty > 0),
         f"--repeat-penalty must be a number above 0 (1 = off), got {repeat_penalty}"),
        (repeat_last_n is None or repeat_last_n >= 0,
         f"--repeat-last-n must be at least 0 (0 = off), got {repeat_last_n}"),
        (frequency_penalty is None or np.isfinite(frequency_penalty),
         f"--frequency-penalty must be a finite number, got {frequency_penalty}"),
        (presence_penalty is None or np.isfinite(presence_penalty),
         f"--presence-penalty must be a finite number, got {presence_penalty}"),
        (flash_attn is None or flash_attn in FLASH_ATTN,
         f"--flash-attn must be one of {', '.join(FLASH_ATTN)}, got '{flash_attn}'"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if given:
        s = dataclasses.replace(s, name=f"{name} ({', '.join(f'{k}={v}' for k, v in given.items())})", **given)
    return s


def sampler_of(settings: dict) -> Sampler:
    """The sampler a run's settings (config.yaml's, or TrainConfig's) train and certify for: its `sampler` preset
    with its penalties; greedy for a run that names none."""
    return sampler_from_options(settings.get("sampler") or "greedy", repeat_penalty=settings.get("repeat_penalty"),
                                repeat_last_n=settings.get("repeat_last_n"),
                                frequency_penalty=settings.get("frequency_penalty"),
                                presence_penalty=settings.get("presence_penalty"),
                                flash_attn=settings.get("flash_attn"))
