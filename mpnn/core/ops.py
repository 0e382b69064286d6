"""The op set in one namespace (``from mpnn.core import ops; ops.add(a, b)``), gathered from the family modules:

    elementwise  add sub mul div pow maximum minimum neg exp log sqrt abs clip sign clone to_dtype, unbroadcast
    activation   relu leaky_relu sigmoid tanh gelu softmax log_softmax dropout
    reduce       sum mean var std max min amax amin argmax argmin prod logsumexp cumsum
    movement     reshape view flatten permute transpose t squeeze unsqueeze expand contiguous cat stack split chunk
                 tril triu repeat flip roll
    indexing     getitem where masked_fill embedding gather scatter scatter_add sort argsort topk
    linalg       matmul linear einsum
    random       multinomial
    inplace      setitem add_ sub_ mul_ div_ copy_ fill_ zero_ clamp_ relu_ masked_fill_
                 scatter_ scatter_add_
Losses, normalization, convolution, pooling and padding have modules of their own (loss, normalization, conv,
pool, pad). Each op's backward sits beside its forward in its family's file.
"""

from mpnn.core.activation import dropout, gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh  # noqa: F401
from mpnn.core.attention import scaled_dot_product_attention  # noqa: F401
from mpnn.core.elementwise import (  # noqa: F401
    _pair,
    abs,
    add,
    clip,
    clone,
    div,
    exp,
    log,
    maximum,
    minimum,
    mul,
    neg,
    pow,
    sign,
    sqrt,
    sub,
    to_dtype,
    unbroadcast,
)
from mpnn.core.indexing import (  # noqa: F401
    _is_basic,
    _unwrap_index,
    argsort,
    embedding,
    gather,
    getitem,
    masked_fill,
    scatter,
    scatter_add,
    sort,
    topk,
    where,
)
from mpnn.core.inplace import (  # noqa: F401
    add_,
    clamp_,
    copy_,
    div_,
    fill_,
    masked_fill_,
    mul_,
    relu_,
    scatter_,
    scatter_add_,
    setitem,
    sub_,
    zero_,
)
from mpnn.core.linalg import einsum, linear, matmul  # noqa: F401
from mpnn.core.movement import (  # noqa: F401
    cat,
    chunk,
    concat,
    contiguous,
    expand,
    flatten,
    flip,
    permute,
    repeat,
    reshape,
    roll,
    split,
    squeeze,
    stack,
    t,
    transpose,
    tril,
    triu,
    unsqueeze,
    view,
)
from mpnn.core.random import multinomial  # noqa: F401
from mpnn.core.reduce import amax, amin, argmax, argmin, cumsum, logsumexp, max, mean, min, prod, std, sum, var  # noqa: F401

clamp = clip
