r"""Feature maps $\phi$ for keys and queries of test-time memories.

Every map is an Equinox module acting on arrays of shape `(*batch, d)` and knows its output
dimension through `out_dim(d)`. The exact polynomial maps satisfy
$\langle\phi_a(q), \phi_a(k)\rangle = \sum_i a_i (q^\top k)^i$ (ATLAS Eqs 4, 5, 22; digest §3).
"""

from ._base import AbstractFeatureMap as AbstractFeatureMap
from ._elementwise import Elementwise as Elementwise
from ._identity import Identity as Identity
from ._polynomial import Polynomial as Polynomial
from ._random import RandomFeatures as RandomFeatures
from ._taylor import TaylorExp as TaylorExp
