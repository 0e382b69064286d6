"""MultiheadAttention, the Transformer encoder and decoder layers and stacks, and nn.Transformer, with torch.nn's
names, parameters and masks.

Parameter names, shapes and default initialisation are torch's (``in_proj_weight`` (3E, E) packed q/k/v,
``in_proj_bias``, ``out_proj.weight``/``out_proj.bias``; ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
when kdim or vdim differ from embed_dim), so state_dicts load both ways. Masks follow torch's conventions:
a bool ``attn_mask``/``key_padding_mask`` is True where a position may NOT be attended, a float mask is added
to the attention scores; both are merged into one additive mask. Internally the computation is batch-first;
``batch_first=False`` (torch's default) inputs are (L, N, E) and are transposed in and out.

With ``need_weights=False`` the attention itself goes through ``F.scaled_dot_product_attention`` when mpnn
provides it, and through the same explicit softmax(QK^T/sqrt(d) + mask) V otherwise.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from mpnn.core.movement import cat
from mpnn.core.tensor import Tensor, check_device, to_dtype
from mpnn.nn import functional as F
from mpnn.nn import init
from mpnn.nn.activation import Dropout
from mpnn.nn.container import ModuleList
from mpnn.nn.linear import Linear
from mpnn.nn.module import Module, Parameter
from mpnn.nn.norm import LayerNorm

__all__ = [
    "MultiheadAttention",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "generate_square_subsequent_mask",
]


def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
    """The (sz, sz) causal float mask: 0 on and below the diagonal, -inf above it (torch's
    ``nn.Transformer.generate_square_subsequent_mask``)."""
    check_device(device, "generate_square_subsequent_mask")
    dt = to_dtype(dtype)
    return Tensor(np.triu(np.full((sz, sz), -np.inf, dtype=dt), k=1))


def _additive_mask(mask, name: str, dtype) -> Tensor | None:
    """torch's canonical mask: bool (True = may not attend) becomes 0 / -inf in ``dtype``; float is kept as is."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        mask = Tensor(np.asarray(mask))
    kind = mask.data.dtype.kind
    if kind == "b":
        return Tensor(np.where(mask.data, -np.inf, 0).astype(dtype))
    if kind != "f":
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.data.dtype}")
    return mask


