"""Independent check of memcli's locality figures: plain transformers + PEFT, no memcli code.

    python docs/locality/independent_check.py BASE_HF_FOLDER RUN/adapter TEXT [--window 128]

BASE_HF_FOLDER is the folder of HF weights the run trained on (for smollm2-135m, memcli's cached dequantised
weights: ls ~/.cache/memcli). Prints JSON: greedy next-token agreement between base and base + adapter over the
text, mean KL(base || tuned), the CE of each, and the token count, teacher-forced in consecutive windows.
"""

import argparse
import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("adapter")
ap.add_argument("text")
ap.add_argument("--window", type=int, default=128)
args = ap.parse_args()

tok = AutoTokenizer.from_pretrained(args.base)
ids = tok(open(args.text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
w = args.window
windows = torch.tensor([ids[i: i + w] for i in range(0, len(ids) - w + 1, w)])
base = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32).eval()
tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32),
                                  args.adapter).eval()
agree = kl = ce_p = ce_q = n = 0.0
with torch.no_grad():
    for k in range(0, len(windows), 4):
        x = windows[k: k + 4]
        lp = torch.log_softmax(base(input_ids=x).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(tuned(input_ids=x).logits[:, :-1].float(), -1)
        nxt = x[:, 1:, None]
        agree += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
        kl += (lp.exp() * (lp - lq)).sum(-1).sum().item()
        ce_p -= lp.gather(-1, nxt).sum().item()
        ce_q -= lq.gather(-1, nxt).sum().item()
        n += nxt.numel()
print(json.dumps({"argmax_agreement": agree / n, "kl": kl / n, "ce_base": ce_p / n, "ce_tuned": ce_q / n,
                  "tokens": int(n)}))
