"""Small elementwise Numba kernels the op set needs and NumPy lacks (erf for the exact GELU)."""
import math

from numba import vectorize


@vectorize(["float32(float32)", "float64(float64)"], cache=True)
def erf(x):
    """The error function, elementwise (NumPy has none; SciPy is not a dependency); float16 goes via float32."""
    return math.erf(x)
