"""prosparse.convert: Hugging Face checkpoints → GGUF files that prosparse runs."""

from .gguf_writer import OUTTYPES, write_llama_gguf

__all__ = ["OUTTYPES", "write_llama_gguf"]
