"""lkspec eval package: the speculative decoder, its statistics and reports."""
from eval.drafters import load_drafter

__all__ = ["load_drafter"]
