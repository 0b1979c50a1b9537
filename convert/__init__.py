"""prosparse.convert: Hugging Face checkpoints → GGUF files that prosparse runs.

``convert_checkpoint`` (the ``prosparse-convert`` CLI as a function) reads a checkpoint directory
and writes one file; ``write_llama_gguf`` writes an in-memory state dict (tests, training).
"""

from .errors import (ConversionError, MissingFileError, OutputExistsError, PredictorError, TensorError,
                     UnsupportedModelError, VocabError)
from .gguf_writer import LAYOUTS, OUTTYPES, write_llama_gguf
from .hf_to_gguf import FORMATS, ConversionResult, convert_checkpoint

__all__ = ["ConversionError", "ConversionResult", "FORMATS", "LAYOUTS", "MissingFileError", "OUTTYPES",
           "OutputExistsError", "PredictorError", "TensorError", "UnsupportedModelError", "VocabError",
           "convert_checkpoint", "write_llama_gguf"]
