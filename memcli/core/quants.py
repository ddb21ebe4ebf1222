"""The file types llama.cpp's quantiser makes, by llama.cpp's own names (`llama-quantize`'s), and their checks:
what `export --quant`, `verify --deploy` and `train --deploy` accept. The types that need an importance matrix
are refused (memcli makes none). The quantising itself is memcli.llama.quantize."""

from __future__ import annotations

from memcli.core.errors import UserError

# name -> llama_ftype constant in llama_cpp (LLAMA_FTYPE_MOSTLY_<NAME>); f32 is LLAMA_FTYPE_ALL_F32.
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s",
               "q4_1", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
_NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
                  "iq4_xs", "iq4_nl", "q2_k_s", "tq1_0", "tq2_0")


def check_quant(name: str, what: str = "--quant") -> str:
    """The lower-case type name; UserError for a name llama.cpp's quantiser does not offer here."""
    key = str(name).strip().lower()
    if key in QUANT_TYPES:
        return key
    if key in _NEEDS_IMATRIX:
        raise UserError(f"{what} {name}: llama.cpp needs an importance matrix (imatrix) for this type, which memcli "
                        f"does not make; choose one of {', '.join(QUANT_TYPES)}")
    raise UserError(f"{what} must be one of {', '.join(QUANT_TYPES)}, got '{name}'")


def parse_quants(text: str, what: str = "--deploy") -> list[str]:
    """A comma-separated list of types, checked (duplicates dropped, order kept)."""
    names = [t for t in (p.strip() for p in str(text).split(",")) if t]
    if not names:
        raise UserError(f"{what} needs at least one type, e.g. q8_0,q4_k_m")
    return list(dict.fromkeys(check_quant(n, what) for n in names))
