"""longctx: extend the context window of pretrained RoPE language models by fine-tuning (LongLoRA style).

Importing longctx changes nothing: transformers is patched only by `longctx.apply(model, ...)`, on that model
instance, and `handle.remove()` undoes it.
"""

from longctx.config import Config, ConfigError, load_config
from longctx.patch import Handle, apply

__all__ = ["Config", "ConfigError", "Handle", "apply", "load_config"]
__version__ = "0.1.0"
