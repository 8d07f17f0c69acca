"""`Engine`: batched prefill and decode with a preallocated KV cache, sampling, stops, streaming."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import torch

from openafm.model import KVCache, Linear, Transformer
from openafm.model.compressed import is_compressed
from openafm.runtime.adapter_cache import AdapterCache, overlaid, overlay
from openafm.runtime.detokenize import IncrementalDetokenizer, RowText, StopMatcher
from openafm.runtime.sampling import SamplingParams, sample_next, seeded_generator
from openafm.runtime.speculative import Drafter, DraftModel, next_draft_length, verify
from openafm.runtime.threads import ThreadTuner
from openafm.tokenizer import Tokenizer


class ContextLengthError(ValueError):
    """A prompt does not fit the model's context window."""


AdapterChoice = str | None | Sequence[str | None]
"""One adapter name for the whole batch, none, or one (or None) per prompt."""


@dataclass
class Completion:
    """One generated answer and how it was produced."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    ttft_ms: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and how many were kept
    accepted_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def to_dict(self) -> dict[str, object]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "ttft_ms": round(self.ttft_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
        }


@dataclass
class _Row(RowText):
    """Generation state of one prompt in the batch."""

    drafted: int = 0
    accepted: int = 0


class Engine:
    """Generates text from a model and its tokenizer.

    Prefill runs in float32 by default, so greedy output matches a float32 reference token for
    token; `prefill_dtype=torch.bfloat16` runs it under autocast on a bf16 copy of the projection
    weights (AMX or AVX-512-BF16 units, about 2x faster here; casting the weights on every call
    cost a third of that gain) at the cost of bf16 rounding and the copy's memory. Decode runs
    in the weights' dtype (memory-bound). Prompts of different lengths are left-padded into one
    batch; each row stops on its own. With an `AdapterCache`, each request may name a feature
    adapter; rows of one batch may use different adapters. With `speculation`, a single prompt
    decodes speculatively (drafts verified in one forward; the output is what plain decoding
    gives; a `PromptLookup` or a `DraftModel` drafts); batches of several prompts decode
    plainly. Decode steps choose their thread count by timing (`ThreadTuner`), so another busy
    process on the machine does not collapse them; `tune_threads=False` keeps PyTorch's setting.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        prefill_dtype: torch.dtype = torch.float32,
        cache_dtype: torch.dtype = torch.float32,
        adapters: AdapterCache | None = None,
        speculation: Drafter | None = None,
        tune_threads: bool = True,
    ) -> None:
        self.model = model.eval()
        if isinstance(speculation, DraftModel):
            vocab = speculation.model.config.vocab_size
            if vocab != model.config.vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary ({vocab}) is not the model's"
                    f" ({model.config.vocab_size}): they must share the tokenizer"
                )
        self.speculation = speculation
        self.threads = ThreadTuner() if tune_threads else None
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.prefill_dtype = prefill_dtype
        self.prefill_model = model
        # compressed projections compute from their tables; a dense twin would defeat them
        if prefill_dtype != model.dtype and not is_compressed(model):
            self.prefill_model = _cast_copy(model, prefill_dtype)
        self.cache_dtype = cache_dtype
        self.context_length = model.config.max_seq_len

    # --- prompts ----------------------------------------------------------------------------

    def encode(self, prompt: str, *, chat: bool = True, system: str | None = None) -> list[int]:
        """Prompt ids: a chat turn rendered with the model's template, or plain text."""
        if chat:
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages.append({"role": "user", "content": prompt})
            return self.tokenizer.encode_chat(messages)
        text = prompt if system is None else f"{system}\n\n{prompt}"
        return self.tokenizer.encode(text)

    # --- generation -------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams = SamplingParams(),
        adapters: AdapterChoice = None,
    ) -> list[Completion]:
        """Generate for a batch of tokenized prompts (of any lengths) in one call."""
        run = self._run(prompts, params, adapters)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        adapter: str | None = None,
    ) -> Generator[str, None, Completion]:
        """Yield text pieces as they are produced; the generator's return value is the `Completion`."""
        run = self._run([prompt], params, adapter)
        while True:
            try:
                _, piece = next(run)
            except StopIteration as done:
                return done.value[0]
            yield piece

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Refuse an empty batch, empty prompts, unknown ids and prompts over the context."""
        if not prompts:
            raise ValueError("no prompts given")
        for ids in prompts:
            if not ids:
                raise ValueError("empty prompt: give at least one token")
            if len(ids) >= self.context_length:
                raise ContextLengthError(
                    f"prompt of {len(ids)} tokens does not fit the context length"
                    f" {self.context_length} (leave room for at least one new token)"
                )
            vocab = self.model.config.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"token ids must be in [0, {vocab})")

    def _adapter_rows(self, choice: AdapterChoice, n: int) -> list[str | None]:
        names = [choice] * n if choice is None or isinstance(choice, str) else list(choice)
        if len(names) != n:
            raise ValueError(f"{len(names)} adapter choices for {n} prompts")
        if any(names) and self.adapters is None:
            raise ValueError("this engine was built without an adapter cache")
        return names

    def prefill_autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast to the prefill dtype when prefill runs on a twin in that dtype."""
        if self.prefill_model is self.model:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.prefill_dtype)

    def _run(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, adapters: AdapterChoice
    ) -> Generator[tuple[int, str], None, list[Completion]]:
        """Load the batch's adapters (all or none), overlay them, and generate."""
        self.check_prompts(prompts)
        names = self._adapter_rows(adapters, len(prompts))
        if self.adapters is None:  # no adapter cache: the model as it is, with what it holds
            return (yield from self._generate(prompts, params))
        rows = self.adapters.resolve_rows(names)
        models = dict.fromkeys((self.model, self.prefill_model))
        drafter = self.speculation
        if isinstance(drafter, DraftModel) and drafter.model.config == self.model.config:
            models[drafter.model] = None  # the same feature adapter: drafts in the same style
        with overlaid(list(models), overlay(rows)):
            return (yield from self._generate(prompts, params))

    def _generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> Generator[tuple[int, str], None, list[Completion]]:
        """Prefill, then decode until every row stops; yields (row, new text) as text is final."""
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        budget = min(params.max_tokens, self.context_length - width)
        pad_id = self.tokenizer.eos_id or 0
        tokens = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
        pad = torch.tensor([width - n for n in lengths])
        cache = KVCache(
            self.model.config.n_layers,
            len(prompts),
            width + budget,
            dtype=self.cache_dtype,
            pad=pad,
        )
        generator = seeded_generator(params.seed)
        stops = StopMatcher(params.stop)
        rows = [_Row(IncrementalDetokenizer(self.tokenizer)) for _ in prompts]

        start = time.perf_counter()
        with torch.inference_mode(), self.prefill_autocast():
            logits = self.prefill_model(tokens, cache, last_only=True)[:, -1]
        next_ids = sample_next(logits, params, generator)
        first = time.perf_counter()
        if self.speculation is not None and len(prompts) == 1:
            decode = self._decode_speculative(
                list(prompts[0]), int(next_ids[0]), cache, rows[0], budget, params, stops, generator
            )
        else:
            decode = self._decode(next_ids, cache, rows, budget, params, stops, generator)
        yield from decode
        end = time.perf_counter()

        ttft = first - start
        return [
            Completion(
                text=r.text,
                token_ids=r.token_ids,
                prompt_tokens=n,
                finish_reason=r.finish_reason or "length",
                ttft_ms=ttft * 1e3,
                decode_tokens_per_s=(len(r.token_ids) - 1) / (end - first)
                if len(r.token_ids) > 1 and end > first
                else 0.0,
                prefill_tokens_per_s=n / ttft if ttft > 0 else 0.0,
                draft_tokens=r.drafted,
                accepted_tokens=r.accepted,
            )
            for r, n in zip(rows, lengths, strict=True)
        ]

    def decode_threads(self) -> contextlib.AbstractContextManager[None]:
        """The thread count the tuner picks for one decode step."""
        return self.threads.step() if self.threads is not None else contextlib.nullcontext()

    def _decode(
        self,
        next_ids: torch.Tensor,
        cache: KVCache,
        rows: list[_Row],
        budget: int,
        params: SamplingParams,
        stops: StopMatcher,
        generator: torch.Generator,
    ) -> Generator[tuple[int, str], None, None]:
        """One token per row per forward, until every row stops."""
        for step in range(budget):
            if step:
                with torch.inference_mode(), self.decode_threads():
                    logits = self.model(next_ids[:, None], cache, last_only=True)[:, -1]
                next_ids = sample_next(logits, params, generator)
            for i, token in enumerate(next_ids.tolist()):
                row = rows[i]
                if row.finish_reason is None:
                    piece = row.append(
                        token,
                        self.tokenizer.stop_ids,
                        stops,
                        last=step == budget - 1,
                        ignore_eos=params.ignore_eos,
                    )
                    if piece:
                        yield i, piece
            if all(r.finish_reason for r in rows):
                break

    def _decode_speculative(
        self,
        history: list[int],
        pending: int,
        cache: KVCache,
        row: _Row,
        budget: int,
        params: SamplingParams,
        stops: StopMatcher,
        generator: torch.Generator,
    ) -> Generator[tuple[int, str], None, None]:
        """One prompt: feed the pending token with a draft, keep what verification accepts.

        `pending` is a chosen token whose key/value is not yet in the cache; each forward
        writes it and the draft, and the cache forgets the rejected part of the draft.
        """
        assert self.speculation is not None
        drafter = self.speculation.session(cache.max_len)
        accepted: list[int] = []
        length = self.speculation.max_draft
        while True:
            # the accepted draft, then the token that follows it (the budget leaves it room)
            for token in [*accepted, pending]:
                last = len(row.token_ids) + 1 == budget
                stop_ids = self.tokenizer.stop_ids
                piece = row.append(token, stop_ids, stops, last=last, ignore_eos=params.ignore_eos)
                if piece:
                    yield 0, piece
                history.append(token)
                if row.finish_reason:
                    return
            room = min(budget - len(row.token_ids) - 1, cache.max_len - cache.length - 1)
            with self.decode_threads():
                proposal = drafter.draft(history, min(room, length), params, generator)
                draft = proposal.tokens
                with torch.inference_mode():
                    logits = self.model(torch.tensor([[pending, *draft]]), cache)[0]
            n_accepted, pending = verify(logits, draft, params, generator, proposal.probs)
            cache.truncate(cache.length - (len(draft) - n_accepted))
            accepted = draft[:n_accepted]
            length = next_draft_length(length, len(draft), n_accepted, self.speculation.max_draft)
            row.drafted += len(draft)
            row.accepted += n_accepted


def _cast_copy(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A prefill twin of `model`: projection weights copied in `dtype`, the rest shared.

    The embedding and norms stay in the original precision, so under autocast the residual
    stream stays float32 (a model cast wholesale to bf16 lost the answer to a simple question).
    """
    with torch.device("meta"):
        twin = Transformer(model.config)
    twin.load_weights(model.state_dict())
    for module in twin.modules():
        if isinstance(module, Linear):
            module.weight = torch.nn.Parameter(
                module.weight.detach().to(dtype), requires_grad=False
            )
    return twin.eval()
