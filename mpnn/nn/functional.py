"""Every layer's functional twin, with torch.nn.functional's names and signatures."""

from mpnn.core.activation import dropout, gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh
from mpnn.core.attention import scaled_dot_product_attention
from mpnn.core.conv import conv1d, conv2d
from mpnn.core.indexing import embedding
from mpnn.core.linalg import linear
from mpnn.core.loss import binary_cross_entropy_with_logits, cross_entropy, l1_loss, mse_loss, nll_loss
from mpnn.core.movement import flatten
from mpnn.core.normalization import batch_norm, layer_norm
from mpnn.core.pad import pad
from mpnn.core.pool import adaptive_avg_pool2d, avg_pool1d, avg_pool2d, max_pool1d, max_pool2d

__all__ = [
    "adaptive_avg_pool2d",
    "avg_pool1d",
    "avg_pool2d",
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "conv1d",
    "conv2d",
    "cross_entropy",
    "dropout",
    "embedding",
    "flatten",
    "gelu",
    "l1_loss",
    "layer_norm",
    "leaky_relu",
    "linear",
    "log_softmax",
    "max_pool1d",
    "max_pool2d",
    "mse_loss",
    "nll_loss",
    "pad",
    "relu",
    "scaled_dot_product_attention",
    "sigmoid",
    "softmax",
    "tanh",
]
