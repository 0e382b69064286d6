"""mpnn: multi-process neural-network training on plain CPUs, with a PyTorch-shaped API.

import mpnn
x = mpnn.tensor([[1.0, 2.0]], requires_grad=True)
model = mpnn.nn.Sequential(mpnn.nn.Linear(2, 8), mpnn.nn.ReLU(), mpnn.nn.Linear(8, 1))
"""

import mpnn.threads  # noqa: F401  first, before NumPy loads: under mpirun/srun, one BLAS/Numba thread per rank
from mpnn._version import __version__  # the one version source (pyproject.toml reads it too)
from mpnn.core import (
    GradcheckError,
    OpError,
    Tensor,
    bool_,
    enable_grad,
    float16,
    float32,
    float64,
    gradcheck,
    int32,
    int64,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
    tensor,
)
from mpnn.core.activation import dropout, log_softmax, softmax
from mpnn.core.factory import (
    arange,
    empty,
    eye,
    from_numpy,
    full,
    linspace,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    randperm,
    zeros,
    zeros_like,
)
from mpnn.core.ops import (
    abs,
    amax,
    amin,
    argmax,
    argmin,
    argsort,
    cat,
    chunk,
    clip,
    concat,
    cumsum,
    einsum,
    exp,
    flatten,
    flip,
    gather,
    log,
    logsumexp,
    matmul,
    max,
    maximum,
    mean,
    min,
    minimum,
    multinomial,
    permute,
    prod,
    relu,
    reshape,
    roll,
    scatter,
    scatter_add,
    sigmoid,
    sort,
    split,
    sqrt,
    squeeze,
    stack,
    sum,
    tanh,
    topk,
    transpose,
    tril,
    triu,
    unsqueeze,
    where,
)
from mpnn.core.fpenv import set_flush_denormal
from mpnn.core.random import manual_seed
from mpnn.core.serialize import load, save
from mpnn import data, launch, nn, optim, profiler, telemetry  # noqa: E402  (subpackages after the engine they build on)
from mpnn.parallel import DataParallel  # noqa: E402
from mpnn.checkpoint import Checkpointer  # noqa: E402
from mpnn.checkpoint.weights import load_safetensors, save_safetensors  # noqa: E402
from mpnn import onnx  # noqa: E402  (mpnn.onnx.export; the onnx package itself loads only when it is called)
from mpnn.runtime import get_comm, init  # noqa: E402
from mpnn.capture import compile  # noqa: E402  (mpnn.compile(fn): capture a step once, replay it after)

clamp = clip
long = int64
float = float32
double = float64
half = float16
