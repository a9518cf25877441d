"""The training process: PyTorch, transformers and peft, never in the kernel.

It loads the base model from its GGUF file (transformers dequantizes it), wraps it in a
LoRA (or, on a CUDA GPU, a 4-bit QLoRA), and trains on the tokenized examples, sending
each step's numbers to the kernel through a queue. It checkpoints every `ckpt_every`
steps through the asynchronous double-buffered writer, and at the end (or on cancel)
writes the adapter as a GGUF LoRA. A resumed run continues from the newest whole
checkpoint: adapter, optimizer state, random state and position in the data.
"""

from __future__ import annotations

import math
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(spec: dict[str, Any], events: Any, cancel: Any) -> None:
    """Process entry point: every outcome becomes one last event."""
    try:
        events.put(("done", _train(spec, lambda *e: events.put(e), cancel)))
    except WorkbenchError as e:
        events.put(("error", e.message, e.hint))
    except Exception:
        events.put(("bug", traceback.format_exc()))


def check_architecture(arch: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise WorkbenchError(
            f"transformers cannot load GGUF models of the {arch!r} architecture, so this model "
            "cannot be fine-tuned here",
            "Fine-tune a model of a supported architecture (llama, e.g. the default "
            f"SmolLM2); transformers reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}.")
    if arch != "llama":
        raise WorkbenchError(f"the adapter export maps llama-architecture tensors; this model "
                             f"is {arch!r}", "Fine-tune a llama-architecture model.")


def _device(spec: dict[str, Any]) -> str:
    """cuda or cpu, as asked and as PyTorch here can; QLoRA only on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    if spec["method"] == "qlora":
        if not cuda:
            raise WorkbenchError("QLoRA needs a CUDA GPU (bitsandbytes' 4-bit kernels), and "
                                 "PyTorch here sees none",
                                 "Use method='lora': it trains the full-precision base on the "
                                 "CPU.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise WorkbenchError("QLoRA needs the bitsandbytes package, which is not installed",
                                 "pip install bitsandbytes, or use method='lora'.") from None
    if spec["device"] == "cuda" and not cuda:
        raise WorkbenchError("device='cuda' was asked for, but PyTorch here sees no CUDA GPU",
                             "Use device='auto' or 'cpu'.")
    return "cuda" if cuda and spec["device"] != "cpu" else "cpu"


def _load(spec: dict[str, Any], emit: Any) -> tuple[Any, Any, Any]:
    import torch

    from ..models.gguf_file import read_header
    from ..models.hf import load_model, load_tokenizer

    base = Path(spec["base"])
    header = read_header(base)
    check_architecture(header.architecture)
    emit("status", f"loading {base.name} (dequantizing for PyTorch)")
    tok = load_tokenizer(base)
    cuda = spec["device"] == "cuda"
    model = load_model(base, torch.bfloat16 if cuda else torch.float32)
    if spec["method"] == "qlora":
        model = _four_bit(model, spec)
    elif cuda:
        model = model.to("cuda")
    return tok, model, header


def _four_bit(model: Any, spec: dict[str, Any]) -> Any:
    """The dequantized model reloaded with bitsandbytes' 4-bit NF4 weights, on the GPU."""
    import copy
    import tempfile

    import torch
    from peft import prepare_model_for_kbit_training
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory(dir=spec["out_dir"]) as tmp:
        # transformers will not `save_pretrained` a model it read from GGUF, though it
        # holds plain tensors by now: the config and the weights go out as they are, the
        # config without GGUF's quantization_config (from_pretrained refuses to replace it)
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.bfloat16,
                                   bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant,
                                                     device_map={"": 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _batches(examples: list[Any], batch_size: int, seed: int, epoch: int) -> list[list[Any]]:
    """The epoch's batches: a shuffle seeded by (seed, epoch), so a step number alone
    says where in the data a run is."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [[examples[i] for i in order[k:k + batch_size]]
            for k in range(0, len(order), batch_size)]


def _collate(batch: list[Any], pad: int, device: str) -> tuple[Any, Any, Any, int]:
    import torch

    n = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.ids)] = 1
    tokens = int(mask.sum())
    return ids.to(device), labels.to(device), mask.to(device), tokens


def _val_loss(model: Any, val: list[Any], batch_size: int, pad: int, device: str) -> float:
    """Mean loss per trained token over the validation set."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(val), batch_size):
            ids, labels, mask, _ = _collate(val[k:k + batch_size], pad, device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shift = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((shift != -100).sum())
    model.train()
    return total / max(1, count)


def _state(model: Any, opt: Any, names: list[str], params: list[Any]) -> dict[str, Any]:
    """Everything a resume needs, as named tensors."""
    import torch

    out = {f"adapter.{n}": p for n, p in zip(names, params)}
    for n, p in zip(names, params):
        st = opt.state.get(p)
        if st:
            out[f"optim.{n}.exp_avg"] = st["exp_avg"]
            out[f"optim.{n}.exp_avg_sq"] = st["exp_avg_sq"]
            out[f"optim.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    out["rng.torch"] = torch.get_rng_state()
    return out


def _restore(tensors: dict[str, Any], opt: Any, names: list[str], params: list[Any]) -> None:
    import torch

    with torch.no_grad():
        for n, p in zip(names, params):
            key = f"adapter.{n}"
            if key not in tensors or tensors[key].shape != p.shape:
                raise WorkbenchError(f"the checkpoint does not match this run's adapter ({n})",
                                     "Resume with the same base model, rank and targets, "
                                     "or start over with resume=False.")
            p.copy_(tensors[key])
            if f"optim.{n}.exp_avg" in tensors:
                opt.state[p] = {
                    "step": tensors[f"optim.{n}.step"].reshape(()).to(torch.float32),
                    "exp_avg": tensors[f"optim.{n}.exp_avg"].to(p.device, p.dtype).clone(),
                    "exp_avg_sq": tensors[f"optim.{n}.exp_avg_sq"].to(p.device, p.dtype).clone()}
    torch.set_rng_state(tensors["rng.torch"])


def lr_at(step: int, total: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth."""
    warm = max(1, total // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))


def _memory(device: str) -> int:
    import psutil

    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    return psutil.Process().memory_info().rss


def _train(spec: dict[str, Any], emit: Any, cancel: Any) -> dict[str, Any]:
    import torch

    from .checkpoint import AsyncCheckpointer, CheckpointStore, SyncCheckpointer
    from .data import tokenize
    from .export import write_lora_gguf

    torch.set_num_threads(spec["threads"])
    device = _device(spec)
    spec = {**spec, "device": device}
    tok, model, header = _load(spec, emit)
    template = header.metadata.get("tokenizer.chat_template")
    bos = tok.bos_token or ""
    eos = tok.eos_token or ""
    max_len = min(spec["max_len"], int(header.arch_value("context_length", spec["max_len"])))
    train, warn_t = tokenize(spec["train"], tok, template, bos, eos, max_len, spec["truncate"])
    val, warn_v = tokenize(spec["val"], tok, template, bos, eos, max_len, spec["truncate"])
    for w in warn_t + warn_v:
        emit("warning", w)
    if not train or not val:
        raise WorkbenchError("no example is left to train or validate on after tokenization",
                             "Give more examples, or raise max_len.")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM")
    # seeded here, after the base is loaded: converting a GGUF file and reading the kept
    # copy (models/hf.py) draw different amounts of randomness, and the adapter's first
    # weights must not depend on which one ran
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, lcfg)
    model.train()
    # what the base and the adapter hold on the GPU before training: 4-bit or not shows here
    loaded = int(torch.cuda.memory_allocated()) if device == "cuda" else None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)

    steps_per_epoch = math.ceil(len(train) / spec["batch_size"])
    total = spec["steps"] or steps_per_epoch * spec["epochs"]
    store = CheckpointStore(Path(spec["out_dir"]) / "checkpoints", keep=spec["keep"])
    store.clean_partials()
    start, history = 0, {"train": [], "val": []}
    if spec["resume"]:
        found = store.newest()
        if found is not None:
            latest, tensors, info = found
            _restore(tensors, opt, names, params)
            start, history = int(info["step"]), info["history"]
            emit("status", f"resumed from {latest.name} (step {start} of {total})")
    ckpt = (AsyncCheckpointer if spec["async_checkpoints"] else SyncCheckpointer)(store)
    emit("start", {"total_steps": total, "start_step": start, "train_examples": len(train),
                   "val_examples": len(val), "steps_per_epoch": steps_per_epoch,
                   "trainable_params": sum(p.numel() for p in params), "history": history,
                   "pid": os.getpid()})
    if start == 0:
        v = _val_loss(model, val, spec["batch_size"], pad, device)
        history["val"].append((0, v))
        emit("val", {"step": 0, "val_loss": v})

    def info_at(step: int) -> dict[str, Any]:
        return {"step": step, "total_steps": total, "history": history,
                "base": spec["base"], "rank": spec["rank"], "alpha": spec["alpha"],
                "seed": spec["seed"], "lr": spec["lr"], "batch_size": spec["batch_size"]}

    stalls: list[float] = []
    step, cancelled, t_run, tokens_run = start, False, 0.0, 0
    batches, batches_epoch = [], -1
    try:
        parent = os.getppid()
        while step < total:
            if cancel.is_set() or os.getppid() != parent:  # asked to stop, or orphaned
                cancelled = True
                break
            epoch, index = divmod(step, steps_per_epoch)
            if epoch != batches_epoch:  # the order is drawn once per epoch
                batches = _batches(train, spec["batch_size"], spec["seed"], epoch)
                batches_epoch = epoch
            batch = batches[index]
            t0 = time.perf_counter()
            ids, labels, mask, n_tok = _collate(batch, pad, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, spec["lr"])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            dt = time.perf_counter() - t0
            t_run, tokens_run = t_run + dt, tokens_run + n_tok
            history["train"].append((step, loss.item()))
            emit("step", {"step": step, "loss": history["train"][-1][1], "tokens": n_tok,
                          "tokens_per_s": n_tok / dt, "seconds": dt, "memory": _memory(device),
                          "lr": opt.param_groups[0]["lr"]})
            if step % spec["eval_every"] == 0 or step == total:
                v = _val_loss(model, val, spec["batch_size"], pad, device)
                history["val"].append((step, v))
                emit("val", {"step": step, "val_loss": v})
            if step % spec["ckpt_every"] == 0 or step == total:
                stall = ckpt.save(step, _state(model, opt, names, params), info_at(step))
                stalls.append(stall)
                emit("checkpoint", {"step": step, "stall_s": stall})
        if cancelled and step > start:
            ckpt.save(step, _state(model, opt, names, params), info_at(step))
        ckpt.flush()
    finally:
        ckpt.close()

    emit("status", "writing the adapter as a GGUF LoRA")
    adapter = {n: p.detach() for n, p in zip(names, params)}
    cfg = model.base_model.model.config
    lora = write_lora_gguf(adapter, spec["base"], Path(spec["out_dir"]) / "adapter.gguf",
                           spec["alpha"], cfg.num_attention_heads, cfg.num_key_value_heads)
    vals = history["val"]
    return {"adapter": str(lora), "steps": step, "total_steps": total, "cancelled": cancelled,
            "val_loss_before": vals[0][1] if vals else None,
            "val_loss_after": vals[-1][1] if vals else None,
            "tokens_per_s": tokens_run / t_run if t_run else None, "loaded_memory": loaded,
            "checkpoint_stalls_s": stalls, "history": history,
            "checkpoints": [str(p) for p in store.paths()]}
