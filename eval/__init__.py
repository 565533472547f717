"""lkspec eval package."""