class MultiheadAttention(Module):
    """Multi-head attention as torch.nn.MultiheadAttention: softmax(Q K^T / sqrt(head_dim) + mask) V per head,
    heads concatenated and projected by ``out_proj``.

    ``forward`` returns ``(output, weights)``; ``weights`` (after dropout, as torch) is averaged over heads
    ((N, L, S)) unless ``average_attn_weights=False`` ((N, num_heads, L, S)), and None when
    ``need_weights=False``. ``is_causal`` is a hint that ``attn_mask`` is the causal mask, as in torch: it
    requires the mask, which is what is applied.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_device(device, "MultiheadAttention")
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"MultiheadAttention: embed_dim and num_heads must be greater than 0, got "
                f"embed_dim={embed_dim} and num_heads={num_heads} instead"
            )
        dt = to_dtype(dtype)
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(
                f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = Parameter(np.empty((embed_dim, embed_dim), dtype=dt))
            self.k_proj_weight = Parameter(np.empty((embed_dim, self.kdim), dtype=dt))
            self.v_proj_weight = Parameter(np.empty((embed_dim, self.vdim), dtype=dt))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = Parameter(np.empty((3 * embed_dim, embed_dim), dtype=dt))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(np.empty(3 * embed_dim, dtype=dt))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, dtype=dt)
        if add_bias_kv:
            self.bias_k = Parameter(np.empty((1, 1, embed_dim), dtype=dt))
            self.bias_v = Parameter(np.empty((1, 1, embed_dim), dtype=dt))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self):
        """torch's: xavier_uniform_ for the input projections, zero biases, xavier_normal_ for bias_k/bias_v;
        out_proj.weight keeps Linear's default init."""
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            init.xavier_uniform_(self.q_proj_weight)
            init.xavier_uniform_(self.k_proj_weight)
            init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            init.constant_(self.in_proj_bias, 0.0)
            init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            init.xavier_normal_(self.bias_v)

    def _project(self, query, key, value, same_qkv: bool):
        E, b = self.embed_dim, self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E : 2 * E], b[2 * E :])
        if not self._qkv_same_embed_dim:
            return (
                F.linear(query, self.q_proj_weight, bq),
                F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv),
            )
        w = self.in_proj_weight
        if same_qkv:  # self-attention: one (3E, E) product, as torch's packed projection
            return F.linear(query, w, b).split(E, dim=-1)
        return F.linear(query, w[:E], bq), F.linear(key, w[E : 2 * E], bk), F.linear(value, w[2 * E :], bv)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        E, H, hd = self.embed_dim, self.num_heads, self.head_dim
        same_qkv = query is key and key is value
        if query.dim() not in (2, 3):
            raise ValueError(
                f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor"
            )
        batched = query.dim() == 3
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"For {'batched' if batched else 'unbatched'} {query.dim()}-D `query`, expected "
                f"`key` and `value` to be {query.dim()}-D but found {key.dim()}-D and {value.dim()}-D "
                f"tensors respectively"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(
                f"For {'batched' if batched else 'unbatched'} {query.dim()}-D `query`, expected "
                f"`key_padding_mask` to be `None` or {query.dim() - 1}-D but found "
                f"{key_padding_mask.dim()}-D tensor instead"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use "
                "nn.transformer.generate_square_subsequent_mask to create this mask."
            )
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, qE = query.shape
        S = key.shape[1]
        if qE != E:
            raise ValueError(f"was expecting embedding dimension of {E}, but got {qE}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(
                f"key's sequence and batch dims {tuple(key.shape[:2])} do not match value's {tuple(value.shape[:2])}"
            )

        dtype = query.data.dtype
        mask = _additive_mask(attn_mask, "attn_mask", dtype)
        if mask is not None:
            want = (L, S) if mask.dim() == 2 else (N * H, L, S)
            if tuple(mask.shape) != want:
                raise RuntimeError(
                    f"The shape of the {mask.dim()}D attn_mask is {tuple(mask.shape)}, but should be {want}."
                )
        kpm = _additive_mask(key_padding_mask, "key_padding_mask", dtype)
        if kpm is not None and tuple(kpm.shape) != (N, S):
            raise RuntimeError(f"expecting key_padding_mask shape of {(N, S)}, but got {tuple(kpm.shape)}")

        q, k, v = self._project(query, key, value, same_qkv)
        if self.bias_k is not None:
            k = cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        S_k = k.shape[1]
        q = q.reshape(N, L, H, hd).transpose(1, 2)  # (N, H, L, hd)
        k = k.reshape(N, S_k, H, hd).transpose(1, 2)
        v = v.reshape(N, S_k, H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
            mask = None if mask is None else F.pad(mask, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        S_k = k.shape[2]
        if mask is not None:
            mask = mask.reshape(1, 1, L, S_k) if mask.dim() == 2 else mask.reshape(N, H, L, S_k)
        if kpm is not None:
            kpm = kpm.reshape(N, 1, 1, S_k)
            mask = kpm if mask is None else mask + kpm

        dropout_p = self.dropout if self.training else 0.0
        sdpa = getattr(F, "scaled_dot_product_attention", None)
        weights = None
        if need_weights or sdpa is None:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, dropout_p)
            out = weights @ v
        else:
            out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))

    def extra_repr(self):
        return ""


def _activation(activation):
    if isinstance(activation, str):
        if activation == "relu":
            return F.relu
        if activation == "gelu":
            return F.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    return activation


