"""lkspec cache package."""
