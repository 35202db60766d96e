# The `finetune` stage's trainer: LoRA supervised fine-tuning with PyTorch + transformers + peft,
# the adapter merged into the base weights and saved as a Hugging Face model directory
# (config.json, model.safetensors, tokenizer files, chat template).
#
#   python train.py JOB.json OUT_DIR
#
# JOB.json: {"base": {"gguf": PATH} | {"dir": PATH}, "method": "lora-sft" | "lora-dpo" | "lora-import",
#            "examples": [{"messages": [...], "answer": S}] (SFT),
#            "pairs": [{"messages": [...], "chosen": S, "rejected": S}] (DPO), "beta" (DPO),
#            "lora": {"rank", "alpha", "dropout", "target_modules"}, "epochs", "max_steps",
#            "learning_rate", "batch_size", "seed", "base_name": the base's catalog id,
#            "adapter": DIR (lora-import)}
# lora-import trains nothing: the PEFT adapter in DIR, trained elsewhere, is merged the same way.
# A trained adapter is saved too, in OUT_DIR/adapter (PEFT layout), before it is merged.
# DPO (Rafailov et al. 2023) scores each answer by its summed log-probability; the reference
# model is the base itself, the LoRA adapter switched off, so no second copy is held.
# Progress goes to stdout as JSON lines ({"event": "step", ...}); the last line is
# {"event": "done", ...}. Errors go to stderr, exit code 1 (2 for a job that cannot be trained).
#
# Deterministic by construction: one thread, torch's deterministic algorithms, seeded shuffling
# and initialization, and the CPU kernels pinned to AVX2 (the caller sets ATEN_CPU_CAPABILITY and
# MKL_CBWR), so two runs, and two AVX2 machines, train the same bits.
import json
import os
import random
import sys
import time


def emit(**fields):
    print(json.dumps(fields), flush=True)


def fail(message, code=2):
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def token_ids(encoded):
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def exit_with_parent():
    # Killed with the `pipeline` process that started it (kill -9 included): a training nobody
    # waits for must not go on using the machine.
    import threading

    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main():
    import warnings

    exit_with_parent()
    warnings.filterwarnings("ignore")
    if len(sys.argv) != 3:
        fail("usage: train.py JOB.json OUT_DIR")
    with open(sys.argv[1]) as f:
        job = json.load(f)
    out = sys.argv[2]

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(job["seed"])
    torch.manual_seed(job["seed"])

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    base = job["base"]
    started = time.monotonic()
    try:
        if "gguf" in base:
            where, name = os.path.split(base["gguf"])
            tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
            # Loaded from GGUF, the model is dequantized to float32; transformers refuses to save
            # a model it believes quantized.
            model.hf_quantizer = None
            model.is_quantized = False
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            tokenizer = AutoTokenizer.from_pretrained(base["dir"])
            model = AutoModelForCausalLM.from_pretrained(base["dir"], dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the user must see it
        fail(f"the trainer cannot load the base model: {type(e).__name__}: {e}")
    emit(event="loaded", seconds=round(time.monotonic() - started, 1))

    if job.get("method") == "lora-import":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, job["adapter"])
        except Exception as e:  # noqa: BLE001 - peft's own words say what does not fit
            fail(f"the adapter does not fit the base model: {type(e).__name__}: {e}")
        emit(event="start", examples=0, steps=0)
        save_merged(model.merge_and_unload(), tokenizer, out)
        emit(event="done", steps=0, examples=0, final_loss=None, seconds=round(time.monotonic() - started, 1), versions=versions())
        return

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode(i, messages, answer):
        """The conversation's token ids, and the answer's (the tokens learned)."""
        prompt = token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full = token_ids(tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=True))
        if full[: len(prompt)] != prompt:
            fail(f"example {i}: the chat template does not render the prompt as a prefix of the whole conversation")
        learned = full[len(prompt):]
        # Learn the answer and the end of its turn, nothing the template adds after it.
        if eos in learned:
            learned = learned[: learned.index(eos) + 1]
        return (prompt + learned, [-100] * len(prompt) + learned)

    dpo = job.get("method") == "lora-dpo"
    if dpo:
        units = [(encode(i, p["messages"], p["chosen"]), encode(i, p["messages"], p["rejected"])) for i, p in enumerate(job["pairs"])]
    else:
        units = [encode(i, ex["messages"], ex["answer"]) for i, ex in enumerate(job["examples"])]

    def tensors(rows):
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        return input_ids, labels, mask

    def answer_logps(rows):
        """Each row's answer: the sum of its tokens' log-probabilities."""
        input_ids, labels, mask = tensors(rows)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        learned = targets != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * learned).sum(-1)

    def loss_of(chunk):
        if not dpo:
            input_ids, labels, mask = tensors(chunk)
            return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        rows = [c for c, _ in chunk] + [r for _, r in chunk]
        n = len(chunk)
        policy = answer_logps(rows)
        with torch.no_grad(), model.disable_adapter():
            reference = answer_logps(rows)
        margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
        return -torch.nn.functional.logsigmoid(job["beta"] * margin).mean()

    lora = job["lora"]
    config = LoraConfig(
        r=lora["rank"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=job["learning_rate"], weight_decay=0.0)

    batch = job["batch_size"]
    per_epoch = (len(units) + batch - 1) // batch
    total = per_epoch * job["epochs"]
    if job.get("max_steps"):
        total = min(total, job["max_steps"])
    emit(event="start", examples=len(units), steps=total)
    order = random.Random(job["seed"])
    step = 0
    loss_value = None
    while step < total:
        idx = list(range(len(units)))
        order.shuffle(idx)
        for b in range(0, len(idx), batch):
            if step >= total:
                break
            loss = loss_of([units[i] for i in idx[b : b + batch]])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = loss.item()
            emit(event="step", step=step, steps=total, loss=round(loss_value, 6))

    # The adapter as trained, for servers that load one beside its base; then merged. It names
    # its base by catalog id, not by this machine's path, and peft's model card (which repeats
    # the path) is left out: the same training gives the same adapter bytes on every machine.
    model.peft_config["default"].base_model_name_or_path = job["base_name"]
    adapter = os.path.join(out, "adapter")
    model.save_pretrained(adapter)
    if os.path.exists(os.path.join(adapter, "README.md")):
        os.remove(os.path.join(adapter, "README.md"))
    save_merged(model.merge_and_unload(), tokenizer, out)
    emit(
        event="done",
        steps=step,
        examples=len(units),
        final_loss=loss_value,
        seconds=round(time.monotonic() - started, 1),
        versions=versions(),
    )


def versions():
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def save_merged(merged, tokenizer, out):
    """The merged model as a Hugging Face model directory that mistral.rs reads."""
    merged.eval()
    os.makedirs(out, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes RoPE settings under `rope_parameters`; readers of the older layout
    # (mistral.rs 0.8.1 among them) need `rope_theta` at the top.
    path = os.path.join(out, "config.json")
    with open(path) as f:
        saved = json.load(f)
    rope = saved.get("rope_parameters") or {}
    if "rope_theta" not in saved and "rope_theta" in rope and rope.get("rope_type", "default") == "default":
        saved["rope_theta"] = rope["rope_theta"]
        with open(path, "w") as f:
            json.dump(saved, f, indent=2, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    main()
