"""lkspec trainer package."""
