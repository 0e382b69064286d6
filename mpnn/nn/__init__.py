"""Layers, losses and containers with torch.nn's names, shapes and default initialisations."""

from mpnn.nn import functional, init, utils  # noqa: F401
from mpnn.nn.activation import GELU, Dropout, LeakyReLU, LogSoftmax, ReLU, Sigmoid, Softmax, Tanh
from mpnn.nn.container import ModuleDict, ModuleList, ParameterDict, ParameterList, Sequential
from mpnn.nn.conv import Conv1d, Conv2d
from mpnn.nn.linear import Embedding, Identity, Linear
from mpnn.nn.loss import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, NLLLoss
from mpnn.nn.module import Module, Parameter
from mpnn.nn.norm import BatchNorm1d, BatchNorm2d, LayerNorm
from mpnn.nn.pooling import AdaptiveAvgPool2d, AvgPool1d, AvgPool2d, Flatten, MaxPool1d, MaxPool2d
from mpnn.nn.transformer import (
    MultiheadAttention,
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool1d",
    "AvgPool2d",
    "BCEWithLogitsLoss",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Embedding",
    "Flatten",
    "GELU",
    "Identity",
    "LayerNorm",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MSELoss",
    "MaxPool1d",
    "MaxPool2d",
    "Module",
    "ModuleDict",
    "ModuleList",
    "MultiheadAttention",
    "NLLLoss",
    "Parameter",
    "ParameterDict",
    "ParameterList",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
    "functional",
    "init",
    "utils",
]
