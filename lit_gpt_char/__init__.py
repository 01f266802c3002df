"""lit_gpt_char: the character-level GPT of "Let's build GPT", trained with PyTorch Lightning."""

from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "LitGPTCharError"]
__version__ = "0.1.0"