class TransformerEncoderLayer(Module):
    """Self-attention and a feed-forward block, each with a residual connection and LayerNorm (post-norm by
    default, pre-norm with ``norm_first=True``), as torch.nn.TransformerEncoderLayer with its submodule names:
    self_attn, linear1, dropout, linear2, norm1, norm2, dropout1, dropout2 (and activation when it is a Module).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_device(device, "TransformerEncoderLayer")
        self.self_attn = MultiheadAttention(
            d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first, dtype=dtype
        )
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, dtype=dtype)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, dtype=dtype)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        x = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoder(Module):
    """``num_layers`` deep copies of ``encoder_layer`` (as ``layers.0``, ``layers.1``, ...) applied in turn, then
    the optional final ``norm``. ``enable_nested_tensor`` and ``mask_check`` (torch's sparsity fast path) are
    accepted and change nothing: mpnn has no nested tensors; padded positions are computed and masked."""

    def __init__(
        self,
        encoder_layer: Module,
        num_layers: int,
        norm: Module | None = None,
        enable_nested_tensor: bool = True,
        mask_check: bool = True,
    ):
        super().__init__()
        self.layers = ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.enable_nested_tensor = enable_nested_tensor
        self.use_nested_tensor = False
        self.mask_check = mask_check

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal: bool | None = None):
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoderLayer(Module):
    """Self-attention over the target, attention from the target to the encoder's ``memory``, and a feed-forward
    block, each with a residual connection and LayerNorm (post-norm by default, pre-norm with ``norm_first``), as
    torch.nn.TransformerDecoderLayer with its submodule names: self_attn, multihead_attn, linear1, dropout,
    linear2, norm1, norm2, norm3, dropout1, dropout2, dropout3 (and activation when it is a Module)."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_device(device, "TransformerDecoderLayer")
        attn = dict(dropout=dropout, bias=bias, batch_first=batch_first, dtype=dtype)
        self.self_attn = MultiheadAttention(d_model, nhead, **attn)
        self.multihead_attn = MultiheadAttention(d_model, nhead, **attn)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, dtype=dtype)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, dtype=dtype)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = _activation(activation)

    def forward(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ):
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        x = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal=False):
        x = self.multihead_attn(
            x,
            mem,
            mem,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            is_causal=is_causal,
        )[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoder(Module):
    """``num_layers`` deep copies of ``decoder_layer`` (``layers.0``, ``layers.1``, ...), each reading the same
    ``memory``, then the optional final ``norm``, as torch.nn.TransformerDecoder."""

    def __init__(self, decoder_layer: Module, num_layers: int, norm: Module | None = None):
        super().__init__()
        self.layers = ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ):
        output = tgt
        for mod in self.layers:
            output = mod(
                output,
                memory,
                tgt_mask=tgt_mask,
                memory_mask=memory_mask,
                tgt_key_padding_mask=tgt_key_padding_mask,
                memory_key_padding_mask=memory_key_padding_mask,
                tgt_is_causal=bool(tgt_is_causal),
                memory_is_causal=memory_is_causal,
            )
        if self.norm is not None:
            output = self.norm(output)
        return output


class Transformer(Module):
    """The encoder-decoder model of torch.nn.Transformer: an ``encoder`` (TransformerEncoder with a final
    LayerNorm) over ``src`` and a ``decoder`` (TransformerDecoder with a final LayerNorm) over ``tgt`` that
    attends to the encoder's output; every weight matrix xavier-uniform initialised, as torch's. A
    ``custom_encoder``/``custom_decoder`` replaces the built one."""

    def __init__(
        self,
        d_model: int = 512,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        custom_encoder: Module | None = None,
        custom_decoder: Module | None = None,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_device(device, "Transformer")
        layer_args = dict(
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            layer_norm_eps=layer_norm_eps,
            batch_first=batch_first,
            norm_first=norm_first,
            bias=bias,
            dtype=dtype,
        )
        if custom_encoder is not None:
            self.encoder = custom_encoder
        else:
            self.encoder = TransformerEncoder(
                TransformerEncoderLayer(d_model, nhead, **layer_args),
                num_encoder_layers,
                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype),
            )
        if custom_decoder is not None:
            self.decoder = custom_decoder
        else:
            self.decoder = TransformerDecoder(
                TransformerDecoderLayer(d_model, nhead, **layer_args),
                num_decoder_layers,
                LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype),
            )
        for p in self.parameters():
            if p.dim() > 1:
                init.xavier_uniform_(p)
        self.d_model = d_model
        self.nhead = nhead
        self.batch_first = batch_first

    def forward(
        self,
        src,
        tgt,
        src_mask=None,
        tgt_mask=None,
        memory_mask=None,
        src_key_padding_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        src_is_causal: bool | None = None,
        tgt_is_causal: bool | None = None,
        memory_is_causal: bool = False,
    ):
        batched = src.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if batched and src.shape[batch_dim] != tgt.shape[batch_dim]:
            raise RuntimeError("the batch number of src and tgt must be equal")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise RuntimeError("the feature number of src and tgt must be equal to d_model")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(
            tgt,
            memory,
            tgt_mask=tgt_mask,
            memory_mask=memory_mask,
            tgt_key_padding_mask=tgt_key_padding_mask,
            memory_key_padding_mask=memory_key_padding_mask,
            tgt_is_causal=tgt_is_causal,
            memory_is_causal=memory_is_causal,
        )

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None) -> Tensor:
        """The (sz, sz) causal float mask (0 on and below the diagonal, -inf above), as torch's."""
        return generate_square_subsequent_mask(sz, device=device, dtype=dtype)
