"""The large text models of the zoo: a small Transformer encoder ("transformer") and a BiLSTM ("bilstm"), in torch.

Private to ``clients``: build them through ``clients.models.build_model``. Both read a text
dataset's hashed word ids (``clients.text.token_ids``: int64 (N, L), left-aligned, 0 pads),
fold them into an embedding table of ``vocab_size`` rows (``clients.text.fold_ids``, in the
network, so a node needs nothing but its own texts) and end in a linear classifier. They
are built only from layers Opacus computes per-sample gradients for (Embedding, Linear,
LayerNorm; the LSTM becomes Opacus's DPLSTM under ``private=True``), with no BatchNorm, and
accept the ids as floats too (ids below 2^24 are exact in float32), which the memory
estimate and ONNX export feed. Training reuses the zoo's torch loop (``clients._torch_models``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from clients._model_checks import check_text_data
from clients._torch_models import TorchModel, predict_logits, resolve_device, seeded
from clients.data import Dataset

TEXT_NETWORKS = ("transformer", "bilstm")
VOCAB_SIZE = 2**15  # embedding rows of the folded word ids (row 0: padding)
WIDTH = 64  # embedding and model width
# initial embedding scale (BERT's 0.02): Adam moves a row by about the learning rate per step, so rows drawn from
# torch's N(0, 1) would bury what a node's few thousand reviews teach (on 2,050 rotten-tomatoes reviews, one epoch:
# transformer 0.58 -> 0.68, bilstm 0.58 -> 0.67 held-out accuracy)
EMBEDDING_STD = 0.02


def _embedding(rows: int, width: int, *, padding: bool) -> nn.Embedding:
    """Return an embedding drawn from N(0, EMBEDDING_STD²), its padding row 0 (if ``padding``) zero."""
    layer = nn.Embedding(rows, width, padding_idx=0 if padding else None)
    with torch.no_grad():
        layer.weight.normal_(0.0, EMBEDDING_STD)
        if padding:
            layer.weight[0].zero_()
    return layer


def _fold(x: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return word ids (any dtype) as int64 folded into 1..vocab_size-1, padding 0 kept (``clients.text.fold_ids``)."""
    ids = x.long()
    return torch.where(ids > 0, 1 + (ids - 1) % (vocab_size - 1), torch.zeros_like(ids))


class EncoderBlock(nn.Module):
    """A pre-norm Transformer encoder layer: masked multi-head self-attention and a GELU feed-forward, each residual."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        """Create the layers (attention as plain Linear layers, which Opacus supports)."""
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Return the block's output for ``h`` (B, L, W); ``keep`` (B, L) says which positions may be attended to."""
        batch, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  attn_mask=keep[:, None, None, :])
        h = h + self.dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, width)))
        return h + self.dropout(self.fc2(F.gelu(self.fc1(self.norm2(h)))))


class TextTransformer(nn.Module):
    """Token and position embeddings, ``layers`` encoder blocks, a masked mean over the words, a linear classifier."""

    def __init__(self, max_length: int, num_classes: int, *, vocab_size: int = VOCAB_SIZE, width: int = WIDTH,
                 heads: int = 4, layers: int = 2, hidden: int = 2 * WIDTH, dropout: float = 0.1) -> None:
        """Create the layers for texts of ``max_length`` word ids."""
        super().__init__()
        self.vocab_size = vocab_size
        self.tokens = _embedding(vocab_size, width, padding=True)
        self.positions = _embedding(max_length, width, padding=False)
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, hidden, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of word-id rows (B, L)."""
        ids = _fold(x, self.vocab_size)
        keep = ids > 0
        keep[:, 0] = True  # a text without words still attends to (and averages) one position
        where = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()  # batched, as Opacus needs
        h = self.dropout(self.tokens(ids) + self.positions(where))
        for block in self.blocks:
            h = block(h, keep)
        weights = keep.unsqueeze(-1).to(h.dtype)
        pooled = (self.norm(h) * weights).sum(dim=1) / weights.sum(dim=1)
        return self.out(pooled)


class TextBiLstm(nn.Module):
    """A word embedding, one bidirectional LSTM layer over the words, a max over time, a linear classifier."""

    def __init__(self, num_classes: int, *, vocab_size: int = VOCAB_SIZE, width: int = WIDTH, hidden: int = WIDTH,
                 dropout: float = 0.25) -> None:
        """Create the layers."""
        super().__init__()
        self.vocab_size = vocab_size
        self.tokens = _embedding(vocab_size, width, padding=True)
        self.lstm = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for a batch of word-id rows (B, L), read up to each row's last word."""
        ids = _fold(x, self.vocab_size)
        lengths = (ids > 0).sum(dim=1).clamp(min=1)  # ids are left-aligned; an empty text reads one padding
        packed = pack_padded_sequence(self.dropout(self.tokens(ids)), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=ids.shape[1])
        inside = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        pooled = states.masked_fill(~inside.unsqueeze(-1), float("-inf")).amax(dim=1)
        return self.out(self.dropout(pooled))


def build_text_network(name: str, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Return the untrained text network ``name`` for word-id rows of ``input_shape`` = (max_length,)."""
    if len(input_shape) != 1:
        raise ValueError(f"model {name!r} reads rows of word ids (max_length,), got input shape {input_shape}; "
                         "use a text dataset such as 'rotten-tomatoes'")
    if name == "transformer":
        return TextTransformer(input_shape[0], num_classes)
    if name == "bilstm":
        return TextBiLstm(num_classes)
    raise ValueError(f"no text network named {name!r}; expected one of {', '.join(TEXT_NETWORKS)}")


class TextTorchModel(TorchModel):
    """A text network with the uniform model interface: TorchModel's, plus checks that the data is text."""

    def fit(self, train: Dataset, **kwargs: Any) -> dict[str, float]:
        """Train as TorchModel.fit does (its arguments, ``weight_decay`` included), after checking the texts."""
        check_text_data(self.name, train)
        return super().fit(train, **kwargs)

    def evaluate(self, test: Dataset, *, batch_size: int) -> dict[str, float]:
        """Return cross-entropy loss, accuracy, macro F1 and num_examples on the texts ``test``."""
        check_text_data(self.name, test)
        return super().evaluate(test, batch_size=batch_size)

    def predict(self, x: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
        """Return the predicted class of every text (word-id row) in ``x`` (``batch_size`` bounds memory only)."""
        if len(x) == 0:
            return np.empty(0, dtype=np.int64)
        logits = predict_logits(self.network, np.ascontiguousarray(x, dtype=np.int64), batch_size=batch_size,
                                device=self.device)
        return logits.argmax(axis=1).astype(np.int64)


def build_text_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, seed: int, device: str,
                     private: bool = False) -> TextTorchModel:
    """Build and seed-initialize text network ``name`` on ``device`` (``private``: Opacus's layers where needed)."""
    device = resolve_device(device)
    with seeded(seed, "cpu"):  # initialize on the CPU: same weights whatever the device
        network = build_text_network(name, input_shape=input_shape, num_classes=num_classes)
        fixes: list[str] = []
        if private:
            from privacy.sample_level import make_compatible

            network, fixes = make_compatible(network)  # nn.LSTM -> opacus.layers.DPLSTM
    model = TextTorchModel(name, network.to(device), input_shape=input_shape, num_classes=num_classes, device=device)
    model.dp_fixes = fixes
    return model
