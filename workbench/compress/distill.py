"""`workbench.distill`: bring a pruned student back toward its teacher.

The student and the teacher are loaded by transformers from their GGUF files
(dequantized), in a child process on the CPU. The student's weights are trained to
minimize the KL divergence from the teacher's next-token distributions over calibration
text; then they are written back into a copy of the student's GGUF (same metadata and
tokenizer), as F16, and quantized again to the student's type by llama.cpp's quantizer.
Only the llama architecture's tensor names are mapped.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..models.gguf_file import read_header


@dataclass
class Distilled:
    path: Path
    student: Path
    teacher: Path
    steps: int
    losses: list[float] = field(default_factory=list)   # KL per step, nats per token
    seconds: float = 0.0

    def figure(self) -> Any:
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(y=self.losses, mode="lines+markers"))
        fig.update_layout(title="Distillation: KL from the teacher per step",
                          xaxis_title="step", yaxis_title="KL (nats/token)", height=300,
                          margin=dict(l=50, r=20, t=50, b=40))
        return fig

    def __repr__(self) -> str:
        first, last = (self.losses[0], self.losses[-1]) if self.losses else (0.0, 0.0)
        return (f"{self.path}: {self.steps} steps in {self.seconds:.0f} s, KL from the teacher "
                f"{first:.3f} → {last:.3f} nats/token")


def distill(student: str | os.PathLike, teacher: str | os.PathLike, *,
            out: str | os.PathLike | None = None, steps: int = 40, seq_len: int = 256,
            lr: float = 5e-5, text: str | None = None, overwrite: bool = False,
            to: str | None = None, train_from: int = 0, threads: int | None = None,
            progress: Callable[[float], None] | None = None) -> Distilled:
    """Train `student` toward `teacher` (both GGUF paths, one tokenizer) for `steps`
    steps of `seq_len` tokens; write the result as `<student>-distilled.<QUANT>.gguf`,
    in the student's own type unless `to` names another.

    `train_from`: the first layer trained. Layers before it, and the (tied) embeddings,
    stay frozen; after removing layers i.., the layers before i see exactly the
    teacher's inputs, so training from i spends the budget where the gap is."""
    from .._cpu import idle_cores
    from .. import _child
    from .quantize import default_output, quantize
    from .text import calibration_text

    s, t = Path(student).expanduser(), Path(teacher).expanduser()
    hs, ht = read_header(s), read_header(t)
    for h, p in ((hs, s), (ht, t)):
        if h.architecture != "llama":
            raise WorkbenchError(f"distillation maps llama-architecture models; {p.name} is "
                                 f"{h.architecture}", "Use a llama-architecture model.")
    if _vocabulary(hs) != _vocabulary(ht):
        raise WorkbenchError(
            f"{s.name} and {t.name} have different vocabularies ({_vocabulary(hs)[2]:,} and "
            f"{_vocabulary(ht)[2]:,} tokens): the student learns the teacher's next-token "
            "distribution, token by token", "Distil a student made from the teacher "
            "(workbench.prune), which keeps its vocabulary.")
    if steps < 1 or seq_len < 16:
        raise WorkbenchError("steps must be ≥ 1 and seq_len ≥ 16", "For example steps=40.")
    n_layers = int(hs.arch_value("block_count", 0))
    if not 0 <= train_from < n_layers:
        raise WorkbenchError(f"train_from={train_from} is not a layer of {s.name} "
                             f"({n_layers} layers)", f"Give 0 to {n_layers - 1}.")
    if to is not None:
        from .quantize import quant_name

        quant = quant_name(to)
    else:
        quant = hs.quantization.upper()
    dst = Path(out).expanduser() if out else default_output(s, quant, "-distilled")
    if dst.exists() and not overwrite:
        raise WorkbenchError(f"{dst} exists", "Pass overwrite=True to replace it.")
    f16 = dst.with_name(f".{dst.name}.{os.getpid()}.f16.partial")
    t0 = time.monotonic()
    try:
        losses = _child.run(_distill_child, (str(s), str(t), str(f16), steps, seq_len, lr,
                                             train_from, text or calibration_text(),
                                             threads or idle_cores().idle),
                            f"distilling {s.name} from {t.name}", progress)
        if quant == "F16":
            os.replace(f16, dst)
        else:
            quantize(f16, quant, dst, overwrite=True)  # back to the student's own type
    finally:
        f16.unlink(missing_ok=True)
    return Distilled(dst, s, t, steps, losses, time.monotonic() - t0)


def _vocabulary(h: Any) -> tuple[Any, Any, int]:
    """What must agree for two models to share next-token distributions."""
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    return (h.metadata.get("tokenizer.ggml.model"), h.metadata.get("tokenizer.ggml.pre"),
            int(getattr(tokens, "length", 0) or 0))


def _distill_child(student: str, teacher: str, f16_out: str, steps: int, seq_len: int,
                   lr: float, train_from: int, text: str, threads: int,
                   report: Any) -> list[float]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ..models.hf import load_model, load_tokenizer
    from ._gguf import finish, hf_to_gguf_name, permute_qk, writer_like

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = load_tokenizer(teacher)  # the student shares it (checked before the child started)
    # the teacher is kept dequantized for the next run; a pruned student is met once
    teach, stud = load_model(teacher), load_model(student, keep=False)
    teach.eval()
    stud.train()
    ids = tok(text, return_tensors="pt").input_ids[0]
    n = len(ids) // seq_len
    if n < 1:
        raise WorkbenchError("the calibration text is shorter than one sequence",
                             "Give a longer text or a smaller seq_len.")
    frozen = ("model.embed_tokens.", "lm_head.") + tuple(
        f"model.layers.{i}." for i in range(train_from)) if train_from else ()
    params = []
    for name, p in stud.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # a short warm-up, then cosine decay to a tenth
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, steps // 10))
                                              * (0.55 + 0.45 * math.cos(math.pi * k / steps)))
    losses = []
    report.progress(0.0, 0, steps, "steps")  # the rate counts from here, past the loading
    for step in range(steps):
        i = step % n
        x = ids[i * seq_len:(i + 1) * seq_len].unsqueeze(0)
        with torch.no_grad():
            t_logp = F.log_softmax(teach(x).logits.float(), dim=-1)
        s_logp = F.log_softmax(stud(x).logits.float(), dim=-1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        report.progress(0.9 * (step + 1) / steps, step + 1, steps, "steps")

    # write: the student's GGUF with every mapped tensor replaced (F16; norms F32)
    cfg = stud.config
    state = {k: v.detach().float().numpy() for k, v in stud.state_dict().items()}
    new: dict[str, Any] = {}
    for k, v in state.items():
        name = hf_to_gguf_name(k)
        if name is None:
            continue
        if k.endswith("q_proj.weight"):
            v = permute_qk(v, cfg.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            v = permute_qk(v, cfg.num_key_value_heads)
        new[name] = v
    reader, w = writer_like(student, f16_out, {"general.file_type": 1})  # MOSTLY_F16
    for t in reader.tensors:
        if t.name in new:
            arr = new[t.name]
            arr = arr.astype(np.float32 if arr.ndim == 1 else np.float16)
            w.add_tensor(t.name, np.ascontiguousarray(arr))
        else:
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    finish(w)
    report.progress(1.0)
    return losses
