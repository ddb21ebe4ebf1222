"""What `memcli train --deploy TYPE` adds to the training loop (memcli.train.Trainer): the base as llama.cpp's
quantiser makes it at TYPE, both deployment forms in every forward pass (memcli.deploy.qat), and llama.cpp's
verdict on the deployed files made from the adapter as it is (memcli.deploy.check)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .. import models, runs
from ..errors import UserError


class Deployment:
    def __init__(self, spec: models.ModelSpec, quant: str, log=print):
        self.spec, self.quant, self.log = spec, quant, log
        self.target = None  # qat.DeployTarget, once the adapter exists
        self.rows, self.step, self.error = None, None, None  # llama.cpp's last verdict, its step, why none

    def load_base(self, dtype: str, device: str):
        """The torch model of the base as llama.cpp quantises it (the quantised GGUF made once, dequantised)."""
        self.base_gguf, model = quantised_base(self.spec, self.quant, dtype, device, self.log)
        return model

    def attach(self, peft_model, blocker: str | None) -> None:
        """Put the merged form into the adapted layers; refuse (before the run folder exists) when the adapter
        could not be exported, since both deployed files are made from its GGUF export."""
        from .qat import DeployTarget

        if blocker is not None:
            raise UserError(f"--deploy makes and checks GGUF files: {blocker}")
        self.target = DeployTarget(peft_model, models.hf_dir(self.spec), self.base_gguf)

    def evaluate(self, evaluate):
        """`evaluate()` (a clean recall pass) in both forms: an entry recalled only where both recall it."""
        return worst([evaluate() for _ in self.target.forms()])

    def answer_ce(self, answer_ce):
        """`answer_ce()` in both forms, each token's worse form: the higher CE and lower margin, correct only in
        both, so the objective trains a token while either deployed file could get it wrong."""
        (ce_a, ok_a, m_a), (ce_m, ok_m, m_m) = [answer_ce() for _ in self.target.forms()]
        return torch.maximum(ce_a, ce_m), ok_a & ok_m, torch.minimum(m_a, m_m)

    def check(self, model, examples, out: Path, step: int) -> bool:
        """llama.cpp's verdict on both deployed files made from the adapter now (the merged file kept in
        RUN/deploy/); True when both certify every entry. A failure to make or score them is a warning (recorded
        in summary.json), never the loss of the run."""
        from .check import check_deployed

        self.step = step
        try:
            with tempfile.TemporaryDirectory(prefix=".deploy-", dir=out) as work:
                peft = Path(work) / "adapter"
                model.save_pretrained(peft)
                self.rows = check_deployed(peft, self.spec, self.quant, examples, Path(work),
                                           keep_merged=runs.deployed_path(out, self.quant))
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.rows, self.error = None, str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.log(f"warning: the deployed files could not be checked in llama.cpp: {self.error}")
            return False
        self.error = None
        ok = all(r["certified"] == r["entries"] for r in self.rows)
        self.log(f"step {step}: llama.cpp on the deployed {self.quant} files: " + ", ".join(
            f"{r['form']} {r['certified']}/{r['entries']} certified" for r in self.rows) + ("" if ok else "; training on"))
        return ok

    def summary(self, model, examples, out: Path, step: int) -> dict:
        """summary.json's `deploy`: llama.cpp's verdict at the last step (checked now if the last check was
        earlier), the files, the tensor types of the adapted layers."""
        if self.step != step:
            self.check(model, examples, out, step)
        return {"type": self.quant, "forms": self.rows, "error": self.error,
                "merged_gguf": str(runs.deployed_path(out, self.quant).relative_to(out)),
                "base_gguf": str(self.base_gguf), "tensor_types": self.target.types}


def quantised_base(spec, quant: str, dtype: str, device: str, log=print):
    """(the base GGUF of `spec` at type `quant`, made once by llama.cpp's quantiser, and the torch model loaded
    from it: the weights llama.cpp multiplies with, dequantised)."""
    from .. import models
    from ..gguf.base import cached_base

    log(f"--deploy {quant}: training against the base as llama.cpp quantises it to {quant}")
    path = cached_base(spec, quant)
    model, _ = models.load_model(models.resolve(str(path)), dtype, device)
    return path, model


def worst(recalls):
    """One forward.Recall from the recall of each form: an entry is recalled (certified) only where every form
    recalls (certifies) it; its min p and token accuracy are the lowest, the mean CE the highest."""
    from ..forward import Recall

    def each(name, pick):
        return [pick(vals) for vals in zip(*(getattr(r, name) for r in recalls))]

    return Recall(max(r.mean_ce for r in recalls), each("exact", all), each("certified", all), each("min_p", min),
                  min(r.above for r in recalls), each("token_accuracy", min))
