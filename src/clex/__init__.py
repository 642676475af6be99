"""clex: CLEX (Continuous Length EXtrapolation, Chen et al., ICLR 2024) for any RoPE model of transformers.

    import clex
    model = clex.apply_clex(model, clex.CLEXConfig(max_factor=16))   # learned, continuous RoPE scaling
    model.save_pretrained("out");  model = clex.load_model("out")
"""

from .checkpoint import load_model
from .config import CLEXConfig
from .patch import apply_clex, get_clex_rotary
from .rotary import CLEXDynamics, CLEXRotaryEmbedding

__version__ = "0.1.0"

__all__ = [
    "CLEXConfig",
    "CLEXDynamics",
    "CLEXRotaryEmbedding",
    "apply_clex",
    "get_clex_rotary",
    "load_model",
    "__version__",
]
