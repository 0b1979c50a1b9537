"""prosparse: fast CPU inference for activation-sparse LLaMA-family models.

    from prosparse import Runtime
    with Runtime() as rt:                      # the default model, SmolLM2-135M-Instruct
        print(rt.generate("The capital of France is", max_tokens=16, temperature=0))

``Runtime`` is imported on first use, so the converter and training tools (``prosparse.convert``,
``prosparse.training``) never load the C extension.
"""

__version__ = "0.1.0"

__all__ = ["Runtime", "__version__"]


def __getattr__(name: str):
    if name == "Runtime":
        from .api import Runtime
        return Runtime
    raise AttributeError(f"module 'prosparse' has no attribute {name!r}")
