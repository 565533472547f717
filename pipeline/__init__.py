"""lkspec pipeline package."""
