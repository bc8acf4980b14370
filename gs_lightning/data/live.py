"""Activations generated live: text -> model -> hooks -> shuffle buffer -> batches."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from gs_lightning.data.base import ActivationDataModule, as_is, data_parallel_rank
from gs_lightning.data.buffer import ShuffleBuffer
from gs_lightning.data.scaling import SCHEMES, ScalingScheme, estimate_input_scale
from gs_lightning.data.shard_format import all_finite
from gs_lightning.errors import ConfigError, check_at_least
from gs_lightning.lm.load import (
    ModelDtype,
    check_context_size,
    load_model_config,
    parse_dtype,
    shared_language_model,
)
from gs_lightning.lm.sites import (
    ActivationExtractor,
    check_site_config,
    site_dim,
    site_dim_from_config,
)
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts


class _Stream(IterableDataset):
    """An endless dataset whose every ``iter()`` restarts the seeded stream."""

    def __init__(self, make: Any) -> None:
        self._make = make

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self._make()


class LiveActivationDataModule(ActivationDataModule):
    """Run a language model over a text and stream shuffled activations of one site.

    Batches are raw float32 ``[batch_size, d_in]`` activations of content tokens (BOS,
    EOS and padding positions are dropped, as in Gemma Scope). With ``target_site``,
    batches are ``(input, target)`` pairs of the same tokens (for transcoders).

    Args:
        model: Embedded model name, local directory or Hugging Face hub name.
        site: Where to read: ``blocks.{L}.hook_resid_post``, ``blocks.{L}.hook_mlp_out``,
            ``blocks.{L}.attn.hook_z`` or ``<module.path>:output`` / ``:input``.
        text: ``kjv``, a local .txt file or directory, or a Hugging Face datasets name.
        text_split: Split of ``text`` that training reads.
        val_split: Split of ``text`` that the fixed validation set comes from.
        text_column: Column holding the text in a datasets dataset.
        context_size: Tokens per context, BOS included (Gemma Scope uses 1024).
        batch_size: Activations per training batch.
        model_batch_size: Contexts per forward pass of the language model.
        buffer_tokens: Capacity of the shuffle buffer in activations.
        input_scaling: How the scalar input scale is chosen (Gemma Scope: unit_mean_squared_norm).
        scale_estimate_tokens: Activations (from the train stream's start) that estimate the scale.
        val_tokens: Activations in the fixed validation set.
        model_dtype: Dtype the language model runs in.
        revision: Hub revision (branch, tag or commit) of the model.
        seed: Seed of the shuffle buffer; the same seed gives the same batches.
        target_site: A second site read in the same forward pass, e.g.
            ``blocks.{L}.hook_mlp_out`` when ``site`` is the MLP input; batches become pairs.

    Resuming is approximate: the stream skips the tokens already read (without running
    the model on them) and starts with an empty buffer, so the activations that sat in
    the buffer at checkpoint time are never seen. Use cached activations for exact resume.
    """

    def __init__(
        self,
        model: str = "gs-lightning/tiny-gemma2-kjv",
        site: str = "blocks.2.hook_resid_post",
        text: str = "kjv",
        text_split: str = "train",
        val_split: str = "validation",
        text_column: str = "text",
        context_size: int = 128,
        batch_size: int = 4096,
        model_batch_size: int = 16,
        buffer_tokens: int = 262144,
        input_scaling: ScalingScheme = "unit_mean_squared_norm",
        scale_estimate_tokens: int = 65536,
        val_tokens: int = 32768,
        model_dtype: ModelDtype = "float32",
        revision: str | None = None,
        seed: int = 0,
        target_site: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_name, self.site, self.text = model, site, text
        self.text_split, self.val_split, self.text_column = text_split, val_split, text_column
        self.context_size, self.batch_size = context_size, batch_size
        self.model_batch_size, self.buffer_tokens = model_batch_size, buffer_tokens
        self.input_scaling, self.scale_estimate_tokens = input_scaling, scale_estimate_tokens
        self.val_tokens, self.model_dtype = val_tokens, model_dtype
        self.revision, self.seed, self.target_site = revision, seed, target_site
        self._validate()
        self._config = load_model_config(model, revision)
        check_site_config(self._config, site)
        if target_site is not None:
            check_site_config(self._config, target_site)
        check_context_size(self._config, context_size, model)
        self._widths: dict[str, int] = {}
        self._lm: Any = None
        self._tokenizer: Any = None
        self._extractor: ActivationExtractor | None = None
        self._val: torch.Tensor | None = None  # [n, d_in (+ d_out)]: the sites side by side
        self._batches_yielded = 0
        self._tokens_read = 0
        self._resume_tokens = 0

    def _validate(self) -> None:
        check_at_least(self, {"context_size": 2, "batch_size": 1, "model_batch_size": 1,
                              "scale_estimate_tokens": 1, "val_tokens": 1})
        if self.buffer_tokens < 2 * self.batch_size:
            raise ConfigError(
                f"buffer_tokens={self.buffer_tokens} must be >= 2 * batch_size={self.batch_size}"
            )
        if self.input_scaling not in SCHEMES:
            raise ConfigError(f"input_scaling={self.input_scaling!r} is not one of {list(SCHEMES)}")
        parse_dtype(self.model_dtype)

    # -- the interface -------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the site: from the model config, or a probe forward for module paths."""
        return self._width(self.site)

    @property
    def d_out(self) -> int:
        """Width of ``target_site`` (``d_in`` without one)."""
        return self.d_in if self.target_site is None else self._width(self.target_site)

    def _width(self, site: str) -> int:
        if site not in self._widths:
            width = site_dim_from_config(self._config, site)
            if width is None:  # a module path: only a forward pass can tell
                self._load()
                width = site_dim(self._lm, site)
            self._widths[site] = width
        return self._widths[site]

    @property
    def paired(self) -> bool:
        """Whether a ``target_site`` makes batches ``(input, target)`` pairs."""
        return self.target_site is not None

    @property
    def metadata(self) -> dict[str, Any]:
        """Where the activations come from; ``input_scale`` is None before setup."""
        return {
            "model": self.model_name,
            "revision": self.revision,
            "site": self.site,
            "context_size": self.context_size,
            "text": self.text,
            "text_split": self.text_split,
            "val_split": self.val_split,
            "text_column": self.text_column,
            "input_scaling": self.input_scaling,
            "input_scale": None if self._scales is None else self._scales[0],
            "d_in": self.d_in,
            **({} if self.target_site is None else {
                "target_site": self.target_site, "d_out": self.d_out,
                "target_scale": None if self._scales is None else self._scales[1]}),
        }

    def setup(self, stage: str | None = None) -> None:
        """Load the model, estimate the input scale and build the validation set (once)."""
        self._load()
        self._lm.to(self._device())
        if self._scales is None:
            train = iter_contexts(self._texts(self.text_split), self._tokenizer, self.context_size)
            chunks = _limit(self._activations(train), self.scale_estimate_tokens)
            if self.target_site is None:  # one site: stream the estimate, nothing held
                self._scales = [estimate_input_scale(chunks, self.input_scaling)]
            else:  # two sites side by side: one scale each from the same tokens
                pairs = [self._split(c) for c in chunks]
                self._scales = [estimate_input_scale((p[i] for p in pairs), self.input_scaling) for i in (0, 1)]
        if self._val is None:
            self._val = self._build_val_set()

    def teardown(self, stage: str | None = None) -> None:
        """Remove the hooks from the model."""
        if self._extractor is not None:
            self._extractor.close()
            self._extractor = None

    def _split(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows of the sites side by side, as one tensor per site."""
        return (rows,) if self.target_site is None else tuple(rows.split([self.d_in, self.d_out], dim=1))

    def train_dataloader(self) -> DataLoader:
        """An endless, seeded stream of shuffled ``[batch_size, d_in]`` batches (or pairs)."""
        return DataLoader(_Stream(self._train_batches), batch_size=None, num_workers=0, collate_fn=as_is)

    def val_dataloader(self) -> DataLoader:
        """The fixed validation set, in order; the last batch may be smaller."""
        if self._val is None:
            raise RuntimeError("the validation set is built in setup(); call setup() first")
        batches = [self._pair(b) for b in self._val.split(self.batch_size)]
        return DataLoader(batches, batch_size=None, num_workers=0, collate_fn=as_is)

    def _pair(self, rows: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        parts = self._split(rows)
        return parts[0] if len(parts) == 1 else parts

    def state_dict(self) -> dict[str, Any]:
        """Seed and progress of the training stream (resume is approximate; see the class doc)."""
        return {
            "seed": self.seed,
            "batches_yielded": self._batches_yielded,
            "tokens_read": self._tokens_read,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue a run: the next training stream skips the tokens already read."""
        self.seed = int(state_dict["seed"])
        self._batches_yielded = int(state_dict["batches_yielded"])
        self._tokens_read = self._resume_tokens = int(state_dict.get("tokens_read", 0))

    # -- the stream ----------------------------------------------------------------

    def _load(self) -> None:
        if self._lm is None:
            # Shared with DeltaLMLoss (and anything else in this process) when it asks for
            # the same model and dtype: one copy in memory.
            self._lm, self._tokenizer = shared_language_model(self.model_name, self.revision, self.model_dtype)

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _rank_world(self) -> tuple[int, int]:
        return data_parallel_rank(self.trainer)

    def _texts(self, split: str) -> Iterator[str]:
        return iter_texts(self.text, split=split, column=self.text_column)

    def _endless_contexts(self, split: str) -> Iterator[torch.Tensor]:
        """Loop over the text epoch after epoch, in the same document order."""
        while True:
            empty = True
            for ctx in iter_contexts(self._texts(split), self._tokenizer, self.context_size):
                empty = False
                yield ctx
            if empty:
                raise self._too_short(split)

    def _activations(self, contexts: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Content-token activations ``[n, d_in (+ d_out)]``, float32 on the model's device, per
        forward; with a target site its activations sit beside the input's, so one shuffle
        buffer keeps each pair together."""
        sites = [self.site] if self.target_site is None else [self.site, self.target_site]
        if self._extractor is None:
            self._extractor = ActivationExtractor(self._lm, sites)
        device = next(self._lm.parameters()).device
        while group := list(islice(contexts, self.model_batch_size)):
            ids = torch.stack(group).to(device)
            acts = self._extractor(ids, torch.ones_like(ids))
            mask = content_mask(ids, self._tokenizer)
            rows = torch.cat([acts[site][mask].float() for site in sites], dim=1)
            if not all_finite(rows):
                raise ConfigError(
                    f"model {self.model_name!r} produced NaN or Inf activations at "
                    f"site(s) {sites} (model_dtype={self.model_dtype!r}; try float32)"
                )
            yield rows

    def _train_batches(self) -> Iterator[torch.Tensor]:
        rank, world = self._rank_world()
        contexts = islice(self._endless_contexts(self.text_split), rank, None, world)
        contexts = _skip_content_tokens(contexts, self._resume_tokens, self._tokenizer)
        self._tokens_read = self._resume_tokens
        # Ranks share the text but take strided contexts, and mix with their own seed.
        buffer = ShuffleBuffer(
            self.buffer_tokens,
            self.d_in + (0 if self.target_site is None else self.d_out),
            self.batch_size,
            seed=self.seed * 65536 + rank,
            device=self._device(),
        )
        for rows in self._activations(contexts):
            self._tokens_read += len(rows)
            buffer.add(rows)
            for batch in buffer.batches():
                self._batches_yielded += 1
                yield self._pair(batch)

    def _build_val_set(self) -> torch.Tensor:
        contexts = iter_contexts(self._texts(self.val_split), self._tokenizer, self.context_size)
        chunks = [c.cpu() for c in _limit(self._activations(contexts), self.val_tokens)]
        if not chunks:
            raise self._too_short(self.val_split)
        val = torch.cat(chunks)
        if len(val) < self.val_tokens:
            msg = f"val_split={self.val_split!r} has {len(val)} of val_tokens={self.val_tokens}"
            warnings.warn(msg, stacklevel=2)
        return val

    def _too_short(self, split: str) -> ConfigError:
        return ConfigError(
            f"text={self.text!r} split {split!r} is shorter than one context "
            f"(context_size={self.context_size} tokens)"
        )


def _limit(chunks: Iterator[torch.Tensor], n: int) -> Iterator[torch.Tensor]:
    """The first ``n`` rows of a stream of ``[k, d]`` chunks."""
    if n <= 0:
        return
    for chunk in chunks:
        yield chunk[:n]
        n -= len(chunk)
        if n <= 0:  # stop before pulling (and computing) one more chunk
            return


def _skip_content_tokens(
    contexts: Iterator[torch.Tensor], n: int, tokenizer: Any
) -> Iterator[torch.Tensor]:
    """Drop whole contexts until ``n`` content tokens are skipped: a resume without forwards."""
    for ctx in contexts:
        if n <= 0:
            yield ctx
            break
        n -= int(content_mask(ctx, tokenizer).sum())
    yield from contexts
