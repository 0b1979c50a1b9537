"""prosparse: fast CPU inference for activation-sparse LLaMA-family models.

    from prosparse import Runtime
    with Runtime() as rt:                      # the default model, SmolLM2-135M-Instruct
        print(rt.generate("The capital of France is", max_tokens=16, temperature=0))
"""

__version__ = "0.1.0"

from .api import Runtime  # noqa: E402

__all__ = ["Runtime", "__version__"]
